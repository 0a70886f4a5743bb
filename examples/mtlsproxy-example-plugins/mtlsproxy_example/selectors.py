# -*- test-case-name: mtlsproxy_example.test.test_selectors -*-
"""
The C{first_available} backend selector: active/standby.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from twisted.plugin import IPlugin
from zope.interface import implementer

from mtlsproxy.interfaces import IBackendSelector, IBackendSelectorFactory, IMemberState


@implementer(IBackendSelector)
class FirstAvailable:
    """
    Send every connection to the first candidate: the first member in
    configuration order that is healthy, not drained, has a weight above
    zero and was not already tried for this connection.

    The other members are standbys: they get connections only while the
    members before them cannot take them, and lose them to a recovered
    primary for new connections (existing connections stay where they are).
    Weights other than zero do not matter.
    """

    def pick(
        self, candidates: Sequence[IMemberState], facts: Any
    ) -> Optional[IMemberState]:
        """
        Choose the first candidate.

        @param candidates: The members that may be chosen, in configuration
            order; never empty.
        @param facts: The connection's facts (not needed here).
        @return: C{candidates[0]}.
        """
        return candidates[0]


@implementer(IPlugin, IBackendSelectorFactory)
class FirstAvailableFactory:
    """
    The plugin: what C{selector = "first_available"} refers to.

    It provides L{IPlugin} as well as L{IBackendSelectorFactory}: Twisted's
    plugin scan only records objects that provide L{IPlugin}.
    """

    name = "first_available"
    description = "Active/standby: the first available member in configuration order."

    def newSelector(self) -> IBackendSelector:
        """
        Make a selector for one pool (this one keeps no state, but each pool
        still gets its own).
        """
        return FirstAvailable()


firstAvailable = FirstAvailableFactory()
