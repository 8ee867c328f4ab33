"""The requester's cache of key-epoch tag sets (docs/architecture.md, National custodian).

In epoch mode the custodian's compressed tag set is fetched once per key epoch
(``FetchTagSet``, accounted by the custodian) and kept here, owner-only, for every later
authorization of the same epoch.  The custodian may be hostile, so what it streams is checked
before it is kept: the epoch id is a plain name (it becomes a directory), the fingerprint
length and tag counts are consistent across chunks, every chunk decodes (bounded, strictly
increasing, exact lengths: ``protocol.crypto.tagset``), the chunks of a rule continue each
other and add up to the announced count, and the bytes received are bounded by that count.
A fetch is written to a temporary directory and renamed into place whole.

Layout: ``<root>/<custodian id>/<epoch id>/manifest.json`` and one ``rule-<n>.chunks`` file
per rule (length-prefixed chunks), read back as a stream by :class:`CachedTagSet`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import grpc
import numpy as np

from proto import codec
from proto import service_kit as kit
from protocol.adapters.files import make_private_dir
from protocol.crypto import tagset
from protocol.domain.identity import validate_agency_id
from protocol.engines.epoch import TagSetChunk, TagSetRequest
from protocol.errors import ProtocolError
from protocol.policy.decide import SignedAuthorization, check_epoch_id

MANIFEST = "manifest.json"
_LENGTH = 4  # bytes of each chunk's length prefix in a cached rule file
#: Most tags one rule of an epoch may announce (a national file has ~2^28 records).
MAX_RULE_TAGS = 1 << 34


class CachedTagSet:
    """One cached epoch (``engines.base.EpochTagSet``): chunks are read from disk lazily."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self._manifest = manifest

    @classmethod
    def open(cls, root: Path) -> CachedTagSet:
        manifest = json.loads((root / MANIFEST).read_text("utf-8"))
        return cls(root, manifest)

    @property
    def epoch_id(self) -> str:
        return str(self._manifest["epoch_id"])

    @property
    def bits(self) -> int:
        return int(self._manifest["bits"])

    @property
    def rules(self) -> tuple[str, ...]:
        return tuple(self._manifest["rules"])

    def tags(self, rule_id: str) -> int:
        return int(self._manifest["rules"][rule_id]["tags"])

    def tagset_bytes(self, rule_id: str) -> int:
        return int(self._manifest["rules"][rule_id]["bytes"])

    def tagset_chunks(self, rule_id: str) -> Iterator[bytes]:
        path = self.root / str(self._manifest["rules"][rule_id]["file"])
        with path.open("rb") as f:
            while header := f.read(_LENGTH):
                size = int.from_bytes(header, "big")
                if size > tagset.MAX_CHUNK_BYTES:
                    raise ProtocolError(f"cached tag set {path} is corrupt")
                yield f.read(size)


class _RuleWriter:
    """Checks and writes one rule's chunks as they arrive."""

    def __init__(self, out: BinaryIO | _NullFile, rule_id: str, bits: int, tags: int) -> None:
        self.out, self.rule_id, self.bits, self.tags = out, rule_id, bits, tags
        self.count = 0
        self.bytes = 0
        self._last: Any = None
        # Golomb-Rice needs about k + 2 bits per tag; allow generous slack, never unbounded.
        self.limit = 2 * tags * (bits + 8) // 8 + 64 * tagset.MAX_CHUNK_BYTES

    def add(self, chunk: bytes) -> None:
        self.bytes += len(chunk)
        if self.bytes > self.limit:
            raise ProtocolError(f"tag set of rule {self.rule_id}: more than {self.limit:,} "
                                f"bytes for {self.tags:,} tags")
        try:
            block = next(tagset.decode_chunks([chunk], bits=self.bits, max_tags=self.tags))
        except (ValueError, StopIteration) as exc:
            raise ProtocolError(f"tag set of rule {self.rule_id}: {exc}") from exc
        if self._last is not None and not block[0] > self._last:
            raise ProtocolError(f"tag set of rule {self.rule_id}: a chunk does not continue "
                                "above the previous one")
        self._last = np.copy(block[-1])
        self.count += int(block.size)
        if self.count > self.tags:
            raise ProtocolError(f"tag set of rule {self.rule_id}: more than the announced "
                                f"{self.tags:,} tags")
        self.out.write(len(chunk).to_bytes(_LENGTH, "big") + chunk)


