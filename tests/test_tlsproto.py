# -*- test-case-name: tests.test_tlsproto -*-
"""
Tests for L{mtlsproxy.tlsproto}: TLS half-close, in memory over iosim.

The helpers at the top (certificates, contexts, connection creators,
L{connectTLS}) are also used by C{tests.test_relay}.
"""

from __future__ import annotations

import types
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Optional

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mtlsproxy.tlsproto import HalfCloseTLSFactory, HalfCloseTLSProtocol


# -- certificates and contexts ------------------------------------------------


@attrs.frozen
class Issued:
    """
    A certificate and its private key.
    """

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(commonName: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)])


def issue(commonName: str, issuer: Optional[Issued] = None, ca: bool = False) -> Issued:
    """
    Make a certificate for C{commonName}, self-signed if no C{issuer}.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    issuerName = issuer.certificate.subject if issuer else _name(commonName)
    signingKey = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(commonName))
        .issuer_name(issuerName)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(commonName)]), critical=False
        )
    return Issued(builder.sign(signingKey, hashes.SHA256()), key)


@attrs.frozen
class PKI:
    """
    A CA, a server certificate and a client certificate it issued.
    """

    ca: Issued
    server: Issued
    client: Issued


_pki: Optional[PKI] = None


def testPKI() -> PKI:
    """
    The PKI shared by the tests of a run (generated once: keys are not free).
    """
    global _pki
    if _pki is None:
        ca = issue("Test CA", ca=True)
        _pki = PKI(ca, issue("localhost", ca), issue("client-ok", ca))
    return _pki


def _pinVersion(context: SSL.Context, version: Optional[int]) -> None:
    if version is not None:
        context.set_min_proto_version(version)
        context.set_max_proto_version(version)


def serverContext(
    version: Optional[int] = None, requireClientCertificate: bool = True
) -> SSL.Context:
    """
    A server context with the test PKI's server certificate that verifies
    client certificates against its CA.
    """
    pki = testPKI()
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    _pinVersion(context, version)
    context.use_certificate(pki.server.certificate)
    context.use_privatekey(pki.server.key)
    context.get_cert_store().add_cert(X509.from_cryptography(pki.ca.certificate))
    mode = SSL.VERIFY_PEER
    if requireClientCertificate:
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    context.set_verify(mode, lambda connection, certificate, errno, depth, ok: bool(ok))
    return context


def clientContext(version: Optional[int] = None, withCertificate: bool = True) -> SSL.Context:
    """
    A client context that trusts the test CA and presents the test client
    certificate.
    """
    pki = testPKI()
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    _pinVersion(context, version)
    context.get_cert_store().add_cert(X509.from_cryptography(pki.ca.certificate))
    context.set_verify(SSL.VERIFY_PEER, lambda connection, certificate, errno, depth, ok: bool(ok))
    if withCertificate:
        context.use_certificate(pki.client.certificate)
        context.use_privatekey(pki.client.key)
    return context


@implementer(IOpenSSLServerConnectionCreator)
class ServerCreator:
    """
    Server connections from a fixed context.
    """

    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._context, None)


@implementer(IOpenSSLClientConnectionCreator)
class ClientCreator:
    """
    Client connections from a fixed context, with SNI C{localhost}.
    """

    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_tlsext_host_name(b"localhost")
        return connection


class PausableFakeTransport(FakeTransport):
    """
    An iosim transport that remembers whether it was paused, and whose
    C{loseWriteConnection} is recorded.
    """

    paused = False
    writeClosed = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


@attrs.define
class TLSPair:
    """
    Both ends of an in-memory TLS connection.
    """

    clientTLS: HalfCloseTLSProtocol
    serverTLS: HalfCloseTLSProtocol
    clientIO: PausableFakeTransport
    serverIO: PausableFakeTransport
    pump: IOPump
    client: Any
    server: Any


def connectTLS(
    serverFactory: IProtocolFactory,
    clientFactory: IProtocolFactory,
    serverVersion: Optional[int] = None,
    clientVersion: Optional[int] = None,
    clientCertificate: bool = True,
    handshakeFailed: Optional[Callable[[HalfCloseTLSProtocol, Failure], object]] = None,
    clock: Optional[Clock] = None,
    flush: bool = True,
) -> TLSPair:
    """
    Connect a client made by C{clientFactory} to a server made by
    C{serverFactory}, both through L{HalfCloseTLSFactory}, over iosim.
    """
    clock = clock or Clock()
    serverTLSFactory = HalfCloseTLSFactory(
        ServerCreator(serverContext(serverVersion)),
        False,
        serverFactory,
        clock=clock,
        handshakeFailed=handshakeFailed,
    )
    clientTLSFactory = HalfCloseTLSFactory(
        ClientCreator(clientContext(clientVersion, clientCertificate)),
        True,
        clientFactory,
        clock=clock,
    )
    serverTLS = serverTLSFactory.buildProtocol(None)
    clientTLS = clientTLSFactory.buildProtocol(None)
    assert isinstance(serverTLS, HalfCloseTLSProtocol)
    assert isinstance(clientTLS, HalfCloseTLSProtocol)
    serverIO = PausableFakeTransport(serverTLS, isServer=True)
    clientIO = PausableFakeTransport(clientTLS, isServer=False)
    pump = connect(serverTLS, serverIO, clientTLS, clientIO, greet=False, clock=clock)
    pair = TLSPair(
        clientTLS, serverTLS, clientIO, serverIO, pump,
        clientTLS.wrappedProtocol, serverTLS.wrappedProtocol,
    )
    if flush:
        pump.flush()
    return pair


# -- application protocols ------------------------------------------------------


@implementer(IHandshakeListener)
class Recorder(Protocol):
    """
    Records what happens to it, in order.  Not half-closeable.
    """

    def __init__(self) -> None:
        self.events: list[str] = []
        self.received = b""
        self.lostReason: Optional[Failure] = None

    def connectionMade(self) -> None:
        self.events.append("connectionMade")

    def handshakeCompleted(self) -> None:
        self.events.append("handshakeCompleted")

    def dataReceived(self, data: bytes) -> None:
        self.events.append("dataReceived")
        self.received += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.events.append("connectionLost")
        self.lostReason = reason


@implementer(IHalfCloseableProtocol)
class HalfCloseRecorder(Recorder):
    """
    A L{Recorder} that wants half-close notifications.
    """

    def readConnectionLost(self) -> None:
        self.events.append("readConnectionLost")

    def writeConnectionLost(self) -> None:
        self.events.append("writeConnectionLost")


class EarlyWriter(HalfCloseRecorder):
    """
    Writes C{b"early"} and half-closes as soon as it is connected, before the
    handshake has completed.
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(b"early")  # type: ignore[union-attr]
        self.transport.loseWriteConnection()  # type: ignore[union-attr]


