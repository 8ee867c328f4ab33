"""Bit-matrix plumbing for the KKRT engine: transposes and column PRGs, vectorized.

IKNP-style OT extension lives in two layouts of one bit matrix:

* **rows**: one row per OPRF instance (bin), ``width`` bits packed most-significant bit
  first into ``width // 8`` bytes (``np.packbits`` order).  Code words, ``t0`` rows and
  ``q`` rows are hashed in this layout.
* **columns**: one column per base OT, the bit of row ``r`` at byte ``r // 8``, bit
  ``7 - r % 8``.  Base-OT seeds expand into columns, and the extension message carries
  columns.

The transpose between them is the hot inner step, so it runs without per-bit work:
bytes are regrouped into 8x8 bit blocks held in ``uint64`` words, and each word is
transposed in three mask-and-shift rounds (the classic recursive 8x8 transpose), all as
whole-array numpy operations.  ``naive_*`` are the obvious unpackbits/packbits versions,
kept as the reference the tests compare against.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "ColumnPRG",
    "cols_to_rows",
    "naive_cols_to_rows",
    "naive_rows_to_cols",
    "rows_to_cols",
]

_M7 = np.uint64(0x00AA00AA00AA00AA)
_M14 = np.uint64(0x0000CCCC0000CCCC)
_M28 = np.uint64(0x00000000F0F0F0F0)
_S7, _S14, _S28 = np.uint64(7), np.uint64(14), np.uint64(28)


def _transpose_8x8(x: np.ndarray) -> np.ndarray:
    """Transpose the 8x8 bit matrix in every uint64 of ``x`` in place (bit 8a+c <-> 8c+a)."""
    t = x >> _S7
    t ^= x
    t &= _M7
    x ^= t
    x ^= t << _S7
    np.right_shift(x, _S14, out=t)
    t ^= x
    t &= _M14
    x ^= t
    x ^= t << _S14
    np.right_shift(x, _S28, out=t)
    t ^= x
    t &= _M28
    x ^= t
    x ^= t << _S28
    return x


def _check_2d(a: np.ndarray, what: str) -> None:
    if a.dtype != np.uint8 or a.ndim != 2:
        raise ValueError(f"{what} must be a 2-D uint8 array")


def rows_to_cols(rows: np.ndarray) -> np.ndarray:
    """(R, W/8) packed rows -> (W, R/8) packed columns; R and W multiples of 8."""
    _check_2d(rows, "rows")
    n_rows, row_bytes = rows.shape
    if n_rows % 8:
        raise ValueError(f"row count {n_rows} is not a multiple of 8")
    groups = n_rows // 8
    # word (g, b) holds rows 8g..8g+7 of byte column b, row 8g+r at byte 7-r
    words = np.ascontiguousarray(rows.reshape(groups, 8, row_bytes)[:, ::-1, :].transpose(0, 2, 1))
    out = _transpose_8x8(words.view(np.uint64).reshape(groups, row_bytes))
    blocks = out.view(np.uint8).reshape(groups, row_bytes, 8)[:, :, ::-1]
    return np.ascontiguousarray(blocks.transpose(1, 2, 0)).reshape(row_bytes * 8, groups)


def cols_to_rows(cols: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(W, R/8) packed columns -> (R, W/8) packed rows; the inverse of ``rows_to_cols``.

    ``out`` (a C-contiguous (R, W/8) uint8 array) receives the rows without a copy.
    """
    _check_2d(cols, "cols")
    width, groups = cols.shape
    if width % 8:
        raise ValueError(f"column count {width} is not a multiple of 8")
    row_bytes = width // 8
    words = np.ascontiguousarray(cols.reshape(row_bytes, 8, groups)[:, ::-1, :].transpose(2, 0, 1))
    done = _transpose_8x8(words.view(np.uint64).reshape(groups, row_bytes))
    blocks = done.view(np.uint8).reshape(groups, row_bytes, 8)[:, :, ::-1].transpose(0, 2, 1)
    if out is None:
        return np.ascontiguousarray(blocks).reshape(groups * 8, row_bytes)
    if out.shape != (groups * 8, row_bytes) or out.dtype != np.uint8:
        raise ValueError("out has the wrong shape or dtype")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    np.copyto(out.reshape(groups, 8, row_bytes), blocks)
    return out


def naive_rows_to_cols(rows: np.ndarray) -> np.ndarray:
    """Reference transpose through one byte per bit (slow, obviously correct)."""
    return np.packbits(np.unpackbits(rows, axis=1).T, axis=1)


def naive_cols_to_rows(cols: np.ndarray) -> np.ndarray:
    """Reference inverse transpose through one byte per bit."""
    return np.packbits(np.unpackbits(cols, axis=1).T, axis=1)


class ColumnPRG:
    """One AES-128-CTR keystream per base-OT seed, read column-slice by column-slice.

    Column ``i`` of the extension matrix is the keystream of seed ``i``; the streams are
    read strictly in order.  Keystream is produced ``block`` bytes per column at a time
    (one ``update`` call per column and block, AES running over the whole block inside
    OpenSSL) and handed out in slices, so small chunks do not pay one call per column.
    """

    def __init__(self, seeds: list[bytes], block: int = 8192) -> None:
        if any(len(s) != 16 for s in seeds):
            raise ValueError("PRG seeds must be 16 bytes")
        iv = bytes(16)  # each seed keys its own stream, used once: a fixed counter start is fine
        self._streams = [Cipher(algorithms.AES(s), modes.CTR(iv)).encryptor() for s in seeds]
        self.width = len(seeds)
        self.block = block
        self.position = 0  # bytes handed out per column
        self._buffer = np.zeros((self.width, 0), dtype=np.uint8)
        self._offset = 0

    def _refill(self, at_least: int) -> None:
        size = max(self.block, at_least)
        zeros = bytes(size)
        fresh = np.frombuffer(b"".join([s.update(zeros) for s in self._streams]), dtype=np.uint8)
        rest = self._buffer[:, self._offset :]
        self._buffer = np.concatenate([rest, fresh.reshape(self.width, size)], axis=1)
        self._offset = 0

    def next(self, nbytes: int) -> np.ndarray:
        """The next ``nbytes`` of every column, as a contiguous (width, nbytes) uint8 array."""
        if self._buffer.shape[1] - self._offset < nbytes:
            self._refill(nbytes)
        out = np.ascontiguousarray(self._buffer[:, self._offset : self._offset + nbytes])
        self._offset += nbytes
        self.position += nbytes
        return out
