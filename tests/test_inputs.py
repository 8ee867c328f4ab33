"""Input files as an operator writes them (issue 14): tax-period separators, optional columns,
the bad-header error, and the budget ``psi-authority issue`` signs for each engine."""

from __future__ import annotations

import csv
import gc
import io
import json
import os
from datetime import date
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agency_a import cli as cli_a
from agency_a.service import RequesterService
from agency_a.service import serve as serve_requester
from agency_a.store import KEY_LEN, ResultStore
from proto import service_kit as kit
from protocol.adapters.scenario import ScenarioSpec, generate
from protocol.adapters.sqlite_ledger import Ledger
from protocol.cli import authority
from protocol.cli.dev_pki import write_dev_pki
from protocol.crypto.kkrt import KKRTRequester
from protocol.domain.records import (
    CSV_SCHEMA_HELP,
    PERSON_FIELDS,
    QUERY_META_FIELDS,
    ReasonCode,
    match_keys_bulk,
    read_person_csv,
    read_query_csv,
    read_query_csv_with_lines,
    validate_queries,
)
from protocol.domain.recordstore import load_custodian_csv
from protocol.errors import InvalidRecordError
from tests.factories import make_world

TODAY = date(2025, 6, 15)
FULL_QUERY_HEADER = ",".join((*PERSON_FIELDS, *QUERY_META_FIELDS, "record_class"))


def query_csv(header: list[str], *rows: dict[str, str]) -> io.StringIO:
    """A query file with exactly ``header``; cells not given in a row are blank."""
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    buf.seek(0)
    return buf


SUBJECT = {
    "record_id": "Q-1", "tin": "123-45-6789", "first_name": "Ann", "last_name": "Lee",
    "dob": "1980-04-12", "address": "12 Main Street", "city": "Springfield", "state": "IL",
    "zip": "62701", "tax_periods": "2023;2024", "statute": "26 U.S.C. 6103(i)(2)",
    "reason": "locate subject of case 24-117",
}
ALL_QUERY_COLUMNS = list(SUBJECT)


# --------------------------------------------------------------------------- tax periods


@pytest.mark.parametrize(("cell", "periods"), [
    ("2023;2024", ("2023", "2024")),
    ("2023,2024", ("2023", "2024")),
    ("2023, 2024", ("2023", "2024")),
    ("2023 2024Q1", ("2023", "2024Q1")),
    (" 2022 ; 2023Q4 ,2024 ", ("2022", "2023Q4", "2024")),
    ("2023;;2024,", ("2023", "2024")),
])
def test_tax_periods_accept_semicolons_commas_and_spaces(cell: str,
                                                         periods: tuple[str, ...]) -> None:
    (query,) = read_query_csv(query_csv(ALL_QUERY_COLUMNS, {**SUBJECT, "tax_periods": cell}))
    assert query.metadata.tax_periods == periods
    report = validate_queries([(2, query)], today=TODAY)
    assert report.refused == [] and len(report.accepted) == 1


def test_a_malformed_period_is_still_refused_by_name() -> None:
    (query,) = read_query_csv(query_csv(ALL_QUERY_COLUMNS,
                                        {**SUBJECT, "tax_periods": "2023, FY24"}))
    (refusal,) = validate_queries([(2, query)], today=TODAY).refused
    assert refusal.code is ReasonCode.MALFORMED_TAX_PERIOD and "FY24" in refusal.detail


# --------------------------------------------------------------------------- optional columns


def test_query_file_without_city_and_state_is_read_and_accepted() -> None:
    header = [c for c in ALL_QUERY_COLUMNS if c not in ("city", "state")]
    (query,) = read_query_csv(query_csv(header, SUBJECT))
    assert (query.person.city, query.person.state) == ("", "")
    assert validate_queries([(2, query)], today=TODAY).refused == []


def test_query_file_without_dob_serves_a_rule_that_does_not_need_it() -> None:
    header = [c for c in ALL_QUERY_COLUMNS if c != "dob"]
    rows = read_query_csv_with_lines(query_csv(header, SUBJECT), rules=["tin+last_name"])
    keys = match_keys_bulk([q.person for _, q in rows], ["tin+last_name", "tin+dob"],
                           today=TODAY)
    assert keys["tin+last_name"][0] is not None and keys["tin+dob"][0] is None


