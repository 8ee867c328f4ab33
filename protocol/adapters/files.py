"""File I/O at the edge: atomic writes, owner-only secrets, CSV, policy and certification files.

The core serializes (``CustodianPolicy.to_json``/``from_json``,
``Certification.to_bytes``/``from_bytes``) and never opens a file; the CLIs and services read
and write through these helpers.  Every write goes to a temporary file that starts at mode
0600 and is renamed over the target, so a crash leaves the old file or the new one, never half
of one, and a private key never exists with looser permissions.
See docs/architecture.md, Layers.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Literal, TextIO

from protocol.engines.named import Certification
from protocol.errors import ProtocolError
from protocol.policy.decide import CustodianPolicy

__all__ = [
    "open_csv",
    "read_certification",
    "read_policy",
    "read_secret",
    "write_certification",
    "write_file_atomic",
    "write_policy",
    "write_secret",
]

PathLike = str | os.PathLike[str]


def write_file_atomic(path: PathLike, data: bytes, *, mode: int = 0o600,
                      overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename), with ``mode``.

    Without ``overwrite`` an existing file (or dangling symlink) raises FileExistsError.
    """
    target = Path(path)
    if not overwrite and (target.exists() or target.is_symlink()):
        raise FileExistsError(f"{target} already exists (use --force to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_secret(path: PathLike, data: bytes, *, force: bool = False) -> None:
    """Write a secret file with mode 0600; never silently overwrite one."""
    write_file_atomic(path, data, mode=0o600, overwrite=force)


def read_secret(path: PathLike) -> bytes:
    """Read a secret file, refusing one that group or others can read."""
    source = Path(path)
    mode = source.stat().st_mode
    if mode & 0o077:
        raise PermissionError(f"{source} is readable by group/others (mode {oct(mode & 0o777)}); "
                              "chmod 600 it")
    return source.read_bytes()


def read_policy(path: PathLike) -> CustodianPolicy:
    """Read a custodian policy file written by :func:`write_policy`."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"custodian policy file {path} is not valid JSON: {exc}") from exc
    return CustodianPolicy.from_json(doc)


def write_policy(policy: CustodianPolicy, path: PathLike) -> None:
    """Write the policy as JSON, atomically (a crash never leaves a half-written policy)."""
    text = json.dumps(policy.to_json(), indent=2, sort_keys=True) + "\n"
    write_file_atomic(path, text.encode("utf-8"))


def write_certification(certification: Certification, path: PathLike) -> None:
    """Write a named-subject certification, mode 0600: its binding secret is a secret."""
    write_file_atomic(path, certification.to_bytes())


def read_certification(path: PathLike) -> Certification:
    """Read a certification written by :func:`write_certification`; errors name the file."""
    try:
        return Certification.from_bytes(Path(path).read_bytes())
    except ProtocolError as exc:
        raise ProtocolError(f"{path}: {exc}") from None


def open_csv(path: PathLike, mode: Literal["r", "w"] = "r") -> TextIO:
    """Open a records CSV the way ``protocol.domain.records`` reads and writes it.

    Reading strips a byte-order mark (spreadsheet exports add one); ``newline=""`` leaves
    line endings to the ``csv`` module, as it requires.
    """
    encoding = "utf-8-sig" if mode == "r" else "utf-8"
    return open(path, mode, newline="", encoding=encoding)
