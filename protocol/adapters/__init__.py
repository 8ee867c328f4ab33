"""I/O at the edge: the SQLite ledger, worker pools, files."""
