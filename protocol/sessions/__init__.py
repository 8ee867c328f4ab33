"""The session core and the thin tiers over it (identity, aggregate)."""
