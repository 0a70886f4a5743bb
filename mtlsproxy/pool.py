# -*- test-case-name: tests.test_pool -*-
"""
Run-time state of server groups (pools) and their members.

The frozen configuration (L{mtlsproxy.config.PoolConfig},
L{mtlsproxy.config.MemberConfig}) says what a pool should be; the objects here
say what it is now: which members are healthy, how many connections each
carries.  They change only through the explicit methods below.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from .interfaces import IBackendSelector, IMemberState


@attrs.frozen
class ConnectionFacts:
    """
    What a selector may know about the connection it is choosing a member for.

    @ivar listener: The listener's configured name.
    @ivar peerHost: The client's IP address as text.
    @ivar peerPort: The client's source port.
    @ivar sni: The server name the client asked for, or L{None}.
    @ivar clientIdentity: The verified client certificate's identity (an
        object with C{subject}, C{issuer}, C{serial}, C{fingerprint}), or
        L{None} when no certificate was presented.
    """

    listener: str
    peerHost: str
    peerPort: int
    sni: Optional[str] = None
    clientIdentity: Any = None


@implementer(IMemberState)
class Member:
    """
    One backend server of a pool, with its mutable state.

    @ivar config: The member's configuration (address, port, weight).
    @ivar weight: The weight in force (a reload or the admin console may
        change it without touching the configuration object).
    @ivar activeConnections: Proxied connections open to this member now.
    @ivar totalConnections: Proxied connections ever opened to this member.
    @ivar healthy: L{False} while health checks have taken it out.
    @ivar draining: L{True} when an operator drained it: no new connections.
    """

    def __init__(self, config: Any) -> None:
        self.config = config
        self.weight: int = config.weight
        self.activeConnections = 0
        self.totalConnections = 0
        self.failedConnections = 0
        self.healthy = True
        self.draining = False

    @property
    def address(self) -> str:
        return str(self.config.address)

    @property
    def port(self) -> int:
        return int(self.config.port)

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)

    def available(self) -> bool:
        """
        May this member be offered to a selector for a new connection?
        """
        return self.healthy and not self.draining and self.weight > 0

    def connectionOpened(self) -> None:
        """
        A proxied connection to this member was established.
        """
        self.activeConnections += 1
        self.totalConnections += 1

    def connectionClosed(self) -> None:
        """
        A proxied connection to this member ended.
        """
        if self.activeConnections <= 0:
            raise RuntimeError(f"connectionClosed without open connection on {self}")
        self.activeConnections -= 1

    def connectFailed(self) -> None:
        """
        A connection attempt to this member failed (refused, timed out).
        """
        self.failedConnections += 1

    def __repr__(self) -> str:
        return (
            f"<Member {self.address}:{self.port} weight={self.weight}"
            f" active={self.activeConnections} healthy={self.healthy}>"
        )


class Pool:
    """
    A server group: its members and the selector that picks among them.
    """

    log = Logger()

    def __init__(self, name: str, members: Iterable[Member], selector: IBackendSelector) -> None:
        self.name = name
        self.members: list[Member] = list(members)
        self.selector = selector

    @classmethod
    def fromConfig(cls, config: Any, selector: IBackendSelector) -> "Pool":
        """
        Build the run-time pool for a L{mtlsproxy.config.PoolConfig}.
        """
        return cls(config.name, [Member(m) for m in config.members], selector)

    def candidates(self, exclude: Iterable[Member] = ()) -> list[Member]:
        """
        The members a selector may choose from now.
        """
        excluded = set(map(id, exclude))
        return [m for m in self.members if m.available() and id(m) not in excluded]

    def pick(self, facts: ConnectionFacts, exclude: Iterable[Member] = ()) -> Optional[Member]:
        """
        Choose a member for a new connection, or L{None} if there is none.

        @param exclude: Members already tried for this connection.
        """
        candidates = self.candidates(exclude)
        if not candidates:
            return None
        try:
            chosen = self.selector.pick(candidates, facts)
        except Exception:
            self.log.failure(
                "Selector {selector!r} of pool {pool} raised",
                selector=self.selector,
                pool=self.name,
            )
            return None
        if chosen is None:
            return None
        if not any(chosen is c for c in candidates):
            self.log.error(
                "Selector {selector!r} of pool {pool} returned {member!r},"
                " which was not a candidate",
                selector=self.selector,
                pool=self.name,
                member=chosen,
            )
            return None
        return chosen
