# -*- test-case-name: tests.test_drain -*-
"""
Tests for L{mtlsproxy.drain}: the registry of live connections, the drainer,
the relay's side of both, and L{mtlsproxy.service.ProxyService.stopService}.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mtlsproxy.checks import checkConfiguration
from mtlsproxy.config import loadConfig
from mtlsproxy.drain import ConnectionInfo, ConnectionRegistry, Drainer
from mtlsproxy.relay import CloseReason, Phase
from mtlsproxy.service import ProxyService
from tests.test_relay import RelayHarness, accessEvents


class FakeConnection:
    """
    A registered connection that records what it is told and goes away
    when told to (if C{obedient}).
    """

    def __init__(self, registry: ConnectionRegistry, obedient: bool = True) -> None:
        self.registry = registry
        self.obedient = obedient
        self.closed: list[str] = []
        self.aborted = 0
        self.id = registry.add(self)

    def describe(self) -> ConnectionInfo:
        return ConnectionInfo(self.id, "web", "203.0.113.7:40000", "relaying", 0.0)

    def closeNow(self, reason: str) -> None:
        self.closed.append(reason)
        if self.obedient:
            self.finish()

    def abort(self) -> None:
        self.aborted += 1
        if self.obedient is None:
            self.finish()

    def finish(self) -> None:
        self.registry.remove(self.id)


class RegistryTests(SynchronousTestCase):
    """
    L{ConnectionRegistry}.
    """

    def test_addNumbersAndRemoveForgets(self) -> None:
        """
        When connections are added they get increasing numbers, can be
        found by number, and are forgotten when removed.
        """
        registry = ConnectionRegistry()
        one, two = FakeConnection(registry), FakeConnection(registry)
        self.assertEqual((one.id, two.id), (1, 2))
        self.assertIs(registry.get(2), two)
        self.assertEqual(len(registry), 2)
        registry.remove(1)
        registry.remove(1)
        self.assertIsNone(registry.get(1))
        self.assertEqual([info.id for info in registry.snapshot()], [2])

    def test_whenEmpty(self) -> None:
        """
        When the last connection is removed, L{ConnectionRegistry.whenEmpty}
        fires; on an empty registry it has fired already.
        """
        registry = ConnectionRegistry()
        self.successResultOf(registry.whenEmpty())
        connection = FakeConnection(registry)
        waiting = registry.whenEmpty()
        self.assertNoResult(waiting)
        connection.finish()
        self.successResultOf(waiting)


class DrainerTests(SynchronousTestCase):
    """
    L{Drainer}: wait, then close, then abort.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = ConnectionRegistry()
        self.drainer = Drainer(self.clock, self.registry, timeout=30.0, abortAfter=5.0)

    def test_nothingToDrain(self) -> None:
        """
        When no connection is open, drain fires at once.
        """
        self.successResultOf(self.drainer.drain())

    def test_connectionsFinishInTime(self) -> None:
        """
        When the connections end before the timeout, drain fires then,
        nobody is closed and no timer is left.
        """
        connections = [FakeConnection(self.registry) for _ in range(2)]
        d = self.drainer.drain()
        self.clock.advance(29)
        connections[0].finish()
        self.assertNoResult(d)
        connections[1].finish()
        self.successResultOf(d)
        self.assertEqual([c.closed for c in connections], [[], []])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeoutCloses(self) -> None:
        """
        When the drain timeout runs out, the connections left are closed
        with close reason shutdown, and drain fires when they are gone.
        """
        connection = FakeConnection(self.registry)
        d = self.drainer.drain()
        self.clock.advance(30)
        self.assertEqual(connection.closed, ["shutdown"])
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_abortAfterClose(self) -> None:
        """
        When closed connections do not go away, they are aborted after
        abortAfter seconds, and drain fires when they are gone.
        """
        connection = FakeConnection(self.registry, obedient=None)  # type: ignore[arg-type]
        d = self.drainer.drain()
        self.clock.advance(30)
        self.assertNoResult(d)
        self.clock.advance(5)
        self.assertEqual(connection.aborted, 1)
        self.successResultOf(d)

    def test_giveUpEventually(self) -> None:
        """
        When aborted connections never report their end, drain fires anyway
        (bounded shutdown) and says so.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        FakeConnection(self.registry, obedient=False)
        d = self.drainer.drain()
        self.clock.advance(30)
        self.clock.advance(5)
        self.assertNoResult(d)
        self.clock.advance(5)
        self.successResultOf(d)
        self.assertIn(
            "{count} aborted connection(s) did not end; stopping anyway",
            [e["log_format"] for e in observer],
        )

    def test_drainTwice(self) -> None:
        """
        When drain is called again while draining, both calls fire when it
        is done.
        """
        connection = FakeConnection(self.registry)
        first, second = self.drainer.drain(), self.drainer.drain()
        connection.finish()
        self.successResultOf(first)
        self.successResultOf(second)


class RelayRegistrationTests(SynchronousTestCase):
    """
    The relay adds itself to the registry, describes itself and can be
    closed by the operator or the drainer.
    """

    def setUp(self) -> None:
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.h = RelayHarness()

    def test_registeredUntilBothSidesGone(self) -> None:
        """
        When a connection is accepted it is registered, and it stays so
        until both sides are gone.
        """
        h = self.h.connectClient()
        registry = h.factory.connections
        self.assertEqual(len(registry), 1)
        backend = h.connectBackend()
        h.relay.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(registry), 1)
        backend.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(registry), 0)

    def test_describe(self) -> None:
        """
        When described, a relaying connection names its listener, peer,
        phase, backend and byte counts.
        """
        h = self.h.connectClient()
        h.connectBackend()
        h.relay.dataReceived(b"abc")
        [info] = h.factory.connections.snapshot()
        self.assertEqual(
            (info.id, info.listener, info.peer, info.phase, info.backend, info.pool, info.bytesIn),
            (1, "web", "203.0.113.7:40000", "relaying", "10.0.0.1:8001", "pool", 3),
        )
        self.assertIsNone(info.subject)
        self.assertEqual(info.asDict()["peer"], "203.0.113.7:40000")

    def test_closeNow(self) -> None:
        """
        When closed by the operator, both transports are closed after
        flushing, and the access event says closed_by_operator.
        """
        h = self.h.connectClient()
        backend = h.connectBackend()
        h.relay.closeNow(CloseReason.OPERATOR)
        self.assertTrue(h.clientTransport.disconnecting)
        assert h.backendTransport is not None
        self.assertTrue(h.backendTransport.disconnecting)
        self.assertIs(h.relay.phase, Phase.CLOSING)
        h.relay.connectionLost(Failure(ConnectionDone()))
        backend.connectionLost(Failure(ConnectionDone()))
        [event] = accessEvents(self.observer)
        self.assertEqual(event["close_reason"], "closed_by_operator")
        self.assertEqual(len(h.factory.connections), 0)

    def test_closeWhileConnecting(self) -> None:
        """
        When closed while the backend is being connected, the attempt is
        abandoned and the client closed.
        """
        h = self.h.connectClient()
        h.relay.closeNow(CloseReason.SHUTDOWN)
        self.assertTrue(h.reactor.connectors[0].stoppedConnecting)
        self.assertTrue(h.clientTransport.disconnecting)
        h.relay.connectionLost(Failure(ConnectionDone()))
        [event] = accessEvents(self.observer)
        self.assertEqual(event["close_reason"], "shutdown")

    def test_abort(self) -> None:
        """
        When aborted, both transports are aborted.
        """
        h = self.h.connectClient()
        h.connectBackend()
        aborted: list[str] = []
        h.clientTransport.abortConnection = lambda: aborted.append("client")  # type: ignore[method-assign]
        assert h.backendTransport is not None
        h.backendTransport.abortConnection = lambda: aborted.append("backend")  # type: ignore[method-assign]
        h.relay.abort()
        self.assertEqual(aborted, ["client", "backend"])


CONFIG = """
drain_timeout = 10

