"""The engine interface is sufficient: a third engine plugs in without touching sessions.

``PlainHashEngine`` below is an INSECURE reference engine, for tests only: the requester
sends plain SHA-256 hashes of its match keys and the custodian answers with a keyed hash
under the per-authorization key (no blinding, so the custodian learns every query).  It has
its own message types and runs its exchanges in another order than the OPRF engine, and it
still runs end to end through the unmodified identity session (docs/architecture.md,
Engines).
"""

from __future__ import annotations

import ast
import hashlib
import hmac
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from protocol.domain.engine import Engine, EngineTraits, IndexMode
from protocol.domain.messages import OpenResponse
from protocol.domain.records import MATCH_RULES, match_keys_bulk
from protocol.engines import registry
from protocol.engines.base import (
    CustodianData,
    Exchange,
    Flow,
    RequesterInputs,
    SessionGrant,
)
from protocol.errors import InvalidElementError, PolicyRefusal, ProtocolError
from protocol.sessions.identity import RequesterSession, run_exchanges, run_in_process
from tests.factories import as_query, make_person, make_world

PLAIN = "plain-sha256"
RULES = ("tin+dob", "first+last+dob+zip")
FIELDS = ("address", "zip")
TAG_BYTES = 12
OUT_BYTES = 32
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the engine


@dataclass(frozen=True)
class PlainQuery:
    """Requester -> custodian: SHA-256 of each match key (32 bytes each)."""

    seq: int
    hashes: bytes

    def transcript_bytes(self) -> bytes:
        return b"plain-query" + struct.pack(">Q", self.seq) + self.hashes


@dataclass(frozen=True)
class PlainAnswer:
    """Custodian -> requester: HMAC(k, hash) for each hash of the query."""

    seq: int
    outputs: bytes

    def transcript_bytes(self) -> bytes:
        return b"plain-answer" + struct.pack(">Q", self.seq) + self.outputs


@dataclass(frozen=True)
class PlainTags:
    """Custodian -> requester: sorted 12-byte prefixes of its records' outputs."""

    seq: int
    tags: bytes

    def transcript_bytes(self) -> bytes:
        return b"plain-tags" + struct.pack(">Q", self.seq) + self.tags


def _keyed(key: bytes, hashes: bytes) -> bytes:
    return b"".join(hmac.new(key, hashes[i:i + 32], hashlib.sha256).digest()
                    for i in range(0, len(hashes), 32))


def _engine_key(grant_key: bytes) -> bytes:
    return hmac.new(grant_key, b"plain-sha256 reference engine", hashlib.sha256).digest()


