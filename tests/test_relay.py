# -*- test-case-name: tests.test_relay -*-
"""
Tests for L{mtlsproxy.relay}.

Most tests run in memory: a L{MemoryReactorClock} records backend connection
attempts, L{StringTransport}s stand for both sides, and TLS clients talk to the
relay over iosim.  L{LoopbackTests} runs the relay on 127.0.0.1 with the real
reactor for throughput, integrity and bounded memory.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Optional

import attrs
from cryptography.hazmat.primitives import hashes
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    TimeoutError,
    UserError,
)
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from mtlsproxy.pool import MEMBERS_EXHAUSTED, NO_HEALTHY_MEMBER, ConnectionFacts, Member, Pool
from mtlsproxy.relay import (
    ACCESS_LOG_FORMAT,
    BackendProtocol,
    CloseReason,
    Phase,
    ProxyServerFactory,
    ProxyServerProtocol,
)
from tests.test_tlsproto import EarlyWriter, HalfCloseRecorder, connectTLS, testPKI


class EarlyDataWriter(HalfCloseRecorder):
    """
    Writes C{b"early"} as soon as it is connected, before the handshake has
    completed (TLS 1.3 sends it right after the client's Finished).
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(b"early")  # type: ignore[union-attr]


@attrs.frozen
class _MemberConfig:
    address: str
    port: int
    weight: int = 1


class RecordingSelector:
    """
    Picks the first candidate and remembers what it was asked.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[list[Member], ConnectionFacts]] = []

    def pick(self, candidates: list[Member], facts: ConnectionFacts) -> Optional[Member]:
        self.calls.append((list(candidates), facts))
        return candidates[0]


class HalfCloseStringTransport(StringTransport):
    """
    A L{StringTransport} that records C{loseWriteConnection}.
    """

    writeClosed = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


def _members(count: int = 3) -> list[Member]:
    return [Member(_MemberConfig(f"10.0.0.{i}", 8000 + i)) for i in range(1, count + 1)]


def accessEvents(observer: EventLoggingObserver) -> list[dict[str, Any]]:
    """
    The access events an observer saw.
    """
    return [e for e in observer if e.get("log_category") == "access"]


class RelayHarness:
    """
    One client connection to a relay, with everything in memory.
    """

    clientPeer = IPv4Address("TCP", "203.0.113.7", 40000)

    def __init__(self, maxAttempts: int = 3, members: int = 3, tls: bool = False) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1000)
        self.selector = RecordingSelector()
        self.members = _members(members)
        self.pool = Pool("pool", self.members, self.selector)
        self.factory = ProxyServerFactory(self.reactor, "web", self.pool, 5.0, maxAttempts, tls)
        self.clientTransport = HalfCloseStringTransport(peerAddress=self.clientPeer)
        self.relay = self.factory.buildProtocol(self.clientPeer)
        self.backend: Optional[BackendProtocol] = None
        self.backendTransport: Optional[HalfCloseStringTransport] = None

    def connectClient(self) -> "RelayHarness":
        self.relay.makeConnection(self.clientTransport)
        return self

    def connectBackend(self, index: int = -1) -> BackendProtocol:
        """
        Let the connection attempt number C{index} succeed.
        """
        host, port, factory, timeout, bindAddress = self.reactor.tcpClients[index]
        backend = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.backendTransport = HalfCloseStringTransport(
            peerAddress=IPv4Address("TCP", host, port)
        )
        backend.makeConnection(self.backendTransport)
        self.backend = backend
        return backend

    def failBackend(self, reason: Exception, index: int = -1) -> None:
        """
        Let the connection attempt number C{index} fail.
        """
        factory = self.reactor.tcpClients[index][2]
        factory.clientConnectionFailed(self.reactor.connectors[index], Failure(reason))


def _observe(testCase: SynchronousTestCase) -> EventLoggingObserver:
    return EventLoggingObserver.createWithCleanup(testCase, globalLogPublisher)


class ConnectTests(SynchronousTestCase):
    """
    When and where the backend connection is made.
    """

    def test_tcpConnectsOnConnectionMade(self) -> None:
        """
        When a TCP client connects, the client is paused and the first
        member the pool picks is connected to with the connect timeout.
        """
        h = RelayHarness().connectClient()
        self.assertEqual(h.clientTransport.producerState, "paused")
        self.assertEqual(len(h.reactor.tcpClients), 1)
        host, port, _, timeout, _ = h.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("10.0.0.1", 8001, 5.0))
        self.assertIs(h.relay.phase, Phase.CONNECTING)
        facts = h.selector.calls[0][1]
        self.assertEqual(
            facts, ConnectionFacts("web", "203.0.113.7", 40000, None, None)
        )

    def test_bytesBeforeBackendKeptThenForwarded(self) -> None:
        """
        When the client sends bytes before the backend is connected, they are
        kept, and written to the backend once it connects, before anything
        later; then the client is resumed.
        """
        h = RelayHarness().connectClient()
        h.relay.dataReceived(b"early ")
        h.relay.dataReceived(b"bytes")
        h.connectBackend()
        assert h.backendTransport is not None
        self.assertEqual(h.backendTransport.value(), b"early bytes")
        self.assertEqual(h.clientTransport.producerState, "producing")
        h.relay.dataReceived(b" later")
        self.assertEqual(h.backendTransport.value(), b"early bytes later")
        self.assertIs(h.relay.phase, Phase.RELAYING)

    def test_retryNextMemberOnRefused(self) -> None:
        """
        When a member refuses, it is excluded and the next one is tried.
        """
        h = RelayHarness().connectClient()
        h.failBackend(ConnectionRefusedError())
        self.assertEqual(len(h.reactor.tcpClients), 2)
        self.assertEqual(h.reactor.tcpClients[1][:2], ("10.0.0.2", 8002))
        self.assertEqual(h.selector.calls[1][0], h.members[1:])
        self.assertEqual(h.members[0].failedConnections, 1)

    def test_retryNextMemberOnTimeout(self) -> None:
        """
        When a connection attempt times out, the next member is tried, and
        the one that connects gets the relay.
        """
        h = RelayHarness().connectClient()
        h.failBackend(TimeoutError())
        h.connectBackend()
        self.assertIs(h.relay.phase, Phase.RELAYING)
        self.assertEqual(h.members[1].activeConnections, 1)
        self.assertEqual(h.members[0].activeConnections, 0)

    def test_noBackendAfterMaxAttempts(self) -> None:
        """
        When maxAttempts attempts failed, no other member is tried, the
        client is closed (not aborted) and the access event says no_backend.
        """
        observer = _observe(self)
        h = RelayHarness(maxAttempts=2).connectClient()
        h.failBackend(ConnectionRefusedError())
        h.failBackend(TimeoutError())
        self.assertEqual(len(h.reactor.tcpClients), 2)
        self.assertTrue(h.clientTransport.disconnecting)
        self.assertFalse(h.clientTransport.disconnected)
        self.assertEqual(accessEvents(observer), [])
        h.relay.connectionLost(Failure(ConnectionDone()))
        [event] = accessEvents(observer)
        self.assertEqual(event["close_reason"], CloseReason.NO_BACKEND)
        self.assertIsNone(event["backend"])
        self.assertEqual((event["bytes_in"], event["bytes_out"]), (0, 0))
        warnings = [e for e in observer if "no backend" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertEqual((warnings[0]["attempts"], warnings[0]["why"]), (2, "max_attempts"))

    def test_noBackendWhenPoolHasNone(self) -> None:
        """
        When the pool offers no member, nothing is connected and the client
        is closed with no_backend.
        """
        observer = _observe(self)
        h = RelayHarness()
        for member in h.members:
            member.healthy = False
        h.connectClient()
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertTrue(h.clientTransport.disconnecting)
        h.relay.connectionLost(Failure(ConnectionDone()))
        [event] = accessEvents(observer)
        self.assertEqual(event["close_reason"], CloseReason.NO_BACKEND)
        [warning] = [e for e in observer if "no backend" in e.get("log_format", "")]
        self.assertEqual(warning["why"], NO_HEALTHY_MEMBER)

    def test_allMembersTried(self) -> None:
        """
        When every member failed before maxAttempts is reached, the client is
        closed with no_backend, the reason being that members are exhausted.
        """
        observer = _observe(self)
        h = RelayHarness(maxAttempts=5, members=2).connectClient()
        h.failBackend(ConnectionRefusedError())
        h.failBackend(ConnectionRefusedError())
        self.assertEqual(len(h.reactor.tcpClients), 2)
        self.assertTrue(h.clientTransport.disconnecting)
        [warning] = [e for e in observer if "no backend" in e.get("log_format", "")]
        self.assertEqual(warning["why"], MEMBERS_EXHAUSTED)

    def test_clientGoneWhileConnecting(self) -> None:
        """
        When the client goes away while a backend is being connected, the
        attempt is stopped and not retried, the access event is emitted, and
        a backend connection that completes anyway is closed and uncounted.
        """
        observer = _observe(self)
        h = RelayHarness().connectClient()
        h.relay.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(h.reactor.connectors[0].stoppedConnecting)
        [event] = accessEvents(observer)
        self.assertEqual(event["close_reason"], CloseReason.CLIENT_CLOSED)
        h.failBackend(UserError())
        self.assertEqual(len(h.reactor.tcpClients), 1)
        h.connectBackend()
        assert h.backendTransport is not None and h.backend is not None
        self.assertTrue(h.backendTransport.disconnecting)
        h.backend.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(h.members[0].activeConnections, 0)
        self.assertEqual(len(accessEvents(observer)), 1)

    def test_preConnectBufferBounded(self) -> None:
        """
        When the client sends more than preConnectBufferLimit bytes before a
        backend is connected, the connection is closed with close_reason
        error and nothing is connected.
        """
        observer = _observe(self)
        h = RelayHarness()
        h.relay.preConnectBufferLimit = 10
        h.connectClient()
        h.relay.dataReceived(b"x" * 11)
        self.assertTrue(h.reactor.connectors[0].stoppedConnecting)
        self.assertTrue(h.clientTransport.disconnecting)
        h.relay.connectionLost(Failure(ConnectionDone()))
        [event] = accessEvents(observer)
        self.assertEqual(event["close_reason"], CloseReason.ERROR)


class OrderingPropertyTests(SynchronousTestCase):
    """
    Bytes arrive whole and in order however they are split.
    """

    @settings(max_examples=60, deadline=None)
    @given(
        early=st.lists(st.binary(min_size=1, max_size=64), max_size=8),
        up=st.lists(st.binary(min_size=1, max_size=64), max_size=8),
        down=st.lists(st.binary(min_size=1, max_size=64), max_size=8),
        failures=st.integers(min_value=0, max_value=2),
    )
    def test_chunksArriveInOrder(
        self, early: list[bytes], up: list[bytes], down: list[bytes], failures: int
    ) -> None:
        """
        When the client sends chunks before and after the backend connects
        (after some failed attempts), and the backend answers in chunks, each
        side receives exactly the concatenation of the other's chunks and the
        counters match.
        """
        h = RelayHarness().connectClient()
        for chunk in early:
            h.relay.dataReceived(chunk)
        for _ in range(failures):
            h.failBackend(ConnectionRefusedError())
        backend = h.connectBackend()
        assert h.backendTransport is not None
        for chunk in up:
            h.relay.dataReceived(chunk)
        for chunk in down:
            backend.dataReceived(chunk)
        self.assertEqual(h.backendTransport.value(), b"".join(early + up))
        self.assertEqual(h.clientTransport.value(), b"".join(down))
        self.assertEqual(h.relay._bytesIn, len(b"".join(early + up)))
        self.assertEqual(h.relay._bytesOut, len(b"".join(down)))


class RelayingTests(SynchronousTestCase):
    """
    The data path, flow control and closing, over TCP.
    """

    def setUp(self) -> None:
        self.observer = _observe(self)
        self.h = RelayHarness().connectClient()
        self.backend = self.h.connectBackend()
        assert self.h.backendTransport is not None
        self.backendTransport = self.h.backendTransport
        self.clientTransport = self.h.clientTransport

    def test_bothWays(self) -> None:
        """
        When both sides send, each receives the other's bytes.
        """
        self.h.relay.dataReceived(b"request")
        self.backend.dataReceived(b"response")
        self.assertEqual(self.backendTransport.value(), b"request")
        self.assertEqual(self.clientTransport.value(), b"response")

    def test_producersRegisteredBothWays(self) -> None:
        """
        When the backend is connected, each transport is the other's
        streaming producer, so a full send buffer pauses the other side.
        """
        self.assertIs(self.clientTransport.producer, self.backendTransport)
        self.assertIs(self.backendTransport.producer, self.clientTransport)
        self.assertTrue(self.clientTransport.streaming)
        self.assertTrue(self.backendTransport.streaming)
        # The backend's send buffer fills: it pauses its producer, the client.
        self.backendTransport.producer.pauseProducing()
        self.assertEqual(self.clientTransport.producerState, "paused")
        self.clientTransport.producer.pauseProducing()
        self.assertEqual(self.backendTransport.producerState, "paused")

    def test_activeConnections(self) -> None:
        """
        When a backend connection is open its member counts it; when it ends
        it is uncounted exactly once.
        """
        member = self.h.members[0]
        self.assertEqual((member.activeConnections, member.totalConnections), (1, 1))
        self.backend.connectionLost(Failure(ConnectionDone()))
        self.h.relay.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((member.activeConnections, member.totalConnections), (0, 1))

    def test_clientHalfClose(self) -> None:
        """
        When the client sends EOF, the backend's write side is closed, the
        client no longer feeds it, and the backend can still answer; when the
        backend then sends EOF too, both are closed.
        """
        self.h.relay.dataReceived(b"request")
        self.h.relay.readConnectionLost()
        self.assertTrue(self.backendTransport.writeClosed)
        self.assertIsNone(self.backendTransport.producer)
        self.assertFalse(self.backendTransport.disconnecting)
        self.backend.dataReceived(b"response")
        self.assertEqual(self.clientTransport.value(), b"response")
        self.assertFalse(self.clientTransport.writeClosed)

        self.backend.readConnectionLost()
        self.assertTrue(self.clientTransport.writeClosed)
        self.assertTrue(self.clientTransport.disconnecting)
        self.assertTrue(self.backendTransport.disconnecting)
        self.backend.connectionLost(Failure(ConnectionDone()))
        self.h.relay.connectionLost(Failure(ConnectionDone()))
        [event] = accessEvents(self.observer)
        self.assertEqual(event["close_reason"], CloseReason.CLIENT_CLOSED)
        self.assertEqual((event["bytes_in"], event["bytes_out"]), (7, 8))

    def test_backendHalfClose(self) -> None:
        """
        When the backend sends EOF, the client's write side is closed and the
        client can still send to the backend.
        """
        self.backend.dataReceived(b"banner")
        self.backend.readConnectionLost()
        self.assertTrue(self.clientTransport.writeClosed)
        self.assertIsNone(self.clientTransport.producer)
        self.assertFalse(self.clientTransport.disconnecting)
        self.h.relay.dataReceived(b"more")
        self.assertEqual(self.backendTransport.value(), b"more")
        self.h.relay.readConnectionLost()
        self.assertTrue(self.backendTransport.writeClosed)
        self.assertTrue(self.clientTransport.disconnecting)
        self.h.relay.connectionLost(Failure(ConnectionDone()))
        self.backend.connectionLost(Failure(ConnectionDone()))
        [event] = accessEvents(self.observer)
        self.assertEqual(event["close_reason"], CloseReason.BACKEND_CLOSED)

    def test_repeatedEOFIgnored(self) -> None:
        """
        When a transport reports EOF again (resumed after EOF), nothing more
        happens.
        """
        self.h.relay.readConnectionLost()
        self.h.relay.readConnectionLost()
        self.backend.readConnectionLost()
        self.backend.readConnectionLost()
        self.assertTrue(self.clientTransport.disconnecting)

    def test_backendClosedFlushesClient(self) -> None:
        """
        When the backend closes, its last bytes go to the client, which is
        then closed after flushing (loseConnection, not abortConnection),
        with the producers unregistered; later client bytes are dropped.
        """
        self.backend.dataReceived(b"last")
        self.backend.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clientTransport.value(), b"last")
        self.assertTrue(self.clientTransport.disconnecting)
        self.assertFalse(self.clientTransport.disconnected)
        self.assertIsNone(self.clientTransport.producer)
        self.assertIsNone(self.backendTransport.producer)
        self.h.relay.dataReceived(b"too late")
        self.assertEqual(self.backendTransport.value(), b"")
        self.h.relay.connectionLost(Failure(ConnectionDone()))
        [event] = accessEvents(self.observer)
        self.assertEqual(event["close_reason"], CloseReason.BACKEND_CLOSED)

    def test_clientClosedFlushesBackend(self) -> None:
        """
        When the client closes, the backend is closed after flushing, and
        the access event comes when the backend is gone too.
        """
        self.h.relay.dataReceived(b"last")
        self.h.relay.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.backendTransport.value(), b"last")
        self.assertTrue(self.backendTransport.disconnecting)
        self.assertFalse(self.backendTransport.disconnected)
        self.assertIsNone(self.backendTransport.producer)
        self.assertEqual(accessEvents(self.observer), [])
        self.backend.dataReceived(b"dropped")
        self.assertEqual(self.clientTransport.value(), b"")
        self.backend.connectionLost(Failure(ConnectionDone()))
        [event] = accessEvents(self.observer)
        self.assertEqual(event["close_reason"], CloseReason.CLIENT_CLOSED)
        self.assertIs(self.h.relay.phase, Phase.CLOSED)

    def test_accessEventFields(self) -> None:
        """
        When a TCP connection ends, one access event carries the listener,
        peer, backend, byte counts, duration by the reactor's clock and close
        reason, with the TLS fields None, in the access namespace and
        category.
        """
        self.h.relay.dataReceived(b"12345")
        self.backend.dataReceived(b"123")
        self.h.reactor.advance(2.5)
        self.h.relay.connectionLost(Failure(ConnectionDone()))
        self.backend.connectionLost(Failure(ConnectionDone()))
        [event] = accessEvents(self.observer)
        self.assertEqual(event["log_format"], ACCESS_LOG_FORMAT)
        self.assertEqual(event["log_namespace"], "mtlsproxy.access")
        expected = {
            "listener": "web",
            "peer": "203.0.113.7:40000",
            "backend": "10.0.0.1:8001",
            "bytes_in": 5,
            "bytes_out": 3,
            "duration": 2.5,
            "close_reason": "client_closed",
            "sni": None,
            "tls_version": None,
            "cipher": None,
            "subject": None,
            "issuer": None,
            "serial": None,
            "fingerprint": None,
        }
        self.assertEqual({k: event[k] for k in expected}, expected)


class AddressTests(SynchronousTestCase):
    """
    How addresses are written in the log.
    """

    def test_ipv6Peer(self) -> None:
        """
        When the client and the backend are IPv6, their addresses are
        bracketed.
        """
        observer = _observe(self)
        h = RelayHarness()
        h.members[0].config = _MemberConfig("::1", 8443)
        h.clientTransport = HalfCloseStringTransport(peerAddress=IPv6Address("TCP", "2001:db8::7", 5))
        h.connectClient()
        backend = h.connectBackend()
        h.relay.connectionLost(Failure(ConnectionDone()))
        backend.connectionLost(Failure(ConnectionDone()))
        [event] = accessEvents(observer)
        self.assertEqual((event["peer"], event["backend"]), ("[2001:db8::7]:5", "[::1]:8443"))


class TLSRelayTests(SynchronousTestCase):
    """
    The relay behind L{mtlsproxy.tlsproto.HalfCloseTLSFactory}, with a TLS
    client over iosim.
    """

    def setUp(self) -> None:
        self.observer = _observe(self)
        self.h = RelayHarness(tls=True)

    def connect(self, clientProtocol: type[Protocol] = HalfCloseRecorder, **kw: Any) -> Any:
        h = self.h
        relays: list[ProxyServerProtocol] = []

        def build(addr: Any) -> ProxyServerProtocol:
            relay = ProxyServerFactory.buildProtocol(h.factory, addr)
            relays.append(relay)
            return relay

        h.factory.buildProtocol = build  # type: ignore[method-assign]
        pair = connectTLS(h.factory, Factory.forProtocol(clientProtocol), **kw)
        h.relay = relays[0]
        return pair

    def test_backendOnlyAfterHandshake(self) -> None:
        """
        When a TLS 1.3 client sends data right after its Finished (and then
        close_notify), no backend is contacted before handshakeCompleted,
        nothing is forwarded before the backend connects, and then the data
        and the EOF are forwarded in order.
        """
        pair = self.connect(EarlyWriter, serverVersion=SSL.TLS1_3_VERSION, flush=False)
        while self.h.relay.phase is Phase.HANDSHAKING:
            self.assertEqual(self.h.reactor.tcpClients, [])
            self.assertTrue(pair.pump.pump())
        self.assertEqual(len(self.h.reactor.tcpClients), 1)
        pair.pump.flush()
        self.assertIs(self.h.relay.phase, Phase.CONNECTING)
        self.assertTrue(pair.serverIO.paused)

        self.h.connectBackend()
        assert self.h.backendTransport is not None
        self.assertEqual(self.h.backendTransport.value(), b"early")
        self.assertTrue(self.h.backendTransport.writeClosed)
        # The client sent EOF: it is not resumed (nor registered as producer).
        self.assertIsNone(self.h.backendTransport.producer)

    def test_clientResumedWhenBackendConnects(self) -> None:
        """
        When the backend connects, the paused TLS client transport is
        resumed and data sent early is forwarded first.
        """
        pair = self.connect(EarlyDataWriter)
        self.assertTrue(pair.serverIO.paused)
        self.h.connectBackend()
        assert self.h.backendTransport is not None
        self.assertFalse(pair.serverIO.paused)
        pair.client.transport.write(b" late")
        pair.pump.flush()
        self.assertEqual(self.h.backendTransport.value(), b"early late")

    def test_handshakeFailureNoBackend(self) -> None:
        """
        When the handshake fails (no client certificate), no backend is ever
        contacted and the access event says handshake_failed.
        """
        self.connect(clientCertificate=False)
        self.assertEqual(self.h.reactor.tcpClients, [])
        [event] = accessEvents(self.observer)
        self.assertEqual(event["close_reason"], CloseReason.HANDSHAKE_FAILED)
        self.assertIsNone(event["backend"])
        self.assertIsNone(event["subject"])

    def test_tlsFactsInSelectionAndAccessLog(self) -> None:
        """
        When a TLS client ends its connection, the selector saw its SNI and
        certificate identity, and the access event carries version, cipher,
        SNI and the certificate's subject, issuer, serial and SHA-256
        fingerprint.
        """
        pair = self.connect()
        backend = self.h.connectBackend()
        pair.client.transport.write(b"hello")
        pair.pump.flush()
        backend.dataReceived(b"hi")
        pair.pump.flush()
        self.assertEqual(pair.client.received, b"hi")
        pair.client.transport.loseConnection()
        pair.pump.flush()
        backend.connectionLost(Failure(ConnectionDone()))
        pair.pump.flush()

        certificate = testPKI().client.certificate
        facts = self.h.selector.calls[0][1]
        self.assertEqual(facts.sni, "localhost")
        self.assertEqual(facts.clientIdentity.subject, "CN=client-ok")
        [event] = accessEvents(self.observer)
        expected = {
            "listener": "web",
            "sni": "localhost",
            "tls_version": "TLSv1.3",
            "subject": "CN=client-ok",
            "issuer": "CN=Test CA",
            "serial": format(certificate.serial_number, "x"),
            "fingerprint": certificate.fingerprint(hashes.SHA256()).hex(),
            "backend": "10.0.0.1:8001",
            "bytes_in": 5,
            "bytes_out": 2,
            "close_reason": "client_closed",
        }
        self.assertEqual({k: event[k] for k in expected}, expected)
        self.assertTrue(event["cipher"])

    def test_halfCloseThroughRelay(self) -> None:
        """
        When a TLS 1.3 client sends close_notify, the backend sees EOF, its
        answer still reaches the client, and the backend's EOF closes the
        client connection with close_notify.
        """
        pair = self.connect()
        backend = self.h.connectBackend()
        assert self.h.backendTransport is not None
        pair.client.transport.write(b"question")
        pair.client.transport.loseWriteConnection()
        pair.pump.flush()
        self.assertEqual(self.h.backendTransport.value(), b"question")
        self.assertTrue(self.h.backendTransport.writeClosed)

        backend.dataReceived(b"answer")
        pair.pump.flush()
        self.assertEqual(pair.client.received, b"answer")
        backend.readConnectionLost()
        pair.pump.flush()
        assert pair.client.lostReason is not None
        pair.client.lostReason.trap(ConnectionDone)
        self.assertTrue(self.h.backendTransport.disconnecting)
        backend.connectionLost(Failure(ConnectionDone()))
        [event] = accessEvents(self.observer)
        self.assertEqual(event["close_reason"], CloseReason.CLIENT_CLOSED)

    def test_backendClosedSendsCloseNotify(self) -> None:
        """
        When the backend closes, the TLS client is closed with close_notify
        (a clean close), after the backend's last bytes.
        """
        pair = self.connect(serverVersion=SSL.TLS1_2_VERSION)
        backend = self.h.connectBackend()
        backend.dataReceived(b"bye")
        backend.connectionLost(Failure(ConnectionDone()))
        pair.pump.flush()
        self.assertEqual(pair.client.received, b"bye")
        assert pair.client.lostReason is not None
        pair.client.lostReason.trap(ConnectionDone)
        [event] = accessEvents(self.observer)
        self.assertEqual(event["tls_version"], "TLSv1.2")
        self.assertEqual(event["close_reason"], CloseReason.BACKEND_CLOSED)


# -- loopback -----------------------------------------------------------------


def _buffered(transport: Any) -> int:
    """
    Bytes a real TCP transport holds in user space, not yet sent.
    """
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@implementer(IHalfCloseableProtocol)
class _Sink(Protocol):
    """
    Hashes what it receives; writes C{payload} on connect; fires C{done}
    with the digest of what it received at EOF or close.  With C{stalled},
    does not read until told.
    """

    def __init__(self, payload: bytes = b"", stalled: bool = False) -> None:
        self.payload = payload
        self.stalled = stalled
        self.hasher = hashlib.sha256()
        self.count = 0
        self.done: defer.Deferred[str] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        if self.stalled:
            self.transport.pauseProducing()  # type: ignore[union-attr]
        if self.payload:
            self.transport.write(self.payload)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.hasher.update(data)
        self.count += len(data)

    def readConnectionLost(self) -> None:
        if not self.done.called:
            self.done.callback(self.hasher.hexdigest())
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if not self.done.called:
            self.done.callback(self.hasher.hexdigest())
        self.closed.callback(None)


class LoopbackTests(TestCase):
    """
    The relay on 127.0.0.1 with the real reactor.
    """

    timeout = 20

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.backends: list[_Sink] = []
        self.backendFactory = Factory.forProtocol(self._newBackend)
        self.backendPort = reactor.listenTCP(0, self.backendFactory, interface="127.0.0.1")
        self.addCleanup(self.backendPort.stopListening)
        member = Member(_MemberConfig("127.0.0.1", self.backendPort.getHost().port))
        self.pool = Pool("loop", [member], RecordingSelector())
        self.relays: list[ProxyServerProtocol] = []
        factory = ProxyServerFactory(reactor, "loop", self.pool, 5.0, 1, False)
        build = factory.buildProtocol

        def record(addr: Any) -> ProxyServerProtocol:
            relay = build(addr)
            self.relays.append(relay)
            return relay

        factory.buildProtocol = record  # type: ignore[method-assign]
        self.proxyPort = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.proxyPort.stopListening)
        self.backendPayload = b""
        self.backendStalled = False

    def _newBackend(self) -> _Sink:
        backend = _Sink(self.backendPayload, self.backendStalled)
        self.backends.append(backend)
        return backend

    def _connectClient(self, payload: bytes) -> _Sink:
        client = _Sink()
        client.factory = None

        def connected(_: Any) -> None:
            client.transport.write(payload)  # type: ignore[union-attr]
            client.transport.loseWriteConnection()  # type: ignore[union-attr]

        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.proxyPort.getHost().port)
        connectProtocol(endpoint, client).addCallback(connected)
        return client

    @defer.inlineCallbacks
    def test_largeTransferBothWaysIntact(self) -> Any:
        """
        When 10 MiB go each way through the relay over TCP (with the client's
        EOF forwarded), every byte arrives intact.
        """
        up = os.urandom(10 * 2**20)
        down = os.urandom(10 * 2**20)
        self.backendPayload = down
        client = self._connectClient(up)
        backendDigest = yield _backendDone(self)
        clientDigest = yield client.done
        self.assertEqual(backendDigest, hashlib.sha256(up).hexdigest())
        self.assertEqual(clientDigest, hashlib.sha256(down).hexdigest())
        yield client.closed
        yield self.backends[0].closed
        self.assertEqual(self.pool.members[0].activeConnections, 0)

    @defer.inlineCallbacks
    def test_stalledBackendBoundsMemory(self) -> Any:
        """
        When a client sends 64 MiB to a backend that does not read, the
        proxy's transports hold at most a few MiB while the client is
        stalled; once the backend reads, everything arrives intact.
        """
        payload = os.urandom(64 * 2**20)
        self.backendStalled = True
        client = self._connectClient(payload)
        peak = 0
        lastIn = -1
        stableSince = self.reactor.seconds()
        while True:
            yield task.deferLater(self.reactor, 0.02, lambda: None)
            if not self.relays or self.relays[0]._backend is None:
                continue
            relay = self.relays[0]
            backendTransport = relay._backend.transport  # type: ignore[union-attr]
            peak = max(peak, _buffered(relay.transport) + _buffered(backendTransport))
            if relay._bytesIn != lastIn:
                lastIn = relay._bytesIn
                stableSince = self.reactor.seconds()
            elif self.reactor.seconds() - stableSince > 0.5:
                break
        self.assertLess(peak, 4 * 2**20)
        self.assertLess(relay._bytesIn, 32 * 2**20)
        self.assertFalse(client.done.called)

        self.backends[0].transport.resumeProducing()  # type: ignore[union-attr]
        backendDigest = yield _backendDone(self)
        self.assertEqual(backendDigest, hashlib.sha256(payload).hexdigest())
        self.assertEqual(self.backends[0].count, len(payload))
        yield client.closed


def _backendDone(testCase: LoopbackTests) -> defer.Deferred[str]:
    """
    Fire with the first backend's digest once it has connected and finished.
    """

    @defer.inlineCallbacks
    def wait() -> Any:
        while not testCase.backends:
            yield task.deferLater(testCase.reactor, 0.01, lambda: None)
        digest = yield testCase.backends[0].done
        return digest

    return wait()