def _factoryOf(protocolClass: type[Protocol]) -> Factory:
    return Factory.forProtocol(protocolClass)


class HalfCloseTLS13Tests(SynchronousTestCase):
    """
    Half-close on TLS 1.3.
    """

    def test_clientHalfCloseServerAnswers(self) -> None:
        """
        When a TLS 1.3 client calls loseWriteConnection, the server protocol
        gets readConnectionLost (not connectionLost), can still write, the
        client receives that, and the server's close ends both cleanly.
        """
        pair = connectTLS(_factoryOf(HalfCloseRecorder), _factoryOf(HalfCloseRecorder),
                          SSL.TLS1_3_VERSION, SSL.TLS1_3_VERSION)
        self.assertEqual(pair.serverTLS.getHandle().get_protocol_version_name(), "TLSv1.3")
        pair.client.transport.write(b"request")
        pair.client.transport.loseWriteConnection()
        pair.pump.flush()
        self.assertEqual(pair.server.received, b"request")
        self.assertEqual(
            pair.server.events,
            ["connectionMade", "handshakeCompleted", "dataReceived", "readConnectionLost"],
        )

        pair.server.transport.write(b"response")
        pair.pump.flush()
        self.assertEqual(pair.client.received, b"response")
        self.assertNotIn("connectionLost", pair.client.events)

        pair.server.transport.loseConnection()
        pair.pump.flush()
        self.assertEqual(pair.server.events[-1], "connectionLost")
        self.assertEqual(pair.client.events[-1], "connectionLost")
        assert pair.server.lostReason is not None and pair.client.lostReason is not None
        pair.server.lostReason.trap(ConnectionDone)
        pair.client.lostReason.trap(ConnectionDone)
        self.assertTrue(pair.serverIO.disconnected)
        self.assertTrue(pair.clientIO.disconnected)

    def test_serverHalfCloseClientAnswers(self) -> None:
        """
        When a TLS 1.3 server calls loseWriteConnection, the client gets
        readConnectionLost, its later writes still reach the server, and the
        client's close ends both cleanly.
        """
        pair = connectTLS(_factoryOf(HalfCloseRecorder), _factoryOf(HalfCloseRecorder),
                          SSL.TLS1_3_VERSION, SSL.TLS1_3_VERSION)
        pair.server.transport.write(b"banner")
        pair.server.transport.loseWriteConnection()
        pair.pump.flush()
        self.assertEqual(pair.client.received, b"banner")
        self.assertEqual(pair.client.events[-1], "readConnectionLost")

        pair.client.transport.write(b"answer")
        pair.pump.flush()
        self.assertEqual(pair.server.received, b"answer")
        self.assertNotIn("connectionLost", pair.server.events)

        pair.client.transport.loseConnection()
        pair.pump.flush()
        assert pair.server.lostReason is not None and pair.client.lostReason is not None
        pair.server.lostReason.trap(ConnectionDone)
        pair.client.lostReason.trap(ConnectionDone)

    def test_halfCloseBothWays(self) -> None:
        """
        When each side calls loseWriteConnection in turn, the first to close
        gets the other's last data, then connectionLost (both directions are
        finished, there is nothing left to half-close), and the connection
        closes by itself, cleanly.
        """
        pair = connectTLS(_factoryOf(HalfCloseRecorder), _factoryOf(HalfCloseRecorder))
        pair.client.transport.loseWriteConnection()
        pair.pump.flush()
        pair.server.transport.write(b"last words")
        pair.server.transport.loseWriteConnection()
        pair.pump.flush()
        self.assertEqual(pair.client.received, b"last words")
        self.assertEqual(
            pair.client.events,
            ["connectionMade", "handshakeCompleted", "dataReceived", "connectionLost"],
        )
        self.assertEqual(
            pair.server.events,
            ["connectionMade", "handshakeCompleted", "readConnectionLost", "connectionLost"],
        )
        self.assertTrue(pair.serverIO.disconnected)
        assert pair.server.lostReason is not None and pair.client.lostReason is not None
        pair.server.lostReason.trap(ConnectionDone)
        pair.client.lostReason.trap(ConnectionDone)

    def test_writesAfterHalfCloseDropped(self) -> None:
        """
        When a protocol writes after loseWriteConnection, the bytes are
        dropped, as TCP drops them.
        """
        pair = connectTLS(_factoryOf(HalfCloseRecorder), _factoryOf(HalfCloseRecorder))
        pair.client.transport.write(b"kept")
        pair.client.transport.loseWriteConnection()
        pair.client.transport.write(b"dropped")
        pair.client.transport.writeSequence([b"also ", b"dropped"])
        pair.pump.flush()
        self.assertEqual(pair.server.received, b"kept")

    def test_halfCloseDuringHandshake(self) -> None:
        """
        When a protocol writes and calls loseWriteConnection before the
        handshake completed, the data is sent and then close_notify, once
        the handshake is done; the peer sees handshakeCompleted first.
        """
        pair = connectTLS(_factoryOf(HalfCloseRecorder), _factoryOf(EarlyWriter))
        self.assertEqual(pair.server.received, b"early")
        self.assertEqual(
            pair.server.events,
            ["connectionMade", "handshakeCompleted", "dataReceived", "readConnectionLost"],
        )

    def test_notHalfCloseableClosesBothWays(self) -> None:
        """
        When the wrapped protocol does not provide IHalfCloseableProtocol, a
        close_notify closes the connection both ways, as Twisted does.
        """
        pair = connectTLS(_factoryOf(Recorder), _factoryOf(HalfCloseRecorder))
        pair.client.transport.write(b"bye")
        pair.client.transport.loseWriteConnection()
        pair.pump.flush()
        self.assertEqual(pair.server.received, b"bye")
        self.assertEqual(pair.server.events[-1], "connectionLost")
        assert pair.server.lostReason is not None
        pair.server.lostReason.trap(ConnectionDone)

    def test_finAfterCloseNotifyKeepsWriting(self) -> None:
        """
        When the TCP transport reports the peer's FIN after its close_notify,
        the server can still write and the client still receives.
        """
        pair = connectTLS(_factoryOf(HalfCloseRecorder), _factoryOf(HalfCloseRecorder))
        pair.client.transport.loseWriteConnection()
        pair.pump.flush()
        pair.serverTLS.readConnectionLost()
        self.assertFalse(pair.serverIO.disconnecting)
        pair.server.transport.write(b"still here")
        pair.pump.flush()
        self.assertEqual(pair.client.received, b"still here")
        self.assertNotIn("connectionLost", pair.server.events)

    def test_finWithoutCloseNotifyIsTruncation(self) -> None:
        """
        When the TCP transport reports the peer's FIN without a close_notify
        first, the connection is closed and the protocol told it was lost.
        """
        pair = connectTLS(_factoryOf(HalfCloseRecorder), _factoryOf(HalfCloseRecorder))
        pair.serverTLS.readConnectionLost()
        self.assertTrue(pair.serverIO.disconnecting)
        pair.pump.flush()
        self.assertNotIn("readConnectionLost", pair.server.events)
        assert pair.server.lostReason is not None
        pair.server.lostReason.trap(ConnectionLost)


