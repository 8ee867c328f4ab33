"""A pre-warmed ``agency-b`` process for the kill -9 test.

Importing grpc, numpy and cryptography takes one to two seconds on a loaded two-core box, and
the crash test restarts the custodian more than thirty times. This launcher does the imports
first, then blocks until the test writes ``go`` on its stdin, and only then runs exactly
``agency_b.cli.main(argv)``: the same ``serve`` code path as ``python -m agency_b.cli serve``,
opening the ledger only after the previous process has been killed.

Usage: python -m tests.helpers.custodian_launcher serve --records ... (agency-b arguments)
"""

from __future__ import annotations

import sys

from agency_b import cli


def main(argv: list[str]) -> int:
    line = sys.stdin.readline()
    if line.strip() != "go":
        return 0  # the test is over and closed our stdin: exit without serving
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
