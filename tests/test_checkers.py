# -*- test-case-name: tests.test_checkers -*-
"""
Tests for L{mtlsproxy.checkers}: the built-in health checkers against real
servers on 127.0.0.1, with the real reactor.

Every test waits until the servers' side of each connection is closed too,
so a checker that leaves a connection open fails the test (trial's dirty
reactor check would otherwise catch it only sometimes).
"""

from __future__ import annotations

import os
import socket
import ssl as _stdssl
import threading
from typing import Any, Callable, Generator, Optional

import attrs
from OpenSSL import SSL, crypto
from twisted.internet import reactor as _globalReactor
from twisted.internet import ssl
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IListeningPort, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mtlsproxy import pki
from mtlsproxy.backendtls import BackendTLS, BackendTLSMaterial
from mtlsproxy.checkers import (
    BODY_LIMIT,
    HTTPChecker,
    StatusCodes,
    TCPChecker,
    TLSChecker,
    describeFailure,
)
from mtlsproxy.health import CheckResult, HealthCheckConfig, HealthMonitor, OptionError, checkOnce
from mtlsproxy.interfaces import IHealthChecker
from mtlsproxy.pool import Member, Pool
from mtlsproxy.selectors import SmoothWeightedRoundRobin

reactor: Any = _globalReactor

VERIFY_FAILED = "TLS handshake failed: certificate verify failed"


@attrs.frozen
class _MemberConfig:
    address: str
    port: int
    weight: int = 1


def _member(port: int, address: str = "127.0.0.1") -> Member:
    return Member(_MemberConfig(address, port))


class _Tracker(WrappingFactory):
    """
    Wraps a server factory and can wait until all its connections are
    closed.
    """

    def __init__(self, wrappedFactory: Any) -> None:
        WrappingFactory.__init__(self, wrappedFactory)
        self._waiting: list[Deferred[None]] = []
        self.accepted = 0

    def registerProtocol(self, p: Any) -> None:
        self.accepted += 1
        WrappingFactory.registerProtocol(self, p)

    def unregisterProtocol(self, p: Any) -> None:
        WrappingFactory.unregisterProtocol(self, p)
        if not self.protocols:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def allClosed(self) -> Deferred[None]:
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d


class _Silent(Protocol):
    """
    Accepts and never says anything.
    """


class _HealthResource(Resource):
    """
    Answers every GET with a fixed status and body, and records the Host
    headers it saw.
    """

    isLeaf = True

    def __init__(self, status: int = 200, body: bytes = b"ok") -> None:
        Resource.__init__(self)
        self.status = status
        self.body = body
        self.hosts: list[Optional[bytes]] = []
        self.paths: list[bytes] = []

    def render_GET(self, request: Any) -> bytes:
        self.hosts.append(request.getHeader(b"host"))
        self.paths.append(request.uri)
        request.setResponseCode(self.status)
        return self.body


class _BackendTLS:
    """
    A stand-in for a pool's backend TLS settings: trusts one root CA and
    checks the member's address against the certificate.
    """

    def __init__(self, root: pki.Issued) -> None:
        self.trustRoot = ssl.Certificate.loadPEM(pki.certificatePEM(root.certificate))

    def clientConnectionCreator(self, member: Any) -> Any:
        return ssl.optionsForClientTLS(member.address, trustRoot=self.trustRoot)


@implementer(IOpenSSLServerConnectionCreator)
class _ServerTLS:
    """
    A backend's TLS server side, with a certificate from L{mtlsproxy.pki}.
    """

    def __init__(self, issued: pki.Issued) -> None:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.use_certificate(issued.certificate)
        context.use_privatekey(issued.key)
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._context, None)


@implementer(IOpenSSLServerConnectionCreator)
class _MutualServerTLS:
    """
    A backend's TLS server side that requires a client certificate from
    C{clientCA} (checked against C{crls}, if any), TLS 1.3 only unless
    C{version} says otherwise.
    """

    def __init__(
        self,
        issued: pki.Issued,
        clientCA: pki.Issued,
        crls: tuple[Any, ...] = (),
        version: int = SSL.TLS1_3_VERSION,
    ) -> None:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(version)
        context.set_max_proto_version(version)
        context.use_certificate(issued.certificate)
        context.use_privatekey(issued.key)
        store = context.get_cert_store()
        assert store is not None
        store.add_cert(crypto.X509.from_cryptography(clientCA.certificate))
        if crls:
            for crl in crls:
                store.add_crl(crl)
            store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
        context.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            lambda connection, certificate, errno, depth, ok: bool(ok),
        )
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._context, None)


