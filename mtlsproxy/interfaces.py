# -*- test-case-name: tests.test_selectors -*-
"""
The contracts between mtlsproxy and its plugins.

Third parties implement these interfaces in their own distributions and
declare module-level instances in a C{twisted/plugins/} module; mtlsproxy finds
them with L{twisted.plugin.getPlugins} and uses them by the C{name} given in
the configuration.  Nothing here may block: every method is called on the
reactor thread, in the middle of accepting a connection.
"""

from zope.interface import Attribute, Interface


class IMemberState(Interface):
    """
    The read-only view of one pool member that a selector is given.
    """

    key = Attribute("A hashable, stable identity: C{(address, port)}.")
    address = Attribute("The member's host address, a C{str}.")
    port = Attribute("The member's TCP port, an C{int}.")
    weight = Attribute(
        "The member's current weight, an C{int} >= 1 (members with weight 0 are"
        " never offered to a selector)."
    )
    activeConnections = Attribute(
        "How many proxied connections to this member are open now, an C{int}."
    )
    healthy = Attribute("C{True} unless health checks took the member out.")


class IBackendSelector(Interface):
    """
    Chooses the pool member for one new client connection.

    One selector instance serves one pool for the life of the process, so it
    may keep state (a round-robin position, a hash ring).
    """

    def pick(candidates, facts):
        """
        Choose a member for a new connection.

        @param candidates: The members that may be chosen now: healthy, not
            drained, with a weight above zero and not already tried for this
            connection.  Never empty.
        @type candidates: L{list} of L{IMemberState} providers

        @param facts: What is known about the connection: peer address, SNI,
            the verified client certificate's identity.
        @type facts: L{mtlsproxy.pool.ConnectionFacts}

        @return: One of C{candidates}, or L{None} to refuse the connection.
            Must not block and should not raise; an exception is logged and
            treated as L{None}.
        """


class IBackendSelectorFactory(Interface):
    """
    A plugin that makes selectors: what C{selector = "NAME"} in a pool refers to.
    """

    name = Attribute("The name used in the configuration, a C{str}.")
    description = Attribute("One line for humans, a C{str}.")

    def newSelector():
        """
        Make a fresh selector for one pool.

        @rtype: L{IBackendSelector} provider
        """
