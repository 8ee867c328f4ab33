"""The benchmarks' process sampler tells a process's own memory from the pages of files it
memory-maps (the custodian maps its row files and index buckets, so its RSS grows with the
pages a run touches, which the kernel can drop)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from benchmarks.scale import TreeSampler

MIB = 1 << 20
SIZE = 64 * MIB

_MAP_FILE = """
import mmap, sys, time
with open(sys.argv[1], "rb") as fh:
    blob = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
total = sum(blob[i] for i in range(0, len(blob), 4096))
print("ready", total, flush=True)
time.sleep(30)
"""

_ALLOCATE = """
import sys, time
blob = bytearray(int(sys.argv[1]))
for i in range(0, len(blob), 4096):
    blob[i] = 1
print("ready", flush=True)
time.sleep(30)
"""


def _peaks(script: str, arg: str) -> tuple[int, int]:
    proc = subprocess.Popen([sys.executable, "-c", script, arg], stdout=subprocess.PIPE,
                            text=True)
    try:
        with TreeSampler(interval=0.05) as sampler:
            sampler.watch("p", proc.pid)
            assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
            time.sleep(0.3)
            sampler.sample()
            return sampler.peak_rss["p"], sampler.peak_anon_rss["p"]
    finally:
        proc.kill()
        proc.wait()


def test_mapped_file_pages_count_in_rss_but_not_in_anonymous_rss(tmp_path: Path) -> None:
    data = tmp_path / "rows.bin"
    data.write_bytes(b"\x01" * SIZE)
    rss, anon = _peaks(_MAP_FILE, str(data))
    assert rss - anon >= SIZE * 3 // 4  # the touched file pages
    assert anon < SIZE // 2


def test_allocated_memory_counts_in_both(tmp_path: Path) -> None:
    rss, anon = _peaks(_ALLOCATE, str(SIZE))
    assert anon >= SIZE * 3 // 4
    assert rss >= anon
