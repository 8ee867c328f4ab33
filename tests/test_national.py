"""The national custodian end to end (docs/architecture.md, National custodian).

A small national configuration: a few thousand custodian records in a sharded store, the
key-epoch index built on a real 2-worker ``distributed.LocalCluster`` (worker processes),
both services over real gRPC with real mutual TLS, the custodian reading its records out of
core.  Matches equal the plaintext join and the small-custodian (``oprf``) mode on the same
data; the tag-set fetch is accounted; a disclosure bound to another authorization's
evaluation is refused; hostile tag-set streams are refused by the requester's cache.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from agency_a.client import WireStats, _run_exchanges, run_remote_session
from agency_a.tagset_cache import TagSetCache
from proto import codec
from proto import service_kit as kit
from protocol.accounting.export import custodian_export
from protocol.adapters.epoch_index import EpochIndex, build_epoch_index, write_epoch_key
from protocol.adapters.shards import BASE_COLUMNS, ShardedRecords, table_from_records
from protocol.crypto import tagset
from protocol.domain.engine import Engine
from protocol.domain.messages import DisclosureResponse, OpenResponse
from protocol.domain.records import MATCH_RULES, PersonRecord
from protocol.engines.base import RecordsOutOfCore
from protocol.engines.epoch import TagSetChunk, TagSetRequest
from protocol.errors import ProtocolError
from protocol.policy import decide as P
from protocol.sessions.identity import Custodian, RequesterSession, run_in_process
from tests.factories import REASON, World, as_query, custodian_over_mtls, make_person, make_world

EPOCH = "2026-11"
RULES = ("tin+dob", "tin+last_name")
RECORDS = 3000
MAX_EVALUATIONS = 1 << 12
HITS = (0, 7, 123, 1500, 2999)


@dataclass
class National:
    world: World
    records: list[PersonRecord]
    store_dir: Path
    index_dir: Path
    tmp: Path

    def custodian(self) -> Custodian:
        """The custodian as ``agency-b serve --records-store --epoch-index`` builds it."""
        self.world.records = RecordsOutOfCore(ShardedRecords.open(self.store_dir))  # type: ignore[assignment]
        return self.world.custodian(epoch_index=EpochIndex.open(self.index_dir))

    def authorize(self, **kw: Any) -> P.SignedAuthorization:
        kw.setdefault("max_evaluations", MAX_EVALUATIONS)
        kw.setdefault("engines", (Engine.OPRF_EPOCH, Engine.OPRF))
        return self.world.authorize(rules=RULES, **kw)


@pytest.fixture(scope="module")
def national(tmp_path_factory: pytest.TempPathFactory) -> Iterator[National]:
    distributed = pytest.importorskip("distributed")
    tmp = tmp_path_factory.mktemp("national")
    world = make_world(tmp, 0, index_mode="epoch", epoch_id=EPOCH,
                       allowed_engines=frozenset({Engine.OPRF_EPOCH}),
                       allowed_tiers=frozenset({P.Tier.IDENTITY}),
                       epoch_max_evaluations=MAX_EVALUATIONS, epoch_max_tagset_fetches=2)
    records = [make_person(i) for i in range(RECORDS)]
    store_dir, index_dir, key_file = tmp / "records", tmp / "index", tmp / "epoch.key"
    ShardedRecords.write(store_dir, [table_from_records(records[i:i + 1000], BASE_COLUMNS)
                                     for i in range(0, RECORDS, 1000)],
                         BASE_COLUMNS, shard_rows=1024, row_group_rows=256)
    write_epoch_key(key_file, world.master_secret, EPOCH)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        build_epoch_index(store_dir, index_dir, epoch_id=EPOCH, rules=RULES,
                          key_file=key_file, max_evaluations=MAX_EVALUATIONS, client=client,
                          partition_rows=512, progress=False)
    yield National(world, records, store_dir, index_dir, tmp)
    world.ledger.close()


def _queries(records: list[PersonRecord]) -> list[Any]:
    return ([as_query(records[i]) for i in HITS]
            + [as_query(make_person(900 + j, prefix="x", tin=f"9{j:02d}-55-4321"))
               for j in range(20)])


def _plaintext_join(records: list[PersonRecord], queries: list[Any]) -> set[tuple[str, str]]:
    today = dt.date.today()
    keys = {(rule, MATCH_RULES[rule].match_key(r, today=today)) for r in records for rule in RULES}
    return {(q.person.record_id, rule) for q in queries for rule in RULES
            if (rule, MATCH_RULES[rule].match_key(q.person, today=today)) in keys}


def _triples(records: list[PersonRecord], queries: list[Any]) -> set[tuple[str, str, str]]:
    """(query, record, rule) of the plaintext join, computed here in memory."""
    today = dt.date.today()
    holders: dict[tuple[str, bytes | None], list[str]] = {}
    for r in records:
        for rule in RULES:
            holders.setdefault((rule, MATCH_RULES[rule].match_key(r, today=today)),
                               []).append(r.record_id)
    return {(q.person.record_id, rid, rule) for q in queries for rule in RULES
            for rid in holders.get((rule, MATCH_RULES[rule].match_key(q.person, today=today)),
                                   [])
            if MATCH_RULES[rule].match_key(q.person, today=today) is not None}


def test_the_streamed_plaintext_join_lists_every_pair(national: National) -> None:
    """``benchmarks.national.plaintext_triples`` over the shards equals the in-memory join,
    triple for triple, and its summary counts them."""
    from benchmarks.national import plaintext_triples
    from protocol.domain.records import write_query_csv

    queries = _queries(national.records)
    queries_csv = national.tmp / "pairs-queries.csv"
    with queries_csv.open("w", newline="") as fh:
        write_query_csv(queries, fh)
    summary, triples = plaintext_triples(national.store_dir, queries_csv, RULES,
                                         dt.date.today(), frozenset())
    assert triples == _triples(national.records, queries)
    assert len(triples) == summary["pairs"] == summary["matches"] == 2 * len(HITS)
    assert summary["subjects"] == len(HITS) and summary["accepted_queries"] == len(queries)


def test_the_pair_check_counts_missing_and_extra_pairs() -> None:
    from benchmarks.national_online import pair_check

    want = {("Q1", "C1", "tin+dob"), ("Q2", "C2", "tin+dob"), ("Q2", "C2", "tin+last_name")}
    assert pair_check(set(want), want)["pairs_equal"]
    got = (want - {("Q2", "C2", "tin+dob")}) | {("Q3", "pseudonym-x", "tin+dob")}
    check = pair_check(got, want)
    assert not check["pairs_equal"]
    assert (check["missing_pairs"], check["extra_pairs"]) == (1, 1)
    assert (check["pairs"], check["expected_pairs"]) == (3, 3)
    assert check["mismatch_examples"] == [["Q2", "C2", "tin+dob"],
                                          ["Q3", "pseudonym-x", "tin+dob"]]
    assert check["missing_pairs_of_a_disclosed_match"] == 0
    # a key two records hold: the match released C1, the other holder C9 stays missing
    shared = pair_check(set(want), want | {("Q1", "C9", "tin+dob")})
    assert shared["missing_pairs"] == shared["missing_pairs_of_a_disclosed_match"] == 1


def _channel(address: str, tls: kit.TLSFiles) -> Any:
    return kit.secure_channel(address, tls)


def test_epoch_mode_over_mtls_equals_the_plaintext_join_and_the_oprf_mode(
        national: National) -> None:
    queries = _queries(national.records)
    world = national.world
    signed = national.authorize()
    auth_id = signed.authorization.authorization_id
    with custodian_over_mtls(national.custodian(), national.tmp / "pki") as (address, tls), \
            _channel(address, tls) as channel:
        cache = TagSetCache(national.tmp / "cache")
        tags, received = cache.fetch(channel, signed, RULES)
        index = EpochIndex.open(national.index_dir)
        assert received == sum(index.tagset_bytes(r) for r in RULES) > 0
        assert (tags.epoch_id, tags.bits) == (EPOCH, index.bits)
        assert {f.stat().st_mode & 0o777 for f in tags.root.iterdir()} == {0o600}
        assert tags.root.stat().st_mode & 0o777 == 0o700
        # bytes per record per rule on the wire, at the false-positive bound 2^-40
        assert received / (RECORDS * len(RULES)) < 8.5
        assert tagset.false_positive_bound(MAX_EVALUATIONS, RECORDS, tags.bits) <= 2.0 ** -40
        session = RequesterSession(signed, queries, engine=Engine.OPRF_EPOCH, tagset=tags,
                                   signing_key=world.requester_key, chunk_size=8)
        outcome = run_remote_session(session, channel)
        # A second authorization of the same epoch uses the cache: headers only, unaccounted.
        again, received_again = cache.fetch(channel, national.authorize(), RULES)
        assert received_again == 0 and again.epoch_id == EPOCH
    epoch_matches = {(m.query_record_id, m.rule_id) for m in outcome.matches}
    assert epoch_matches == _plaintext_join(national.records, queries)
    assert len(epoch_matches) == 2 * len(HITS)
    epoch_results = {(r.query_record_id, r.rule_id, tuple(sorted(r.fields.items())))
                     for r in outcome.results}
    assert {q for q, _, _ in epoch_results} == {f"q-c{i}" for i in HITS}
    assert outcome.rejected == 0

    # The fetch is accounted: ledger row, audit entry, oversight export.
    fetches = world.ledger.tagset_fetches(auth_id)
    assert [(f.requester_id, f.epoch_id, f.rules, f.bytes_sent) for f in fetches] == [
        ("agency-a", EPOCH, RULES, received)]
    entries = [e for e in world.ledger.audit_entries() if e.kind == "tagset.fetched"]
    assert entries[-1].payload["bytes"] == received
    assert custodian_export(world.ledger, auth_id)["tagset_fetches"][0]["bytes"] == received
    budget = world.ledger.budget(auth_id)
    assert budget.evaluated == session.element_count and budget.disclosed == len(HITS)

    # The small-custodian mode on the same data gives the same matches and fields.
    small = make_world(national.tmp / "small", 0)
    small.authority, small.requester_key = world.authority, world.requester_key
    small.policy = P.CustodianPolicy.trusting("agency-b", [world.authority.public_key()])
    small.records = national.records
    signed_oprf = national.authorize(engines=(Engine.OPRF,))
    oprf_run = run_in_process(
        RequesterSession(signed_oprf, queries, signing_key=world.requester_key),
        small.custodian().session(), requester_id="agency-a")
    assert {(m.query_record_id, m.rule_id) for m in oprf_run.matches} == epoch_matches
    assert {(r.query_record_id, r.rule_id, tuple(sorted(r.fields.items())))
            for r in oprf_run.results} == epoch_results
    small.ledger.close()


def test_a_disclosure_bound_to_another_authorization_is_refused_over_mtls(
        national: National) -> None:
    world = national.world
    queries = _queries(national.records)[:2]
    first, second = national.authorize(), national.authorize()
    with custodian_over_mtls(national.custodian(), national.tmp / "pki2") as (address, tls), \
            _channel(address, tls) as channel:
        tags, _ = TagSetCache(national.tmp / "cache2").fetch(channel, first, RULES)
        done = run_remote_session(
            RequesterSession(first, queries, engine=Engine.OPRF_EPOCH, tagset=tags,
                             signing_key=world.requester_key), channel)
        stolen = done.matches[0]
        # Second authorization: its own honest evaluations, then the first one's proof.
        session = RequesterSession(second, queries, engine=Engine.OPRF_EPOCH, tagset=tags,
                                   signing_key=world.requester_key)
        stub = kit.pb2_grpc.CustodianStub(channel)
        opened = stub.OpenSession(codec.to_pb(session.open_request()), timeout=60)
        session.handle(codec.from_pb(OpenResponse, opened))
        _run_exchanges(session, stub, opened, lambda *a: None, WireStats(), 60)
        session.match()
        session.matches = [stolen]
        requests = [codec.to_pb(r, session_id=session.session_id)
                    for r in session.disclosure_requests()]
        (reply,) = list(stub.Disclose(iter(requests), timeout=60))
    response = codec.from_pb(DisclosureResponse, reply)
    assert response.rejected == (0,) and response.disclosures == ()
    assert world.ledger.budget(second.authorization.authorization_id).disclosed == 0
    assert world.ledger.budget(first.authorization.authorization_id).disclosed == 2


def test_tagset_fetch_refusals_over_mtls(national: National) -> None:
    world = national.world
    with custodian_over_mtls(national.custodian(), national.tmp / "pki3") as (address, tls), \
            _channel(address, tls) as channel:
        stub = kit.pb2_grpc.CustodianStub(channel)

        def fetch(signed: P.SignedAuthorization, rules: tuple[str, ...] = RULES) -> Any:
            request = codec.to_pb(TagSetRequest(signed.to_bytes(), rules))
            return list(stub.FetchTagSet(request, timeout=60))

        cases = [
            (national.authorize(requester="agency-x"), grpc.StatusCode.PERMISSION_DENIED,
             "requester_mismatch"),
            (national.authorize(engines=(Engine.OPRF,)), grpc.StatusCode.PERMISSION_DENIED,
             "engine_not_permitted"),
            (national.authorize(max_evaluations=MAX_EVALUATIONS + 1),
             grpc.StatusCode.FAILED_PRECONDITION, "epoch_evaluations_exceeded"),
        ]
        for signed, status, reason in cases:
            with pytest.raises(grpc.RpcError) as refused:
                fetch(signed)
            assert refused.value.code() is status, refused.value.details()
            assert refused.value.details().startswith(reason)
            assert REASON.match(refused.value.details())
        # The policy allows two fetches of an epoch per authorization; the third is refused.
        signed = national.authorize()
        assert len(fetch(signed)) >= 2 and len(fetch(signed)) >= 2
        with pytest.raises(grpc.RpcError) as refused:
            fetch(signed)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "fetched the tag set of epoch '2026-11' 2 times" in refused.value.details()
    assert len(world.ledger.tagset_fetches(signed.authorization.authorization_id)) == 2


# --------------------------------------------------------------------------- hostile custodian


def _stream(*chunks: TagSetChunk) -> Iterator[Any]:
    return iter([codec.to_pb(c) for c in chunks])


def _receive(tmp: Path, *chunks: TagSetChunk, rules: tuple[str, ...] = ("tin+dob",)) -> Any:
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    for f in work.iterdir():
        f.unlink()
    return TagSetCache(tmp)._receive(_stream(*chunks), work, rules, None)


def _fps(values: list[int]) -> Any:
    return tagset.from_ints(values)


def test_hostile_tag_set_streams_are_refused(tmp_path: Path) -> None:
    bits = 60
    good = next(tagset.encode_chunks(_fps([5, 9, 1 << 40]), bits, 3))
    ok = _receive(tmp_path, TagSetChunk(EPOCH, bits, "tin+dob", 3, good))
    assert [int(v) for b in tagset.decode_chunks(ok.tagset_chunks("tin+dob"))
            for v in tagset.to_ints(b)] == [5, 9, 1 << 40]
    cases = [
        ("path in the epoch id", [TagSetChunk("../x", bits, "tin+dob", 3, good)],
         "bad epoch id"),
        ("parent directory as the epoch id", [TagSetChunk("..", bits, "tin+dob", 3, good)],
         "bad epoch id"),
        ("unrequested rule", [TagSetChunk(EPOCH, bits, "dob+zip", 3, good)],
         "not requested"),
        ("fewer tags than announced", [TagSetChunk(EPOCH, bits, "tin+dob", 4, good)],
         "3 tags received, 4 announced"),
        ("more tags than announced", [TagSetChunk(EPOCH, bits, "tin+dob", 2, good)],
         "more than 2 tags"),
        ("header changes", [TagSetChunk(EPOCH, bits, "tin+dob", 3, good),
                            TagSetChunk("2026-12", bits, "tin+dob", 3, good)],
         "changed the epoch header"),
        ("chunks do not continue", [TagSetChunk(EPOCH, bits, "tin+dob", 6, good),
                                    TagSetChunk(EPOCH, bits, "tin+dob", 6, good)],
         "does not continue"),
        ("corrupt chunk", [TagSetChunk(EPOCH, bits, "tin+dob", 3, good[:-1])], "tag-set chunk"),
        ("bits out of range", [TagSetChunk(EPOCH, 8, "tin+dob", 3, good)], "8-bit"),
        ("unchanged, but nothing is cached",
         [TagSetChunk(EPOCH, bits, "tin+dob", 3, unchanged=True)], "differs from the cached"),
        ("missing rule", [TagSetChunk(EPOCH, bits, "tin+dob", 3, good)], "not ['tin+dob', "),
    ]
    for name, chunks, message in cases:
        rules = ("tin+dob", "tin+last_name") if name == "missing rule" else ("tin+dob",)
        with pytest.raises(ProtocolError, match=re.escape(message)):
            _receive(tmp_path, *chunks, rules=rules)
        assert name  # each case names what a hostile custodian tries
    # an endless stream stops at the announced count
    endless = [TagSetChunk(EPOCH, bits, "tin+dob", 1, next(tagset.encode_chunks(
        _fps([v]), bits, 1))) for v in range(1, 100)]
    with pytest.raises(ProtocolError, match="more than the announced 1 tags"):
        _receive(tmp_path, *endless)


def test_the_online_runner_runs_both_services_as_processes(national: National) -> None:
    """``benchmarks.national_online.run_online``: the operator's commands end to end
    (agency-b serve --records-store --epoch-index, agency-a serve, agency-a match --engine
    oprf-epoch), over mTLS, on the index built above."""
    from benchmarks.national_online import run_online
    from protocol.adapters.files import make_private_dir, write_secret
    from protocol.adapters.sqlite_ledger import Ledger
    from protocol.domain.records import write_query_csv

    work = national.tmp / "online-work"
    write_secret(make_private_dir(work / "secrets") / "master.secret",
                 national.world.master_secret.hex().encode(), force=True)
    queries_csv = national.tmp / "queries.csv"
    queries = _queries(national.records)
    with queries_csv.open("w", newline="") as fh:
        write_query_csv(queries, fh)
    result = run_online(national.store_dir, national.index_dir, queries_csv, work)
    assert result["matches"] == len(_plaintext_join(national.records, queries)) == 2 * len(HITS)
    assert result["disclosed_records"] == len(HITS)
    assert 0 < result["bytes_per_record_per_rule"] < 8.5
    assert result["fpr_per_authorization"] <= 2.0 ** -40
    assert result["peak_rss_custodian"] > 0 and result["peak_rss_requester"] > 0
    # read back and compared pair by pair with the plaintext join of the same files
    assert result["expected_matches"]["matches"] == result["matches"]
    assert result["expected_matches"]["subjects"] == result["matched_queries"] == len(HITS)
    check = result["pair_check"]
    assert check["pairs_equal"] and result["matches_agree_with_plaintext"]
    assert check["pairs"] == check["expected_pairs"] == 2 * len(HITS)
    assert check["missing_pairs"] == check["extra_pairs"] == 0
    assert {(q, r) for q, _rid, r in _triples(national.records, queries)} == \
        _plaintext_join(national.records, queries)
    (ledger_path,) = (work / "online").glob("run-*/agency-b/ledger.sqlite")
    with Ledger(ledger_path) as ledger:
        fetched = [e.payload for e in ledger.audit_entries() if e.kind == "tagset.fetched"]
    assert [(f["epoch_id"], f["bytes"]) for f in fetched] == [(EPOCH, result["tagset_bytes"])]


def test_the_machine_parallelism_probe_runs_the_build_kernel_in_k_processes() -> None:
    """The ceiling a K-worker build can reach here, measured with real processes."""
    from benchmarks.national import machine_parallelism

    probe = machine_parallelism(2, n=200)
    assert probe["evaluates_per_process"] == 200
    assert probe["one_process_s"] > 0 and probe["2_processes_s"] > 0
    # (from the unrounded times; the rounded ones agree to the rounding)
    assert probe["speedup"] == pytest.approx(
        2 * probe["one_process_s"] / probe["2_processes_s"], rel=0.15)
