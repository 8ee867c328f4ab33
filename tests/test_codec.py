"""Every protocol message survives protobuf bytes unchanged (proto/codec.py)."""

from __future__ import annotations

import pytest

from proto import codec
from protocol.crypto import kkrt
from protocol.domain import messages as m
from protocol.sessions import aggregate as agg

DISCLOSURE = m.Disclosure(
    index=2, rule_id="tin+dob", pseudonym="p-1", fields=(("first_name", "Ana"), ("zip", "02139"))
)

SAMPLES: list[object] = [
    m.OpenRequest("s-1", b"{auth}", "identity", ("tin+dob", "tin"), ("zip",), 12, "kkrt"),
    m.OpenResponse("s-1", "auth-1", "agency-b", ("tin",), (), 12, 40, 12, 1_000),
    m.TagChunk(seq=3, tags=b"\x01" * 24),
    m.EvaluateChunk(seq=1, elements=b"\x02" * 64),
    m.EvaluatedChunk(seq=1, elements=b"\x03" * 64),
    m.DisclosureRequest(seq=0, outputs=(("tin", b"\x04" * 64), ("tin+dob", b"\x05" * 64))),
    DISCLOSURE,
    m.DisclosureResponse(seq=4, disclosures=(DISCLOSURE, DISCLOSURE), rejected=(1, 7)),
    m.DisclosureResponse(seq=5, disclosures=()),
    m.CloseRequest(transcript_hash=b"\x06" * 32),
    m.Receipt("auth-1", "s-1", "agency-b", "agency-a", 12, 2, b"\x07" * 32, b"c" * 64, b"r" * 64),
    kkrt.KKRTSetup(
        version=1, context=b"ctx", bins=1024, stash=2, chunk_bins=256, attempt=0,
        base_ot_a=b"\x08" * 32,
    ),
    kkrt.KKRTBaseOTReply(code_nonce=b"\x09" * 32, base_ot_b=b"\x0a" * 64),
    kkrt.KKRTExtensionChunk(seq=0, start=0, bins=256, columns=b"\x0b" * 64),
    kkrt.KKRTTagChunk(seq=2, table=3, table_size=99, tags=b"\x0c" * 24),
    agg.AggregateOpenRequest("s-2", b"{auth}", "aggregate", "tin", "amount", 50, agg.ENGINE),
    agg.AggregateOpenResponse(
        "s-2", "auth-2", "agency-b", "aggregate", "tin", "amount", 50, 60, b"\x0d" * 256, 10, 7
    ),
    agg.BlindedChunk(seq=0, elements=b"\x0e" * 32),
    agg.DoubleBlindedChunk(seq=1, elements=b"\x0f" * 32),
    agg.CustodianPairsChunk(seq=0, elements=b"\x10" * 32, ciphertexts=b"\x11" * 512),
    agg.MaskedSum(count=5, ciphertext=b"\x12" * 512),
    agg.SumReveal(count=5, withheld=True, masked_sum=b"", reason="below minimum count"),
]


def test_every_table_entry_has_a_sample() -> None:
    assert {type(s) for s in SAMPLES} == set(codec.WIRE)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda s: type(s).__name__)
def test_round_trip_through_protobuf_bytes(message: object) -> None:
    pb = codec.to_pb(message)
    parsed = type(pb).FromString(pb.SerializeToString())
    assert codec.from_pb(type(message), parsed) == message


def test_envelope_fields_travel_beside_the_message() -> None:
    pb = codec.to_pb(m.EvaluateChunk(seq=9, elements=b"x" * 32), session_id="s-9")
    assert (pb.session_id, pb.seq) == ("s-9", 9)
    opened = m.OpenResponse("s-1", "auth-1", "agency-b", ("tin",), (), 1, 1, 12, 1)
    assert codec.to_pb(opened, custodian_public_key=b"k" * 32).custodian_public_key == b"k" * 32


def test_an_unset_engine_name_means_the_default_engine() -> None:
    pb = codec.pb2.OpenSessionRequest(session_id="s-1", tier="identity", match_rules=["tin"])
    assert codec.from_pb(m.OpenRequest, pb).engine == m.OpenRequest.engine
    agg_pb = codec.pb2.AggregateOpenRequest(session_id="s-2", tier="cardinality")
    assert codec.from_pb(agg.AggregateOpenRequest, agg_pb).engine == agg.ENGINE
