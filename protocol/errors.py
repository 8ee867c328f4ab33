"""Exception types shared by the whole library.

Callers (the gRPC adapters in particular) map these to status codes, so each
kind of failure has exactly one type and a stable machine-readable ``code``.
"""

from __future__ import annotations


class PSIError(Exception):
    """Base class of every error the library raises on purpose."""

    code: str = "psi_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidElementError(PSIError):
    """A group element or scalar that is malformed, non-canonical or the identity.

    Raised for anything that arrives from the network and fails validation.
    """

    code = "invalid_element"


class InvalidRecordError(PSIError):
    """A person record or query that fails validation (see ``records.Refusal``)."""

    code = "invalid_record"


class PolicyRefusal(PSIError):
    """An authorization or request refused by policy; ``reasons`` are machine-readable."""

    code = "policy_refused"

    def __init__(self, message: str, reasons: tuple[str, ...] = ()) -> None:
        super().__init__(message, code=reasons[0] if reasons else "policy_refused")
        self.reasons = reasons


class BudgetExhausted(PSIError):
    """The persistent evaluation budget of an authorization would be exceeded."""

    code = "budget_exhausted"


class DisclosureCapReached(PSIError):
    """The authorization's ``max_disclosures`` would be exceeded."""

    code = "disclosure_cap_reached"


class ProtocolError(PSIError):
    """A message that is not allowed in the session's current state, or is malformed."""

    code = "protocol_error"


class LedgerError(PSIError):
    """The ledger is inconsistent (for example, a broken audit chain)."""

    code = "ledger_error"
