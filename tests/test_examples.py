"""The embedding surface (issue 14): what `protocol` exports, the examples, the guide's and
the README's code, and the library refusing what the services refuse.

The examples and the README snippet run as real processes (a fresh interpreter, as a user
would run them); the guide's blocks run in order in one namespace, as a reader would paste
them. Each is checked on what it prints or leaves behind, not only on running.
"""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import pytest

import protocol
from protocol.domain.records import ValidatedQueries, validate_queries
from protocol.errors import InvalidRecordError, LedgerError
from protocol.sessions.aggregate import AggregateRequesterSession
from protocol.sessions.identity import (
    CustodianConfig,
    RequesterSession,
    run_in_process,
)
from tests.factories import as_query, make_person, make_world

ROOT = Path(__file__).resolve().parents[1]
TODAY = date.today()


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", path.read_text(encoding="utf-8"),
                      re.S | re.M)


def _run(args: list[str], cwd: Path) -> str:
    """Run a program in a fresh interpreter; its stdout (stderr shown on failure)."""
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


# --------------------------------------------------------------------------- the programs


def test_identity_example_matches_the_held_subjects_and_refuses_the_placeholder(
        tmp_path: Path) -> None:
    out = _run([str(ROOT / "examples" / "identity_match.py")], tmp_path).splitlines()
    assert out == [
        "refused a-4: placeholder_address (address 'Failed to Provide' is a placeholder)",
        "match a-1 by tin+dob: address=12 Main Street, city=Springfield, state=IL, zip=62701",
        "match a-2 by tin+dob: address=301 Elm Drive, city=Chicago, state=IL, zip=60614",
        "no match a-3",
        "receipt: evaluated 3, disclosed 2, signed by custodian True, "
        "countersigned by requester True",
        "custodian ledger: 3 of 3 evaluations, 2 of 3 disclosures",
    ]
    assert list(tmp_path.iterdir()) == []  # its ledger lived in a temporary directory


def test_aggregate_example_learns_the_count_and_sum_only(tmp_path: Path) -> None:
    out = _run([str(ROOT / "examples" / "aggregate_query.py")], tmp_path)
    assert "tier aggregate: 2 of 3 subjects held" in out
    assert "tax paid together: 4225000 cents" in out  # 1,250,000 + 2,975,000
    assert "countersigned by requester True" in out
    assert "a-1" not in out and "b-1001" not in out  # no identity is printed: none is known


def test_named_example_matches_only_approved_subjects(tmp_path: Path) -> None:
    out = _run([str(ROOT / "examples" / "named_subjects.py")], tmp_path).splitlines()
    assert out == [
        "authority approved ['a-1', 'a-3']: 2 tokens",
        "match a-1 by tin+dob: city=Springfield, state=IL",
        "not matched: ['a-2', 'a-3']",  # a-2 is held, but was not approved
        "receipt: evaluated 2, disclosed 1, countersigned True",
    ]


def test_every_example_is_listed_in_its_readme() -> None:
    listed = (ROOT / "examples" / "README.md").read_text(encoding="utf-8")
    programs = {p.name for p in (ROOT / "examples").glob("*.py")}
    assert programs == {"identity_match.py", "aggregate_query.py", "named_subjects.py",
                        "sample_people.py"}
    assert all(f"`{name}`" in listed for name in programs)


def test_embedding_guide_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    blocks = _python_blocks(ROOT / "docs" / "embedding.md")
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)  # the guide's ledger is a relative path
    namespace: dict[str, Any] = {"__name__": "embedding_guide"}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"docs/embedding.md, block {number}", "exec"), namespace)
    (result,) = namespace["outcome"].results
    assert result.query_record_id == "a-1"
    assert namespace["outcome"].receipt.requester_signature
    assert (tmp_path / "custodian.sqlite").exists()


def test_readme_embedding_snippet_runs(tmp_path: Path) -> None:
    (snippet,) = [b for b in _python_blocks(ROOT / "README.md") if "run_in_process" in b]
    script = tmp_path / "snippet.py"
    script.write_text(snippet, encoding="utf-8")
    out = _run([str(script)], tmp_path)
    assert out.strip() == "[('b-7', {'zip': '62701'})]"
    assert (tmp_path / "b.sqlite").exists()


# --------------------------------------------------------------------------- the surface