class _ThreadedMember:
    """
    A TLS 1.3 member in a thread (Python's C{ssl}, one connection) that
    requires a client certificate from C{clientCA} and sends no session
    ticket: after the handshake it says nothing until the client closes.

    @ivar peers: The common names of the client certificates it accepted.
    @ivar closed: The connection is closed.
    """

    def __init__(self, directory: str, clientCA: pki.Issued) -> None:
        os.makedirs(directory)
        server = _PKI.get().server
        certificate = os.path.join(directory, "member.pem")
        key = os.path.join(directory, "member.key")
        with open(certificate, "wb") as f:
            f.write(pki.certificatePEM(server.certificate))
        with open(key, "wb") as f:
            f.write(pki.keyPEM(server.key))
        context = _stdssl.SSLContext(_stdssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = _stdssl.TLSVersion.TLSv1_3
        context.load_cert_chain(certificate, key)
        context.load_verify_locations(cadata=pki.certificatePEM(clientCA.certificate).decode())
        context.verify_mode = _stdssl.CERT_REQUIRED
        context.num_tickets = 0
        self._context = context
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(1)
        self._sock.settimeout(10)
        self.port: int = self._sock.getsockname()[1]
        self.peers: list[str] = []
        self.closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            raw, _ = self._sock.accept()
        except OSError:
            return
        raw.settimeout(10)
        try:
            conn = self._context.wrap_socket(raw, server_side=True)
            subject: Any = (conn.getpeercert() or {}).get("subject", ())
            self.peers.extend(value for part in subject for key, value in part if key == "commonName")
            while conn.recv(4096):
                pass
        except (_stdssl.SSLError, OSError):
            pass
        finally:
            raw.close()
            self.closed = True

    def stop(self) -> None:
        self._sock.close()
        self._thread.join(10)


class _MutualPKI:
    """
    Member certificates from L{_PKI}'s root, and client certificates for the
    proxy: C{proxy} from C{clientRoot}, C{revoked} from it too but revoked
    by C{crl}; C{otherClientRoot} issued neither.
    """

    _made: Optional["_MutualPKI"] = None

    def __init__(self) -> None:
        self.clientRoot = pki.createRootCA("proxy client root")
        self.otherClientRoot = pki.createRootCA("someone else's client root")
        self.proxy = pki.issueClientCertificate(self.clientRoot, "mtlsproxy")
        self.revoked = pki.issueClientCertificate(self.clientRoot, "mtlsproxy-revoked")
        self.crl = pki.buildCRL(self.clientRoot, [self.revoked.certificate])

    @classmethod
    def get(cls) -> "_MutualPKI":
        if cls._made is None:
            cls._made = cls()
        return cls._made


def _poolTLS(client: Optional[pki.Issued]) -> BackendTLS:
    """
    Real backend TLS settings of a pool: trusts L{_PKI}'s root and presents
    C{client} (or no certificate).
    """
    material = BackendTLSMaterial(
        cas=(_PKI.get().root.certificate,),
        chain=(client.certificate,) if client is not None else (),
        key=client.key if client is not None else None,
    )
    return BackendTLS.create("app", material)


class _PKI:
    """
    One root CA with a server certificate for 127.0.0.1, another root with
    one too, and a certificate of the first root for another address.
    """

    _made: Optional["_PKI"] = None

    def __init__(self) -> None:
        self.root = pki.createRootCA("health test root")
        self.server = pki.issueServerCertificate(self.root, "backend", ipAddresses=["127.0.0.1"])
        self.otherName = pki.issueServerCertificate(self.root, "other", ipAddresses=["127.0.0.2"])
        self.otherRoot = pki.createRootCA("someone else's root")
        self.stranger = pki.issueServerCertificate(
            self.otherRoot, "stranger", ipAddresses=["127.0.0.1"]
        )

    @classmethod
    def get(cls) -> "_PKI":
        if cls._made is None:
            cls._made = cls()
        return cls._made


class _ServerTestCase(TestCase):
    """
    Starts servers on 127.0.0.1 and, at the end, waits for every connection
    they accepted to be closed and stops them.
    """

    timeout = 30

    def listen(self, factory: Any, tlsIssued: Optional[pki.Issued] = None) -> tuple[_Tracker, int]:
        tracker = _Tracker(factory)
        port: IListeningPort
        if tlsIssued is None:
            port = reactor.listenTCP(0, tracker, interface="127.0.0.1")
        else:
            tls = TLSMemoryBIOFactory(_ServerTLS(tlsIssued), False, tracker)
            port = reactor.listenTCP(0, tls, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(tracker.allClosed)
        return tracker, port.getHost().port

    def closedPort(self) -> Deferred[int]:
        """
        A port nothing listens on: bound, not listening, until the test
        ends, so that no other process can take it meanwhile.
        """
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        return succeed(int(sock.getsockname()[1]))

    def httpServer(self, status: int = 200, body: bytes = b"ok",
                   tlsIssued: Optional[pki.Issued] = None) -> tuple[_HealthResource, _Tracker, int]:
        resource = _HealthResource(status, body)
        site = Site(resource)
        site.displayTracebacks = False
        tracker, port = self.listen(site, tlsIssued)
        return resource, tracker, port


class InterfaceTests(SynchronousTestCase):
    """
    Tests for the checkers' interfaces and option parsing.
    """

    def test_verifyObject(self) -> None:
        """
        When checked with verifyObject, every built-in checker provides
        IHealthChecker.
        """
        for checker in [
            TCPChecker.fromOptions(reactor, {}, None),
            TLSChecker.fromOptions(reactor, {}, None),
            HTTPChecker.fromOptions(reactor, {}, None),
        ]:
            self.assertTrue(verifyObject(IHealthChecker, checker))

    def test_noOptions(self) -> None:
        """
        When tcp or tls is given an option directly, it is refused with the
        key.
        """
        for cls in (TCPChecker, TLSChecker):
            with self.assertRaises(OptionError) as caught:
                cls.fromOptions(reactor, {"path": "/"}, None)
            self.assertEqual(caught.exception.key, "path")

    def test_statusCodes(self) -> None:
        """
        When expected_status lists codes and ranges, exactly those pass and
        it prints back normalised.
        """
        codes = StatusCodes.parse(" 200-299 , 304,418")
        self.assertEqual([c for c in (199, 200, 299, 300, 304, 418, 500) if c in codes],
                         [200, 299, 304, 418])
        self.assertEqual(str(codes), "200-299,304,418")
        self.assertEqual(str(StatusCodes.parse(204)), "204")
        for bad in ("", "20", "200-", "600", "200-600", "99", True, 1.5):
            self.assertRaises(OptionError, StatusCodes.parse, bad)

    def test_httpDefaults(self) -> None:
        """
        When http has no options, it asks for "/" and accepts 200-399
        without looking at the body.
        """
        checker = HTTPChecker.fromOptions(reactor, {}, None)
        self.assertEqual((checker.path, str(checker.statuses), checker.bodyContains, checker.host),
                         (b"/", "200-399", None, None))

    def test_describeFailure(self) -> None:
        """
        When a failure has no special description, its message is the
        reason, or its class name when it has none.
        """
        self.assertEqual(describeFailure(Failure(RuntimeError("odd"))), "odd")
        self.assertEqual(describeFailure(Failure(RuntimeError())), "RuntimeError")

    def test_describeLocalResourceError(self) -> None:
        """
        When the proxy could not even create a socket (out of file
        descriptors), the reason says it is the proxy's problem and names the
        errno.
        """
        from errno import EMFILE

        from twisted.internet.error import ConnectBindError

        reason = describeFailure(Failure(ConnectBindError(EMFILE, "Too many open files")))
        self.assertTrue(reason.startswith("the proxy is out of resources (EMFILE)"), reason)


class QuietChecksTests(_ServerTestCase):
    """
    A check logs nothing of Twisted's own per connection: no "Starting
    factory" / "Stopping factory" lines every interval for every member.
    """

    def factoryEvents(self, observer: Any) -> list[Any]:
        return [e for e in observer if "factory" in (e.get("log_format") or "").lower()
                and e.get("log_namespace", "").startswith("twisted.")]

    @inlineCallbacks
    def test_quiet(self) -> Generator[Any, Any, None]:
        """
        When a tcp, a tls and an http (over TLS) check run, none logs a
        factory starting or stopping.
        """
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher

        material = _PKI.get()
        _, port = self.listen(Factory.forProtocol(_Silent))
        _, tlsPort = self.listen(Factory.forProtocol(_Silent), material.server)
        _, _, httpsPort = self.httpServer(200, b"ok", material.server)
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        results = [
            (yield TCPChecker(reactor).check(_member(port))),
            (yield TLSChecker(reactor, _BackendTLS(material.root)).check(_member(tlsPort))),
            (yield HTTPChecker.fromOptions(reactor, {}, _BackendTLS(material.root)).check(_member(httpsPort))),
        ]
        self.assertEqual([r.healthy for r in results], [True, True, True], results)
        self.assertEqual(self.factoryEvents(observer), [])


class TCPCheckerTests(_ServerTestCase):
    """
    Tests for the C{tcp} checker.
    """

    @inlineCallbacks
    def test_up(self) -> Generator[Any, Any, None]:
        """
        When the member accepts the connection, it is healthy and the
        connection is closed.
        """
        tracker, port = self.listen(Factory.forProtocol(_Silent))
        result = yield TCPChecker(reactor).check(_member(port))
        self.assertEqual(result, CheckResult(True, "connected"))
        yield tracker.allClosed()
        self.assertEqual(tracker.accepted, 1)

    @inlineCallbacks
    def test_down(self) -> Generator[Any, Any, None]:
        """
        When nothing listens, the member is unhealthy: connection refused.
        """
        port = yield self.closedPort()
        result = yield TCPChecker(reactor).check(_member(port))
        self.assertEqual(result, CheckResult(False, "connection refused"))

    @inlineCallbacks
    def test_outOfDescriptorsInconclusive(self) -> Generator[Any, Any, None]:
        """
        When this process cannot open another descriptor (its soft limit
        lowered to the lowest free descriptor number while the check starts
        its connection),
        the result is inconclusive and names EMFILE, and nothing is
        accepted.
        """
        import gc
        import resource

        tracker, port = self.listen(Factory.forProtocol(_Silent))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # No collection in the window: it could close a lower descriptor.
        gc.disable()
        try:
            lowestFree = os.open(os.devnull, os.O_RDONLY)
            os.close(lowestFree)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowestFree, hard))
            checking = TCPChecker(reactor).check(_member(port))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            gc.enable()
        result = yield checking
        self.assertEqual((result.healthy, result.inconclusive), (False, True), result)
        self.assertTrue(result.reason.startswith("the proxy is out of resources (EMFILE)"), result)
        self.assertEqual(tracker.accepted, 0)

    @inlineCallbacks
    def test_hostName(self) -> Generator[Any, Any, None]:
        """
        When the member's address is a host name, it is resolved without
        blocking and connected to.
        """
        tracker, port = self.listen(Factory.forProtocol(_Silent))
        result = yield TCPChecker(reactor).check(_member(port, "localhost"))
        self.assertEqual(result.healthy, True, result)


