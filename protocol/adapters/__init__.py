"""I/O at the edge: the SQLite ledger, worker pools, files, the services' collector policy."""

__all__ = [
    "checkpointer",
    "collector",
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