def test_top_level_names_resolve_and_import_stays_cheap(tmp_path: Path) -> None:
    for name in protocol.__all__:
        assert getattr(protocol, name) is not None, name
    assert set(protocol.__all__) <= set(dir(protocol))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        protocol.nope  # noqa: B018
    loaded = _run(["-c", "import sys, protocol; "
                         "print(sorted({'sqlite3', 'grpc', 'numpy'} & set(sys.modules)))"],
                  tmp_path)
    assert loaded.strip() == "[]"


def test_help_is_a_guide_by_task() -> None:
    guide = protocol.__doc__ or ""
    for task in ("Authorize", "requester's subjects", "custodian", "Identity tier",
                 "Aggregate", "Named subjects", "Errors", "docs/embedding.md"):
        assert task in guide, task
    missing = [name for name in protocol.__all__ if not re.search(rf"\b{name}\b", guide)]
    assert missing == []  # every exported name is placed under its task


@pytest.mark.parametrize("package", ["accounting", "adapters", "cli", "crypto", "domain",
                                     "engines", "policy", "report", "sessions"])
def test_each_subpackage_lists_its_modules(package: str) -> None:
    module = __import__(f"protocol.{package}", fromlist=["__all__"])
    present = {p.stem for p in (ROOT / "protocol" / package).glob("*.py")} - {"__init__"}
    assert sorted(module.__all__) == sorted(present)


# --------------------------------------------------------------------------- the refusals


def test_unvalidated_queries_are_validated_and_refused_by_name(tmp_path: Path) -> None:
    world = make_world(tmp_path, n_records=10)
    signed = world.authorize()
    placeholder = as_query(make_person(3, address="Failed to Provide"))
    with pytest.raises(InvalidRecordError, match=r"validate_queries.*") as err:
        RequesterSession(signed, [as_query(world.records[1]), placeholder])
    assert "placeholder_address" in str(err.value) and "1 of 2 queries" in str(err.value)
    twice = as_query(world.records[2])
    with pytest.raises(InvalidRecordError, match="duplicate_record_id"):
        RequesterSession(signed, [twice, twice])
    # a list that validation accepts runs, exactly as the same list validated first
    plain = [as_query(world.records[i]) for i in range(4)]
    outcomes = [run_in_process(RequesterSession(signed_, queries,
                                                signing_key=world.requester_key),
                               world.custodian().session(), requester_id="agency-a")
                for signed_, queries in (
                    (signed, plain),
                    (world.authorize(),
                     validate_queries(enumerate(plain, 1), today=TODAY).accepted))]
    assert [sorted(r.query_record_id for r in o.results) for o in outcomes] == [
        ["q-c0", "q-c1", "q-c2", "q-c3"]] * 2


def test_the_aggregate_tier_refuses_what_the_identity_tier_refuses(tmp_path: Path) -> None:
    """Aggregate sessions take the same inputs: refused records never enter, dicts are named."""
    world = make_world(tmp_path, n_records=10)
    signed = world.authorize_aggregate()
    placeholder = as_query(make_person(3, address="Failed to Provide"))
    with pytest.raises(InvalidRecordError, match="placeholder_address"):
        AggregateRequesterSession(signed, [as_query(world.records[1]), placeholder])
    with pytest.raises(TypeError, match="QueryRecord"):
        AggregateRequesterSession(signed, [{"record_id": "q-1"}])  # type: ignore[list-item]
    accepted = validate_queries(enumerate([as_query(world.records[1])], 1), today=TODAY).accepted
    assert AggregateRequesterSession(signed, accepted).queries_total == 1


def test_wrong_query_types_name_the_expected_type(tmp_path: Path) -> None:
    world = make_world(tmp_path, n_records=3)
    signed = world.authorize()
    with pytest.raises(TypeError, match=r"queries\[0\] is a PersonRecord; a query is a "
                                        r"QueryRecord"):
        RequesterSession(signed, world.records)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"QueryRecord.*got dict.*not dicts"):
        RequesterSession(signed, [{"record_id": "q-1", "tin": "123-45-6789"}])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"list of QueryRecord.*got str"):
        RequesterSession(signed, "q-1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="signed_authorization must be of type SignedAuthorization"):
        RequesterSession(signed.to_bytes(), [as_query(world.records[0])])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"match_rules must be a sequence of str"):
        RequesterSession(signed, [as_query(world.records[0])], match_rules="tin+dob")
    with pytest.raises(TypeError, match="tokens must map"):
        RequesterSession(signed, [as_query(world.records[0])], tokens={"q-c0": "abc"})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"\(line, QueryRecord\) pairs, e.g. enumerate"):
        validate_queries([as_query(world.records[0])], today=TODAY)  # type: ignore[list-item]