class PlainRequester:
    def __init__(self, inputs: RequesterInputs) -> None:
        self.inputs = list(inputs.inputs)
        self.chunk = inputs.chunk_size
        self.outputs: dict[int, bytes] = {}
        self.theirs: set[bytes] = set()
        self.tag_count = -1

    @property
    def units(self) -> int:
        return len(self.inputs)

    def on_open(self, opened: OpenResponse) -> None:
        if opened.tag_size != TAG_BYTES:
            raise ProtocolError("unexpected tag size")
        self.tag_count = opened.tag_count

    def requests(self, exchange: Exchange) -> Iterator[object]:
        assert exchange.sends is PlainQuery
        for seq, start in enumerate(range(0, len(self.inputs), self.chunk)):
            part = self.inputs[start:start + self.chunk]
            yield PlainQuery(seq, b"".join(hashlib.sha256(k).digest() for k in part))

    def handle(self, message: object) -> None:
        if isinstance(message, PlainAnswer):
            start = message.seq * self.chunk
            for j in range(len(message.outputs) // OUT_BYTES):
                self.outputs[start + j] = message.outputs[j * OUT_BYTES:(j + 1) * OUT_BYTES]
        else:
            assert isinstance(message, PlainTags)
            tags = message.tags
            self.theirs.update(tags[i:i + TAG_BYTES] for i in range(0, len(tags), TAG_BYTES))

    def match(self) -> list[int]:
        if len(self.outputs) != len(self.inputs) or len(self.theirs) > self.tag_count:
            raise ProtocolError("match before the exchanges completed")
        return [e for e in range(len(self.inputs)) if self.outputs[e][:TAG_BYTES] in self.theirs]

    def proofs(self, elements: Sequence[int]) -> list[bytes]:
        return [self.outputs[e] for e in elements]

    def custodian_entries(self, tag_count: int) -> int:
        return tag_count


class PlainCustodianSession:
    def __init__(self, data: CustodianData, grant: SessionGrant) -> None:
        self.data = data
        self.key = _engine_key(grant.key)
        self.index: dict[bytes, list[tuple[int, str]]] = {}
        for rule_id in sorted(grant.rules):
            keys = data.match_keys(rule_id)
            for position, key in zip(data.in_scope.tolist(), keys, strict=True):
                if key is not None:
                    tag = _keyed(self.key, hashlib.sha256(key).digest())[:TAG_BYTES]
                    self.index.setdefault(tag, []).append((position, rule_id))

    @property
    def tag_count(self) -> int:
        return sum(len(v) for v in self.index.values())

    @property
    def tag_size(self) -> int:
        return TAG_BYTES

    @property
    def proof_size(self) -> int:
        return OUT_BYTES

    def cost(self, message: object) -> int:
        if not isinstance(message, PlainQuery) or len(message.hashes) % 32:
            raise InvalidElementError("a plain query is a whole number of 32-byte hashes")
        return len(message.hashes) // 32

    def evaluate(self, message: object) -> PlainAnswer:
        assert isinstance(message, PlainQuery)
        return PlainAnswer(message.seq, _keyed(self.key, message.hashes))

    def tag_chunks(self, chunk_tags: int) -> Iterator[PlainTags]:
        tags = sorted(t for t, entries in self.index.items() for _ in entries)
        for seq, start in enumerate(range(0, max(len(tags), 1), chunk_tags)):
            yield PlainTags(seq, b"".join(tags[start:start + chunk_tags]))

    def verify(self, items: Sequence[tuple[int, str, bytes]]) -> dict[int, tuple[int, ...]]:
        today = self.data.today()
        found: dict[int, tuple[int, ...]] = {}
        for i, rule_id, proof in items:
            holders = []
            for position, rule in self.index.get(proof[:TAG_BYTES], []):
                key = MATCH_RULES[rule_id].match_key(self.data.records[position], today=today)
                if rule == rule_id and key is not None and hmac.compare_digest(
                        _keyed(self.key, hashlib.sha256(key).digest()), proof):
                    holders.append(position)
            if holders:
                found[i] = tuple(sorted(holders))
        return found


class PlainCustodian:
    def __init__(self, data: CustodianData) -> None:
        self.data = data

    def prepare(self, rules: Sequence[str]) -> None:
        return None  # every tag depends on the authorization key

    def open(self, grant: SessionGrant) -> PlainCustodianSession:
        return PlainCustodianSession(self.data, grant)


class PlainHashEngine:
    name = PLAIN
    traits = EngineTraits(group_element_inputs=False)
    # evaluate first, tags last: the opposite order of the OPRF engine
    exchanges = (
        Exchange("evaluate", Flow.BIDI, sends=PlainQuery, replies=PlainAnswer),
        Exchange("tags", Flow.SERVER_STREAM, sends=None, replies=PlainTags,
                 reply_stream="tags"),
    )
    key_digest = None

    def requester(self, inputs: RequesterInputs) -> PlainRequester:
        return PlainRequester(inputs)

    def custodian(self, data: CustodianData) -> PlainCustodian:
        return PlainCustodian(data)


@pytest.fixture()
def plain_engine() -> Iterator[PlainHashEngine]:
    engine = registry.register(PlainHashEngine())
    assert isinstance(engine, PlainHashEngine)
    yield engine
    registry.unregister(PLAIN)


# --------------------------------------------------------------------------- helpers


def _world(tmp_path: Path, engines: Sequence[str]):
    world = make_world(tmp_path, n_records=60, allowed_engines=frozenset(engines),
                       excluded_record_classes=frozenset({"protected"}))
    world.records = [replace(p, record_class="protected") if i % 7 == 3 else p
                     for i, p in enumerate(world.records)]
    return world


def _queries(world):
    inside = [as_query(world.records[i]) for i in range(10, 40)]
    # same TIN and birth date as record 46, another name: matches under tin+dob only
    renamed = as_query(replace(world.records[46], first_name="Zed", last_name="Other"),
                       record_id="q-renamed")
    strangers = [as_query(make_person(900 + i, prefix="s")) for i in range(12)]
    return [*inside, renamed, *strangers]


def _run(world, engine: str, queries, **kw):
    signed = world.authorize(rules=RULES, fields=FIELDS, engines=registry.names())
    custodian = world.custodian()
    requester = RequesterSession(signed, queries, engine=engine,
                                 signing_key=world.requester_key, **kw)
    custodian_session = custodian.session()
    outcome = run_in_process(requester, custodian_session, requester_id="agency-a")
    return outcome, requester, custodian_session, signed


def _pairs(world, outcome, custodian_session) -> set[tuple[str, str, str]]:
    """(query id, custodian record id, rule) of every disclosure, via the pseudonyms."""
    record_of = {custodian_session.pseudonym(r): r.record_id for r in world.records}
    return {(r.query_record_id, record_of[r.pseudonym], r.rule_id) for r in outcome.results}


def _plaintext_join(world, queries) -> set[tuple[str, str, str]]:
    today = datetime.fromtimestamp(time.time(), UTC).date()
    in_scope = [r for r in world.records if r.record_class != "protected"]
    theirs = match_keys_bulk(in_scope, list(RULES), today=today)
    ours = match_keys_bulk([q.person for q in queries], list(RULES), today=today)
    pairs = set()
    for rule in RULES:
        by_key = {k: r.record_id for r, k in zip(in_scope, theirs[rule], strict=True) if k}
        for q, k in zip(queries, ours[rule], strict=True):
            if k is not None and k in by_key:
                pairs.add((q.person.record_id, by_key[k], rule))
    return pairs


# --------------------------------------------------------------------------- tests


def test_third_engine_runs_through_the_unmodified_session(tmp_path: Path,
                                                          plain_engine) -> None:
    world = _world(tmp_path, ("oprf", PLAIN))
    queries = _queries(world)
    plain, requester, custodian_session, signed = _run(world, PLAIN, queries)
    oprf_outcome, _, oprf_custodian, _ = _run(world, Engine.OPRF, queries)
    # the same matches and the same disclosed records as the OPRF engine
    assert ({(m.query_record_id, m.rule_id) for m in plain.matches}
            == {(m.query_record_id, m.rule_id) for m in oprf_outcome.matches})
    pairs = _pairs(world, plain, custodian_session)
    assert pairs == _pairs(world, oprf_outcome, oprf_custodian)
    assert len(plain.results) > 30 and plain.rejected == 0
    # accounted like any engine: one unit per element, every disclosure on the ledger
    assert plain.receipt.evaluated == requester.element_count
    assert plain.receipt.disclosed == len({r.pseudonym for r in plain.results})
    assert plain.receipt.requester_signature
    rows = world.ledger.disclosures(signed.authorization.authorization_id)
    assert {r.session_id for r in rows} == {requester.session_id}
    assert {r.record_id for r in rows} == {record_id for _, record_id, _ in pairs}


def test_third_engine_proofs_are_verified(tmp_path: Path, plain_engine) -> None:
    from protocol.domain.messages import DisclosureRequest

    world = _world(tmp_path, (PLAIN,))
    signed = world.authorize(rules=("tin+dob",), fields=FIELDS, engines=(PLAIN,))
    rs = RequesterSession(signed, [as_query(world.records[5])], engine=PLAIN)
    cs = world.custodian().session()
    rs.handle(cs.handle(rs.open_request(), peer_id="agency-a"))
    run_exchanges(rs, cs)
    (m,) = rs.match()
    forged = bytes([m.output[0] ^ 1]) + m.output[1:]
    resp = cs.handle(DisclosureRequest(seq=0, outputs=(
        ("tin+dob", forged), ("tin+dob", m.output[:31]), ("first+last+dob+zip", m.output),
        ("tin+dob", m.output))))
    assert resp.rejected == (0, 1, 2)
    assert [d.index for d in resp.disclosures] == [3]
    assert world.ledger.budget(signed.authorization.authorization_id).disclosed == 1


def test_a_message_of_another_engine_is_refused(tmp_path: Path, plain_engine) -> None:
    from protocol.domain.messages import EvaluateChunk

    world = _world(tmp_path, (PLAIN,))
    signed = world.authorize(engines=(PLAIN,))
    rs = RequesterSession(signed, [as_query(world.records[1])], engine=PLAIN)
    cs = world.custodian().session()
    rs.handle(cs.handle(rs.open_request(), peer_id="agency-a"))
    with pytest.raises(ProtocolError, match="cannot accept EvaluateChunk: EvaluateChunk is "
                       "not a message of the identity tier with engine 'plain-sha256'"):
        cs.handle(EvaluateChunk(seq=0, elements=bytes(32)))
    from protocol.domain.messages import TagChunk

    cs = world.custodian().session()
    rs = RequesterSession(signed, [as_query(world.records[1])], engine=PLAIN)
    rs.handle(cs.handle(rs.open_request(), peer_id="agency-a"))
    with pytest.raises(ProtocolError, match="cannot send TagChunk"):
        list(cs.tag_chunks(kind=TagChunk))
    with pytest.raises(ProtocolError, match="cannot send EvaluateChunk"):
        rs.send(EvaluateChunk)


def test_unknown_engine_is_refused_with_its_reason(tmp_path: Path) -> None:
    world = make_world(tmp_path, allowed_engines=frozenset({"oprf", "nope"}))
    signed = world.authorize(engines=("oprf", "nope"))
    with pytest.raises(registry.UnknownEngine):
        RequesterSession(signed, [as_query(world.records[0])], engine="nope")
    request = RequesterSession(signed, [as_query(world.records[0])]).open_request()
    with pytest.raises(PolicyRefusal) as err:
        world.custodian().session().handle(replace(request, engine="nope"), peer_id="agency-a")
    assert err.value.reasons == ("engine_unknown",)


def test_named_mode_needs_an_engine_with_group_element_inputs(tmp_path: Path) -> None:
    from protocol.policy import decide as P

    world = make_world(tmp_path, allowed_engines=frozenset(Engine))
    signed = world.authorize(engines=tuple(Engine))
    named = P.sign_authorization(
        replace(signed.authorization, mode=P.Mode.NAMED_SUBJECTS,
                subject_commitment=bytes(32)), world.authority)
    with pytest.raises(ProtocolError, match="group elements"):
        RequesterSession(named, [as_query(world.records[0])], engine=Engine.KKRT, tokens={})


def test_registry_holds_the_builtin_engines_and_refuses_shadowing() -> None:
    assert set(Engine) <= set(registry.names())
    assert registry.traits()[Engine.OPRF].group_element_inputs
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get(Engine.OPRF))


