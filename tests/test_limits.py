# -*- test-case-name: tests.test_limits -*-
"""
Tests for L{mtlsproxy.limits} and for the limits the relay and the services
apply with it: C{handshake_timeout}, C{idle_timeout}, C{max_connections} and
the open file limit.  Everything runs in memory, with a
L{MemoryReactorClock} for time.
"""

from __future__ import annotations

import resource
from typing import Any, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mtlsproxy.config import ListenerConfig
from mtlsproxy.errors import ConfigurationError
from mtlsproxy.limits import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    ConnectionGate,
    IdleTimer,
    Timeouts,
    checkFileLimit,
    descriptorsNeeded,
    ensureFileLimit,
)
from mtlsproxy.relay import CloseReason, Phase, ProxyServerFactory, ProxyServerProtocol
from mtlsproxy.service import ListenerService
from mtlsproxy.tlsproto import HalfCloseTLSFactory
from tests.test_relay import HalfCloseStringTransport, RelayHarness, accessEvents
from tests.test_tlsproto import HalfCloseRecorder, ServerCreator, connectTLS, serverContext


def _observe(testCase: SynchronousTestCase) -> EventLoggingObserver:
    return EventLoggingObserver.createWithCleanup(testCase, globalLogPublisher)  # type: ignore[arg-type]


def _events(observer: EventLoggingObserver, **fields: Any) -> list[Any]:
    """
    The events that have all of C{fields}.
    """
    return [e for e in observer if all(e.get(k) == v for k, v in fields.items())]


