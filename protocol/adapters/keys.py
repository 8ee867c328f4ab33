"""Key files both agencies use: Ed25519 signing keys and the peers' public keys.

A signing key is a PKCS#8 PEM file (mode 0600, see ``files.write_secret``); its public half
is ``<stem>.pub.json`` holding ``{"public_key": hex}``, the file a peer agency is given.
Shared here so neither agency's CLI imports the other's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.adapters.files import read_secret, write_file_atomic, write_secret
from protocol.crypto.oprf import deserialize_element
from protocol.errors import InvalidElementError

__all__ = ["load_public_key_json", "load_signing_key", "parse_agency_keys", "write_signing_key"]


def write_signing_key(out: Path, stem: str, *, force: bool) -> Ed25519PrivateKey:
    """Generate a signing key: ``<stem>.key`` (0600) and ``<stem>.pub.json`` in ``out``."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_secret(out / f"{stem}.key", pem, force=force)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    doc = json.dumps({"public_key": raw.hex()}) + "\n"
    write_file_atomic(out / f"{stem}.pub.json", doc.encode(), mode=0o644)
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read a signing key, refusing a file that group or others can read."""
    key = serialization.load_pem_private_key(read_secret(path), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key_json(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Read a ``<stem>.pub.json`` written by :func:`write_signing_key`."""
    try:
        doc = json.loads(Path(path).read_text())
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(doc["public_key"]).strip()))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not an Ed25519 public key file: {exc}") from exc


def parse_agency_keys(items: Iterable[str]) -> dict[str, Ed25519PublicKey]:
    """``agency=path.pub.json`` pairs -> {agency: key}."""
    out: dict[str, Ed25519PublicKey] = {}
    for item in items:
        agency, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"expected AGENCY=PATH, got {item!r}")
        out[agency] = load_public_key_json(Path(path))
    return out


#: The file a custodian publishes its POPRF evaluation key in (docs/architecture.md,
#: Verifiable evaluation); the authority pins its ``public_key`` in authorizations.
EVALUATION_KEY_FORMAT = "gated-psi/evaluation-key/v1"


def write_evaluation_key(path: Path, custodian_id: str, public_key: bytes) -> None:
    """Publish a custodian's RFC 9497 POPRF public key (ristretto255-SHA512, mode 2)."""
    doc = {"format": EVALUATION_KEY_FORMAT, "custodian_id": custodian_id,
           "suite": "ristretto255-SHA512", "mode": 2, "public_key": public_key.hex()}
    write_file_atomic(path, (json.dumps(doc, indent=2) + "\n").encode(), mode=0o644)


def load_evaluation_key(path: str | os.PathLike[str]) -> tuple[str, bytes]:
    """(custodian id, public key) of a file written by :func:`write_evaluation_key`.

    The key is checked to be a canonical non-identity ristretto255 element here, so a bad
    file is refused when the authority issues, not when a session opens.
    """
    try:
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != EVALUATION_KEY_FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, not {EVALUATION_KEY_FORMAT!r}")
        if doc.get("mode") != 2 or doc.get("suite") != "ristretto255-SHA512":
            raise ValueError("not an RFC 9497 POPRF ristretto255-SHA512 key")
        key = deserialize_element(bytes.fromhex(str(doc["public_key"]).strip()))
        return str(doc["custodian_id"]), key
    except (KeyError, TypeError, ValueError, AttributeError, InvalidElementError) as exc:
        raise ValueError(f"{path} is not an evaluation key file: {exc}") from exc
