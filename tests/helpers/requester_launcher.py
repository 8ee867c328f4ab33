"""An ``agency-a serve`` process that SIGKILLs itself at one step of its first job.

For the late-failure tests (tests/test_late_failure.py). ``LATE_FAILURE_KILL_AT`` names the
step; the process then dies with SIGKILL exactly there, with nothing flushed or closed:

* ``opened``: right after the open is made durable (the custodian has reserved the budget);
* ``evaluate``: at the first evaluation progress event (mid-evaluation);
* ``disclosed``: a disclosure batch arrived and was accounted by the custodian, but is not
  yet stored by the requester (mid-disclosure: the custodian's ledger is ahead);
* ``closing``: before the close request is made durable and sent;
* ``receipt``: the custodian closed and signed, the receipt arrived, nothing of it is kept
  and the countersignature is not sent.

Without the variable it is exactly ``agency_a.cli.main(argv)``, which is also what runs after
the hook is installed: the same ``serve`` code path as ``python -m agency_a.cli serve``.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from agency_a import cli, service

KILL_ENV = "LATE_FAILURE_KILL_AT"
AFTER = frozenset({"opened"})  # killed once the step is durable; the others before it


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(step: str) -> None:
    """Make the requester die at ``step`` (see the module docstring)."""
    if step == "evaluate":
        progress_of = service.RequesterService._progress

        def progress(self: service.RequesterService, job: service.Job) -> Any:
            inner = progress_of(self, job)

            def report(phase: str, done: int, total: int) -> None:
                if phase == "evaluate" and done > 0:
                    _die()
                inner(phase, done, total)

            return report

        service.RequesterService._progress = progress  # type: ignore[method-assign]
        return
    original = getattr(service.JobJournal, step)

    def hooked(self: service.JobJournal, *args: Any) -> None:
        if step in AFTER:
            original(self, *args)
        _die()

    setattr(service.JobJournal, step, hooked)


def main(argv: list[str]) -> int:
    step = os.environ.get(KILL_ENV)
    if step:
        install(step)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
