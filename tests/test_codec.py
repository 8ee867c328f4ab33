"""Every protocol message survives protobuf bytes unchanged (proto/codec.py)."""

from __future__ import annotations

import pytest

from proto import codec
from protocol.crypto import kkrt
from protocol.domain import messages as m
from protocol.engines import epoch
from protocol.errors import InvalidElementError
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
        "s-2", "auth-2", "agency-b", "aggregate", "tin", "amount", 50, 60, 10, 7
    ),
    agg.BlindedChunk(seq=0, elements=b"\x0e" * 32),
    agg.CustodianChunk(seq=1, elements=b"\x0f" * 32),
    agg.ReblindedChunk(seq=2, elements=b"\x10" * 32),
    agg.MatchChallenge(count=5, matched=b"\x11" * 8),
    agg.ConsistencyProof(public_element=b"\x12" * 32, challenge=b"\x13" * 32,
                         response=b"\x14" * 32),
    agg.AggregateRelease(count=5, sum=None, withheld=True, reason="below_minimum_count"),
    agg.AggregateRelease(count=12, sum=-(2**70), withheld=False),
    agg.AggregateRelease(count=1, sum=0, withheld=False),
    epoch.TagSetRequest(b"{auth}", ("tin+dob", "tin+last_name"), "2026-10"),
    epoch.TagSetChunk("2026-11", 77, "tin+dob", 3000, b"GPT1" + b"\x15" * 40),
    epoch.TagSetChunk("2026-11", 77, "tin+dob", 3000, unchanged=True),
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


# ------------------------------------------------------------------ wire limits (issue 13)


def test_an_integer_past_2_63_is_refused_by_name_when_decoded() -> None:
    """SQLite and signed arithmetic hold 2^63-1 at most; 2^63 and up never reach a session."""
    largest = codec.pb2.OpenSessionRequest(session_id="s-1", element_count=codec.MAX_WIRE_INTEGER)
    assert codec.from_pb(m.OpenRequest, largest).element_count == 2**63 - 1
    for too_large in (2**63, 2**64 - 1):
        pb = codec.pb2.OpenSessionRequest(session_id="s-1", element_count=too_large)
        with pytest.raises(InvalidElementError) as err:
            codec.from_pb(m.OpenRequest, pb)
        assert err.value.code == "integer_too_large"
        assert f"OpenSessionRequest.element_count is {too_large}" in str(err.value)


def test_a_repeated_field_past_the_limit_is_refused() -> None:
    item = codec.pb2.DisclosureItem(rule_id="tin", output=bytes(64))
    at_limit = codec.pb2.DisclosureRequest(items=[item] * codec.MAX_REPEATED_ENTRIES)
    assert len(codec.from_pb(m.DisclosureRequest, at_limit).outputs) == codec.MAX_REPEATED_ENTRIES
    past = codec.pb2.DisclosureRequest(items=[item] * (codec.MAX_REPEATED_ENTRIES + 1))
    past_limit = codec.MAX_REPEATED_ENTRIES + 1
    with pytest.raises(InvalidElementError,
                       match=rf"DisclosureRequest.items has {past_limit} entries"):
        codec.from_pb(m.DisclosureRequest, past)


def test_an_overlong_string_is_refused_even_nested() -> None:
    """A custodian's reply is checked as a request is: a malicious peer may send either."""
    long_value = "x" * (codec.MAX_STRING_CHARS + 1)
    reply = codec.to_pb(m.DisclosureResponse(seq=0, disclosures=(
        m.Disclosure(index=0, rule_id="tin", pseudonym="p", fields=(("zip", long_value),)),)))
    with pytest.raises(InvalidElementError) as err:
        codec.from_pb(m.DisclosureResponse, reply)
    assert (err.value.code, str(err.value)) == (
        "field_too_long", "Field.value has 4097 characters; the limit is 4096")


def test_one_bad_message_among_thousands_is_found() -> None:
    """Nested messages are checked a field at a time across the whole batch: the one
    overlong value or oversized list is found wherever it sits."""
    def reply(bad: m.Disclosure | None, at: int) -> object:
        good = [m.Disclosure(index=i, rule_id="tin", pseudonym=f"p{i}",
                             fields=(("zip", "20500"), ("dob", "1980-02-03")))
                for i in range(3000)]
        if bad is not None:
            good[at] = bad
        return codec.to_pb(m.DisclosureResponse(seq=1, disclosures=tuple(good)))

    assert len(codec.from_pb(m.DisclosureResponse, reply(None, 0)).disclosures) == 3000
    long_value = "x" * (codec.MAX_STRING_CHARS + 1)
    many = tuple((f"f{i}", "v") for i in range(codec.MAX_REPEATED_ENTRIES + 1))
    cases = [
        (m.Disclosure(index=7, rule_id="tin", pseudonym="p", fields=(("zip", long_value),)),
         "field_too_long", "Field.value has 4097 characters"),
        (m.Disclosure(index=7, rule_id="tin", pseudonym="p", fields=many),
         "too_many_entries", f"Disclosure.fields has {codec.MAX_REPEATED_ENTRIES + 1} entries"),
    ]
    for bad, code, text in cases:
        for at in (0, 1499, 2999):
            with pytest.raises(InvalidElementError) as err:
                codec.from_pb(m.DisclosureResponse, reply(bad, at))
            assert err.value.code == code and text in str(err.value)


BROKEN_WIRE = {
    "invalid UTF-8 in a string": b"\x0a\x02\xc3\x28",
    "a varint longer than 64 bits": b"\x10" + b"\xff" * 10 + b"\x01",
    "a truncated varint": b"\x10\xff",
    "a length past the end": b"\x1a\x80\x80\x40ab",
    "wire type 7": b"\x0f\x00",
    "field number 0": b"\x00\x00",
}


@pytest.mark.parametrize("data", BROKEN_WIRE.values(), ids=BROKEN_WIRE.keys())
def test_the_request_decoder_never_raises_on_broken_bytes(data: bytes) -> None:
    """gRPC answers INTERNAL when a deserializer raises; this one returns what to refuse."""
    decoded = codec.request_decoder(codec.pb2.ElementChunk)(data)
    assert isinstance(decoded, codec.Undecodable)
    assert decoded.error.code == "malformed_message"
    assert str(decoded.error).startswith("not a well-formed ElementChunk: ")
    assert len(str(decoded.error)) < 300


def test_the_request_decoder_checks_limits_and_passes_good_messages() -> None:
    decode = codec.request_decoder(codec.pb2.ElementChunk)
    good = codec.pb2.ElementChunk(session_id="s-1", seq=3, elements=bytes(64))
    assert decode(good.SerializeToString()) == good
    too_far = decode(codec.pb2.ElementChunk(seq=2**63).SerializeToString())
    assert isinstance(too_far, codec.Undecodable)
    assert too_far.error.code == "integer_too_large"

