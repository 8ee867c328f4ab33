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
    #: RFC 9497 OPRF under the custodian's key-epoch key, matched against the epoch's
    #: compressed tag set (docs/architecture.md, National custodian)
    OPRF_EPOCH = "oprf-epoch"


class IndexMode(StrEnum):
    """Which custodian index an engine matches against (docs/architecture.md, National custodian).

    ``per_authorization``: the custodian evaluates its records under a key derived for each
    authorization, at open (small custodians).  ``epoch``: under a key of the custodian's key
    epoch, once, offline; the requester fetches the epoch's compressed tag set.
    """

    PER_AUTHORIZATION = "per_authorization"
    EPOCH = "epoch"


@dataclass(frozen=True)
class EngineTraits:
    """What the policy layer may know about an engine, declared by the engine itself."""

    #: The requester's inputs are group elements it blinds, so authority-issued tokens
    #: (group elements) can stand in for them: required by named-subject authorizations.
    group_element_inputs: bool
    #: The custodian index the engine needs; policy serves it only in that index mode.
    index: IndexMode = IndexMode.PER_AUTHORIZATION
    #: The engine evaluates verifiably under a pinned POPRF key (docs/architecture.md,
    #: Verifiable evaluation): only such engines run authorizations that pin one.
    verifiable_evaluation: bool = False
    #: The custodian can check that every proof of a corroborated group names one record
    #: (its proofs resolve to records, and nothing binds them to separate query slots the
    #: custodian cannot group): only such engines run authorizations asking corroboration.
    corroborated_disclosure: bool = False


#: Traits of the built-in engines: the table ``decide`` uses when its caller passes none
#: (the engine registry passes its own, which also holds engines registered at run time).
BUILTIN_ENGINE_TRAITS: Mapping[str, EngineTraits] = MappingProxyType({
    Engine.OPRF: EngineTraits(group_element_inputs=True, verifiable_evaluation=True,
                              corroborated_disclosure=True),
    Engine.KKRT: EngineTraits(group_element_inputs=False, corroborated_disclosure=True),
    # Tokens of named subjects are per-authorization: the epoch index has none.  Its proofs
    # bind to single evaluation slots, which the custodian cannot group into one query, so
    # it serves no corroboration.
    Engine.OPRF_EPOCH: EngineTraits(group_element_inputs=False, index=IndexMode.EPOCH),
})
