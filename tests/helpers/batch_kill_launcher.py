"""An ``agency-a serve`` process with small disclosure batches that SIGKILLs itself when
the N-th disclosure batch of its first job has been answered, before it is stored.

For tests/test_corroboration_resume.py. ``tests/helpers/requester_launcher.py`` dies at the
*first* batch; a resume after a *later* batch is the case where some groups were answered
and stored and others were accounted by the custodian only. Real batches hold up to 4,096
outputs, so a test would need thousands of matches to reach a second one:
``BATCH_KILL_SIZE`` makes both the first run and the resume batch that many outputs (the
same size for both, as in production), and ``BATCH_KILL_AT`` names the batch to die at.
Without the variables it is exactly ``agency_a.cli.main(argv)``.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

from agency_a import cli, client, service
from protocol.sessions.identity import RequesterSession

KILL_AT_ENV = "BATCH_KILL_AT"
SIZE_ENV = "BATCH_KILL_SIZE"


def install(kill_at: int | None, size: int | None) -> None:
    """Batch disclosures ``size`` outputs at a time; die at the ``kill_at``-th answer."""
    if size is not None:
        requests_of = RequesterSession.disclosure_requests

        def small(self: RequesterSession, batch: int = size) -> Iterator[Any]:
            return requests_of(self, min(batch, size))

        RequesterSession.disclosure_requests = small  # type: ignore[method-assign]
        client.MAX_DISCLOSURE_BATCH = size  # finish_session's batches: the same size
    if kill_at is not None:
        disclosed_of = service.JobJournal.disclosed
        answered = 0

        def disclosed(self: service.JobJournal, *args: Any) -> None:
            nonlocal answered
            answered += 1
            if answered == kill_at:  # accounted by the custodian, not stored here
                os.kill(os.getpid(), signal.SIGKILL)
            disclosed_of(self, *args)

        service.JobJournal.disclosed = disclosed  # type: ignore[method-assign]


def main(argv: list[str]) -> int:
    kill_at, size = os.environ.get(KILL_AT_ENV), os.environ.get(SIZE_ENV)
    install(int(kill_at) if kill_at else None, int(size) if size else None)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
