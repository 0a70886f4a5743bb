# -*- test-case-name: tests.test_drain -*-
"""
Live connections and graceful drain.

L{ConnectionRegistry} knows every proxied connection from accept until both
of its sides are gone: the relay adds itself in C{connectionMade} and
removes itself when it emits its access event.  The admin console lists
and closes connections through it, the status endpoint counts them, and
L{Drainer} waits on it at shutdown.

L{Drainer} is what C{SIGTERM} leads to (twistd stops the reactor, which
stops the services, which calls L{Drainer.drain} once the listeners no
longer accept): established connections get C{drain_timeout} seconds to
finish; then the ones left are closed (pending data flushed, a TLS
close_notify sent), and those still not gone C{abortAfter} seconds later
are aborted.  The Deferred it returns fires when the registry is empty, so
twistd exits only then.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Protocol

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

__all__ = [
    "ABORT_AFTER",
    "ConnectionInfo",
    "ConnectionRegistry",
    "Drainer",
    "RegisteredConnection",
]

ABORT_AFTER = 5.0
"""
Seconds between closing the connections left after C{drain_timeout} and
aborting the ones still open (a peer that does not read keeps a closing
connection open as long as its data is pending).
"""


@attrs.frozen
class ConnectionInfo:
    """
    A snapshot of one live connection, for the admin console and the status
    endpoint.

    @ivar id: The registry's number for it, unique in the process.
    @ivar listener: The listener's configured name.
    @ivar peer: The client's address, C{host:port}.
    @ivar phase: The relay's phase (C{handshaking}, C{connecting},
        C{relaying}, C{closing}).
    @ivar started: When it was accepted, in the reactor's seconds.
    @ivar subject: The client certificate's subject (RFC 4514), or L{None}.
    @ivar serial: The client certificate's serial number (lowercase hex), or
        L{None}.
    @ivar fingerprint: SHA-256 of the client certificate, or L{None}.
    @ivar backend: C{host:port} of the member it is relayed to, or L{None}.
    @ivar pool: The name of the pool its backend is chosen from.
    @ivar bytesIn: Bytes relayed from the client so far.
    @ivar bytesOut: Bytes relayed to the client so far.
    """

    id: int
    listener: str
    peer: str
    phase: str
    started: float
    subject: Optional[str] = None
    serial: Optional[str] = None
    fingerprint: Optional[str] = None
    backend: Optional[str] = None
    pool: Optional[str] = None
    bytesIn: int = 0
    bytesOut: int = 0

    def asDict(self) -> dict[str, Any]:
        """
        The snapshot as a JSON-serializable dictionary.
        """
        return attrs.asdict(self)


class RegisteredConnection(Protocol):
    """
    What the registry needs of a connection
    (L{mtlsproxy.relay.ProxyServerProtocol} provides it).
    """

    def describe(self) -> ConnectionInfo:
        """
        A snapshot of the connection now.
        """

    def closeNow(self, reason: str) -> None:
        """
        Close both sides after flushing what is pending; C{reason} is the
        access event's C{close_reason}.
        """

    def abort(self) -> None:
        """
        Drop both sides at once, without flushing.
        """


class ConnectionRegistry:
    """
    The live connections of one proxy, by number.

    Changes only through L{add} and L{remove}; everything else reads.
    """

    def __init__(self) -> None:
        self._connections: dict[int, RegisteredConnection] = {}
        self._nextId = 1
        self._emptyWaiters: list[Deferred[None]] = []

    def add(self, connection: RegisteredConnection) -> int:
        """
        Register a new connection.

        @return: Its number, for L{remove}, L{get} and the operator.
        """
        connectionId = self._nextId
        self._nextId += 1
        self._connections[connectionId] = connection
        return connectionId

    def remove(self, connectionId: int) -> None:
        """
        Forget a connection that is gone (nothing happens if it is not
        known); fire the L{whenEmpty} Deferreds if it was the last.
        """
        self._connections.pop(connectionId, None)
        if not self._connections and self._emptyWaiters:
            waiters, self._emptyWaiters = self._emptyWaiters, []
            for waiter in waiters:
                waiter.callback(None)

    def get(self, connectionId: int) -> Optional[RegisteredConnection]:
        """
        The connection numbered C{connectionId}, or L{None}.
        """
        return self._connections.get(connectionId)

    def __len__(self) -> int:
        return len(self._connections)

    def __iter__(self) -> Iterator[RegisteredConnection]:
        """
        The connections now (a copy: closing one while iterating is fine).
        """
        return iter(list(self._connections.values()))

    def snapshot(self) -> list[ConnectionInfo]:
        """
        A L{ConnectionInfo} per live connection, oldest first.
        """
        return [connection.describe() for connection in self]

    def whenEmpty(self) -> Deferred[None]:
        """
        A Deferred that fires once no connection is registered (at once if
        none is).
        """
        if not self._connections:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._emptyWaiters.append(waiter)
        return waiter


SHUTDOWN = "shutdown"
"""
The access event's C{close_reason} of a connection closed because the drain
timeout ran out.
"""


class Drainer:
    """
    Lets the connections of a registry finish, for a bounded time.

    @ivar clock: Provides C{callLater} and C{seconds}.
    @ivar connections: The registry.
    @ivar timeout: Seconds the connections are given (C{drain_timeout}).
    @ivar abortAfter: Seconds between closing and aborting the stragglers,
        and then between aborting and giving up on them.
    """

    log = Logger()

    def __init__(
        self,
        clock: Any,
        connections: ConnectionRegistry,
        timeout: float,
        abortAfter: float = ABORT_AFTER,
    ) -> None:
        self.clock = clock
        self.connections = connections
        self.timeout = timeout
        self.abortAfter = abortAfter
        self._timer: Optional[IDelayedCall] = None
        self._done: Optional[Deferred[None]] = None

    def drain(self) -> Deferred[None]:
        """
        Wait for the registry to empty: up to C{timeout} seconds, then close
        the connections left, then abort those still open.

        @return: Fires (never fails) when no connection is left, or when
            aborted connections still did not report their end after
            C{abortAfter} seconds (which would be a bug; it is logged).
        """
        if self._done is not None:
            return _chain(self._done)
        count = len(self.connections)
        if count == 0:
            self._done = succeed(None)
            return succeed(None)
        self.log.info(
            "Draining: waiting up to {timeout}s for {count} connection(s) to finish",
            timeout=self.timeout,
            count=count,
        )
        self._done = Deferred()
        self.connections.whenEmpty().addCallback(self._empty)
        self._timer = self.clock.callLater(self.timeout, self._closeAll)
        return _chain(self._done)

    def _empty(self, _: object) -> None:
        """
        Every connection is gone.
        """
        self._cancelTimer()
        if self._done is not None and not self._done.called:
            self.log.info("Drained: all connections finished")
            self._done.callback(None)

    def _cancelTimer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _closeAll(self) -> None:
        """
        The drain timeout ran out: close what is left.
        """
        self._timer = None
        left = list(self.connections)
        self.log.warn(
            "Drain timeout ({timeout}s) reached: closing {count} connection(s)",
            timeout=self.timeout,
            count=len(left),
        )
        for connection in left:
            connection.closeNow(SHUTDOWN)
        if len(self.connections):
            self._timer = self.clock.callLater(self.abortAfter, self._abortAll)

    def _abortAll(self) -> None:
        """
        Closed connections did not go away: abort them.
        """
        self._timer = None
        left = list(self.connections)
        self.log.warn(
            "Aborting {count} connection(s) still open {seconds}s after being closed",
            count=len(left),
            seconds=self.abortAfter,
        )
        for connection in left:
            connection.abort()
        if len(self.connections):
            self._timer = self.clock.callLater(self.abortAfter, self._giveUp)

    def _giveUp(self) -> None:
        """
        Aborted connections never reported their end: stop waiting.
        """
        self._timer = None
        self.log.error(
            "{count} aborted connection(s) did not end; stopping anyway",
            count=len(self.connections),
        )
        if self._done is not None and not self._done.called:
            self._done.callback(None)


def _chain(d: Deferred[None]) -> Deferred[None]:
    """
    A new Deferred that fires when C{d} does, leaving C{d}'s result alone.
    """
    result: Deferred[None] = Deferred()

    def fire(value: object) -> object:
        result.callback(None)
        return value

    d.addBoth(fire)
    return result
