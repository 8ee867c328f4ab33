"""Small deterministic builders shared by the session and end-to-end tests."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agency_b.service import serve as serve_custodian
from proto import service_kit as kit
from protocol.adapters.sqlite_ledger import Ledger
from protocol.cli.dev_pki import write_dev_pki
from protocol.domain.records import PersonRecord, QueryMetadata, QueryRecord
from protocol.policy import decide as P
from protocol.sessions.aggregate import AggregateCustodian
from protocol.sessions.identity import Custodian, CustodianConfig

FIRST = ["Ann", "Bob", "Carla", "Dmitri", "Eve", "Farah", "Gus", "Hana", "Ivan", "Jo"]
LAST = ["Lee", "Smith", "Garcia", "Nguyen", "Okafor", "Brown", "Kim", "Patel", "Rossi", "Diaz"]
STREETS = ["Main Street", "Oak Avenue", "Pine Road", "Elm Drive", "Cedar Lane"]
META = QueryMetadata(("2023", "2024"), "26 U.S.C. 6103(i)(2)", "locate subject of case 42")


#: The statuses a client's mistake may get: specific ones, never UNKNOWN or INTERNAL.
REFUSALS = frozenset({
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ALREADY_EXISTS,
})
#: ``<reason code>: <human text>``: what every refusal's details start with.
REASON = re.compile(r"^[a-z][a-z0-9_]*: \S")


def make_person(i: int, *, prefix: str = "c", **overrides: str) -> PersonRecord:
    """Person ``i``: a valid SSN-format TIN, a real street address, a possible birth date."""
    rng = random.Random(i)
    fields = dict(
        record_id=f"{prefix}{i}",
        tin=f"{100 + i % 700:03d}-{10 + i % 89:02d}-{1000 + i:04d}",
        first_name=rng.choice(FIRST),
        last_name=f"{rng.choice(LAST)}{i}",
        dob=f"{1950 + i % 50}-{1 + i % 12:02d}-{1 + i % 28:02d}",
        address=f"{100 + i} {rng.choice(STREETS)}",
        city="Springfield",
        state="IL",
        zip=f"{62700 + i % 50:05d}",
    )
    fields.update(overrides)
    return PersonRecord(**fields)


def as_query(p: PersonRecord, record_id: str | None = None) -> QueryRecord:
    return QueryRecord(replace(p, record_id=record_id or f"q-{p.record_id}"), META)


@dataclass
class World:
    """An authority, a custodian with records, and a signed authorization."""

    authority: Ed25519PrivateKey
    requester_key: Ed25519PrivateKey
    custodian_key: Ed25519PrivateKey
    policy: P.CustodianPolicy
    records: list[PersonRecord]
    ledger: Ledger
    master_secret: bytes

    def custodian(self, **kw: object) -> Custodian:
        return Custodian(CustodianConfig(
            policy=self.policy, records=self.records, ledger=self.ledger,
            master_secret=self.master_secret, signing_key=self.custodian_key,
            requester_keys={"agency-a": self.requester_key.public_key()}, **kw,  # type: ignore[arg-type]
        ))

    def authorize(self, *, rules: Sequence[str] = ("tin+dob",),
                  fields: Sequence[str] = ("address", "city", "state", "zip"),
                  max_evaluations: int = 10_000, max_disclosures: int = 10_000,
                  requester: str = "agency-a", custodian: str = "agency-b",
                  not_before: int | None = None, not_after: int | None = None,
                  tier: P.Tier = P.Tier.IDENTITY, key: Ed25519PrivateKey | None = None,
                  engines: Sequence[str] = ("oprf",), value_field: str = "",
                  evaluation_key: bytes | None = None,
                  corroboration: int | None = None,
                  ) -> P.SignedAuthorization:
        key = key or self.authority
        now = int(time.time())
        auth = P.Authorization(
            authorization_id=P.new_authorization_id(),
            authority_key_id=P.authority_key_id(key.public_key()),
            requester_id=requester, custodian_id=custodian,
            statute="26 U.S.C. 6103(i)(2)", purpose="locate subjects",
            not_before=now - 60 if not_before is None else not_before,
            not_after=now + 3600 if not_after is None else not_after,
            tier=tier, max_evaluations=max_evaluations, max_disclosures=max_disclosures,
            match_rules=tuple(rules), disclosure_fields=tuple(fields), retention_days=30,
            engines=tuple(engines), value_field=value_field, evaluation_key=evaluation_key,
            corroboration=corroboration,
        )
        return P.sign_authorization(auth, key)

    def authorize_aggregate(self, tier: P.Tier = P.Tier.AGGREGATE, *,
                            min_count: int = 0) -> P.SignedAuthorization:
        """An aggregate or cardinality authorization over ``tin+dob`` (the sum: tax paid)."""
        now = int(time.time())
        auth = P.Authorization(
            authorization_id=P.new_authorization_id(),
            authority_key_id=P.authority_key_id(self.authority.public_key()),
            requester_id="agency-a", custodian_id="agency-b", statute="26 U.S.C. 6103(i)(2)",
            purpose="statistics", not_before=now - 60, not_after=now + 3600, tier=tier,
            max_evaluations=1000, max_disclosures=0, match_rules=("tin+dob",),
            disclosure_fields=(), retention_days=30, min_aggregate_count=min_count,
            value_field="tax_paid_cents" if tier is P.Tier.AGGREGATE else "",
        )
        return P.sign_authorization(auth, self.authority)

    def with_tax_paid(self) -> None:
        """Give every record a ``tax_paid_cents`` column, the value the aggregate tier sums."""
        self.records = [replace(r, extra=(("tax_paid_cents", str(1000 + 37 * i)),))
                        for i, r in enumerate(self.records)]


@contextmanager
def custodian_over_mtls(custodian: Custodian, pki: Path, *,
                        aggregate: AggregateCustodian | None = None,
                        ) -> Iterator[tuple[str, kit.TLSFiles]]:
    """A real custodian server on loopback behind real mutual TLS (a fresh dev PKI in ``pki``).

    Yields its address and agency-a's client TLS files; the server stops on exit.
    """
    write_dev_pki(pki, ["agency-a", "agency-b"], server_agencies=["agency-b"])
    server, port = serve_custodian(custodian, kit.TLSFiles.from_dir(pki, "agency-b", "server"),
                                   "127.0.0.1:0", aggregate=aggregate)
    try:
        yield f"127.0.0.1:{port}", kit.TLSFiles.from_dir(pki, "agency-a", "client")
    finally:
        server.stop(0)


def make_world(tmp: Path, n_records: int = 60, **policy_kw: object) -> World:
    authority = Ed25519PrivateKey.generate()
    kid = P.authority_key_id(authority.public_key())
    policy = P.CustodianPolicy(custodian_id="agency-b",
                               trusted_authorities={kid: authority.public_key()},
                               **policy_kw)  # type: ignore[arg-type]
    return World(
        authority=authority, requester_key=Ed25519PrivateKey.generate(),
        custodian_key=Ed25519PrivateKey.generate(), policy=policy,
        records=[make_person(i) for i in range(n_records)],
        ledger=Ledger(tmp / "custodian-ledger.sqlite"), master_secret=bytes(range(32)),
    )
