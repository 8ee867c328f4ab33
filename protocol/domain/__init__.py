"""Domain layer: records, validation, normalization, match rules, protocol messages."""

__all__ = [
    "engine",
    "identity",
    "messages",
    "records",
    "recordstore",
]
