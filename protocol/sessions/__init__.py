"""The session core and the thin tiers over it (identity, aggregate)."""

__all__ = [
    "aggregate",
    "core",
    "identity",
]
