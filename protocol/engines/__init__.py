"""Match engines behind one interface, and their registry."""

__all__ = [
    "base",
    "kkrt",
    "named",
    "oprf",
    "registry",
]
