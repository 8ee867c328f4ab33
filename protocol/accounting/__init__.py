"""Accounting: the ledger port, audit-chain hashing, receipts, oversight checks."""
