"""Hazmat layer: RFC 9497 OPRF, KKRT OT-extension primitives, encoding."""

__all__ = [
    "encoding",
    "executor",
    "kkrt",
    "kkrt_cuckoo",
    "kkrt_matrix",
    "oprf",
    "tagset",
]
