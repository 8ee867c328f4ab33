"""Agency identities: the one spelling every layer accepts.

An agency id names a party in an Authorization, a session, a certificate (URI SAN and CN)
and a file name, so it is checked once here, at the bottom of the layers, and the policy,
the PKI and the CLIs all call the same check.
"""

from __future__ import annotations

import re

__all__ = ["validate_agency_id"]

# Agency ids end up in a URN, a CN (at most 64 characters) and file names, so they are kept to
# a conservative alphabet: no separators, no path components, no leading dot or dash.
_AGENCY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_agency_id(agency_id: str) -> str:
    """Return ``agency_id`` unchanged if it is usable in a URN, a CN and a file name.

    Raises ValueError otherwise, so that a malformed id is caught where it enters (an
    Authorization, a certificate) rather than as a confusing identity mismatch later.
    """
    if not isinstance(agency_id, str) or _AGENCY_ID_RE.fullmatch(agency_id) is None:
        raise ValueError(
            f"invalid agency id {agency_id!r}: expected 1-64 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return agency_id