class TLSCheckerTests(_ServerTestCase):
    """
    Tests for the C{tls} checker.
    """

    @inlineCallbacks
    def test_verifiedHandshake(self) -> Generator[Any, Any, None]:
        """
        When the member's certificate is signed by the CA the pool trusts and
        names its address, the member is healthy, and the connection closed.
        """
        material = _PKI.get()
        tracker, port = self.listen(Factory.forProtocol(_Silent), material.server)
        checker = TLSChecker(reactor, _BackendTLS(material.root))
        result = yield checker.check(_member(port))
        self.assertTrue(result.healthy, result)
        self.assertRegex(result.reason, r"^TLS handshake completed \(TLSv1\.[23]\)$")
        yield tracker.allClosed()

    @inlineCallbacks
    def test_wrongCA(self) -> Generator[Any, Any, None]:
        """
        When the member's certificate is signed by another CA, the member is
        unhealthy with a verification reason.
        """
        material = _PKI.get()
        self.listen(Factory.forProtocol(_Silent), material.stranger)
        checker = TLSChecker(reactor, _BackendTLS(material.root))
        result = yield checker.check(_member(self.portOf()))
        self.assertEqual(result, CheckResult(False, VERIFY_FAILED))

    @inlineCallbacks
    def test_wrongName(self) -> Generator[Any, Any, None]:
        """
        When the member's certificate is trusted but names another address,
        the member is unhealthy and the reason names the address.
        """
        material = _PKI.get()
        self.listen(Factory.forProtocol(_Silent), material.otherName)
        checker = TLSChecker(reactor, _BackendTLS(material.root))
        result = yield checker.check(_member(self.portOf()))
        self.assertEqual(
            result, CheckResult(False, "TLS handshake failed: certificate does not match 127.0.0.1")
        )

    @inlineCallbacks
    def test_unverified(self) -> Generator[Any, Any, None]:
        """
        When the pool has no backend TLS settings, any certificate does and
        the reason says it was not verified.
        """
        material = _PKI.get()
        tracker, port = self.listen(Factory.forProtocol(_Silent), material.stranger)
        result = yield TLSChecker(reactor).check(_member(port))
        self.assertTrue(result.healthy, result)
        self.assertRegex(
            result.reason, r"^TLS handshake completed \(TLSv1\.[23], certificate not verified\)$"
        )
        yield tracker.allClosed()

    @inlineCallbacks
    def test_notTLS(self) -> Generator[Any, Any, None]:
        """
        When the member answers in plain text, not TLS, it is unhealthy with
        a TLS reason.
        """

        class Banner(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"220 mail.example ESMTP ready\r\n")

        tracker, port = self.listen(Factory.forProtocol(Banner))
        result = yield TLSChecker(reactor).check(_member(port))
        self.assertFalse(result.healthy)
        self.assertTrue(result.reason.startswith("TLS handshake failed: "), result)
        yield tracker.allClosed()

    @inlineCallbacks
    def test_closedDuringHandshake(self) -> Generator[Any, Any, None]:
        """
        When the member closes the connection before the handshake, it is
        unhealthy and the reason says so.
        """

        class Closing(Protocol):
            def connectionMade(self) -> None:
                self.transport.loseConnection()

        tracker, port = self.listen(Factory.forProtocol(Closing))
        result = yield TLSChecker(reactor).check(_member(port))
        self.assertEqual(result, CheckResult(False, "connection closed during the TLS handshake"))

    @inlineCallbacks
    def test_refused(self) -> Generator[Any, Any, None]:
        """
        When nothing listens, the member is unhealthy: connection refused.
        """
        port = yield self.closedPort()
        result = yield TLSChecker(reactor).check(_member(port))
        self.assertEqual(result, CheckResult(False, "connection refused"))

    @inlineCallbacks
    def test_timeoutClosesConnection(self) -> Generator[Any, Any, None]:
        """
        When the member accepts but never answers the handshake, the check
        times out and the connection is closed.
        """
        tracker, port = self.listen(Factory.forProtocol(_Silent))
        result = yield checkOnce(reactor, TLSChecker(reactor), _member(port), 0.3)
        self.assertEqual(result, CheckResult(False, "timeout after 0.3s"))
        yield tracker.allClosed()
        self.assertEqual(tracker.accepted, 1)

    def portOf(self) -> int:
        """
        The port of the last server started (for tests that do not need the
        tracker).
        """
        return self._lastPort

    def listen(self, factory: Any, tlsIssued: Optional[pki.Issued] = None) -> tuple[_Tracker, int]:
        tracker, port = _ServerTestCase.listen(self, factory, tlsIssued)
        self._lastPort = port
        return tracker, port


