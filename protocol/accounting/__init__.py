"""Accounting: the ledger port, audit-chain hashing, receipts, oversight checks."""

__all__ = [
    "chain",
    "export",
    "oversight",
    "port",
    "receipts",
    "refusals",
    "rules",
]