class IdleTimerTests(SynchronousTestCase):
    """
    L{IdleTimer}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.expired: list[float] = []
        self.timer = IdleTimer(self.clock, 10.0, lambda: self.expired.append(self.clock.seconds()))

    def test_expiresWithoutActivity(self) -> None:
        """
        When nothing happens for the timeout, C{expired} is called once and
        the timer stops.
        """
        self.timer.start()
        self.clock.advance(9.9)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, [10.0])
        self.assertFalse(self.timer.running)
        self.clock.advance(100)
        self.assertEqual(self.expired, [10.0])

    def test_touchPostpones(self) -> None:
        """
        When the timer is touched, the timeout counts from the last touch,
        with a single delayed call.
        """
        self.timer.start()
        for _ in range(5):
            self.clock.advance(6)
            self.timer.touch()
            self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(9)
        self.assertEqual(self.expired, [])
        self.clock.advance(1)
        self.assertEqual(self.expired, [40.0])

    def test_stop(self) -> None:
        """
        When the timer is stopped, C{expired} is never called and no delayed
        call is left.
        """
        self.timer.start()
        self.clock.advance(5)
        self.timer.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(self.expired, [])
        self.timer.stop()

    def test_touchBeforeStartIgnored(self) -> None:
        """
        When a timer that was never started is touched, nothing is
        scheduled.
        """
        self.timer.touch()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_restartFromExpired(self) -> None:
        """
        When C{expired} starts the timer again, it runs a full period again.
        """

        def expired() -> None:
            self.expired.append(self.clock.seconds())
            timer.start()

        timer = IdleTimer(self.clock, 10.0, expired)
        timer.start()
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(self.expired, [10.0, 20.0])
        timer.stop()


class FakePort:
    """
    A listening port that records pauses and resumes.
    """

    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1


class ConnectionGateTests(SynchronousTestCase):
    """
    L{ConnectionGate}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.observer = _observe(self)
        self.gate = ConnectionGate("web", 2, self.clock)
        self.port = FakePort()
        self.gate.attach(self.port)

    def test_pausesAtCapacity(self) -> None:
        """
        When the listener reaches max_connections, its port is paused once
        and one warning names the listener and the limit.
        """
        self.assertTrue(self.gate.admit())
        self.assertEqual(self.port.paused, 0)
        self.assertFalse(self.gate.atCapacity)
        self.assertTrue(self.gate.admit())
        self.assertEqual(self.port.paused, 1)
        self.assertTrue(self.gate.atCapacity)
        self.assertEqual(self.gate.capacityEpisodes, 1)
        [event] = self.observer
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["listener"], "web")
        self.assertIn("max_connections", event["log_format"])
        self.assertEqual(event["max_connections"], 2)
        self.assertEqual(event["episode"], 1)

    def test_refusesBeyondCapacity(self) -> None:
        """
        When a connection arrives while the listener is full (accepted in
        the same batch), it is refused and counted, and no second episode
        is logged.
        """
        self.gate.admit()
        self.gate.admit()
        self.assertFalse(self.gate.admit())
        self.assertFalse(self.gate.admit())
        self.assertEqual(self.gate.active, 2)
        self.assertEqual(self.gate.refused, 2)
        self.assertEqual(self.gate.capacityEpisodes, 1)
        self.assertEqual(self.port.paused, 1)
        self.assertEqual(len(self.observer), 1)

    def test_resumesWhenSlotFrees(self) -> None:
        """
        When a connection closes at capacity, the port resumes and one event
        says how long the episode lasted and how many were refused; the next
        time it fills up is a new episode.
        """
        self.gate.admit()
        self.gate.admit()
        self.gate.admit()
        self.clock.advance(2.5)
        self.gate.release()
        self.assertFalse(self.gate.atCapacity)
        self.assertEqual(self.port.resumed, 1)
        resumed = self.observer[-1]
        self.assertEqual(resumed["duration"], 2.5)
        self.assertEqual(resumed["refused"], 1)
        self.gate.release()
        self.assertEqual(self.port.resumed, 1)
        self.gate.admit()
        self.gate.admit()
        self.assertEqual(self.gate.capacityEpisodes, 2)
        self.assertEqual(self.port.paused, 2)

    def test_releaseWithoutAdmit(self) -> None:
        """
        When more connections are released than admitted, that is a bug and
        says so.
        """
        self.assertRaises(RuntimeError, self.gate.release)

    def test_attachAtCapacity(self) -> None:
        """
        When a port is attached while the listener is full (listening
        completed late), it is paused at once.
        """
        gate = ConnectionGate("web", 1, self.clock)
        gate.admit()
        port = FakePort()
        gate.attach(port)
        self.assertEqual(port.paused, 1)

    def test_portWithoutPause(self) -> None:
        """
        When the port cannot be paused, the gate still counts and refuses.
        """
        gate = ConnectionGate("web", 1, self.clock)
        gate.attach(object())
        self.assertTrue(gate.admit())
        self.assertFalse(gate.admit())
        gate.release()
        self.assertTrue(gate.admit())

    def test_changeMaximum(self) -> None:
        """
        When max_connections is raised at capacity, the port resumes; when
        it is lowered below the open connections, the port pauses.
        """
        self.gate.admit()
        self.gate.admit()
        self.gate.maxConnections = 3
        self.assertFalse(self.gate.atCapacity)
        self.assertEqual(self.port.resumed, 1)
        self.gate.maxConnections = 1
        self.assertTrue(self.gate.atCapacity)
        self.assertEqual(self.port.paused, 2)
        self.gate.release()
        self.assertTrue(self.gate.atCapacity)
        self.gate.release()
        self.assertFalse(self.gate.atCapacity)


class ListenerServiceTests(SynchronousTestCase):
    """
    What L{ListenerService} exposes of its gate for metrics.
    """

    def test_capacityAttributes(self) -> None:
        """
        When a listener service has a gate, C{atCapacity},
        C{capacityEpisodes} and C{activeConnections} are the gate's; the gate
        gets the port once listening.
        """
        reactor = MemoryReactorClock()
        config = ListenerConfig("web", "tcp:0:interface=127.0.0.1", "tcp", "app", max_connections=1)
        gate = ConnectionGate("web", 1, reactor)
        service = ListenerService(reactor, config, ProxyServerFactory, gate=gate)
        service.startService()
        self.assertIsNotNone(gate.port)
        self.assertEqual((service.atCapacity, service.capacityEpisodes, service.activeConnections), (False, 0, 0))
        gate.admit()
        self.assertEqual((service.atCapacity, service.capacityEpisodes, service.activeConnections), (True, 1, 1))

    def test_noGate(self) -> None:
        """
        When a listener service has no gate, it reports no connections and
        never being at capacity.
        """
        config = ListenerConfig("web", "tcp:0", "tcp", "app")
        service = ListenerService(MemoryReactorClock(), config, None)
        self.assertEqual((service.atCapacity, service.capacityEpisodes, service.activeConnections), (False, 0, 0))


