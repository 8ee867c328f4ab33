"""Refusals cost a bounded account: per-peer token buckets with an exact suppressed count.

A refused request changes nothing, so recording it is the only cost a hostile peer can impose
on the custodian's audit chain and logs.  Each peer has a bucket of refusals that are recorded
one by one (``audited_refusals_burst``, refilled at ``audited_refusals_per_minute``; both in
the custodian policy).  A refusal beyond it is only counted in memory; the count is written
as one ``refusals_suppressed`` entry (count and window) when the peer's next refusal is
recorded, when the window reaches ``refusal_summary_s``, or on :meth:`RefusalLimiter.flush`.
So the chain stays an exact account of how many refusals each peer earned, and a flood of
any size adds at most ``burst + rate x minutes + minutes x 60 / summary_s`` small entries
(docs/architecture.md, Accounting).

Pure: the caller passes the time, and a lock factory when several threads share a limiter.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from protocol.accounting.port import AuditLog
from protocol.policy.decide import CustodianPolicy

__all__ = [
    "MAX_TRACKED_PEERS",
    "REFUSAL",
    "REFUSALS_SUPPRESSED",
    "Admission",
    "RefusalLimiter",
    "Suppressed",
]

#: Audit kinds: one refusal, and a summary of a peer's refusals that were only counted.
REFUSAL = "refusal"
REFUSALS_SUPPRESSED = "refusals_suppressed"
#: Peers with a bucket in memory; the least recently refused beyond it is summarised and
#: dropped (peers are mTLS identities, so this bounds memory, not who may be refused).
MAX_TRACKED_PEERS = 1024
_PEER_CHARS = 64


@dataclass(frozen=True)
class Suppressed:
    """Refusals of ``peer`` counted, not recorded, between ``since`` and ``until``."""

    peer: str
    count: int
    since: float
    until: float

    def payload(self) -> dict[str, Any]:
        return {"peer": self.peer, "count": self.count, "since": self.since,
                "until": self.until}


@dataclass(frozen=True)
class Admission:
    """Whether one refusal is recorded on its own, and any summary due before it."""

    recorded: bool
    summaries: tuple[Suppressed, ...] = ()


@dataclass
class _Bucket:
    tokens: float
    refilled_at: float
    suppressed: int = 0
    since: float = 0.0


class RefusalLimiter:
    """Per-peer token buckets of recorded refusals; see the module docstring."""

    def __init__(self, *, burst: int, per_minute: int, summary_s: float,
                 new_lock: Callable[[], AbstractContextManager[Any]] = nullcontext,
                 max_peers: int = MAX_TRACKED_PEERS) -> None:
        if burst < 1 or per_minute < 0 or summary_s <= 0 or max_peers < 1:
            raise ValueError("burst >= 1, per_minute >= 0, summary_s > 0, max_peers >= 1")
        self.burst = burst
        self.per_second = per_minute / 60.0
        self.summary_s = float(summary_s)
        self.max_peers = max_peers
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = new_lock()

    @classmethod
    def from_policy(cls, policy: CustodianPolicy,
                    new_lock: Callable[[], AbstractContextManager[Any]] = nullcontext,
                    ) -> RefusalLimiter:
        """The limits the custodian policy sets (``audited_refusals_*``, ``refusal_summary_s``)."""
        return cls(burst=policy.audited_refusals_burst,
                   per_minute=policy.audited_refusals_per_minute,
                   summary_s=policy.refusal_summary_s, new_lock=new_lock)

    @staticmethod
    def peer_key(peer: str) -> str:
        """Peer ids are transport identities; still, only a bounded prefix is ever stored."""
        return peer[:_PEER_CHARS]

    def admit(self, peer: str, now: float) -> Admission:
        """Take a token for one refusal of ``peer`` at ``now``, or count it as suppressed."""
        key = self.peer_key(peer)
        due: list[Suppressed] = []
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(float(self.burst), now)
                while len(self._buckets) > self.max_peers:
                    old_peer, old = self._buckets.popitem(last=False)
                    if old.suppressed:
                        due.append(Suppressed(old_peer, old.suppressed, old.since, now))
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket.refilled_at)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.per_second)
            bucket.refilled_at = now
            recorded = bucket.tokens >= 1.0
            if recorded:
                bucket.tokens -= 1.0
            else:
                if not bucket.suppressed:
                    bucket.since = now
                bucket.suppressed += 1
            if bucket.suppressed and (recorded or now - bucket.since >= self.summary_s):
                due.append(Suppressed(key, bucket.suppressed, bucket.since, now))
                bucket.suppressed = 0
        return Admission(recorded, tuple(due))

    def record(self, log: AuditLog, peer: str, now: float, entry: Mapping[str, Any], *,
               kind: str = REFUSAL) -> bool:
        """Audit one refusal of ``peer`` (``entry``: bounded, small) if its bucket allows.

        Returns whether the entry was written; a summary that fell due is written first, so
        the chain's order is the order in which refusals happened.
        """
        admission = self.admit(peer, now)
        for summary in admission.summaries:
            log.audit(REFUSALS_SUPPRESSED, summary.payload())
        if admission.recorded:
            log.audit(kind, entry)
        return admission.recorded

    def pending(self) -> int:
        """Refusals counted in memory and not yet summarised on the chain."""
        with self._lock:
            return sum(b.suppressed for b in self._buckets.values())

    def flush(self, log: AuditLog, now: float) -> int:
        """Write every pending summary (at shutdown, say); returns the refusals summarised."""
        due: list[Suppressed] = []
        with self._lock:
            for peer, bucket in self._buckets.items():
                if bucket.suppressed:
                    due.append(Suppressed(peer, bucket.suppressed, bucket.since, now))
                    bucket.suppressed = 0
        for summary in due:
            log.audit(REFUSALS_SUPPRESSED, summary.payload())
        return sum(s.count for s in due)
