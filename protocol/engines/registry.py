"""The match engines a process can run, by name (docs/architecture.md, Engines).

Sessions look engines up here and nowhere else, so adding an engine is one module plus
one ``register`` call; tests register throw-away engines the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

from protocol.domain.engine import EngineTraits
from protocol.engines.base import MatchEngine
from protocol.engines.epoch import EpochEngine
from protocol.engines.kkrt import KkrtEngine
from protocol.engines.oprf import OprfEngine

_ENGINES: dict[str, MatchEngine] = {}


class UnknownEngine(ValueError):
    """No engine of that name is registered."""


def register(engine: MatchEngine, *, replace: bool = False) -> MatchEngine:
    """Make ``engine`` available under ``engine.name``; refuses to shadow one silently."""
    name = str(engine.name)
    if not name:
        raise ValueError("an engine needs a name")
    if name in _ENGINES and not replace:
        raise ValueError(f"match engine {name!r} is already registered")
    _ENGINES[name] = engine
    return engine


def unregister(name: str) -> None:
    """Remove an engine (tests that registered one clean up with this)."""
    _ENGINES.pop(name, None)


def get(name: str) -> MatchEngine:
    """The engine registered as ``name``; ``UnknownEngine`` if there is none."""
    engine = _ENGINES.get(name)
    if engine is None:
        raise UnknownEngine(
            f"unknown match engine {name!r} (known: {', '.join(sorted(_ENGINES))})")
    return engine


def names() -> tuple[str, ...]:
    """Registered engine names, in registration order (built-in engines first)."""
    return tuple(_ENGINES)


def traits() -> Mapping[str, EngineTraits]:
    """Declared traits of every registered engine, for ``protocol.policy.decide``."""
    return {name: engine.traits for name, engine in _ENGINES.items()}


register(OprfEngine())
register(KkrtEngine())
register(EpochEngine())
