"""Match engines behind one interface, and their registry."""

__all__ = [
    "base",
    "epoch",
    "kkrt",
    "named",
    "oprf",
    "registry",
]
