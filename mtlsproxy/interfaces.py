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


class IHealthChecker(Interface):
    """
    Checks whether one pool member can serve.

    One checker instance serves one pool; L{mtlsproxy.health} calls it every
    C{interval} seconds per member (with jitter) and applies the
    healthy/unhealthy thresholds, so a checker only answers "did this one
    check pass, and why not".
    """

    def check(member):
        """
        Check one member once.

        @param member: The member to check.
        @type member: L{IMemberState} provider

        @return: A L{Deferred} that fires with a
            L{mtlsproxy.health.CheckResult}.  It must not block; it may take
            as long as the network does, because the caller cancels it when
            the pool's C{timeout} expires (so it must clean up on
            cancellation: close its connection).  A failed Deferred counts as
            an unhealthy result whose reason is the failure's message.  When
            the check could not be made for the proxy's own reasons (out of
            file descriptors), return C{CheckResult(False, reason,
            inconclusive=True)}: the member's health stays as it was (a
            failure with C{EMFILE} and the like as its errno is taken as
            that too).
        """


class IHealthCheckerFactory(Interface):
    """
    A plugin that makes health checkers: what C{[pools.health_check] type =
    "NAME"} refers to.
    """

    name = Attribute("The name used in the configuration, a C{str}.")
    description = Attribute("One line for humans, a C{str}.")
    options = Attribute(
        "The checker-specific keys it accepts in C{[pools.health_check]}: a"
        " mapping of key name to a one-line description."
    )

    def newChecker(reactor, options, tls):
        """
        Make a checker for one pool.

        @param reactor: The reactor to connect and schedule with.
        @param options: The checker-specific keys of the pool's
            C{[pools.health_check]} table (a mapping).
        @param tls: The pool's backend TLS settings (an object with a
            C{clientConnectionCreator(member)} method) or L{None} when the
            pool's members speak plain TCP.

        @raise ValueError: If C{options} are invalid; the message names the
            key and what was expected and becomes a configuration error.

        @rtype: L{IHealthChecker} provider
        """