def test_rules_make_their_columns_required() -> None:
    header = [c for c in ALL_QUERY_COLUMNS if c != "dob"]
    with pytest.raises(InvalidRecordError, match="required columns dob") as info:
        read_query_csv_with_lines(query_csv(header, SUBJECT), rules=["tin+dob"])
    assert f"expected {FULL_QUERY_HEADER}" in str(info.value)


def test_custodian_file_needs_only_one_rules_columns() -> None:
    text = "record_id,tin,last_name,tax_paid_cents\nB-1,123-45-6789,Lee,1200\n"
    records, refused, rows = load_custodian_csv(io.StringIO(text), today=TODAY)
    assert (rows, refused, len(records)) == (1, [], 1)
    (person,) = read_person_csv(io.StringIO(text))
    assert person.dob == "" and person.get("tax_paid_cents") == "1200"


# --------------------------------------------------------------------------- the bad header


def test_bad_query_header_shows_the_whole_expected_header_and_the_schema() -> None:
    header = [c for c in ALL_QUERY_COLUMNS if c not in ("statute", "zip")]
    with pytest.raises(InvalidRecordError) as info:
        read_query_csv(query_csv(header, SUBJECT))
    message = str(info.value)
    assert "lacks required columns zip,statute" in message
    assert f"got {','.join(header)}" in message
    assert f"expected {FULL_QUERY_HEADER}" in message
    assert CSV_SCHEMA_HELP in message  # columns, per-rule needs, formats, separators


def test_custodian_file_serving_no_rule_is_refused_with_the_schema() -> None:
    with pytest.raises(InvalidRecordError) as info:
        read_person_csv(io.StringIO("record_id,first_name,city\nB-1,Ann,Springfield\n"))
    message = str(info.value)
    assert "at least one match rule" in message
    assert "expected record_id,tin,first_name,last_name,dob,address,city,state,zip" in message
    assert "tin+dob -> tin,dob" in message


# --------------------------------------------------------------------------- psi-authority issue


@pytest.fixture()
def authority_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    assert authority.main(["keygen", "--out", str(tmp_path / "authority")]) == 0
    capsys.readouterr()
    return tmp_path / "authority" / "authority.key"


def issue(tmp_path: Path, key: Path, queries: Path, *extra: str) -> list[str]:
    return ["issue", "--key", str(key), "--requester", "agency-a", "--custodian", "agency-b",
            "--statute", "26 U.S.C. 6103(i)(2)", "--purpose", "locate subjects",
            "--fields", "address,zip", "--max-disclosures", "100", "--queries", str(queries),
            "--out", str(tmp_path / "auth.json"), *extra]


