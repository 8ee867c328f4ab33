"""Names and policy-relevant traits of the match engines (docs/architecture.md, Engines).

The engines themselves live in ``protocol.engines``, above the policy layer.  Policy only
needs to know an engine's *name* (authorizations and custodian policies list the engines
they permit) and a few declared *traits* (a named-subject authorization runs only on an
engine whose inputs are group elements).  Both live here so that policy never imports an
engine and never compares engine names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType


class Engine(StrEnum):
    """The built-in identity-tier match engines."""

    OPRF = "oprf"  # RFC 9497 OPRF over ristretto255, one evaluation per element
    KKRT = "kkrt"  # KKRT16 batched OPRF from OT extension, one unit per cuckoo bin


@dataclass(frozen=True)
class EngineTraits:
    """What the policy layer may know about an engine, declared by the engine itself."""

    #: The requester's inputs are group elements it blinds, so authority-issued tokens
    #: (group elements) can stand in for them: required by named-subject authorizations.
    group_element_inputs: bool


#: Traits of the built-in engines: the table ``decide`` uses when its caller passes none
#: (the engine registry passes its own, which also holds engines registered at run time).
BUILTIN_ENGINE_TRAITS: Mapping[str, EngineTraits] = MappingProxyType({
    Engine.OPRF: EngineTraits(group_element_inputs=True),
    Engine.KKRT: EngineTraits(group_element_inputs=False),
})
