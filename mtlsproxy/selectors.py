# -*- test-case-name: tests.test_selectors -*-
"""
The built-in backend selectors.

Each selector class provides L{IBackendSelector}; each module-level
C{...Factory} instance provides L{IBackendSelectorFactory} and is what the
plugin module declares.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import attrs
from zope.interface import implementer

from .interfaces import IBackendSelector, IBackendSelectorFactory, IMemberState


@implementer(IBackendSelector)
class SmoothWeightedRoundRobin:
    """
    Weighted round robin that interleaves members (nginx's "smooth" variant).

    With weights 5, 1, 1 it yields a, a, b, a, c, a, a rather than a run of
    five a's: every pick adds each candidate's weight to its running score,
    picks the highest score and subtracts the candidates' total weight from
    the winner.  Candidates may differ from pick to pick (health changes,
    retries); scores are kept per member key.
    """

    def __init__(self) -> None:
        self._scores: dict[Any, int] = {}

    def pick(self, candidates: Sequence[IMemberState], facts: Any) -> Optional[IMemberState]:
        total = 0
        best: Optional[IMemberState] = None
        bestScore = 0
        scores = self._scores
        for member in candidates:
            weight = member.weight
            score = scores.get(member.key, 0) + weight
            scores[member.key] = score
            total += weight
            if best is None or score > bestScore:
                best, bestScore = member, score
        if best is not None:
            scores[best.key] = bestScore - total
        return best


@implementer(IBackendSelectorFactory)
@attrs.frozen
class SelectorFactory:
    """
    A named selector plugin made from a class.
    """

    name: str
    description: str
    selectorClass: Any

    def newSelector(self) -> IBackendSelector:
        return self.selectorClass()


roundRobin = SelectorFactory(
    "round_robin",
    "Smooth weighted round robin.",
    SmoothWeightedRoundRobin,
)

BUILTIN_SELECTORS = {roundRobin.name: roundRobin}


def selectorFactories() -> dict[str, IBackendSelectorFactory]:
    """
    All selector plugins by name: the built-ins and those that
    L{twisted.plugin.getPlugins} finds.
    """
    found: dict[str, IBackendSelectorFactory] = dict(BUILTIN_SELECTORS)
    from twisted.plugin import getPlugins

    import twisted.plugins

    for plugin in getPlugins(IBackendSelectorFactory, twisted.plugins):
        found[plugin.name] = plugin
    return found
