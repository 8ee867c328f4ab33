"""File I/O at the edge: private files and directories, atomic writes, CSV, policy files.

The core serializes (``CustodianPolicy.to_json``/``from_json``,
``Certification.to_bytes``/``from_bytes``) and never opens a file; the CLIs and services read
and write through these helpers.  Every write goes to a temporary file that starts at mode
0600 and is renamed over the target, so a crash leaves the old file or the new one, never half
of one, and a private key never exists with looser permissions.

Everything that holds disclosed data, keys or audit (ledgers and their SQLite sidecars, result
stores, logs, secrets) is owner-only: files 0600, the directories created for them 0700, from
the moment they exist (:func:`make_private_dir`, :func:`create_private_file`,
:func:`open_private_log`); services also run under :func:`use_private_umask` so files that
libraries create are covered too.  See docs/architecture.md, Files and logs.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Literal, TextIO

from protocol.engines.named import Certification
from protocol.errors import ProtocolError
from protocol.policy.decide import CustodianPolicy

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "create_private_file",
    "make_private_dir",
    "open_csv",
    "open_private_log",
    "read_certification",
    "read_policy",
    "read_secret",
    "sha256_file",
    "use_private_umask",
    "write_certification",
    "write_file_atomic",
    "write_policy",
    "write_secret",
]

PathLike = str | os.PathLike[str]

PRIVATE_FILE_MODE = 0o600
"""Mode of every file holding disclosed data, keys or audit: owner read/write only."""
PRIVATE_DIR_MODE = 0o700
"""Mode of every directory this system creates for such files."""
PRIVATE_UMASK = 0o077
"""Process umask of the services: whatever a library creates is owner-only too."""


def use_private_umask() -> int:
    """Set the process umask to 0077 and return the previous one.

    SQLite, gRPC and the interpreter create files of their own (journals, WAL and shared-memory
    sidecars, crash output); with this umask none of them can be group- or world-readable even
    where this code does not create the file itself.  Process-wide, so it is called once at the
    start of a service process, never around individual calls in a threaded server.
    """
    return os.umask(PRIVATE_UMASK)


def make_private_dir(path: PathLike) -> Path:
    """Create ``path`` and any missing parents with mode 0700; return it.

    Directories that already exist are left as they are: they may be the operator's own
    (a home directory, ``/tmp``), and tightening them would be a surprise.
    """
    target = Path(path)
    missing: list[Path] = []
    probe = target
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # created concurrently: not ours to change
        os.chmod(directory, PRIVATE_DIR_MODE)  # mkdir's mode is filtered by the umask
    if not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    return target


def _tighten(fd: int, target: Path) -> None:
    """Refuse anything but a regular file; make one we own 0600 if it is looser."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{target} is not a regular file")
    if stat.S_IMODE(info.st_mode) != PRIVATE_FILE_MODE and info.st_uid == os.geteuid():
        # O_CREAT's mode is filtered by the umask, and an existing file keeps its mode.
        os.fchmod(fd, PRIVATE_FILE_MODE)


def _open_private_fd(path: PathLike, flags: int) -> int:
    """Open (creating if absent) a regular file with mode 0600, tightening an existing one."""
    target = Path(path)
    make_private_dir(target.parent)
    fd = os.open(target, flags | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        _tighten(fd, target)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_private_file(path: PathLike) -> Path:
    """Make sure ``path`` exists as a regular file with mode 0600 (created empty if absent).

    For files a library then opens itself (a SQLite database): SQLite gives its journal, WAL
    and shared-memory files the database file's mode, so they are 0600 as well.  An existing
    file of ours with a looser mode is tightened, since its content is what needs the
    protection; one that belongs to someone else (an inspector reading a copy it may only
    read) is opened read-only and left as it is.
    """
    target = Path(path)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block here
    except FileNotFoundError:
        fd = _open_private_fd(target, os.O_WRONLY)
    else:
        try:
            _tighten(fd, target)
        except BaseException:
            os.close(fd)
            raise
    os.close(fd)
    return target


def open_private_log(path: PathLike) -> TextIO:
    """Open a log file for appending JSON lines, mode 0600, line-buffered."""
    fd = _open_private_fd(path, os.O_WRONLY | os.O_APPEND)
    return os.fdopen(fd, "a", buffering=1, encoding="utf-8")


def write_file_atomic(path: PathLike, data: bytes, *, mode: int = 0o600,
                      overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename), with ``mode``.

    Without ``overwrite`` an existing file (or dangling symlink) raises FileExistsError.
    """
    target = Path(path)
    if not overwrite and (target.exists() or target.is_symlink()):
        raise FileExistsError(f"{target} already exists (use --force to replace it)")
    make_private_dir(target.parent)
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


def sha256_file(path: PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB blocks: manifests pin large shards and scenario
    files without ever holding one in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def open_csv(path: PathLike, mode: Literal["r", "w"] = "r") -> TextIO:
    """Open a records CSV the way ``protocol.domain.records`` reads and writes it.

    Reading strips a byte-order mark (spreadsheet exports add one); ``newline=""`` leaves
    line endings to the ``csv`` module, as it requires.
    """
    encoding = "utf-8-sig" if mode == "r" else "utf-8"
    return open(path, mode, newline="", encoding=encoding)
