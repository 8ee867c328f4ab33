"""Stable home of the default match-rule set (docs/architecture.md, Recall and
misidentification).

The rules themselves live in :mod:`protocol.domain.records`; this module keeps
``protocol.records.DEFAULT_RULES`` importable for callers that name the default set.
"""

from __future__ import annotations

from protocol.domain.records import DEFAULT_RULES, MATCH_RULES, MatchRule, Strength, Variant

__all__ = ["DEFAULT_RULES", "MATCH_RULES", "MatchRule", "Strength", "Variant"]