def test_issue_reads_a_file_without_city_and_with_comma_periods(
    tmp_path: Path, authority_key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "request.csv"
    header = [c for c in ALL_QUERY_COLUMNS if c != "city"]
    path.write_text(query_csv(header, {**SUBJECT, "tax_periods": "2023, 2024"},
                              {**SUBJECT, "record_id": "Q-2", "tin": "123-45-6790",
                               "tax_periods": "2022,2023"}).getvalue())
    assert authority.main(issue(tmp_path, authority_key, path, "--rules", "tin+dob")) == 0
    out = capsys.readouterr().out
    assert "2 accepted, 0 refused" in out
    signed = json.loads((tmp_path / "auth.json").read_text())
    assert signed["authorization"]["max_evaluations"] == 2


def test_issue_names_the_missing_rule_column(
    tmp_path: Path, authority_key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "request.csv"
    path.write_text(query_csv([c for c in ALL_QUERY_COLUMNS if c != "dob"], SUBJECT).getvalue())
    assert authority.main(issue(tmp_path, authority_key, path, "--rules", "tin+dob")) == 2
    err = capsys.readouterr().err
    assert "lacks required columns dob" in err and "tin+dob -> tin,dob" in err
    assert "Traceback" not in err


def test_issue_budget_covers_every_permitted_engine(
    tmp_path: Path, authority_key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The signed budget is the largest engine need, and KKRT's need is what its requester
    actually asks for at open (issue 14: 92 signed for OPRF, 224 needed by KKRT)."""
    files = generate(ScenarioSpec().scaled(60, 80), tmp_path / "scenario")
    rules = ["tin+dob", "tin+last_name"]
    argv = issue(tmp_path, authority_key, files.queries, "--rules", ",".join(rules),
                 "--engines", "oprf,kkrt")
    assert authority.main(argv) == 0
    out = capsys.readouterr().out
    with files.queries.open(newline="") as fh:
        report = validate_queries(read_query_csv_with_lines(fh), today=date.today())
    keys = match_keys_bulk([q.person for q in report.accepted], rules, today=date.today())
    elements = [k for rule in rules for k in keys[rule] if k is not None]
    kkrt_units = KKRTRequester(elements, seed_context=b"budget test").units
    assert kkrt_units > len(elements)
    assert f"in units per engine: oprf {len(elements):,}, kkrt {kkrt_units:,}" in out
    signed = json.loads((tmp_path / "auth.json").read_text())
    assert signed["authorization"]["max_evaluations"] == kkrt_units
    assert "the largest need of the permitted engines" in out


def test_too_small_budget_names_the_engine_it_fails(
    tmp_path: Path, authority_key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = generate(ScenarioSpec().scaled(40, 50), tmp_path / "scenario")
    argv = issue(tmp_path, authority_key, files.queries, "--rules", "tin+dob",
                 "--engines", "oprf,kkrt", "--max-evaluations", "1")
    assert authority.main(argv) == 0
    err = capsys.readouterr().err
    assert "too small for oprf, kkrt" in err and "RESOURCE_EXHAUSTED" in err


# --------------------------------------------------------------------------- over gRPC + mTLS


def test_agency_a_match_refuses_a_bad_header_with_the_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The requester service refuses the file (INVALID_ARGUMENT, before any custodian is
    contacted); the operator's CLI shows what is missing and the whole schema."""
    world = make_world(tmp_path, n_records=4)
    pki = tmp_path / "pki"
    write_dev_pki(pki, ["agency-a"], server_agencies=["agency-a"])
    store = ResultStore(tmp_path / "results.sqlite", os.urandom(KEY_LEN),
                        Ledger(tmp_path / "requester-ledger.sqlite"))
    service = RequesterService("agency-a", kit.TLSFiles.from_dir(pki, "agency-a", "client"),
                               signing_key=world.requester_key, operators=["analyst-7"],
                               store=store)
    server, port = serve_requester(service, kit.TLSFiles.from_dir(pki, "agency-a", "server"))
    auth = tmp_path / "auth.json"
    auth.write_bytes(world.authorize().to_bytes())
    queries = tmp_path / "request.csv"
    queries.write_text(query_csv([c for c in ALL_QUERY_COLUMNS if c != "reason"],
                                 SUBJECT).getvalue())
    try:
        code = cli_a.main(["match", "--server", f"127.0.0.1:{port}", "--certs", str(pki),
                           "--operator", "analyst-7", "--authorization", str(auth),
                           "--queries", str(queries), "--custodian", "127.0.0.1:1",
                           "--no-progress"])
    finally:
        server.stop(0).wait()
        store.close()
    out = capsys.readouterr().out
    assert code == 1
    assert "refused INVALID_ARGUMENT: invalid_records: CSV header of the query file lacks " \
           "required columns reason" in out
    assert f"expected {FULL_QUERY_HEADER}" in out
    assert "characters cut" not in out
    for line in CSV_SCHEMA_HELP.splitlines():
        assert line in out


def test_an_embedded_requester_service_removes_its_own_tagset_directory(
        tmp_path: Path) -> None:
    """Given no tag-set cache, the service makes a private one and removes it with itself
    (it once stayed behind in /tmp: one empty directory per service ever built)."""
    pki = tmp_path / "pki"
    write_dev_pki(pki, ["agency-a"], server_agencies=["agency-a"])
    store = ResultStore(tmp_path / "results.sqlite", os.urandom(KEY_LEN),
                        Ledger(tmp_path / "requester-ledger.sqlite"))
    service = RequesterService("agency-a", kit.TLSFiles.from_dir(pki, "agency-a", "client"),
                               signing_key=Ed25519PrivateKey.generate(),
                               operators=["analyst-7"], store=store)
    scratch = service.tagsets.root
    assert scratch.is_dir() and (scratch.stat().st_mode & 0o777) == 0o700
    del service
    gc.collect()
    assert not scratch.exists()