class TLS12Tests(SynchronousTestCase):
    """
    On TLS 1.2 a close_notify closes both directions.
    """

    def test_closeNotifyClosesBothWays(self) -> None:
        """
        When a TLS 1.2 client calls loseWriteConnection, it sends
        close_notify: the server protocol gets connectionLost (not
        readConnectionLost), and both ends close cleanly.
        """
        pair = connectTLS(_factoryOf(HalfCloseRecorder), _factoryOf(HalfCloseRecorder),
                          SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION)
        self.assertEqual(pair.serverTLS.getHandle().get_protocol_version_name(), "TLSv1.2")
        pair.client.transport.write(b"request")
        pair.client.transport.loseWriteConnection()
        pair.pump.flush()
        self.assertEqual(pair.server.received, b"request")
        self.assertNotIn("readConnectionLost", pair.server.events)
        self.assertEqual(pair.server.events[-1], "connectionLost")
        self.assertEqual(pair.client.events[-1], "connectionLost")
        assert pair.server.lostReason is not None and pair.client.lostReason is not None
        pair.server.lostReason.trap(ConnectionDone)
        pair.client.lostReason.trap(ConnectionDone)


class ProducerTests(SynchronousTestCase):
    """
    The TLS transport as a producer.
    """

    def test_stopProducingSendsCloseNotify(self) -> None:
        """
        When the TLS transport is told to stopProducing, it closes with
        close_notify: the peer sees a clean close, not a truncation.
        """
        pair = connectTLS(_factoryOf(Recorder), _factoryOf(Recorder))
        pair.serverTLS.stopProducing()
        pair.pump.flush()
        assert pair.client.lostReason is not None
        pair.client.lostReason.trap(ConnectionDone)

    def test_pauseAndResumeReachTransport(self) -> None:
        """
        When the TLS transport is paused and resumed, the TCP transport below
        is.
        """
        pair = connectTLS(_factoryOf(Recorder), _factoryOf(Recorder))
        pair.serverTLS.pauseProducing()
        self.assertTrue(pair.serverIO.paused)
        pair.serverTLS.resumeProducing()
        self.assertFalse(pair.serverIO.paused)

    def test_loseConnectionResumesReading(self) -> None:
        """
        When a paused TLS transport is closed, it resumes reading: the close
        waits for the peer's close_notify.
        """
        pair = connectTLS(_factoryOf(Recorder), _factoryOf(Recorder))
        pair.serverTLS.pauseProducing()
        pair.serverTLS.loseConnection()
        self.assertFalse(pair.serverIO.paused)