def test_validated_queries_carry_their_proof(tmp_path: Path) -> None:
    queries = [as_query(make_person(i)) for i in range(5)]
    accepted = validate_queries(enumerate(queries, 1), today=TODAY).accepted
    assert isinstance(accepted, ValidatedQueries) and accepted == queries
    assert isinstance(accepted[1:3], ValidatedQueries)  # a part of a valid batch
    assert isinstance(pickle.loads(pickle.dumps(accepted)), ValidatedQueries)
    assert ValidatedQueries.ensure(accepted, today=TODAY) is accepted  # not validated twice
    with pytest.raises(TypeError, match="made by validate_queries"):
        ValidatedQueries(queries)
    with pytest.raises(TypeError, match="read-only"):
        accepted.append(as_query(make_person(9, address="NA NA")))
    with pytest.raises(TypeError, match="read-only"):
        accepted[0] = queries[1]
    assert len(accepted) == 5


def test_custodian_config_refuses_wrong_types_and_secret_length(tmp_path: Path) -> None:
    world = make_world(tmp_path, n_records=2)
    base: dict[str, Any] = dict(policy=world.policy, records=world.records, ledger=world.ledger,
                                master_secret=world.master_secret,
                                signing_key=world.custodian_key)
    with pytest.raises(ValueError, match=r"^master secret must be 32 bytes, got 16$"):
        CustodianConfig(**{**base, "master_secret": bytes(16)})
    with pytest.raises(TypeError, match=r"master_secret must be of type bytes \(32 random "
                                        r"bytes\), got str"):
        CustodianConfig(**{**base, "master_secret": "00" * 32})
    with pytest.raises(TypeError, match=r"records\[1\] must be of type PersonRecord.*not "
                                        r"dicts\), got dict"):
        CustodianConfig(**{**base, "records": [world.records[0], {"record_id": "x"}]})
    with pytest.raises(TypeError, match="signing_key must be of type Ed25519PrivateKey"):
        CustodianConfig(**{**base, "signing_key": world.custodian_key.public_key()})
    with pytest.raises(TypeError, match="policy must be of type CustodianPolicy, got dict"):
        CustodianConfig(**{**base, "policy": {"custodian_id": "agency-b"}})
    assert CustodianConfig(**base).master_secret == world.master_secret


def test_run_in_process_needs_the_countersignature_keys_before_spending(tmp_path: Path
                                                                         ) -> None:
    world = make_world(tmp_path, n_records=5)
    signed = world.authorize()
    auth_id = signed.authorization.authorization_id
    queries = validate_queries(enumerate([as_query(world.records[1])], 1), today=TODAY).accepted
    with pytest.raises(ValueError, match=r"no signing_key.*countersign=False"):
        run_in_process(RequesterSession(signed, queries), world.custodian().session(),
                       requester_id="agency-a")
    stranger = make_world(tmp_path / "other").requester_key
    with pytest.raises(ValueError, match="no receipt key for 'agency-a' that matches"):
        run_in_process(RequesterSession(signed, queries, signing_key=stranger),
                       world.custodian().session(), requester_id="agency-a")
    with pytest.raises(ValueError, match="no receipt key for 'agency-c'"):
        run_in_process(RequesterSession(signed, queries, signing_key=world.requester_key),
                       world.custodian().session(), requester_id="agency-c")
    with pytest.raises(TypeError,
                       match=r"custodian must be of type CustodianSession \(one session"):
        run_in_process(RequesterSession(signed, queries, signing_key=world.requester_key),
                       world.custodian(), requester_id="agency-a")  # type: ignore[arg-type]
    with pytest.raises(LedgerError, match="unknown authorization"):
        world.ledger.budget(auth_id)  # refused before open: nothing registered or spent
    # the explicit opt-out runs, and its receipt carries the custodian's signature only
    out = run_in_process(RequesterSession(signed, queries), world.custodian().session(),
                         requester_id="agency-a", countersign=False)
    assert [r.query_record_id for r in out.results] == ["q-c1"]
    assert out.receipt.custodian_signature and not out.receipt.requester_signature
    # the default path ends countersigned, on both sides
    signed2 = world.authorize()
    out = run_in_process(RequesterSession(signed2, queries, signing_key=world.requester_key),
                         world.custodian().session(), requester_id="agency-a")
    assert out.receipt.requester_signature