class HTTPCheckerTests(_ServerTestCase):
    """
    Tests for the C{http} checker.
    """

    def checker(self, tls: Any = None, **options: Any) -> HTTPChecker:
        return HTTPChecker.fromOptions(reactor, options, tls)

    @inlineCallbacks
    def test_statusInRange(self) -> Generator[Any, Any, None]:
        """
        When the member answers with a status in range, it is healthy; the
        request went to the configured path with the member's address and
        port as Host, and the connection is closed.
        """
        resource, tracker, port = self.httpServer(204, b"")
        result = yield self.checker(path="/healthz?full=1").check(_member(port))
        self.assertEqual(result, CheckResult(True, "HTTP 204"))
        self.assertEqual(resource.paths, [b"/healthz?full=1"])
        self.assertEqual(resource.hosts, [f"127.0.0.1:{port}".encode()])
        yield tracker.allClosed()

    @inlineCallbacks
    def test_statusOutOfRange(self) -> Generator[Any, Any, None]:
        """
        When the member answers with a status out of range, it is unhealthy
        and the reason gives the status and the range.
        """
        resource, tracker, port = self.httpServer(503, b"busy")
        result = yield self.checker().check(_member(port))
        self.assertEqual(result, CheckResult(False, "HTTP status 503, expected 200-399"))
        result = yield self.checker(expected_status="200,503").check(_member(port))
        self.assertEqual(result, CheckResult(True, "HTTP 503"))

    @inlineCallbacks
    def test_bodyContains(self) -> Generator[Any, Any, None]:
        """
        When body_contains is set, the member is healthy only if the body
        contains the text.
        """
        resource, tracker, port = self.httpServer(200, "status: ok ✓".encode())
        result = yield self.checker(body_contains="ok ✓").check(_member(port))
        self.assertEqual(result, CheckResult(True, "HTTP 200"))
        result = yield self.checker(body_contains="ready").check(_member(port))
        self.assertEqual(
            result, CheckResult(False, 'HTTP 200, but the body does not contain "ready"')
        )

    @inlineCallbacks
    def test_bodyLimit(self) -> Generator[Any, Any, None]:
        """
        When the body is longer than 64 KiB, only the first 64 KiB are read
        and searched, and the connection is closed.
        """
        body = b"x" * (BODY_LIMIT - 10) + b"early" + b"y" * 100_000 + b"late"
        resource, tracker, port = self.httpServer(200, body)
        result = yield self.checker(body_contains="early").check(_member(port))
        self.assertEqual(result, CheckResult(True, "HTTP 200"))
        result = yield self.checker(body_contains="late").check(_member(port))
        self.assertEqual(
            result,
            CheckResult(
                False, 'HTTP 200, but the first 65536 bytes of the body do not contain "late"'
            ),
        )
        yield tracker.allClosed()

    @inlineCallbacks
    def test_hostHeader(self) -> Generator[Any, Any, None]:
        """
        When host is set, it is the Host header, and the request still goes
        to the member's address.
        """
        resource, tracker, port = self.httpServer()
        result = yield self.checker(host="app.internal").check(_member(port))
        self.assertTrue(result.healthy)
        self.assertEqual(resource.hosts, [b"app.internal"])

    @inlineCallbacks
    def test_refused(self) -> Generator[Any, Any, None]:
        """
        When nothing listens, the member is unhealthy: connection refused.
        """
        port = yield self.closedPort()
        result = yield self.checker().check(_member(port))
        self.assertEqual(result, CheckResult(False, "connection refused"))

    @inlineCallbacks
    def test_closedWithoutResponse(self) -> Generator[Any, Any, None]:
        """
        When the member closes the connection without answering, it is
        unhealthy and the reason says so.
        """

        class Closing(Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.loseConnection()

        tracker, port = self.listen(Factory.forProtocol(Closing))
        result = yield self.checker().check(_member(port))
        self.assertEqual(result, CheckResult(False, "connection closed before a response"))

    @inlineCallbacks
    def test_neverAnswers(self) -> Generator[Any, Any, None]:
        """
        When the member accepts and never answers, the check times out and
        the connection is closed.
        """
        tracker, port = self.listen(Factory.forProtocol(_Silent))
        result = yield checkOnce(reactor, self.checker(), _member(port), 0.3)
        self.assertEqual(result, CheckResult(False, "timeout after 0.3s"))
        yield tracker.allClosed()
        self.assertEqual(tracker.accepted, 1)

    @inlineCallbacks
    def test_https(self) -> Generator[Any, Any, None]:
        """
        When the pool has backend TLS settings, the request goes over TLS
        verified with them, and the Host header leaves out port 443 only.
        """
        material = _PKI.get()
        resource, tracker, port = self.httpServer(200, b"ok", material.server)
        checker = self.checker(_BackendTLS(material.root), body_contains="ok")
        result = yield checker.check(_member(port))
        self.assertEqual(result, CheckResult(True, "HTTP 200"))
        self.assertEqual(resource.hosts, [f"127.0.0.1:{port}".encode()])
        yield tracker.allClosed()

    @inlineCallbacks
    def test_httpsWrongCA(self) -> Generator[Any, Any, None]:
        """
        When the member's certificate is signed by another CA, the member is
        unhealthy with a verification reason.
        """
        material = _PKI.get()
        resource, tracker, port = self.httpServer(200, b"ok", material.stranger)
        result = yield self.checker(_BackendTLS(material.root)).check(_member(port))
        self.assertEqual(result, CheckResult(False, VERIFY_FAILED))
        self.assertEqual(resource.hosts, [])


class ClientCertificateVerdictTests(_ServerTestCase):
    """
    The C{tls} and C{http} checkers with a pool's real L{BackendTLS} against
    members that require a client certificate: like the relay, they wait for
    a TLS 1.3 member's verdict on the proxy's certificate, which comes after
    the client's handshake completed.
    """

    def listenMutual(
        self, factory: Any, clientCA: pki.Issued, **kw: Any
    ) -> tuple[_Tracker, int]:
        tracker = _Tracker(factory)
        tls = TLSMemoryBIOFactory(
            _MutualServerTLS(_PKI.get().server, clientCA, **kw), False, tracker
        )
        port: Any = reactor.listenTCP(0, tls, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(tracker.allClosed)
        return tracker, port.getHost().port

    @inlineCallbacks
    def test_tls13Accepted(self) -> Generator[Any, Any, None]:
        """
        When a TLS 1.3 member requires a client certificate and accepts the
        proxy's, the member is healthy and the connection closed.
        """
        material = _MutualPKI.get()
        tracker, port = self.listenMutual(Factory.forProtocol(_Silent), material.clientRoot)
        result = yield TLSChecker(reactor, _poolTLS(material.proxy)).check(_member(port))
        self.assertEqual(result, CheckResult(True, "TLS handshake completed (TLSv1.3)"))
        yield tracker.allClosed()

    @inlineCallbacks
    def test_tls13AcceptedWithoutTickets(self) -> Generator[Any, Any, None]:
        """
        When a TLS 1.3 member accepts the proxy's certificate but sends
        nothing after the handshake (no session tickets), the member is
        healthy all the same, and the member saw the proxy's certificate.
        """
        material = _MutualPKI.get()
        member = _ThreadedMember(self.mktemp(), material.clientRoot)
        self.addCleanup(member.stop)
        result = yield TLSChecker(reactor, _poolTLS(material.proxy)).check(_member(member.port))
        self.assertEqual(result, CheckResult(True, "TLS handshake completed (TLSv1.3)"))
        yield self.waitFor(lambda: member.closed)
        self.assertEqual(member.peers, ["mtlsproxy"])

    @inlineCallbacks
    def waitFor(self, predicate: Callable[[], object], limit: float = 10.0) -> Generator[Any, Any, None]:
        started = reactor.seconds()
        while not predicate():
            if reactor.seconds() - started > limit:
                self.fail(f"not within {limit}s")
            yield deferLater(reactor, 0.02, lambda: None)

    @inlineCallbacks
    def test_tls13UnknownCA(self) -> Generator[Any, Any, None]:
        """
        When a TLS 1.3 member requires a client certificate from a CA that
        did not issue the proxy's, it rejects it after the handshake and the
        member is unhealthy: the reason names the alert.
        """
        material = _MutualPKI.get()
        tracker, port = self.listenMutual(Factory.forProtocol(_Silent), material.otherClientRoot)
        result = yield TLSChecker(reactor, _poolTLS(material.proxy)).check(_member(port))
        self.assertFalse(result.healthy, result)
        self.assertRegex(
            result.reason, r"^TLS handshake failed: client_certificate_rejected: .*unknown ca"
        )
        yield tracker.allClosed()

    @inlineCallbacks
    def test_tls13Revoked(self) -> Generator[Any, Any, None]:
        """
        When a TLS 1.3 member finds the proxy's client certificate revoked,
        the member is unhealthy: the reason names the alert.
        """
        material = _MutualPKI.get()
        tracker, port = self.listenMutual(
            Factory.forProtocol(_Silent), material.clientRoot, crls=(material.crl,)
        )
        result = yield TLSChecker(reactor, _poolTLS(material.revoked)).check(_member(port))
        self.assertFalse(result.healthy, result)
        self.assertRegex(
            result.reason,
            r"^TLS handshake failed: client_certificate_rejected: .*certificate revoked",
        )
        yield tracker.allClosed()

    @inlineCallbacks
    def test_tls13NoClientCertificate(self) -> Generator[Any, Any, None]:
        """
        When a TLS 1.3 member requires a client certificate and the pool has
        none, the member is unhealthy: certificate required.
        """
        material = _MutualPKI.get()
        tracker, port = self.listenMutual(Factory.forProtocol(_Silent), material.clientRoot)
        result = yield TLSChecker(reactor, _poolTLS(None)).check(_member(port))
        self.assertFalse(result.healthy, result)
        self.assertRegex(
            result.reason,
            r"^TLS handshake failed: client_certificate_required: .*certificate required",
        )
        yield tracker.allClosed()

    @inlineCallbacks
    def test_tls12UnknownCA(self) -> Generator[Any, Any, None]:
        """
        When a TLS 1.2 member rejects the proxy's client certificate (during
        the handshake), the member is unhealthy: the reason names the alert.
        """
        material = _MutualPKI.get()
        tracker, port = self.listenMutual(
            Factory.forProtocol(_Silent), material.otherClientRoot, version=SSL.TLS1_2_VERSION
        )
        result = yield TLSChecker(reactor, _poolTLS(material.proxy)).check(_member(port))
        self.assertFalse(result.healthy, result)
        self.assertRegex(
            result.reason, r"^TLS handshake failed: client_certificate_rejected: .*unknown ca"
        )
        yield tracker.allClosed()

    @inlineCallbacks
    def test_untrustedMember(self) -> Generator[Any, Any, None]:
        """
        When the member's certificate is from a CA the pool does not trust,
        the member is unhealthy with the verification reason.
        """
        material = _MutualPKI.get()
        tracker = _Tracker(Factory.forProtocol(_Silent))
        tls = TLSMemoryBIOFactory(
            _MutualServerTLS(_PKI.get().stranger, material.clientRoot), False, tracker
        )
        port = reactor.listenTCP(0, tls, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(tracker.allClosed)
        checker = TLSChecker(reactor, _poolTLS(material.proxy))
        result = yield checker.check(_member(port.getHost().port))
        self.assertFalse(result.healthy, result)
        self.assertTrue(result.reason.startswith("TLS handshake failed: unknown_ca: "), result)

    @inlineCallbacks
    def test_timeoutWhileWaitingForVerdict(self) -> Generator[Any, Any, None]:
        """
        When the member accepts TCP but never answers the handshake, the
        check times out and the connection is closed.
        """
        tracker, port = self.listen(Factory.forProtocol(_Silent))
        checker = TLSChecker(reactor, _poolTLS(_MutualPKI.get().proxy))
        result = yield checkOnce(reactor, checker, _member(port), 0.3)
        self.assertEqual(result, CheckResult(False, "timeout after 0.3s"))
        yield tracker.allClosed()
        self.assertEqual(tracker.accepted, 1)

    @inlineCallbacks
    def test_refused(self) -> Generator[Any, Any, None]:
        """
        When nothing listens, the member is unhealthy: connection refused.
        """
        port = yield self.closedPort()
        checker = TLSChecker(reactor, _poolTLS(_MutualPKI.get().proxy))
        result = yield checker.check(_member(port))
        self.assertEqual(result, CheckResult(False, "connection refused"))

    @inlineCallbacks
    def test_httpsAccepted(self) -> Generator[Any, Any, None]:
        """
        When a TLS 1.3 HTTPS member accepts the proxy's client certificate,
        the request is answered and the member is healthy.
        """
        material = _MutualPKI.get()
        resource = _HealthResource(200, b"ok")
        tracker, port = self.listenMutual(Site(resource), material.clientRoot)
        checker = HTTPChecker.fromOptions(reactor, {"body_contains": "ok"}, _poolTLS(material.proxy))
        result = yield checker.check(_member(port))
        self.assertEqual(result, CheckResult(True, "HTTP 200"))
        self.assertEqual(resource.paths, [b"/"])
        yield tracker.allClosed()

    @inlineCallbacks
    def test_httpsRejected(self) -> Generator[Any, Any, None]:
        """
        When a TLS 1.3 HTTPS member rejects the proxy's client certificate,
        the member is unhealthy with the alert, and no request reached it.
        """
        material = _MutualPKI.get()
        resource = _HealthResource(200, b"ok")
        tracker, port = self.listenMutual(Site(resource), material.otherClientRoot)
        checker = HTTPChecker.fromOptions(reactor, {}, _poolTLS(material.proxy))
        result = yield checker.check(_member(port))
        self.assertFalse(result.healthy, result)
        self.assertRegex(
            result.reason, r"^TLS handshake failed: client_certificate_rejected: .*unknown ca"
        )
        self.assertEqual(resource.paths, [])
        yield tracker.allClosed()


class MonitorWithRealCheckerTests(_ServerTestCase):
    """
    A L{HealthMonitor} with the C{tcp} checker and the real reactor: what the
    proxy does when a backend dies and comes back.
    """

    @inlineCallbacks
    def waitFor(self, predicate: Callable[[], bool], limit: float) -> Generator[Any, Any, float]:
        started = reactor.seconds()
        while not predicate():
            if reactor.seconds() - started > limit:
                self.fail(f"not within {limit}s")
            yield deferLater(reactor, 0.02, lambda: None)
        return reactor.seconds() - started

    @inlineCallbacks
    def test_backendDiesAndReturns(self) -> Generator[Any, Any, None]:
        """
        When a backend stops listening, it is unhealthy within about
        interval x unhealthy_threshold and the pool offers no member; when it
        listens again, it is healthy within about interval x
        healthy_threshold and offered again.
        """
        tracker = _Tracker(Factory.forProtocol(_Silent))
        self.addCleanup(tracker.allClosed)
        listening = reactor.listenTCP(0, tracker, interface="127.0.0.1")
        portNumber = listening.getHost().port
        member = _member(portNumber)
        pool = Pool("app", [member], SmoothWeightedRoundRobin(), clock=reactor)
        config = HealthCheckConfig(type="tcp", interval=0.1, timeout=0.1, healthy_threshold=2,
                                   unhealthy_threshold=2, jitter=0.0)
        monitor = HealthMonitor(reactor, pool, TCPChecker(reactor), config)
        monitor.startService()
        self.addCleanup(monitor.stopService)
        yield self.waitFor(lambda: member.lastCheck is not None, 1.0)
        self.assertTrue(member.healthy)

        yield listening.stopListening()
        # Bound, not listening, until it listens again: no other process
        # takes the port meanwhile (a listener with SO_REUSEADDR, as
        # Twisted's, can still bind it).
        reserved = socket.socket()
        self.addCleanup(reserved.close)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reserved.bind(("127.0.0.1", portNumber))
        took = yield self.waitFor(lambda: not member.healthy, 2.0)
        self.assertLess(took, 0.1 * 2 + 0.1 + 0.5)
        self.assertEqual(pool.candidates(), [])
        self.assertEqual(member.lastCheck[0], CheckResult(False, "connection refused"))

        listening = reactor.listenTCP(portNumber, tracker, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        took = yield self.waitFor(lambda: member.healthy, 2.0)
        self.assertLess(took, 0.1 * 2 + 0.1 + 0.5)
        self.assertEqual(pool.candidates(), [member])