class FileLimitTests(SynchronousTestCase):
    """
    L{ensureFileLimit} and L{checkFileLimit}, with fake C{getrlimit} and
    C{setrlimit}.
    """

    def setUp(self) -> None:
        self.observer = _observe(self)
        self.limits = (1024, 4096)
        self.calls: list[tuple[int, tuple[int, int]]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        self.assertEqual(which, resource.RLIMIT_NOFILE)
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        self.calls.append((which, limits))
        self.limits = limits

    def test_needed(self) -> None:
        """
        Each connection needs two descriptors, plus a fixed headroom.
        """
        self.assertEqual(descriptorsNeeded([10, 5]), 130)

    def test_raisedWithinHard(self) -> None:
        """
        When the soft limit is too low, it is raised to what is needed,
        within the hard limit.
        """
        limit = ensureFileLimit(2000, self.getrlimit, self.setrlimit)
        self.assertEqual(self.calls, [(resource.RLIMIT_NOFILE, (2000, 4096))])
        self.assertTrue(limit.raised)
        self.assertTrue(limit.sufficient)

    def test_cappedByHard(self) -> None:
        """
        When the hard limit is below what is needed, the soft limit is
        raised to the hard one, and that is not sufficient.
        """
        limit = ensureFileLimit(10000, self.getrlimit, self.setrlimit)
        self.assertEqual(self.limits, (4096, 4096))
        self.assertFalse(limit.sufficient)

    def test_neverLowered(self) -> None:
        """
        When the soft limit is already enough (or unlimited), nothing is
        changed.
        """
        limit = ensureFileLimit(100, self.getrlimit, self.setrlimit)
        self.assertFalse(limit.raised)
        self.limits = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        self.assertTrue(ensureFileLimit(10**9, self.getrlimit, self.setrlimit).sufficient)
        self.assertEqual(self.calls, [])

    def test_unlimitedHard(self) -> None:
        """
        When the hard limit is unlimited, the soft one is raised to exactly
        what is needed.
        """
        self.limits = (1024, resource.RLIM_INFINITY)
        ensureFileLimit(50000, self.getrlimit, self.setrlimit)
        self.assertEqual(self.limits, (50000, resource.RLIM_INFINITY))

    def test_setrlimitFails(self) -> None:
        """
        When the system refuses the new limit, the old one stays and is
        reported.
        """

        def refuse(which: int, limits: tuple[int, int]) -> None:
            raise ValueError("not allowed")

        limit = ensureFileLimit(2000, self.getrlimit, refuse)
        self.assertEqual((limit.before, limit.after), (1024, 1024))
        self.assertFalse(limit.sufficient)

    def test_checkLogs(self) -> None:
        """
        When the limit is raised but still short of what max_connections
        needs, one info event and one warning with the figures are logged.
        """
        listeners = [ListenerConfig("a", "tcp:0", "tcp", "p", max_connections=3000)]
        limit = checkFileLimit(listeners, self.getrlimit, self.setrlimit)
        self.assertEqual(limit.needed, 6100)
        raised, warning = self.observer
        self.assertEqual((raised["before"], raised["after"]), (1024, 4096))
        self.assertEqual(warning["needed"], 6100)
        self.assertEqual(warning["connections"], (4096 - 100) // 2)

    def test_checkWorkersShare(self) -> None:
        """
        When the listeners are shared by worker processes, each process
        needs room for its share of max_connections (rounded up) only.
        """
        listeners = [ListenerConfig("a", "tcp:0", "tcp", "p", max_connections=3001)]
        limit = checkFileLimit(listeners, self.getrlimit, self.setrlimit, workers=2)
        self.assertEqual(limit.needed, 2 * 1501 + 100)

    def test_checkQuietWhenEnough(self) -> None:
        """
        When the limit is enough already, nothing is logged.
        """
        checkFileLimit([ListenerConfig("a", "tcp:0", "tcp", "p", max_connections=10)], self.getrlimit, self.setrlimit)
        self.assertEqual(len(self.observer), 0)


class ConfigTests(SynchronousTestCase):
    """
    The listener keys C{handshake_timeout}, C{idle_timeout} and
    C{max_connections}.
    """

    def tlsListener(self, **kw: Any) -> ListenerConfig:
        from mtlsproxy.config import CertificateConfig

        return ListenerConfig(
            "l", "tcp:0", "tls", "p", certificates=(CertificateConfig("/c", "/k"),), **kw
        )

    def test_defaults(self) -> None:
        """
        When the keys are not set, the documented defaults apply.
        """
        listener = self.tlsListener()
        self.assertEqual(listener.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT)
        self.assertEqual(listener.idle_timeout, DEFAULT_IDLE_TIMEOUT)
        self.assertEqual(listener.max_connections, DEFAULT_MAX_CONNECTIONS)
        self.assertEqual(Timeouts.fromListener(listener), Timeouts())

    def test_values(self) -> None:
        """
        When the keys are set, integers of seconds become floats.
        """
        listener = self.tlsListener(handshake_timeout=2, idle_timeout=0.5, max_connections=7)
        self.assertEqual(Timeouts.fromListener(listener), Timeouts(2.0, 0.5))
        self.assertEqual(listener.max_connections, 7)

    def test_badValues(self) -> None:
        """
        When a timeout is not a positive number or max_connections not an
        integer from 1 to 1000000, the error names the key.
        """
        for key, value, expected in [
            ("handshake_timeout", 0, "handshake_timeout: expected a number of seconds greater than 0; got float 0.0"),
            ("idle_timeout", -1, "idle_timeout: expected a number of seconds greater than 0; got float -1.0"),
            ("idle_timeout", "5", 'idle_timeout: expected a number of seconds greater than 0; got "5"'),
            ("max_connections", 0, "max_connections: expected an integer from 1 to 1000000; got integer 0"),
            ("max_connections", True, "max_connections: expected an integer from 1 to 1000000; got boolean true"),
            ("max_connections", 1.5, "max_connections: expected an integer from 1 to 1000000; got float 1.5"),
        ]:
            error = self.assertRaises(ConfigurationError, self.tlsListener, **{key: value})
            self.assertEqual(str(error), expected)

    def test_handshakeTimeoutIsTLS(self) -> None:
        """
        When a TCP listener sets handshake_timeout, that is an error; it may
        set idle_timeout and max_connections.
        """
        error = self.assertRaises(
            ConfigurationError, ListenerConfig, "l", "tcp:0", "tcp", "p", handshake_timeout=3
        )
        self.assertIn("handshake_timeout: only allowed with protocol", str(error))
        ListenerConfig("l", "tcp:0", "tcp", "p", idle_timeout=3, max_connections=3)


# ---------------------------------------------------------------------------
# The relay with limits
# ---------------------------------------------------------------------------


class LimitedRelayHarness(RelayHarness):
    """
    A L{RelayHarness} whose factory has the given timeouts and a gate.
    """

    def __init__(self, timeouts: Timeouts = Timeouts(10.0, 60.0), maxConnections: int = 100, **kw: Any) -> None:
        super().__init__(**kw)
        self.gate = ConnectionGate("web", maxConnections, self.reactor)
        self.factory.timeouts = timeouts
        self.factory.gate = self.gate

    def newClient(self) -> tuple[ProxyServerProtocol, HalfCloseStringTransport]:
        relay = self.factory.buildProtocol(self.clientPeer)
        transport = HalfCloseStringTransport(peerAddress=self.clientPeer)
        relay.makeConnection(transport)
        return relay, transport


class HandshakeTimeoutTests(SynchronousTestCase):
    """
    C{handshake_timeout}: a deadline from accept for the TLS handshake.
    """

    def setUp(self) -> None:
        self.observer = _observe(self)
        self.h = LimitedRelayHarness(tls=True)
        self.tlsFactory = HalfCloseTLSFactory(
            ServerCreator(serverContext()), False, self.h.factory, clock=self.h.reactor
        )

    def silentClient(self) -> tuple[TLSMemoryBIOProtocol, StringTransport, ProxyServerProtocol]:
        """
        Accept a TCP connection whose client never completes a handshake.
        """
        tls = self.tlsFactory.buildProtocol(IPv4Address("TCP", "198.51.100.1", 5000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.1", 5000))
        tls.makeConnection(transport)
        relay = tls.wrappedProtocol
        assert isinstance(relay, ProxyServerProtocol)
        return tls, transport, relay

    def test_silentClientAborted(self) -> None:
        """
        When a client sends nothing for handshake_timeout seconds, its
        connection is aborted, the event and the access event say
        handshake_timeout, and no backend was contacted.
        """
        tls, transport, relay = self.silentClient()
        self.h.reactor.advance(9.9)
        self.assertFalse(transport.disconnected)
        self.h.reactor.advance(0.1)
        self.assertTrue(transport.disconnected)
        tls.connectionLost(Failure(ConnectionAborted()))
        self.assertIs(relay.phase, Phase.CLOSED)
        [event] = _events(self.observer, reason=CloseReason.HANDSHAKE_TIMEOUT)
        self.assertEqual(event["timeout"], 10.0)
        self.assertEqual(event["peer"], "198.51.100.1:5000")
        [access] = accessEvents(self.observer)
        self.assertEqual(access["close_reason"], "handshake_timeout")
        self.assertEqual(self.h.reactor.tcpClients, [])
        self.assertEqual(self.h.reactor.getDelayedCalls(), [])
        self.assertEqual(self.h.gate.active, 0)

    def test_metricsReason(self) -> None:
        """
        When a handshake times out, the handshake metric's reason is
        handshake_timeout (not aborted).
        """
        failed: list[str] = []

        class Metrics:
            def handshakeFailed(self, reason: str, seconds: float) -> None:
                failed.append(reason)

            def __getattr__(self, name: str) -> Any:
                return lambda *args, **kwargs: None

        self.h.factory.metrics = Metrics()  # type: ignore[assignment]
        tls, transport, relay = self.silentClient()
        self.h.reactor.advance(10)
        tls.connectionLost(Failure(ConnectionAborted()))
        self.assertEqual(failed, ["handshake_timeout"])

    def test_slowBytesDoNotExtend(self) -> None:
        """
        When a client sends its ClientHello one byte a second, the deadline
        still falls handshake_timeout seconds after accept.
        """
        tls, transport, relay = self.silentClient()
        hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32
        for index in range(9):
            tls.dataReceived(hello[index : index + 1])
            self.h.reactor.advance(1)
        self.assertFalse(transport.disconnected)
        tls.dataReceived(hello[9:10])
        self.h.reactor.advance(1)
        self.assertTrue(transport.disconnected)
        tls.connectionLost(Failure(ConnectionAborted()))
        [access] = accessEvents(self.observer)
        self.assertEqual(access["close_reason"], "handshake_timeout")

    def test_completedHandshakeCancels(self) -> None:
        """
        When the handshake completes in time, the deadline is cancelled and
        the connection goes on to a backend.
        """
        relays: list[ProxyServerProtocol] = []
        build = self.h.factory.buildProtocol

        def record(addr: Any) -> ProxyServerProtocol:
            relays.append(build(addr))
            return relays[-1]

        self.h.factory.buildProtocol = record  # type: ignore[method-assign]
        connectTLS(self.h.factory, _factory(HalfCloseRecorder), clock=self.h.reactor)
        [relay] = relays
        self.assertIs(relay.phase, Phase.CONNECTING)
        self.h.reactor.advance(60 * 60)
        self.assertEqual(_events(self.observer, reason=CloseReason.HANDSHAKE_TIMEOUT), [])


def _factory(protocol: Any) -> Any:
    from twisted.internet.protocol import Factory

    return Factory.forProtocol(protocol)


class IdleTimeoutTests(SynchronousTestCase):
    """
    C{idle_timeout}: no byte either way closes a relayed connection; a
    close that does not finish is aborted.
    """

    def setUp(self) -> None:
        self.observer = _observe(self)
        self.h = LimitedRelayHarness(timeouts=Timeouts(10.0, 60.0)).connectClient()
        self.h.connectBackend()
        assert self.h.backendTransport is not None
        self.backendTransport = self.h.backendTransport

    def test_idleClosed(self) -> None:
        """
        When no byte goes either way for idle_timeout seconds, both sides
        are closed (after flushing), the event says idle_timeout, and the
        access event too.
        """
        self.h.reactor.advance(59)
        self.assertFalse(self.h.clientTransport.disconnecting)
        self.h.reactor.advance(1)
        self.assertTrue(self.h.clientTransport.disconnecting)
        self.assertTrue(self.backendTransport.disconnecting)
        self.assertFalse(self.h.clientTransport.disconnected)
        [event] = _events(self.observer, reason=CloseReason.IDLE_TIMEOUT)
        self.assertEqual(event["timeout"], 60.0)
        self.h.relay.connectionLost(Failure(ConnectionDone()))
        assert self.h.backend is not None
        self.h.backend.connectionLost(Failure(ConnectionDone()))
        [access] = accessEvents(self.observer)
        self.assertEqual(access["close_reason"], "idle_timeout")
        self.assertEqual(self.h.reactor.getDelayedCalls(), [])

    def test_dataEitherWayResets(self) -> None:
        """
        When bytes go from the client, then from the backend, each restarts
        the idle period.
        """
        self.h.reactor.advance(50)
        self.h.relay.dataReceived(b"ping")
        self.h.reactor.advance(50)
        assert self.h.backend is not None
        self.h.backend.dataReceived(b"pong")
        self.h.reactor.advance(59)
        self.assertFalse(self.h.clientTransport.disconnecting)
        self.h.reactor.advance(1)
        self.assertTrue(self.h.clientTransport.disconnecting)

    def test_stuckCloseAborted(self) -> None:
        """
        When a side does not go away within idle_timeout of the close (a
        peer that does not read, or never answers close_notify), both are
        aborted.
        """
        self.h.reactor.advance(60)
        self.assertFalse(self.h.clientTransport.disconnected)
        self.h.reactor.advance(60)
        self.assertTrue(self.h.clientTransport.disconnected)
        self.assertTrue(self.backendTransport.disconnected)
        self.assertEqual(len(_events(self.observer, reason="close_timeout")), 1)

    def test_backendGoneClientStuck(self) -> None:
        """
        When the backend closes and the client never goes away, the client
        is aborted idle_timeout later.
        """
        assert self.h.backend is not None
        self.h.reactor.advance(30)
        self.h.backend.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.h.clientTransport.disconnecting)
        self.h.reactor.advance(59)
        self.assertFalse(self.h.clientTransport.disconnected)
        self.h.reactor.advance(1)
        self.assertTrue(self.h.clientTransport.disconnected)
        self.h.relay.connectionLost(Failure(ConnectionAborted()))
        [access] = accessEvents(self.observer)
        self.assertEqual(access["close_reason"], "backend_closed")
        self.assertEqual(self.h.reactor.getDelayedCalls(), [])

    def test_normalCloseLeavesNoTimer(self) -> None:
        """
        When a relayed connection ends normally, no timer is left.
        """
        assert self.h.backend is not None
        self.h.relay.connectionLost(Failure(ConnectionDone()))
        self.h.backend.connectionLost(Failure(ConnectionDone()))
        self.assertIs(self.h.relay.phase, Phase.CLOSED)
        self.assertEqual(self.h.reactor.getDelayedCalls(), [])


class MaxConnectionsRelayTests(SynchronousTestCase):
    """
    The relay counts its client connections with the factory's gate.
    """

    def setUp(self) -> None:
        self.observer = _observe(self)
        self.h = LimitedRelayHarness(maxConnections=2)
        self.port = FakePort()
        self.h.gate.attach(self.port)

    def test_countedAndReleased(self) -> None:
        """
        When clients connect and go, the gate counts them, pauses the port at
        the limit and resumes it when one goes.
        """
        first, _ = self.h.newClient()
        second, _ = self.h.newClient()
        self.assertEqual(self.h.gate.active, 2)
        self.assertTrue(self.h.gate.atCapacity)
        self.assertEqual(self.port.paused, 1)
        first.connectionLost(Failure(ConnectionDone()))
        first.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.h.gate.active, 1)
        self.assertEqual(self.port.resumed, 1)

    def test_refusedAborted(self) -> None:
        """
        When a client connects while the listener is full, it is aborted
        before any backend is contacted, and its access event says
        max_connections; the gate's count is unchanged when it goes.
        """
        self.h.newClient()
        self.h.newClient()
        attempts = len(self.h.reactor.tcpClients)
        third, transport = self.h.newClient()
        self.assertTrue(transport.disconnected)
        self.assertEqual(len(self.h.reactor.tcpClients), attempts)
        third.connectionLost(Failure(ConnectionAborted()))
        [access] = accessEvents(self.observer)
        self.assertEqual(access["close_reason"], CloseReason.MAX_CONNECTIONS)
        self.assertEqual(self.h.gate.active, 2)
        self.assertEqual(self.h.gate.refused, 1)

    def test_refusedTLS(self) -> None:
        """
        When a TLS client is refused, it is aborted before its handshake and
        no timer is left once it is gone.
        """
        h = LimitedRelayHarness(maxConnections=1, tls=True)
        tlsFactory = HalfCloseTLSFactory(ServerCreator(serverContext()), False, h.factory, clock=h.reactor)
        protocols = []
        for _ in range(2):
            tls = tlsFactory.buildProtocol(IPv4Address("TCP", "198.51.100.1", 5000))
            transport = StringTransport()
            tls.makeConnection(transport)
            protocols.append((tls, transport))
        self.assertFalse(protocols[0][1].disconnected)
        self.assertTrue(protocols[1][1].disconnected)
        protocols[1][0].connectionLost(Failure(ConnectionAborted()))
        self.assertEqual(h.gate.refused, 1)
        [access] = accessEvents(self.observer)
        self.assertEqual(access["close_reason"], CloseReason.MAX_CONNECTIONS)
        # Only the first connection's handshake deadline is pending.
        self.assertEqual(len(h.reactor.getDelayedCalls()), 1)


class ProxyServiceLimitsTests(SynchronousTestCase):
    """
    L{mtlsproxy.service.ProxyService} builds relays with the configured
    limits.
    """

    def test_wiring(self) -> None:
        """
        When a configuration sets the limits, each listener's factory gets
        them and its service the gate.
        """
        from mtlsproxy.checks import LoadedConfiguration
        from mtlsproxy.config import MemberConfig, PoolConfig, ProxyConfig
        from mtlsproxy.service import ProxyService

        listener = ListenerConfig("plain", "tcp:0", "tcp", "app", idle_timeout=7, max_connections=3)
        pool = PoolConfig("app", members=(MemberConfig("127.0.0.1", 9),))
        config = ProxyConfig("/x.toml", (listener,), (pool,))
        service = ProxyService(MemoryReactorClock(), LoadedConfiguration(config, {}, ()))
        listenerService = service.listeners["plain"]
        factory = listenerService.factory
        self.assertEqual(factory.timeouts, Timeouts(10.0, 7.0))
        self.assertIs(factory.gate, listenerService.gate)
        assert listenerService.gate is not None
        self.assertEqual(listenerService.gate.maxConnections, 3)
        self.assertIs(service._gateFor(listener), listenerService.gate)
