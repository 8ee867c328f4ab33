"""I/O at the edge: the SQLite ledger, worker pools, files."""

__all__ = [
    "checkpointer",
    "files",
    "keys",
    "operators",
    "pools",
    "scenario",
    "sqlite",
    "sqlite_ledger",
    "workers",
]
