"""The KKRT engine (kkrt): base OTs, transposes, cuckoo hashing, OPRF, PSI, checks."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.adapters.workers import process_pool
from protocol.crypto import kkrt, oprf
from protocol.crypto.kkrt_cuckoo import (
    EXPANSION,
    candidate_bins,
    failure_bound_log2,
    place,
    table_size,
)
from protocol.crypto.kkrt_matrix import (
    ColumnPRG,
    cols_to_rows,
    naive_cols_to_rows,
    naive_rows_to_cols,
    rows_to_cols,
)
from protocol.errors import InvalidElementError, ProtocolError

CTX = b"auth-test|session-1"


def _keys(prefix: str, ids) -> list[bytes]:
    return [f"{prefix}-{i}".encode() for i in ids]


def _opened(keys, records, *, ctx=CTX, **kw):
    """A requester and a custodian after setup and base OTs."""
    custodian = kkrt.KKRTCustodian(records, b"k" * 32, seed_context=ctx,
                                   max_units=kw.pop("max_units", None))
    requester = kkrt.KKRTRequester(keys, ctx, **kw)
    (reply,) = custodian.handle(requester.setup())
    assert requester.handle(reply) == []
    return requester, custodian


def _extend(requester, custodian) -> None:
    for chunk in requester.extension_chunks():
        assert custodian.handle(chunk) == []
    for tags in custodian.tag_chunks():
        requester.handle(tags)


# --------------------------------------------------------------------------- bit matrices


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), width=st.integers(1, 24), seed=st.integers(0, 2**32 - 1))
def test_transpose_matches_naive_reference(rows: int, width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    matrix = rng.integers(0, 256, size=(8 * rows, width), dtype=np.uint8)
    cols = rows_to_cols(matrix)
    assert cols.shape == (8 * width, rows)
    assert np.array_equal(cols, naive_rows_to_cols(matrix))
    assert np.array_equal(cols_to_rows(cols), matrix)
    assert np.array_equal(naive_cols_to_rows(cols), matrix)
    target = np.zeros((8 * rows + 8, width), dtype=np.uint8)
    cols_to_rows(cols, out=target[8:])
    assert np.array_equal(target[8:], matrix) and not target[:8].any()


def test_transpose_bit_convention_is_msb_first() -> None:
    # bit c of row r is bit 7 - c % 8 of byte c // 8, and lands in column c at row r
    matrix = np.zeros((16, 2), dtype=np.uint8)
    matrix[3, 1] = 0b0010_0000  # row 3, column 8 + 2 = 10
    cols = rows_to_cols(matrix)
    assert np.flatnonzero(np.unpackbits(cols, axis=1)).tolist() == [10 * 16 + 3]


def test_transpose_rejects_ragged_shapes() -> None:
    with pytest.raises(ValueError):
        rows_to_cols(np.zeros((12, 8), dtype=np.uint8))
    with pytest.raises(ValueError):
        cols_to_rows(np.zeros((12, 8), dtype=np.uint8))


def test_column_prg_is_one_stream_however_it_is_sliced() -> None:
    seeds = [bytes([i]) * 16 for i in range(4)]
    whole = ColumnPRG(seeds, block=64).next(300)
    parts = ColumnPRG(seeds, block=64)
    pieces = np.concatenate([parts.next(n) for n in (1, 63, 64, 100, 72)], axis=1)
    assert np.array_equal(whole, pieces)
    assert len({whole[i].tobytes() for i in range(4)}) == 4  # distinct seeds, distinct columns


# --------------------------------------------------------------------------- base OTs


def test_base_ot_receiver_gets_exactly_the_chosen_seed() -> None:
    seed = os.urandom(32)
    sender = kkrt.BaseOTSender(seed)
    choices = np.array([0, 1, 1, 0, 1, 0, 0, 1], dtype=np.uint8)
    scalars = [oprf.random_scalar() for _ in choices]
    b_points, chosen = kkrt.base_ot_receive(seed, sender.a_point, choices, scalars)
    k0, k1 = sender.keys(b_points)
    for i, c in enumerate(choices.tolist()):
        assert chosen[i] == (k1[i] if c else k0[i])
        assert chosen[i] != (k0[i] if c else k1[i])
    assert len(set(k0) | set(k1)) == 2 * len(choices)


def test_base_ot_rejects_bad_elements() -> None:
    seed = os.urandom(32)
    sender = kkrt.BaseOTSender(seed)
    good = kkrt.base_ot_receive(seed, sender.a_point, np.array([1], np.uint8),
                                [oprf.random_scalar()])[0]
    for bad in (bytes(32), b"\xff" * 32, good[:31] + bytes([good[31] | 0x80]), good[:31]):
        with pytest.raises(InvalidElementError):
            kkrt.BaseOTSender(seed).keys(bad)
    with pytest.raises(InvalidElementError, match="equals A"):
        sender.keys(sender.a_point)
    with pytest.raises(InvalidElementError, match="element A"):
        kkrt.base_ot_receive(seed, bytes(32), np.array([0], np.uint8), [oprf.random_scalar()])


def test_base_ots_inside_the_session_match_the_choice_string() -> None:
    requester, custodian = _opened(_keys("q", range(20)), _keys("q", range(10)))
    prg0, prg1, prg = requester._prg0, requester._prg1, custodian._prg
    a, b, c = prg0.next(16), prg1.next(16), prg.next(16)
    s = custodian._s_bits.astype(bool)
    assert 100 < s.sum() < 412  # a random 512-bit choice string
    assert np.array_equal(c[s], b[s]) and np.array_equal(c[~s], a[~s])
    assert not np.any(np.all(a == b, axis=1))


# --------------------------------------------------------------------------- cuckoo hashing


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 400), seed=st.integers(0, 2**32 - 1))
def test_cuckoo_placement_is_valid(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    bins = table_size(n)
    cands = candidate_bins(rng.integers(0, 2**63, size=(n, 3), dtype=np.uint64), bins)
    assert np.all(cands[:, 0] != cands[:, 1]) and np.all(cands[:, 1] != cands[:, 2])
    assert np.all(cands[:, 0] != cands[:, 2]) and cands.max(initial=0) < bins
    placement = place(cands, bins, 0, rng)
    assert len(set(placement.bin_of.tolist())) == n  # one item per bin
    assert np.all(cands[np.arange(n), placement.table_of] == placement.bin_of)
    assert np.array_equal(placement.item_in[placement.bin_of], np.arange(n))


def test_exact_fallback_places_what_a_walk_may_miss() -> None:
    # 3 items that all want bins {0, 1, 2}: a perfect placement exists and must be found
    cands = np.array([[0, 1, 2], [0, 1, 2], [0, 1, 2]], dtype=np.int64)
    placement = place(cands, 3, 0, np.random.default_rng(0))
    assert sorted(placement.bin_of.tolist()) == [0, 1, 2]
    with pytest.raises(OverflowError):  # 4 items in 3 bins (Hall's condition fails)
        place(np.vstack([cands, [0, 1, 2]]), 3, 0, np.random.default_rng(0))
    stashed = place(np.vstack([cands, [0, 1, 2]]), 3, 1, np.random.default_rng(0))
    assert sorted(stashed.bin_of.tolist()) == [0, 1, 2, 3] and stashed.table_of.max() == 3


def test_table_size_meets_the_stated_bound() -> None:
    for n in (0, 1, 2, 5, 17, 100, 1000, 5000):
        m = table_size(n)
        assert m >= math.ceil(EXPANSION * n) and m % 8 == 0
        if n >= 2:
            assert failure_bound_log2(n, m) <= -40
    # the large-n rule 1.30 n is covered by the bound where it is used (from 2^14 on)
    assert failure_bound_log2(1 << 14, table_size(1 << 14)) <= -40
    assert table_size(1 << 20) == math.ceil(1.30 * (1 << 20)) + (-math.ceil(1.30 * (1 << 20))) % 8
    # the bound is a real bound: it says nothing (> 0) for an overloaded table
    assert failure_bound_log2(1000, 1000) > 0
    assert failure_bound_log2(1, 8) == float("-inf")


def test_cuckoo_failure_raises_a_specific_error() -> None:
    with pytest.raises(kkrt.CuckooHashingError) as info:
        kkrt.KKRTRequester(_keys("q", range(20)), CTX, bins=8, max_attempts=3)
    assert info.value.code == "cuckoo_failure"


def test_cuckoo_failure_rehashes_with_the_next_attempt() -> None:
    # 7 items in 8 bins fail often enough that some contexts need a second attempt
    keys = _keys("q", range(7))
    for i in range(400):
        ctx = b"rehash-%d" % i
        requester = kkrt.KKRTRequester(keys, ctx, bins=8, max_attempts=8)
        if requester.attempt > 0:
            break
    else:
        pytest.fail("no context needed a re-hash")
    custodian = kkrt.KKRTCustodian(keys[:4], b"k" * 32, seed_context=ctx)
    (reply,) = custodian.handle(requester.setup())
    requester.handle(reply)
    _extend(requester, custodian)
    assert sorted(requester.matches()) == [0, 1, 2, 3]


# --------------------------------------------------------------------------- the OPRF


def test_requester_output_equals_custodian_evaluation() -> None:
    keys = _keys("q", range(300))
    requester, custodian = _opened(keys, _keys("r", range(50)))
    _extend(requester, custodian)
    bins, outputs, tags, tables = requester.output_arrays()
    for i in range(0, 300, 7):
        j = int(bins[i])
        assert custodian.evaluate(j, keys[i]) == outputs[i].tobytes()
        assert custodian.evaluate(j, keys[(i + 1) % 300]) != outputs[i].tobytes()
        other = (j + 1) % requester.units  # another instance: another key k_j
        assert custodian.evaluate(other, keys[i]) != outputs[i].tobytes()
    assert np.array_equal(tags, np.array([np.frombuffer(t, np.uint8) for t in kkrt.derive_tags(
        CTX, [o.tobytes() for o in outputs])]))
    assert set(tables.tolist()) <= {0, 1, 2}


@settings(max_examples=15, deadline=None)
@given(
    common=st.sets(st.integers(0, 10_000), max_size=40),
    only_mine=st.sets(st.integers(10_001, 20_000), max_size=40),
    only_theirs=st.sets(st.integers(20_001, 30_000), max_size=40),
    duplicates=st.integers(0, 3),
)
def test_psi_equals_plain_intersection(common, only_mine, only_theirs, duplicates) -> None:
    mine = _keys("k", sorted(common | only_mine))
    mine += mine[:duplicates]  # repeated queries share a bin and both match
    theirs = _keys("k", sorted(common | only_theirs))
    result = kkrt.run_kkrt_in_process(mine, theirs, seed_context=CTX, chunk_bins=64)
    assert {mine[i] for i in result.matches} == set(mine) & set(theirs)
    assert len(result.matches) == sum(1 for k in mine if k in set(theirs))
    assert result.requester.units == kkrt.units_for(len(set(mine)))


def test_psi_with_stash_slots() -> None:
    # 8 items into 6 bins + 2 stash slots: at least two items live in the stash
    keys = _keys("s", range(8))
    records = keys[::2] + _keys("x", range(5))
    result = kkrt.run_kkrt_in_process(keys, records, seed_context=CTX, bins=6, stash=2,
                                      chunk_bins=8)
    tables = result.requester.output_arrays()[3]
    assert (tables >= 3).sum() >= 2
    assert sorted(result.matches) == [0, 2, 4, 6]
    assert result.wire_bytes["tags"] == kkrt.TAG_SIZE * len(records) * (3 + 2)


def test_cross_check_with_the_oprf_engine_on_the_same_inputs() -> None:
    # The RFC 9497 engine matches x iff Evaluate(k, x) is in the custodian's set; KKRT must
    # find exactly the same queries (the lead repeats this through the sessions).
    mine = _keys("c", range(0, 120, 3)) + _keys("z", range(10))
    theirs = _keys("c", range(0, 120, 2))
    sk, _ = oprf.derive_key_pair(b"s" * 32, b"cross-check")
    their_outputs = set(oprf.evaluate_batch(sk, theirs))
    by_oprf = {i for i, o in enumerate(oprf.evaluate_batch(sk, mine)) if o in their_outputs}
    result = kkrt.run_kkrt_in_process(mine, theirs, seed_context=CTX)
    assert set(result.matches) == by_oprf == {i for i, k in enumerate(mine) if k in theirs}


def test_empty_sides() -> None:
    assert kkrt.run_kkrt_in_process([], _keys("r", range(5)), seed_context=CTX).matches == []
    assert kkrt.run_kkrt_in_process(_keys("r", range(5)), [], seed_context=CTX).matches == []


def test_tags_are_unlinkable_across_sessions_and_sorted() -> None:
    keys = _keys("u", range(64))
    a = kkrt.run_kkrt_in_process(keys, keys, seed_context=b"auth-1|s1")
    b = kkrt.run_kkrt_in_process(keys, keys, seed_context=b"auth-1|s2")
    c = kkrt.run_kkrt_in_process(keys, keys, seed_context=b"auth-2|s1")
    sets = [{t.tobytes() for t in r.requester.output_arrays()[2]} for r in (a, b, c)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2])
    for table in a.custodian._finish_tables():
        raw = [t.tobytes() for t in table.tags]
        assert raw == sorted(raw)


# --------------------------------------------------------------------------- disclosure


def test_verified_disclosure() -> None:
    mine = _keys("d", range(0, 60, 2))
    theirs = _keys("d", range(60))
    result = kkrt.run_kkrt_in_process(mine, theirs, seed_context=CTX)
    requester, custodian = result.requester, result.custodian
    assert len(result.matches) == 30
    for i in result.matches[:10]:
        out = requester.output_for(i)
        record = theirs.index(mine[i])
        assert custodian.lookup(out.tag) == [record]
        assert custodian.find(out.bin_index, out.output) == [record]
        assert custodian.verify(out.bin_index, out.output, mine[i])
        assert not custodian.verify(out.bin_index, out.output, theirs[(record + 1) % 60])
        forged = bytes([out.output[0] ^ 1]) + out.output[1:]
        assert not custodian.verify(out.bin_index, forged, mine[i])
        assert not custodian.verify(out.bin_index, out.output[:15], mine[i])
        assert custodian.find(out.bin_index, forged) == []
        assert kkrt.parse_proof(out.proof) == (out.bin_index, out.output)
    assert requester.proofs(result.matches) == [
        requester.output_for(i).proof for i in result.matches]
    with pytest.raises(ProtocolError):
        kkrt.parse_proof(b"\x00" * 19)
    # a bin that is not one of the record's three candidate bins never verifies
    out = requester.output_for(result.matches[0])
    cands = custodian._keys.bins(kkrt.key_digests([mine[result.matches[0]]]), 0, requester.bins)
    outside = next(j for j in range(requester.bins) if j not in cands[0].tolist())
    assert not custodian.verify(outside, out.output, mine[result.matches[0]])
    assert not custodian.verify(requester.units + 5, out.output, mine[result.matches[0]])


def test_find_many_equals_find_one_by_one() -> None:
    """The batched disclosure check gives each proof exactly what ``find`` gives it,
    whatever else shares the batch: genuine, forged, short, out-of-range, repeated."""
    mine = _keys("b", range(0, 80, 2))
    theirs = _keys("b", range(80))
    result = kkrt.run_kkrt_in_process(mine, theirs, seed_context=CTX)
    requester, custodian = result.requester, result.custodian
    genuine = [requester.output_for(i) for i in result.matches]
    proofs: list[tuple[int, bytes]] = []
    for out in genuine[:12]:
        proofs.append((out.bin_index, out.output))
        proofs.append((out.bin_index, bytes([out.output[0] ^ 0x80]) + out.output[1:]))
        proofs.append(((out.bin_index + 1) % requester.units, out.output))
    proofs += [(genuine[0].bin_index, genuine[0].output[:15]), (requester.units, bytes(16)),
               (-1, genuine[1].output), (genuine[2].bin_index, genuine[2].output)]
    batched = custodian.find_many(proofs)
    assert batched == [custodian.find(b, o) for b, o in proofs]
    assert [bool(hits) for hits in batched[:36:3]] == [True] * 12
    assert not any(batched[i] for i in range(36) if i % 3)
    assert batched[-1] == [theirs.index(mine[result.matches[2]])]
    assert custodian.find_many([]) == []


# --------------------------------------------------------------------------- malformed input


def test_setup_is_validated() -> None:
    requester = kkrt.KKRTRequester(_keys("q", range(10)), CTX)
    setup = requester.setup()
    cases = {
        "identity A": (replace(setup, base_ot_a=bytes(32)), InvalidElementError),
        "short A": (replace(setup, base_ot_a=setup.base_ot_a[:31]), InvalidElementError),
        "context": (replace(setup, context=bytes(32)), ProtocolError),
        "version": (replace(setup, version=9), ProtocolError),
        "ragged": (replace(setup, bins=setup.bins + 1), ProtocolError),
        "chunk": (replace(setup, chunk_bins=12), ProtocolError),
        "attempt": (replace(setup, attempt=kkrt.MAX_ATTEMPTS), ProtocolError),
        "huge": (replace(setup, bins=kkrt.MAX_BINS + 8), ProtocolError),
    }
    for name, (message, error) in cases.items():
        custodian = kkrt.KKRTCustodian(_keys("r", range(5)), b"k" * 32, seed_context=CTX)
        with pytest.raises(error):
            custodian.handle(message)
        assert custodian.state is kkrt.CustodianState.FAILED, name
    over = kkrt.KKRTCustodian([], b"k" * 32, seed_context=CTX, max_units=setup.units - 8)
    with pytest.raises(ProtocolError, match="reserved"):
        over.handle(setup)
    other = kkrt.KKRTCustodian([], b"k" * 32, seed_context=b"another session")
    with pytest.raises(ProtocolError, match="seed context"):
        other.handle(setup)


def test_base_ot_reply_is_validated() -> None:
    for mutate, error in (
        (lambda r: replace(r, base_ot_b=r.base_ot_b[:-1]), InvalidElementError),
        (lambda r: replace(r, base_ot_b=r.base_ot_b[:-32] + bytes(32)), InvalidElementError),
        (lambda r: replace(r, base_ot_b=b"\xee" * 32 + r.base_ot_b[32:]), InvalidElementError),
        (lambda r: replace(r, code_nonce=b"short"), ProtocolError),
    ):
        requester = kkrt.KKRTRequester(_keys("q", range(10)), CTX)
        custodian = kkrt.KKRTCustodian([], b"k" * 32, seed_context=CTX)
        (reply,) = custodian.handle(requester.setup())
        with pytest.raises(error):
            requester.handle(mutate(reply))
        assert requester.state is kkrt.RequesterState.FAILED


def test_extension_chunks_are_validated() -> None:
    def fresh():
        return _opened(_keys("q", range(100)), _keys("r", range(10)), chunk_bins=64)

    requester, custodian = fresh()
    first = requester.extension_chunk()
    bad = {
        "short": replace(first, columns=first.columns[:-1]),
        "long": replace(first, columns=first.columns + b"\x00"),
        "seq": replace(first, seq=1),
        "start": replace(first, start=8),
        "bins": replace(first, bins=first.bins - 8, columns=first.columns[: 512 * 7]),
    }
    for name, chunk in bad.items():
        _, custodian = fresh()
        with pytest.raises(ProtocolError):
            custodian.handle(chunk)
        assert custodian.state is kkrt.CustodianState.FAILED, name
    requester, custodian = fresh()
    custodian.handle(requester.extension_chunk())
    with pytest.raises(ProtocolError, match="not the expected chunk"):
        custodian.handle(first)  # a replay
    with pytest.raises(ProtocolError):
        list(custodian.tag_chunks())  # no tags before the extension finished


def test_tag_chunks_are_validated() -> None:
    requester, custodian = _opened(_keys("q", range(30)), _keys("r", range(30)), chunk_bins=8)
    for chunk in requester.extension_chunks():
        custodian.handle(chunk)
    good = next(iter(custodian.tag_chunks(chunk_tags=8)))
    for chunk in (
        replace(good, tags=good.tags[:-1]),
        replace(good, seq=3),
        replace(good, table=7),
        replace(good, table_size=2),
    ):
        requester2, custodian2 = _opened(_keys("q", range(30)), _keys("r", range(30)),
                                         chunk_bins=8)
        for ext in requester2.extension_chunks():
            custodian2.handle(ext)
        with pytest.raises(ProtocolError):
            requester2.handle(chunk)
    with pytest.raises(ProtocolError, match="every custodian tag set"):
        requester.matches()


def test_messages_in_the_wrong_state_are_refused() -> None:
    requester = kkrt.KKRTRequester(_keys("q", range(10)), CTX)
    custodian = kkrt.KKRTCustodian([], b"k" * 32, seed_context=CTX)
    with pytest.raises(ProtocolError):
        next(requester.extension_chunks())
    setup = requester.setup()
    with pytest.raises(ProtocolError):
        requester.setup()
    custodian.handle(setup)
    with pytest.raises(ProtocolError):
        custodian.handle(setup)
    with pytest.raises(ProtocolError):
        requester.handle(setup)
    with pytest.raises(ProtocolError):
        custodian.verify(0, bytes(16), b"x")


def test_transcript_bytes_bind_every_field() -> None:
    requester = kkrt.KKRTRequester(_keys("q", range(10)), CTX)
    setup = requester.setup()
    assert setup.transcript_bytes() != replace(setup, attempt=1).transcript_bytes()
    chunk = kkrt.KKRTExtensionChunk(seq=0, start=0, bins=8, columns=bytes(512))
    assert chunk.transcript_bytes() != replace(chunk, seq=1).transcript_bytes()
    tags = kkrt.KKRTTagChunk(seq=0, table=0, table_size=1, tags=bytes(12))
    assert tags.transcript_bytes() != replace(tags, table=1).transcript_bytes()


# --------------------------------------------------------------------------- processes


def test_process_pool_gives_the_same_matches() -> None:
    mine = _keys("p", range(0, 80_000, 2))  # large enough for the parallel paths
    theirs = _keys("p", range(0, 80_000, 3))
    executor = process_pool(2)
    try:
        result = kkrt.run_kkrt_in_process(mine, theirs, seed_context=CTX, executor=executor)
    finally:
        executor.shutdown()
    assert {mine[i] for i in result.matches} == set(mine) & set(theirs)


# --------------------------------------------------------------------------- overlap and workers


def test_custodian_tag_sets_are_the_same_from_worker_tags() -> None:
    """The workers return tags (not outputs); the sorted sets equal the in-process ones."""
    mine = _keys("w", range(0, 60_000, 2))
    theirs = _keys("w", range(0, 60_000, 3))
    executor = process_pool(2)
    try:
        # two custodians with one key and nonce see the same setup and chunks: same q rows
        local, pooled = (kkrt.KKRTCustodian(theirs, b"k" * 32, seed_context=CTX, nonce=b"n" * 32,
                                            executor=ex) for ex in (None, executor))
        requester = kkrt.KKRTRequester(mine, CTX)
        setup = requester.setup()
        (reply,) = local.handle(setup)
        assert pooled.handle(setup) == [reply]
        requester.handle(reply)
        for chunk in requester.extension_chunks():
            local.handle(chunk)
            pooled.handle(chunk)
        sets = [list(c.tag_chunks()) for c in (local, pooled)]
    finally:
        executor.shutdown()
    assert sets[0] == sets[1]
    for tags in sets[1]:
        requester.handle(tags)
    assert {mine[i] for i in requester.matches()} == set(mine) & set(theirs)


def test_placement_on_a_worker_equals_placement_in_process() -> None:
    """``place_on`` runs the cuckoo placement as a background job (so it overlaps with the
    open); the placement and the matches are the in-process run's, and a table that cannot
    be placed fails at setup with the same specific error."""
    mine = _keys("c", range(0, 20_000, 2))
    theirs = _keys("c", range(0, 20_000, 3))
    executor = process_pool(2)
    try:
        local = kkrt.KKRTRequester(mine, CTX)
        background = kkrt.KKRTRequester(mine, CTX, place_on=executor)
        assert background.units == local.units  # known before the placement is
        assert background.attempt == local.attempt
        for name in ("bin_of", "table_of"):
            assert np.array_equal(getattr(background._placement, name),
                                  getattr(local._placement, name))
        requester = kkrt.KKRTRequester(mine, CTX, place_on=executor)
        custodian = kkrt.KKRTCustodian(theirs, b"k" * 32, seed_context=CTX)
        (reply,) = custodian.handle(requester.setup())
        requester.handle(reply)
        _extend(requester, custodian)
        doomed = kkrt.KKRTRequester(_keys("q", range(20)), CTX, bins=8, max_attempts=3,
                                    place_on=executor)
        with pytest.raises(kkrt.CuckooHashingError) as info:
            doomed.setup()
    finally:
        executor.shutdown()
    assert {mine[i] for i in requester.matches()} == set(mine) & set(theirs)
    assert info.value.code == "cuckoo_failure"


def test_worker_tags_equal_tags_of_the_outputs() -> None:
    """``_hash_tag_rows`` is H then T: the same bytes as hashing and tagging apart."""
    rng = np.random.default_rng(5)
    records = rng.integers(0, 256, size=(1000, 72), dtype=np.uint8)
    keys = kkrt._SessionKeys(kkrt._session_seed(CTX))
    outputs = np.frombuffer(kkrt._hash_rows(records, keys.salt), dtype=np.uint8).reshape(-1, 16)
    assert kkrt._hash_tag_rows(records, keys.salt, keys.tag_key) == keys.tags(outputs).tobytes()


def test_custodian_builds_its_tag_sets_with_the_last_chunk() -> None:
    """The sets are ready when the extension completes, before anyone asks for them."""
    requester, custodian = _opened(_keys("q", range(200)), _keys("q", range(100, 400)),
                                   chunk_bins=64)
    chunks = list(requester.extension_chunks())
    for chunk in chunks[:-1]:
        custodian.handle(chunk)
        assert "tags" not in custodian.timings
    custodian.handle(chunks[-1])
    assert "tags" in custodian.timings
    for tags in custodian.tag_chunks():
        requester.handle(tags)
    assert {f"q-{i}".encode() for i in range(100, 200)} == {
        f"q-{i}".encode() for i in requester.matches()}


def test_requester_matches_each_tag_set_as_it_completes() -> None:
    """Sets are matched while later ones stream; the result equals matching at the end."""
    mine, theirs = _keys("m", range(0, 3000, 2)), _keys("m", range(0, 3000, 5))
    requester, custodian = _opened(mine, theirs, chunk_bins=64)
    lazy, custodian2 = _opened(mine, theirs, chunk_bins=64)
    for chunk in requester.extension_chunks():  # the generator finishes the outputs
        custodian.handle(chunk)
    while lazy.state is kkrt.RequesterState.EXTENDING:  # chunk by chunk: outputs wait
        custodian2.handle(lazy.extension_chunk())
    seen: list[int] = []
    for tags in custodian.tag_chunks(chunk_tags=97):
        requester.handle(tags)
        seen.append(len(requester._table_hits))
    assert seen[0] == 0 and seen[-1] == kkrt.CUCKOO_HASHES  # matched before matches()
    for tags in custodian2.tag_chunks(chunk_tags=97):
        lazy.handle(tags)
    assert lazy._table_hits == {}
    expected = set(mine) & set(theirs)
    assert {mine[i] for i in requester.matches()} == expected
    assert {mine[i] for i in lazy.matches()} == expected
    assert requester.matches() == requester.matches()  # repeatable


def test_dedupe_equals_the_sorted_unique_reference() -> None:
    rng = np.random.default_rng(11)
    digests = rng.integers(0, 256, size=(5000, 16), dtype=np.uint8)
    digests[10] = digests[20] = digests[4000]  # repeated keys
    digests[30, :8] = digests[31, :8]  # same first word, different digests
    distinct, item = kkrt._dedupe(digests)
    ref = np.unique(digests.view("V16").ravel())
    assert distinct.shape[0] == ref.size == 4998
    assert np.array_equal(distinct[item], digests)  # every key maps to its own digest
    assert len(set(item.tolist())) == distinct.shape[0]
    assert np.array_equal(np.unique(distinct.view("V16").ravel()), ref)
