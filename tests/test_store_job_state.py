"""The requester's job state keeps its match list in a row of its own (agency_a.store).

Every disclosure batch saves the job state; the match list, most of it at scale, is
sealed apart and written again only when it changed.  These tests use a real SQLite file.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from agency_a.store import KEY_LEN, ResultIntegrityError, ResultStore
from protocol.adapters.sqlite_ledger import Ledger

ROW = {"query_record_id": "q-1", "rule_id": "tin+dob", "pseudonym": "p-1",
       "fields": {"zip": "62701"}}


KEY = os.urandom(KEY_LEN)


def _store(tmp_path: Path) -> ResultStore:
    store = ResultStore(tmp_path / "results.sqlite", KEY, Ledger(tmp_path / "ledger.sqlite"))
    store.put_results("job-1", "auth-1", 30, [], operator="op")
    return store


def _matches_row(store: ResultStore) -> tuple[bytes, bytes] | None:
    with sqlite3.connect(store.path) as conn:
        found = conn.execute("SELECT nonce, sealed FROM job_state_matches WHERE job_id = ?",
                             ("job-1",)).fetchone()
    return None if found is None else (bytes(found[0]), bytes(found[1]))


def _state(matches: Any, answered: list[list[int]]) -> dict[str, Any]:
    return {"matches": matches, "answered": answered, "pseudonyms": ["p-1"], "opened": True}


def test_state_reads_back_whole_with_its_matches(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert _matches_row(store) is None
    store.save_job_state("job-1", "running", _state(None, []))  # before the match: inline
    assert store.job_states("job-1") == [("job-1", "running", _state(None, []))]
    assert _matches_row(store) is None
    matches = [["q-1", "tin+dob", "ab" * 20], ["q-2", "tin+dob", "cd" * 20]]
    store.save_job_state("job-1", "running", _state(matches, []))
    assert _matches_row(store) is not None
    store.append_results("job-1", [ROW], operator="op",
                         job_state=("running", _state(matches, [[0, 1]])))
    assert store.job_states("job-1") == [("job-1", "running", _state(matches, [[0, 1]]))]
    store.close()


def test_unchanged_matches_are_not_written_again(tmp_path: Path) -> None:
    store = _store(tmp_path)
    matches = [["q-1", "tin+dob", "ab" * 20]]
    store.save_job_state("job-1", "running", _state(matches, []))
    first = _matches_row(store)
    store.append_results("job-1", [ROW], operator="op",
                         job_state=("running", _state(list(matches), [[0, 1]])))
    assert _matches_row(store) == first  # same content: the sealed row is untouched
    changed = [*matches, ["q-2", "tin+dob", "cd" * 20]]
    store.save_job_state("job-1", "done", _state(changed, [[0, 1]]))
    assert _matches_row(store) != first
    assert store.job_states("job-1")[0][2]["matches"] == changed
    store.close()
    # a new process remembers nothing and simply writes the list again
    reopened = ResultStore(tmp_path / "results.sqlite", KEY, Ledger(tmp_path / "ledger.sqlite"))
    assert reopened.job_states("job-1")[0][2]["matches"] == changed
    reopened.close()


def test_the_same_match_tuple_is_not_even_serialized_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The requester's journal keeps its match list as a tuple of tuples: every later
    batch's save skips it by identity, without re-encoding megabytes of JSON."""
    import agency_a.store as store_module

    encoded: list[object] = []
    real_dumps = store_module.json.dumps

    def counting_dumps(obj: Any, **kw: Any) -> str:
        encoded.append(obj)
        return real_dumps(obj, **kw)

    monkeypatch.setattr(store_module.json, "dumps", counting_dumps)
    store = _store(tmp_path)
    matches = (("q-1", "tin+dob", "ab" * 20), ("q-2", "tin+dob", "cd" * 20))
    store.save_job_state("job-1", "running", _state(matches, []))
    first = _matches_row(store)
    for batch in range(3):
        store.append_results("job-1", [ROW], operator="op",
                             job_state=("running", _state(matches, [[0, batch + 1]])))
    assert sum(obj is matches for obj in encoded) == 1
    assert _matches_row(store) == first
    # an equal list (e.g. read back after a restart) is compared by content: not rewritten
    store.save_job_state("job-1", "running", _state([list(m) for m in matches], [[0, 2]]))
    assert _matches_row(store) == first
    assert store.job_states("job-1")[0][2]["matches"] == [list(m) for m in matches]
    # a failed save of a new tuple does not count as written: the next save writes it
    grown = (*matches, ("q-3", "tin+dob", "ef" * 20))
    with pytest.raises(ValueError, match="no stored job"):  # rolled back after sealing
        store.append_results("job-2", [ROW], operator="op",
                             job_state=("running", _state(grown, [])))
    store.save_job_state("job-1", "running", _state(grown, [[0, 2]]))
    assert store.job_states("job-1")[0][2]["matches"] == [list(m) for m in grown]
    store.close()


def test_a_failed_save_does_not_count_as_written(tmp_path: Path) -> None:
    store = _store(tmp_path)
    matches = [["q-1", "tin+dob", "ab" * 20]]
    # the job header is gone: the transaction that sealed the list is rolled back
    with pytest.raises(ValueError, match="no stored job"):
        store.append_results("job-2", [ROW], operator="op",
                             job_state=("running", _state(matches, [])))
    store.save_job_state("job-1", "running", _state(matches, []))
    assert store.job_states("job-1")[0][2]["matches"] == matches
    store.close()


def test_tampered_matches_fail_authentication(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.save_job_state("job-1", "running", _state([["q-1", "tin+dob", "ab" * 20]], []))
    _, sealed = _matches_row(store) or (b"", b"")
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE job_state_matches SET sealed = ? WHERE job_id = ?",
                     (sealed[:-1] + bytes([sealed[-1] ^ 1]), "job-1"))
    with pytest.raises(ResultIntegrityError, match="fails authentication"):
        store.job_states("job-1")
    store.close()


def test_purging_a_job_deletes_its_matches(tmp_path: Path) -> None:
    store = _store(tmp_path)
    matches = [["q-1", "tin+dob", "ab" * 20]]
    store.save_job_state("job-1", "running", _state(matches, []))
    store.purge_job("job-1", operator="op", reason="test")
    assert _matches_row(store) is None
    # the same id stored again gets its list written again (nothing cached survives)
    store.put_results("job-1", "auth-1", 30, [], operator="op")
    store.save_job_state("job-1", "running", _state(matches, []))
    assert store.job_states("job-1")[0][2]["matches"] == matches
    store.close()

