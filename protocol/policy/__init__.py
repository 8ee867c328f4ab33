"""Policy layer: authorizations, custodian policy and the one decide() gate."""

__all__ = [
    "authority",
    "decide",
]
