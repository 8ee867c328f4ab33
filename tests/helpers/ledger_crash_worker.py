"""Crash-test worker: hammers a ledger file and reports every committed action on stdout.

The crash test runs this as a real process and SIGKILLs it at random moments. A line is printed
(and flushed) only *after* the ledger call that it reports has returned, so every reported line
names an action that was committed; the test then checks that each one survived the kill.

Two authorizations are used: a small one whose budget and disclosure cap run out within the
first few runs (so the limits are hit while processes are being killed), and a large one that
keeps reserve/evaluate/disclose commits flowing for the rest of the test.

Start-up is staged through stdin so that it stays off the test's critical path: the worker
imports everything and prints ``WARM``, waits for ``GO``, opens the ledger and registers the
authorizations, prints ``READY``, then waits for ``RUN``. The test can thus spawn the next pair
while the current pair runs, and let both workers of a pair register before either starts
hammering (a busy SQLite writer can otherwise starve the other's registration for seconds).

Usage: python -m tests.helpers.ledger_crash_worker DB SEED   (then "GO\n", "RUN\n" on stdin)
"""

from __future__ import annotations

import hashlib
import random
import secrets
import sys

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.adapters.sqlite_ledger import Ledger
from protocol.errors import BudgetExhausted, DisclosureCapReached

AUTHORIZATIONS: dict[str, tuple[int, int]] = {
    # auth_id: (max_evaluations, max_disclosures)
    "crash-small": (120, 15),
    "crash-large": (1_000_000, 1_000_000),
}
NOT_AFTER = 4_102_444_800
RECORD_POOL = 400
RULES = ("tin+dob", "tin+last_name", "first+last+dob+zip")
CHECKPOINT_KEY_SEED = hashlib.sha256(b"gated-psi/test/ledger-crash-checkpoint-key").digest()
"""Fixed test key so the parent test can verify checkpoints the worker signed."""


def report(*parts: object) -> None:
    print(*parts, flush=True)


def main(argv: list[str]) -> int:
    db, seed = argv
    rng = random.Random(int(seed))
    key = Ed25519PrivateKey.from_private_bytes(CHECKPOINT_KEY_SEED)
    report("WARM")
    if sys.stdin.readline() != "GO\n":
        return 2  # the test went away before starting this worker
    ledger = Ledger(db)
    for auth_id, (max_evaluations, max_disclosures) in AUTHORIZATIONS.items():
        ledger.ensure_authorization(
            auth_id, max_evaluations=max_evaluations, max_disclosures=max_disclosures,
            not_after=NOT_AFTER
        )
    report("READY")
    if sys.stdin.readline() != "RUN\n":
        return 2
    prefix = f"w{seed}-{secrets.token_hex(6)}"  # unique across restarts with the same seed
    i = 0
    while True:
        i += 1
        auth_id = rng.choice(tuple(AUTHORIZATIONS))
        session_id = f"{prefix}-{i}"
        ledger.open_session(auth_id, session_id, {"worker": seed, "i": i})
        report("OPEN", auth_id, session_id)
        n = rng.randint(1, 9)
        try:
            ledger.reserve(auth_id, session_id, n)
        except BudgetExhausted:
            report("REFUSED", "budget", auth_id, session_id)
            n = 0
        else:
            report("RESERVE", auth_id, session_id, n)
        done = 0
        while done < n:
            step = min(n - done, rng.randint(1, 4))
            done = ledger.record_evaluation(auth_id, session_id, step)
            report("EVAL", auth_id, session_id, done)
        for _ in range(rng.randint(0, 2)):
            record_id = f"rec-{rng.randrange(RECORD_POOL)}"
            try:
                row = ledger.record_disclosure(auth_id, session_id, record_id, rng.choice(RULES))
            except DisclosureCapReached:
                report("REFUSED", "cap", auth_id, record_id)
            else:
                report("DISCLOSE", auth_id, session_id, record_id, int(row.repeat))
        if rng.random() < 0.7:
            receipt = hashlib.sha256(f"receipt:{session_id}".encode()).digest()
            ledger.close_session(auth_id, session_id, receipt, key.sign(receipt))
            report("CLOSE", auth_id, session_id)
        if i % 15 == 0:
            checkpoint = ledger.add_checkpoint(key.sign, "crash-test-key")
            report("CHECKPOINT", checkpoint.seq)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