class TagSetCache:
    """Tag sets of the custodians' key epochs under ``root`` (owner-only)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def _custodian_dir(self, custodian_id: str) -> Path:
        return self.root / validate_agency_id(custodian_id)

    def cached(self, custodian_id: str, rules: Sequence[str]) -> CachedTagSet | None:
        """The newest cached epoch of ``custodian_id`` that holds every rule, if any."""
        pointer = self._custodian_dir(custodian_id) / "current"
        if not pointer.is_file():
            return None
        epoch_dir = self._custodian_dir(custodian_id) / check_epoch_id(
            pointer.read_text("utf-8").strip())
        if not (epoch_dir / MANIFEST).is_file():
            return None
        cached = CachedTagSet.open(epoch_dir)
        return cached if set(rules) <= set(cached.rules) else None

    def fetch(self, channel: grpc.Channel, signed: SignedAuthorization,
              rules: Sequence[str], *, timeout: float = 6 * 3600) -> tuple[CachedTagSet, int]:
        """The current epoch's tag set of ``rules`` and the tag-set bytes received (0 when
        the cached epoch is current: the custodian then sends headers only)."""
        custodian_id = signed.authorization.custodian_id
        have = self.cached(custodian_id, rules)
        stub = kit.pb2_grpc.CustodianStub(channel)
        request = TagSetRequest(signed.to_bytes(), tuple(rules),
                                have.epoch_id if have is not None else "")
        stream = stub.FetchTagSet(codec.to_pb(request), timeout=timeout)
        base = self._custodian_dir(custodian_id)
        make_private_dir(base)
        work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=base))
        try:
            result = self._receive(stream, work, tuple(rules), have)
            if result is have:
                return have, 0
            fetched, received = result, sum(result.tagset_bytes(r) for r in rules)
            final = base / fetched.epoch_id
            if final.exists():
                shutil.rmtree(final)
            os.replace(work, final)
            _write_private(base / "current", fetched.epoch_id.encode("utf-8"))
            return CachedTagSet.open(final), received
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)

    def _receive(self, stream: Any, work: Path, rules: tuple[str, ...],
                 have: CachedTagSet | None) -> CachedTagSet:
        epoch_id = ""
        bits = 0
        writers: dict[str, _RuleWriter] = {}
        files: list[BinaryIO] = []
        unchanged = False
        try:
            for pb in stream:
                msg = codec.from_pb(TagSetChunk, pb)
                if not epoch_id:
                    try:
                        epoch_id = check_epoch_id(msg.epoch_id)
                    except ValueError as exc:
                        raise ProtocolError(f"custodian sent a bad epoch id: {exc}") from exc
                    bits = msg.bits
                    unchanged = msg.unchanged
                    if not tagset.SECURITY_BITS <= bits <= tagset.MAX_BITS:
                        raise ProtocolError(f"custodian announces {bits}-bit fingerprints")
                if (msg.epoch_id, msg.bits, msg.unchanged) != (epoch_id, bits, unchanged):
                    raise ProtocolError("custodian changed the epoch header within one fetch")
                if msg.rule_id not in rules:
                    raise ProtocolError(f"custodian sent rule {msg.rule_id!r}, not requested")
                if not 0 <= msg.rule_tags <= MAX_RULE_TAGS:
                    raise ProtocolError(f"custodian announces {msg.rule_tags:,} tags")
                writer = writers.get(msg.rule_id)
                if writer is None:
                    if unchanged:
                        writers[msg.rule_id] = _RuleWriter(_NullFile(), msg.rule_id, bits,
                                                           msg.rule_tags)
                        continue
                    f: BinaryIO = os.fdopen(os.open(
                        work / f"rule-{len(writers)}.chunks",
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
                    files.append(f)
                    writer = writers[msg.rule_id] = _RuleWriter(f, msg.rule_id, bits,
                                                                msg.rule_tags)
                elif msg.rule_tags != writer.tags:
                    raise ProtocolError(f"custodian changed the tag count of {msg.rule_id}")
                if unchanged and msg.chunk:
                    raise ProtocolError("custodian sent tags for an unchanged epoch")
                if msg.chunk:
                    writer.add(msg.chunk)
            for f in files:
                f.flush()
                os.fsync(f.fileno())
        finally:
            for f in files:
                f.close()
        if set(writers) != set(rules):
            raise ProtocolError(f"custodian sent rules {sorted(writers)}, not {sorted(rules)}")
        if unchanged:
            if have is None or have.epoch_id != epoch_id or any(
                    have.tags(r) != writers[r].tags for r in rules) or have.bits != bits:
                raise ProtocolError("custodian says the epoch is unchanged, but it differs "
                                    "from the cached one")
            return have
        for w in writers.values():
            if w.count != w.tags:
                raise ProtocolError(f"tag set of rule {w.rule_id}: {w.count:,} tags received, "
                                    f"{w.tags:,} announced")
        manifest = {"epoch_id": epoch_id, "bits": bits, "rules": {
            r: {"tags": w.tags, "bytes": w.bytes, "file": f"rule-{i}.chunks"}
            for i, (r, w) in enumerate(writers.items())}}
        _write_private(work / MANIFEST, json.dumps(manifest).encode("utf-8"))
        return CachedTagSet(work, manifest)


class _NullFile:
    """Where an unchanged epoch's headers go: nothing is written."""

    def write(self, data: bytes) -> int:
        return len(data)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` owner-only and durably, replacing ``path`` atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