def test_every_engine_agrees_with_the_plaintext_join(tmp_path: Path, plain_engine) -> None:
    world = _world(tmp_path, registry.names())
    queries = _queries(world)
    expected = _plaintext_join(world, queries)
    assert ("q-renamed", "c46", "tin+dob") in expected and len(expected) > 30
    entries = {}
    # Epoch-index engines need an epoch-mode custodian: tests/test_national.py holds them to
    # the plaintext join (and to the oprf engine) on an index built on Dask.
    for engine in [name for name, traits in registry.traits().items()
                   if traits.index is IndexMode.PER_AUTHORIZATION]:
        outcome, requester, custodian_session, _ = _run(world, engine, queries)
        assert _pairs(world, outcome, custodian_session) == expected, engine
        entries[engine] = requester.custodian_entries
    # the custodian's (record, rule) entries in scope, whatever the engine's tags per entry
    in_scope = sum(1 for r in world.records if r.record_class != "protected")
    assert set(entries.values()) == {in_scope * len(RULES)}


# --------------------------------------------------------------------------- structure


_ENGINE_NAMES = frozenset(Engine)
_SCANNED = ("agency_a", "agency_b", "protocol", "proto")


def _names_an_engine(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in _ENGINE_NAMES
    if isinstance(node, ast.Attribute):  # Engine.OPRF, Engine.KKRT.value
        return _names_an_engine(node.value) or (
            isinstance(node.value, ast.Name) and node.value.id == "Engine")
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return any(_names_an_engine(e) for e in node.elts)
    return False


def _engine_comparisons(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        operands: list[ast.expr] = []
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.match_case) and isinstance(node.pattern, ast.MatchValue):
            operands = [node.pattern.value]
        if any(_names_an_engine(o) for o in operands):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_no_engine_name_is_compared_outside_the_engines_package() -> None:
    engines_dir = REPO / "protocol" / "engines"
    offenders = [
        hit
        for top in _SCANNED
        for path in sorted((REPO / top).rglob("*.py"))
        if engines_dir not in path.parents and "_generated" not in path.parts
        for hit in _engine_comparisons(path)
    ]
    assert offenders == []


def test_the_structure_check_finds_a_comparison() -> None:
    tree = ast.parse('if session.engine == "kkrt":\n    pass\nok = x in (Engine.OPRF, 2)\n')
    hits = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)
            and any(_names_an_engine(o) for o in [n.left, *n.comparators])]
    assert len(hits) == 2