class HandshakeTests(SynchronousTestCase):
    """
    Handshake completion and failure.
    """

    def test_handshakeCompletedBeforeData(self) -> None:
        """
        When the client writes before the handshake is done (in TLS 1.3 its
        data follows its Finished), the server protocol gets
        handshakeCompleted before the data.
        """
        pair = connectTLS(_factoryOf(Recorder), _factoryOf(EarlyWriter),
                          SSL.TLS1_3_VERSION, SSL.TLS1_3_VERSION)
        self.assertEqual(pair.server.events[:3],
                         ["connectionMade", "handshakeCompleted", "dataReceived"])

    def test_handshakeFailedCalledOnce(self) -> None:
        """
        When the client presents no certificate to a server that requires
        one, the factory's handshakeFailed callback gets the protocol (whose
        getHandle still works) and an OpenSSL error, once; the wrapped protocol
        never sees handshakeCompleted.
        """
        calls: list[tuple[HalfCloseTLSProtocol, Failure, object]] = []

        def failed(protocol: HalfCloseTLSProtocol, reason: Failure) -> None:
            calls.append((protocol, reason, protocol.getHandle()))

        pair = connectTLS(_factoryOf(Recorder), _factoryOf(Recorder),
                          clientCertificate=False, handshakeFailed=failed)
        self.assertEqual(len(calls), 1)
        protocol, reason, handle = calls[0]
        self.assertIs(protocol, pair.serverTLS)
        self.assertIsNotNone(handle)
        reason.trap(SSL.Error)
        self.assertEqual(pair.server.events, ["connectionMade", "connectionLost"])

    def test_garbageIsHandshakeFailure(self) -> None:
        """
        When the client sends bytes that are not TLS, the connection is
        closed and handshakeFailed is called with the OpenSSL error.
        """
        reasons: list[Failure] = []
        factory = HalfCloseTLSFactory(
            ServerCreator(serverContext()), False, _factoryOf(Recorder),
            clock=Clock(), handshakeFailed=lambda p, r: reasons.append(r),
        )
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(reasons), 1)
        reasons[0].trap(SSL.Error)

    def test_handshakeFailedOverridable(self) -> None:
        """
        When a subclass overrides handshakeFailed, it is called, and a
        raising factory callback does not stop the connection from closing.
        """
        seen: list[Failure] = []

        class Subclass(HalfCloseTLSProtocol):
            def handshakeFailed(self, reason: Failure) -> None:
                seen.append(reason)
                super().handshakeFailed(reason)

        def broken(protocol: HalfCloseTLSProtocol, reason: Failure) -> None:
            raise ZeroDivisionError()

        factory = HalfCloseTLSFactory(
            ServerCreator(serverContext()), False, _factoryOf(Recorder),
            clock=Clock(), handshakeFailed=broken,
        )
        factory.protocol = Subclass
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        wrapped = protocol.wrappedProtocol
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(len(seen), 1)
        seen[0].trap(ConnectionLost)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(wrapped.events, ["connectionMade", "connectionLost"])