[[listeners]]
name = "plain"
endpoint = "tcp:0:interface=127.0.0.1"
protocol = "tcp"
pool = "app"

[[pools]]
name = "app"
[[pools.members]]
address = "127.0.0.1"
port = 9
"""


def makeProxy(testCase: SynchronousTestCase, text: str = CONFIG) -> tuple[ProxyService, MemoryReactorClock]:
    """
    A L{ProxyService} on a L{MemoryReactorClock}, from C{text}.
    """
    directory = testCase.mktemp()
    os.makedirs(directory)
    path = os.path.join(directory, "proxy.toml")
    with open(path, "w") as f:
        f.write(text)
    loaded = checkConfiguration(loadConfig(path), datetime.now(timezone.utc))
    reactor = MemoryReactorClock()
    return ProxyService(reactor, loaded), reactor


class StopServiceTests(SynchronousTestCase):
    """
    L{ProxyService.stopService} drains.
    """

    def test_stopListeningThenDrain(self) -> None:
        """
        When the proxy stops, its listener stops listening at once, the
        Deferred waits for the open connection for up to drain_timeout,
        the proxy reports draining, and the connection is closed then.
        """
        proxy, reactor = makeProxy(self)
        proxy.startService()
        listener = proxy.listeners["plain"]
        port = listener.port
        self.assertIsNotNone(port)
        factory = reactor.tcpServers[0][1]
        relay = factory.buildProtocol(None)
        from tests.test_relay import HalfCloseStringTransport

        transport = HalfCloseStringTransport()
        relay.makeConnection(transport)
        self.assertEqual(len(proxy.connections), 1)

        d = proxy.stopService()
        self.assertTrue(proxy.draining)
        self.assertIsNone(listener.port)
        self.assertNoResult(d)
        reactor.advance(9)
        self.assertFalse(transport.disconnecting)
        reactor.advance(1)
        self.assertTrue(transport.disconnecting)
        relay.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(d)
        self.assertFalse(proxy.running)

    def test_stopWithoutConnections(self) -> None:
        """
        When the proxy stops with no connection open, it is done at once.
        """
        proxy, reactor = makeProxy(self)
        proxy.startService()
        self.successResultOf(proxy.stopService())

    def test_drainTimeoutDefault(self) -> None:
        """
        When drain_timeout is not configured, the drainer waits 30 seconds.
        """
        proxy, reactor = makeProxy(self, CONFIG.replace("drain_timeout = 10\n", ""))
        self.assertEqual(proxy.drainer.timeout, 30.0)
