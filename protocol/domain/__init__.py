"""Domain layer: records, validation, normalization, match rules, protocol messages."""

__all__ = [
    "engine",
    "estimate",
    "identity",
    "messages",
    "records",
    "recordstore",
    "variants",
]