class NoCyclicGarbageTests(SynchronousTestCase):
    """
    Reading records makes no reference cycles: a busy proxy reads at the
    end of every record, and a cycle per read made Python's cyclic garbage
    collector run tens of times a second, each run a pause for every
    connection (the latency benchmark's tail).
    """

    def _garbageAfter(self, action: Callable[[], None]) -> list[Any]:
        """
        The objects only the cyclic collector could free that C{action}
        left behind.
        """
        import gc

        gc.collect()
        wasEnabled = gc.isenabled()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            del gc.garbage[:]
            action()
            gc.collect()
            found = list(gc.garbage)
            del gc.garbage[:]
        finally:
            gc.set_debug(0)
            if wasEnabled:
                gc.enable()
        return found

    def test_roundTripsLeaveNoCycles(self) -> None:
        """
        A hundred request/response exchanges over an established TLS
        connection leave no L{SSL.Error}, traceback or frame for the cyclic
        collector.
        """
        pair = connectTLS(_factoryOf(HalfCloseRecorder), _factoryOf(HalfCloseRecorder),
                          SSL.TLS1_3_VERSION, SSL.TLS1_3_VERSION)
        pair.pump.flush()

        def exchange() -> None:
            for i in range(100):
                pair.client.transport.write(b"request %d" % i)
                pair.pump.flush()
                pair.server.transport.write(b"response %d" % i)
                pair.pump.flush()

        garbage = self._garbageAfter(exchange)
        self.assertTrue(pair.server.received.endswith(b"request 99"))
        self.assertTrue(pair.client.received.endswith(b"response 99"))
        kinds = sorted({type(item).__name__ for item in garbage
                        if isinstance(item, (SSL.Error, types.TracebackType, types.FrameType))})
        self.assertEqual(kinds, [])

    def test_errorsKeepNoTraceback(self) -> None:
        """
        The end-of-data marker L{_BatchIO.readRecords} reports is one shared
        L{SSL.WantReadError}, never raised (no traceback).
        """
        from mtlsproxy.tlsproto import _batchIO

        pair = connectTLS(_factoryOf(HalfCloseRecorder), _factoryOf(HalfCloseRecorder),
                          SSL.TLS1_3_VERSION, SSL.TLS1_3_VERSION)
        pair.pump.flush()
        if not _batchIO.available:
            raise self.failureException("pyOpenSSL's private helpers are missing: slow path only")
        data, problem = _batchIO.readRecords(pair.serverTLS.getHandle())
        self.assertEqual(data, b"")
        self.assertIsInstance(problem, SSL.WantReadError)
        assert problem is not None
        self.assertIsNone(problem.__traceback__)
        self.assertIs(_batchIO.readRecords(pair.serverTLS.getHandle())[1], problem)
