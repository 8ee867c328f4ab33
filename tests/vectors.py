"""The RFC 9497 Appendix A test vectors that ship with the repository.

``tests/data/rfc9497.json`` holds the published ristretto255-SHA512 suites (mode 0 OPRF,
mode 1 VOPRF, mode 2 POPRF, single and batch vectors) transcribed unchanged in the JSON
layout of the CFRG reference implementation.  A missing file or suite is a failure, never a
skip: a plain clone must run the conformance tests.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["RFC9497_PATH", "SUITE_ID", "rfc9497_suite", "split_field"]

RFC9497_PATH = Path(__file__).resolve().parent / "data" / "rfc9497.json"
SUITE_ID = "ristretto255-SHA512"


@cache
def _suites() -> tuple[dict[str, Any], ...]:
    return tuple(json.loads(RFC9497_PATH.read_text(encoding="utf-8")))


def rfc9497_suite(mode: int, identifier: str = SUITE_ID) -> dict[str, Any]:
    """The published suite for ``identifier`` in ``mode`` (0 OPRF, 1 VOPRF, 2 POPRF)."""
    for suite in _suites():
        if suite["identifier"] == identifier and suite["mode"] == mode:
            return suite
    raise LookupError(f"{RFC9497_PATH} has no {identifier} mode-{mode} suite")


def split_field(field: str) -> list[bytes]:
    """A vector field holds one hex value per batch element, comma-separated."""
    return [bytes.fromhex(part) for part in field.split(",")]
