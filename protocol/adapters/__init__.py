"""I/O at the edge: the SQLite ledger, worker pools, files."""

__all__ = [
    "checkpointer",
    "epoch_index",
    "files",
    "keys",
    "operators",
    "pools",
    "scenario",
    "shards",
    "sqlite",
    "sqlite_ledger",
    "workers",
]