def test_custodian_prepare_option_names_any_registered_engine() -> None:
    """``agency-b serve --prepare ENGINE=RULES``: engines come from the registry."""
    import argparse

    from agency_b.cli import _engine_rules

    assert _engine_rules("kkrt=tin+dob,tin+last_name") == ("kkrt", ["tin+dob", "tin+last_name"])
    assert _engine_rules("oprf=tin+dob") == ("oprf", ["tin+dob"])
    for bad in ("kkrt", "nosuch=tin+dob", "kkrt=", "=tin+dob"):
        with pytest.raises(argparse.ArgumentTypeError):
            _engine_rules(bad)


def test_build_cache_builds_once_per_key_under_concurrency() -> None:
    """Indexes and key tables are built once per key; concurrent callers wait for that build."""
    import threading
    import time as _time

    from protocol.engines.base import BuildCache

    cache: BuildCache[str, list[str]] = BuildCache(threading.Lock)
    builds: list[str] = []

    def build(key: str) -> list[str]:
        builds.append(key)
        _time.sleep(0.05)  # long enough that the other callers arrive during the build
        return [key]

    got: list[list[str]] = []
    threads = [threading.Thread(target=lambda k=k: got.append(cache.get(k, lambda: build(k))))
               for k in ("a", "a", "a", "b", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(builds) == ["a", "b"]
    assert sorted(map(tuple, got)) == [("a",)] * 3 + [("b",)] * 2
    assert cache.get("a", lambda: build("again")) == ["a"]  # cached: no further build

    def failing() -> list[str]:
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError):
        cache.get("c", failing)
    assert cache.get("c", lambda: ["c"]) == ["c"]  # a failed build is not cached
