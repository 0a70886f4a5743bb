# -*- test-case-name: tests.test_backendtls -*-
"""
Tests for L{mtlsproxy.backendtls}: mutual TLS towards pool members, in
memory over iosim.

The member side is a plain pyOpenSSL server context behind Twisted's TLS
(L{HalfCloseTLSFactory}); the proxy side is L{BackendTLS}'s connection
creator alone (as health checkers use it) or L{BackendTLSFactory} (as the
relay uses it).  Certificates come from L{mtlsproxy.pki}.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

import attrs
from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, NotConnectingError
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mtlsproxy import pki
from mtlsproxy.backendtls import (
    ALLOWED_FORMAT,
    BACKEND_TLS_FAILED,
    BACKEND_TLS_FAILED_FORMAT,
    CLIENT_CERTIFICATE_REJECTED,
    CLIENT_CERTIFICATE_REQUIRED,
    CONNECTION_LOST,
    CRL_EXPIRED,
    CRL_MISSING,
    EXPIRED,
    HANDSHAKE_FAILED,
    HANDSHAKE_TIMEOUT,
    HOSTNAME_MISMATCH,
    REVOKED,
    UNKNOWN_CA,
    BackendTLS,
    BackendTLSError,
    BackendTLSFactory,
    BackendTLSMaterial,
    buildBackendContext,
    describeFailure,
    logBackendTLSFailure,
)
from mtlsproxy.checks import LoadedConfiguration, checkConfiguration
from mtlsproxy.config import BackendTLSConfig, MemberConfig, PoolConfig, ProxyConfig, loadConfig
from mtlsproxy.errors import ConfigurationError
from mtlsproxy.interfaces import IBackendSelector
from mtlsproxy.pool import Member as PoolMember
from mtlsproxy.pool import Pool
from mtlsproxy.relay import ProxyServerFactory
from mtlsproxy.revocation import CRLExpired, CRLMissing
from mtlsproxy.tlsproto import HalfCloseTLSFactory

TLS12 = SSL.TLS1_2_VERSION
TLS13 = SSL.TLS1_3_VERSION

NOW = datetime.now(timezone.utc)


# -- certificates -------------------------------------------------------------


@attrs.frozen
class BackendPKI:
    """
    The members' CA (root and intermediate) with member certificates, the
    CA of the proxy's client certificate, and strangers.
    """

    root: pki.Issued
    inter: pki.Issued
    member: pki.Issued
    revokedMember: pki.Issued
    expiredMember: pki.Issued
    underRevokedInter: pki.Issued
    revokedInter: pki.Issued
    untrustedMember: pki.Issued
    clientRoot: pki.Issued
    proxyClient: pki.Issued
    strangerClient: pki.Issued
    rootCRL: x509.CertificateRevocationList
    interCRL: x509.CertificateRevocationList
    revokedInterCRL: x509.CertificateRevocationList


_pki: Optional[BackendPKI] = None


def backendPKI() -> BackendPKI:
    """
    The PKI shared by the tests of a run (generated once: keys are not
    free).
    """
    global _pki
    if _pki is None:
        root = pki.createRootCA("Backend Root")
        inter = pki.createIntermediateCA(root, "Backend Intermediate")
        revokedInter = pki.createIntermediateCA(root, "Revoked Backend Intermediate")
        other = pki.createRootCA("Stranger Root")
        clientRoot = pki.createRootCA("Proxy Client Root")

        def member(issuer: pki.Issued, **kwargs: Any) -> pki.Issued:
            return pki.issueServerCertificate(
                issuer,
                "app.internal",
                dnsNames=["app.internal"],
                ipAddresses=["10.0.0.1"],
                **kwargs,
            )

        revokedMember = member(inter)
        _pki = BackendPKI(
            root=root,
            inter=inter,
            member=member(inter),
            revokedMember=revokedMember,
            expiredMember=member(
                inter, notBefore=NOW - timedelta(days=30), notAfter=NOW - timedelta(days=1)
            ),
            underRevokedInter=member(revokedInter),
            revokedInter=revokedInter,
            untrustedMember=member(other),
            clientRoot=clientRoot,
            proxyClient=pki.issueClientCertificate(clientRoot, "mtlsproxy"),
            strangerClient=pki.issueClientCertificate(other, "stranger"),
            rootCRL=pki.buildCRL(root, [revokedInter.certificate]),
            interCRL=pki.buildCRL(inter, [revokedMember.certificate]),
            revokedInterCRL=pki.buildCRL(revokedInter),
        )
    return _pki


def material(
    withClientCertificate: bool = True,
    crls: Optional[tuple[x509.CertificateRevocationList, ...]] = None,
    client: Optional[pki.Issued] = None,
) -> BackendTLSMaterial:
    """
    The proxy's material: trusts the members' root, checks the CRLs of the
    root and both intermediates, presents the proxy's client certificate.
    """
    p = backendPKI()
    client = client or p.proxyClient
    return BackendTLSMaterial(
        cas=(p.root.certificate,),
        crls=crls if crls is not None else (p.rootCRL, p.interCRL, p.revokedInterCRL),
        chain=(client.certificate,) if withClientCertificate else (),
        key=client.key if withClientCertificate else None,
    )


def memberContext(
    leaf: Optional[pki.Issued] = None,
    issuer: Optional[pki.Issued] = None,
    version: Optional[int] = None,
    trustedClientCA: Optional[pki.Issued] = None,
    requireClientCertificate: bool = True,
) -> SSL.Context:
    """
    A member's server context: presents C{leaf} (with C{issuer}), requires
    a client certificate from C{trustedClientCA} (default: the proxy's
    client root).
    """
    p = backendPKI()
    leaf = leaf or p.member
    issuer = issuer or p.inter
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    if version is not None:
        context.set_min_proto_version(version)
        context.set_max_proto_version(version)
    context.use_certificate(crypto.X509.from_cryptography(leaf.certificate))
    context.add_extra_chain_cert(crypto.X509.from_cryptography(issuer.certificate))
    context.use_privatekey(crypto.PKey.from_cryptography_key(leaf.key))
    trusted = trustedClientCA or p.clientRoot
    store = context.get_cert_store()
    assert store is not None
    store.add_cert(crypto.X509.from_cryptography(trusted.certificate))
    mode = SSL.VERIFY_PEER
    if requireClientCertificate:
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    context.set_verify(mode, lambda connection, certificate, errno, depth, ok: bool(ok))
    return context


@attrs.frozen
class Member:
    address: str
    port: int = 8443


# -- protocols ----------------------------------------------------------------


@implementer(IHandshakeListener, IHalfCloseableProtocol)
class Recorder(Protocol):
    """
    Records what happens to it.
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

    def readConnectionLost(self) -> None:
        self.events.append("readConnectionLost")

    def writeConnectionLost(self) -> None:
        self.events.append("writeConnectionLost")

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.events.append("connectionLost")
        self.lostReason = reason


class MemberProtocol(Recorder):
    """
    The member's application: also remembers the client certificate and
    the server name it was asked for once the handshake is done.
    """

    peerSubject: Optional[str] = None
    serverName: Optional[bytes] = None

    def handshakeCompleted(self) -> None:
        super().handshakeCompleted()
        handle = self.transport.getHandle()  # type: ignore[union-attr]
        peer = handle.get_peer_certificate(as_cryptography=True)
        self.peerSubject = None if peer is None else peer.subject.rfc4514_string()
        self.serverName = handle.get_servername()


class AttemptFactory(ClientFactory):
    """
    Stands for the relay's factory of one connection attempt.
    """

    def __init__(self) -> None:
        self.built: list[Recorder] = []
        self.failed: list[Failure] = []
        self.lost: list[Failure] = []

    def buildProtocol(self, addr: Any) -> Recorder:
        protocol = Recorder()
        protocol.factory = self
        self.built.append(protocol)
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.failed.append(reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        self.lost.append(reason)


class HoldingFakeTransport(FakeTransport):
    """
    An iosim transport that can be told to hold back what its protocol
    writes (a member that seems to send nothing after its handshake), and
    to let it go later.  (Dropping TLS records would break the ones after.)
    """

    holding = False

    def write(self, data: bytes) -> None:
        if self.holding:
            self.held.append(data)
        else:
            super().write(data)

    def hold(self) -> None:
        self.holding = True
        self.held: list[bytes] = []

    def release(self) -> None:
        self.holding = False
        for data in self.held:
            super().write(data)


class SilentAfterHandshake(MemberProtocol):
    """
    A member application that makes its transport hold back everything
    from the end of its handshake on (its session tickets, too).
    """

    def handshakeCompleted(self) -> None:
        super().handshakeCompleted()
        self.transport.transport.hold()  # type: ignore[union-attr]


@attrs.define
class Connection:
    """
    Both ends of an in-memory connection from the proxy to a member.
    """

    proxyTLS: Any
    memberTLS: Any
    proxyIO: FakeTransport
    memberIO: HoldingFakeTransport
    pump: IOPump
    member: Any
    proxy: Any


def connectToMember(
    proxyFactory: Any,
    context: SSL.Context,
    clock: Optional[Clock] = None,
    memberProtocol: type[MemberProtocol] = MemberProtocol,
    flush: bool = True,
) -> Connection:
    """
    Connect a proxy-side TLS factory to a member with C{context} over iosim.
    """
    memberFactory = HalfCloseTLSFactory(
        _ServerCreator(context), False, Factory.forProtocol(memberProtocol), clock=clock or Clock()
    )
    memberTLS = memberFactory.buildProtocol(None)
    proxyTLS = proxyFactory.buildProtocol(None)
    # (TLS protocols forget their application protocol once disconnected.)
    member = memberTLS.wrappedProtocol
    proxy = getattr(proxyTLS, "wrappedProtocol", None)
    memberIO = HoldingFakeTransport(memberTLS, isServer=True)
    proxyIO = FakeTransport(
        proxyTLS, isServer=False, peerAddress=IPv4Address("TCP", "10.0.0.1", 8443)
    )
    pump = connect(memberTLS, memberIO, proxyTLS, proxyIO, greet=False, clock=clock)
    if flush:
        pump.flush()
    return Connection(
        proxyTLS,
        memberTLS,
        proxyIO,
        memberIO,
        pump,
        member,
        proxy if isinstance(proxy, Recorder) else None,
    )


@implementer(IOpenSSLServerConnectionCreator)
class _ServerCreator:
    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def backendTLS(
    serverName: Optional[str] = None,
    minVersion: str = "1.2",
    withClientCertificate: bool = True,
    crls: Optional[tuple[x509.CertificateRevocationList, ...]] = None,
    crlMissing: CRLMissing = CRLMissing.REJECT,
    crlExpired: CRLExpired = CRLExpired.REJECT,
    client: Optional[pki.Issued] = None,
) -> BackendTLS:
    return BackendTLS.create(
        "app",
        material(withClientCertificate, crls, client),
        serverName=serverName,
        minVersion=minVersion,
        crlMissing=crlMissing,
        crlExpired=crlExpired,
    )


def observe(testCase: SynchronousTestCase) -> EventLoggingObserver:
    """
    Collect the log events of a test.
    """
    return EventLoggingObserver.createWithCleanup(
        testCase, globalLogPublisher  # type: ignore[arg-type]
    )


def creatorFactory(tls: BackendTLS, member: Member) -> TLSMemoryBIOFactory:
    """
    A TLS factory using only the creator, as a health checker does.
    """
    return TLSMemoryBIOFactory(
        tls.clientConnectionCreator(member), True, Factory.forProtocol(Recorder)
    )


# -- the creator --------------------------------------------------------------


class CreatorTests(SynchronousTestCase):
    """
    L{BackendTLS.clientConnectionCreator} alone: verification of the
    member's certificate and the proxy's client certificate.
    """

    def assertFails(
        self, connection: Connection, reason: str, depth: Optional[int] = 0
    ) -> BackendTLSError:
        """
        The handshake failed with a L{BackendTLSError} for C{reason}, the
        application protocol never heard of a completed handshake and the
        member received nothing.
        """
        proxy = connection.proxy
        assert proxy is not None
        self.assertNotIn("handshakeCompleted", proxy.events)
        self.assertEqual(proxy.events[-1], "connectionLost")
        assert proxy.lostReason is not None
        error = proxy.lostReason.value
        assert isinstance(error, BackendTLSError)
        self.assertEqual((error.reason, error.depth), (reason, depth))
        self.assertEqual((error.member, error.pool), ("10.0.0.1:8443", "app"))
        self.assertEqual(connection.member.received, b"")
        self.assertNotIn("handshakeCompleted", connection.member.events)
        return error

    def test_providesInterface(self) -> None:
        """
        When a creator is made for a member, it provides
        L{IOpenSSLClientConnectionCreator}.
        """
        creator = backendTLS().clientConnectionCreator(Member("10.0.0.1"))
        self.assertTrue(verifyObject(IOpenSSLClientConnectionCreator, creator))

    def test_validMember(self) -> None:
        """
        When the member's certificate chains to the configured CA, is not
        revoked and is valid for the server name, the handshake completes,
        the name is sent as SNI and the member sees the proxy's client
        certificate.
        """
        tls = backendTLS(serverName="app.internal")
        c = connectToMember(creatorFactory(tls, Member("10.0.0.1")), memberContext())
        self.assertEqual(c.proxy.events, ["connectionMade", "handshakeCompleted"])
        self.assertEqual(c.member.serverName, b"app.internal")
        self.assertEqual(c.member.peerSubject, "CN=mtlsproxy")

    def test_memberHostName(self) -> None:
        """
        When no server_name is configured and the member's address is a host
        name, that name is checked and sent as SNI.
        """
        c = connectToMember(creatorFactory(backendTLS(), Member("app.internal")), memberContext())
        self.assertIn("handshakeCompleted", c.proxy.events)
        self.assertEqual(c.member.serverName, b"app.internal")

    def test_ipAddressMatches(self) -> None:
        """
        When no server_name is configured and the member's address is an IP
        address in the certificate's IP subjectAltNames, the handshake
        completes, without SNI (IP addresses are not server names).
        """
        c = connectToMember(creatorFactory(backendTLS(), Member("10.0.0.1")), memberContext())
        self.assertIn("handshakeCompleted", c.proxy.events)
        self.assertIsNone(c.member.serverName)

    def test_ipAddressMismatch(self) -> None:
        """
        When the member's IP address is not among the certificate's IP
        subjectAltNames, the handshake fails with hostname_mismatch naming
        the address and the certificate's names.
        """
        c = connectToMember(creatorFactory(backendTLS(), Member("10.0.0.2")), memberContext())
        proxy = c.proxy
        assert proxy is not None and proxy.lostReason is not None
        error = proxy.lostReason.value
        self.assertIsInstance(error, BackendTLSError)
        self.assertEqual(error.reason, HOSTNAME_MISMATCH)
        self.assertEqual(error.member, "10.0.0.2:8443")
        self.assertIn("IP address 10.0.0.2", error.error)
        self.assertIn("app.internal, 10.0.0.1", error.error)
        self.assertNotIn("handshakeCompleted", proxy.events)

    def test_wrongName(self) -> None:
        """
        When the certificate is not valid for the configured server_name,
        the handshake fails with hostname_mismatch before it completes.
        """
        tls = backendTLS(serverName="db.internal")
        c = connectToMember(creatorFactory(tls, Member("10.0.0.1")), memberContext())
        error = self.assertFails(c, HOSTNAME_MISMATCH)
        self.assertEqual(error.serverName, "db.internal")
        self.assertEqual(error.certificateSubject, "CN=app.internal")
        self.assertIn("host name db.internal", str(error))

    def test_untrustedCA(self) -> None:
        """
        When the member's certificate comes from a CA that is not
        configured, the handshake fails with unknown_ca.
        """
        p = backendPKI()
        context = memberContext(p.untrustedMember, p.untrustedMember)
        c = connectToMember(creatorFactory(backendTLS(), Member("10.0.0.1")), context)
        error = self.assertFails(c, UNKNOWN_CA)
        self.assertIn("unable to get local issuer certificate", error.error)

    def test_revokedMember(self) -> None:
        """
        When the member's certificate is in its issuer's CRL, the handshake
        fails with revoked.
        """
        p = backendPKI()
        context = memberContext(p.revokedMember)
        c = connectToMember(creatorFactory(backendTLS(), Member("10.0.0.1")), context)
        error = self.assertFails(c, REVOKED)
        self.assertEqual(error.certificateSerial, f"{p.revokedMember.certificate.serial_number:x}")

    def test_revokedIntermediate(self) -> None:
        """
        When the intermediate CA that issued the member's certificate is
        revoked by the root's CRL, the handshake fails with revoked for that
        certificate (the whole chain is checked).
        """
        p = backendPKI()
        context = memberContext(p.underRevokedInter, p.revokedInter)
        c = connectToMember(creatorFactory(backendTLS(), Member("10.0.0.1")), context)
        error = self.assertFails(c, REVOKED, depth=1)
        self.assertEqual(error.certificateSubject, "CN=Revoked Backend Intermediate")

    def test_expiredMember(self) -> None:
        """
        When the member's certificate has expired, the handshake fails with
        expired.
        """
        p = backendPKI()
        c = connectToMember(
            creatorFactory(backendTLS(), Member("10.0.0.1")), memberContext(p.expiredMember)
        )
        self.assertFails(c, EXPIRED)

    def test_crlMissingRejected(self) -> None:
        """
        When CRLs are configured but none for the member's issuer, the
        handshake fails with crl_missing (crl_missing = "reject").
        """
        p = backendPKI()
        tls = backendTLS(crls=(p.rootCRL,))
        c = connectToMember(creatorFactory(tls, Member("10.0.0.1")), memberContext())
        self.assertFails(c, CRL_MISSING)

    def test_crlMissingAllowed(self) -> None:
        """
        When the member's issuer has no CRL and crl_missing = "allow", the
        handshake completes and a warning says which setting allowed it.
        """
        observer = observe(self)
        p = backendPKI()
        tls = backendTLS(crls=(p.rootCRL,), crlMissing=CRLMissing.ALLOW)
        c = connectToMember(creatorFactory(tls, Member("10.0.0.1")), memberContext())
        self.assertIn("handshakeCompleted", c.proxy.events)
        [event] = [e for e in observer if e.get("log_format") == ALLOWED_FORMAT]
        self.assertEqual(
            (event["setting"], event["reason"], event["member"], event["pool"]),
            ("crl_missing", CRL_MISSING, "10.0.0.1:8443", "app"),
        )
        self.assertEqual(event["certificateSubject"], "CN=app.internal")

    def test_crlExpired(self) -> None:
        """
        When the CRL of the member's issuer is past its nextUpdate, the
        handshake fails with crl_expired, unless crl_expired = "allow".
        """
        p = backendPKI()
        stale = pki.buildCRL(
            p.inter, lastUpdate=NOW - timedelta(days=10), nextUpdate=NOW - timedelta(days=1)
        )
        crls = (p.rootCRL, stale)
        c = connectToMember(
            creatorFactory(backendTLS(crls=crls), Member("10.0.0.1")), memberContext()
        )
        self.assertFails(c, CRL_EXPIRED)
        tls = backendTLS(crls=crls, crlExpired=CRLExpired.ALLOW)
        c = connectToMember(creatorFactory(tls, Member("10.0.0.1")), memberContext())
        self.assertIn("handshakeCompleted", c.proxy.events)

    def test_noCRLsNoRevocationCheck(self) -> None:
        """
        When no CRLs are configured, revocation is not checked: a revoked
        member certificate passes.
        """
        p = backendPKI()
        c = connectToMember(
            creatorFactory(backendTLS(crls=()), Member("10.0.0.1")),
            memberContext(p.revokedMember),
        )
        self.assertIn("handshakeCompleted", c.proxy.events)

    def test_minVersion(self) -> None:
        """
        When min_version = "1.3", a member that speaks only TLS 1.2 fails the
        handshake.
        """
        tls = backendTLS(minVersion="1.3")
        factory = tls.wrapFactory(Member("10.0.0.1"), AttemptFactory(), Clock(), 5.0)
        c = connectToMember(factory, memberContext(version=TLS12))
        [failure] = factory.wrappedFactory.failed
        self.assertEqual(failure.value.reason, HANDSHAKE_FAILED)
        self.assertIn("version", failure.value.error)
        self.assertIsNone(c.proxy)


class ContextTests(SynchronousTestCase):
    """
    L{buildBackendContext} and L{BackendTLS.create}.
    """

    def test_noCA(self) -> None:
        """
        When no CA is given, building the context fails: the system's CAs
        are never used.
        """
        self.assertRaises(ValueError, buildBackendContext, BackendTLSMaterial(cas=()))

    def test_unknownVersion(self) -> None:
        """
        When min_version is not "1.2" or "1.3", building the context fails.
        """
        error = self.assertRaises(ValueError, buildBackendContext, material(), "1.1")
        self.assertIn("min_version", str(error))

    def test_keyWithoutCertificate(self) -> None:
        """
        When a key is given without a certificate, building the context
        fails.
        """
        p = backendPKI()
        broken = BackendTLSMaterial(cas=(p.root.certificate,), key=p.proxyClient.key)
        self.assertRaises(ValueError, buildBackendContext, broken)

    def test_keyMismatch(self) -> None:
        """
        When the key does not belong to the certificate, building the context
        fails.
        """
        p = backendPKI()
        broken = BackendTLSMaterial(
            cas=(p.root.certificate,), chain=(p.proxyClient.certificate,), key=p.strangerClient.key
        )
        self.assertRaises(SSL.Error, buildBackendContext, broken)

    def test_anchorsAreSelfSignedCAs(self) -> None:
        """
        When the CAs include a root and an intermediate, only the root is a
        trust anchor that needs no CRL.
        """
        p = backendPKI()
        tls = BackendTLS.create(
            "app", BackendTLSMaterial(cas=(p.root.certificate, p.inter.certificate))
        )
        self.assertEqual(
            tls.anchors, {crypto.X509.from_cryptography(p.root.certificate).digest("sha256")}
        )


# -- connecting ---------------------------------------------------------------


class FactoryTests(SynchronousTestCase):
    """
    L{BackendTLSFactory}: the handshake and the member's verdict as part of
    connecting.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.attempt = AttemptFactory()

    def factory(
        self, tls: Optional[BackendTLS] = None, address: str = "10.0.0.1"
    ) -> BackendTLSFactory:
        return (tls or backendTLS()).wrapFactory(Member(address), self.attempt, self.clock, 5.0)

    def assertFailed(self, reason: str) -> BackendTLSError:
        """
        The attempt failed (once) with C{reason}; its protocol was never
        built.
        """
        self.assertEqual(self.attempt.built, [])
        [failure] = self.attempt.failed
        self.assertIsInstance(failure.value, BackendTLSError)
        self.assertEqual(failure.value.reason, reason)
        self.assertEqual(self.attempt.lost, [])
        return failure.value

    def test_acceptedTLS13(self) -> None:
        """
        When a TLS 1.3 member verifies and accepts the proxy's certificate,
        the attempt's protocol is built and connected once, after its
        session tickets, and what it writes reaches the member.
        """
        c = connectToMember(self.factory(), memberContext(version=TLS13), self.clock)
        [proxy] = self.attempt.built
        self.assertEqual(proxy.events, ["connectionMade"])
        self.assertEqual(self.attempt.failed, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        proxy.transport.write(b"hello")  # type: ignore[union-attr]
        c.pump.flush()
        self.assertEqual(c.member.received, b"hello")
        self.assertEqual(c.member.peerSubject, "CN=mtlsproxy")

    def test_acceptedTLS12(self) -> None:
        """
        When a TLS 1.2 member completes the handshake (it checked the proxy's
        certificate before its Finished), the attempt's protocol is built.
        """
        c = connectToMember(self.factory(), memberContext(version=TLS12), self.clock)
        [proxy] = self.attempt.built
        self.assertEqual(c.proxyTLS.getHandle().get_protocol_version_name(), "TLSv1.2")
        self.assertEqual(proxy.events, ["connectionMade"])

    def test_nothingBeforeVerdict(self) -> None:
        """
        When a TLS 1.3 member that asked for a certificate has not answered
        after the proxy's Finished, the attempt's protocol is not built yet;
        it is once the member's next message arrives.
        """
        c = connectToMember(self.factory(), memberContext(version=TLS13), self.clock, flush=False)
        # ClientHello, the member's flight, the proxy's Finished + certificate.
        for _ in range(3):
            c.pump.pump()
        self.assertTrue(c.proxyTLS._handshakeDone)
        self.assertEqual(self.attempt.built, [])
        c.pump.flush()
        self.assertEqual(len(self.attempt.built), 1)

    def test_silentMemberAcceptedAfterWait(self) -> None:
        """
        When a TLS 1.3 member sends nothing after the handshake (no session
        tickets), it is taken to have accepted after the acceptance wait.
        """
        c = connectToMember(
            self.factory(), memberContext(version=TLS13), self.clock, SilentAfterHandshake
        )
        self.assertEqual(self.attempt.built, [])
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 0.05)
        self.clock.advance(0.05)
        [proxy] = self.attempt.built
        proxy.transport.write(b"hello")  # type: ignore[union-attr]
        c.pump.flush()
        self.assertEqual(c.member.received, b"hello")
        c.memberIO.release()
        c.member.transport.write(b"answer")  # type: ignore[union-attr]
        c.pump.flush()
        self.assertEqual(proxy.received, b"answer")

    def test_memberRejectsCertificateTLS13(self) -> None:
        """
        When a TLS 1.3 member does not trust the proxy's client certificate,
        its alert after the handshake makes the attempt fail with
        client_certificate_rejected; nothing was built or written.
        """
        p = backendPKI()
        context = memberContext(version=TLS13, trustedClientCA=p.root)
        c = connectToMember(self.factory(), context, self.clock)
        error = self.assertFailed(CLIENT_CERTIFICATE_REJECTED)
        self.assertIn("unknown ca", error.error)
        self.assertEqual(c.member.received, b"")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_memberRejectsCertificateTLS12(self) -> None:
        """
        When a TLS 1.2 member does not trust the proxy's client certificate,
        the attempt fails with client_certificate_rejected.
        """
        p = backendPKI()
        context = memberContext(version=TLS12, trustedClientCA=p.root)
        connectToMember(self.factory(), context, self.clock)
        self.assertFailed(CLIENT_CERTIFICATE_REJECTED)

    def test_memberRequiresCertificate(self) -> None:
        """
        When the pool has no client certificate and the member requires
        one, the attempt fails with client_certificate_required.
        """
        connectToMember(
            self.factory(backendTLS(withClientCertificate=False)),
            memberContext(version=TLS13),
            self.clock,
        )
        self.assertFailed(CLIENT_CERTIFICATE_REQUIRED)

    def test_noClientCertificateOptional(self) -> None:
        """
        When the pool has no client certificate and the member does not ask
        for one, the attempt succeeds.
        """
        connectToMember(
            self.factory(backendTLS(withClientCertificate=False)),
            memberContext(version=TLS13, requireClientCertificate=False),
            self.clock,
        )
        self.assertEqual(len(self.attempt.built), 1)

    def test_verificationFailureIsConnectFailure(self) -> None:
        """
        When the member's certificate does not verify, the attempt fails
        with the reason and the member received no application byte.
        """
        p = backendPKI()
        c = connectToMember(
            self.factory(), memberContext(p.untrustedMember, p.untrustedMember), self.clock
        )
        error = self.assertFailed(UNKNOWN_CA)
        self.assertEqual(error.member, "10.0.0.1:8443")
        self.assertEqual(c.member.received, b"")

    def test_wrongNameIsConnectFailure(self) -> None:
        """
        When the member's certificate is for another name, the attempt fails
        with hostname_mismatch.
        """
        connectToMember(self.factory(address="10.9.9.9"), memberContext(), self.clock)
        self.assertFailed(HOSTNAME_MISMATCH)

    def test_handshakeTimeout(self) -> None:
        """
        When the member does not answer the handshake within the timeout,
        the connection is aborted and the attempt fails with
        handshake_timeout.
        """
        c = connectToMember(self.factory(), memberContext(), self.clock, flush=False)
        self.clock.advance(4.9)
        self.assertEqual(self.attempt.failed, [])
        self.clock.advance(0.1)
        self.assertTrue(c.proxyIO.disconnecting)
        c.pump.flush()
        error = self.assertFailed(HANDSHAKE_TIMEOUT)
        self.assertIn("5s", error.error)

    def test_memberClosesDuringHandshake(self) -> None:
        """
        When the member closes the connection during the handshake, the
        attempt fails with connection_lost.
        """
        c = connectToMember(self.factory(), memberContext(), self.clock, flush=False)
        c.memberIO.loseConnection()
        c.pump.flush()
        self.assertFailed(CONNECTION_LOST)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lossAfterAcceptancePassedOn(self) -> None:
        """
        When an accepted connection is lost, the attempt's protocol and
        factory hear of it as of any connection.
        """
        c = connectToMember(self.factory(), memberContext(version=TLS13), self.clock)
        [proxy] = self.attempt.built
        c.proxyTLS.factory.clientConnectionLost(None, Failure(Exception("x")))
        self.assertEqual(len(self.attempt.lost), 1)
        c.memberIO.loseConnection()
        c.pump.flush()
        self.assertEqual(proxy.events[-1], "connectionLost")
        self.assertEqual(self.attempt.failed, [])

    def test_lossBeforeAcceptanceNotPassedOn(self) -> None:
        """
        When a connection that was never accepted is lost, the factory's
        clientConnectionLost is not passed on (it failed already).
        """
        c = connectToMember(self.factory(address="10.9.9.9"), memberContext(), self.clock)
        c.proxyTLS.factory.clientConnectionLost(None, Failure(Exception("x")))
        self.assertEqual(self.attempt.lost, [])

    def test_halfCloseTLS13(self) -> None:
        """
        When the proxy side half-closes a TLS 1.3 connection to a member, the
        member gets readConnectionLost and its answer still arrives.
        """
        c = connectToMember(self.factory(), memberContext(version=TLS13), self.clock)
        [proxy] = self.attempt.built
        proxy.transport.write(b"request")  # type: ignore[union-attr]
        proxy.transport.loseWriteConnection()  # type: ignore[union-attr]
        c.pump.flush()
        self.assertEqual(c.member.received, b"request")
        self.assertIn("readConnectionLost", c.member.events)
        self.assertNotIn("connectionLost", proxy.events)
        c.member.transport.write(b"response")  # type: ignore[union-attr]
        c.member.transport.loseConnection()  # type: ignore[union-attr]
        c.pump.flush()
        self.assertEqual(proxy.received, b"response")
        self.assertEqual(proxy.events[-1], "connectionLost")

    def test_memberSpeaksFirst(self) -> None:
        """
        When application data from the member arrives while the proxy waits
        for its verdict, that accepts it: the protocol is built, receives
        the data, and the wait is over.
        """
        c = connectToMember(
            self.factory(), memberContext(version=TLS13), self.clock, SilentAfterHandshake
        )
        c.member.transport.write(b"220 ready")  # type: ignore[union-attr]
        c.memberIO.release()
        c.pump.flush()
        [proxy] = self.attempt.built
        self.assertEqual(proxy.received, b"220 ready")
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FailureTests(SynchronousTestCase):
    """
    L{describeFailure} and L{logBackendTLSFailure}.
    """

    def test_describeAlerts(self) -> None:
        """
        When the member sent an alert about the proxy's certificate, the
        reason says so; other TLS errors are handshake_failed.
        """

        def describe(text: str) -> str:
            error = SSL.Error([("SSL routines", "", text)])
            return describeFailure(Failure(error), "m:1", "p").reason

        self.assertEqual(describe("tlsv13 alert certificate required"), CLIENT_CERTIFICATE_REQUIRED)
        self.assertEqual(describe("sslv3 alert bad certificate"), CLIENT_CERTIFICATE_REJECTED)
        self.assertEqual(describe("tlsv1 alert unknown ca"), CLIENT_CERTIFICATE_REJECTED)
        self.assertEqual(describe("sslv3 alert certificate revoked"), CLIENT_CERTIFICATE_REJECTED)
        self.assertEqual(describe("tlsv1 alert protocol version"), HANDSHAKE_FAILED)
        self.assertEqual(describe("wrong version number"), HANDSHAKE_FAILED)

    def test_describeKeepsBackendTLSError(self) -> None:
        """
        When the failure is a L{BackendTLSError} already, it is returned as
        it is.
        """
        error = BackendTLSError(UNKNOWN_CA, "x", "m:1", "p")
        self.assertIs(describeFailure(Failure(error), "other:2", "q"), error)

    def test_logEvent(self) -> None:
        """
        When a failure is a L{BackendTLSError}, one backend_tls_failed
        warning is logged with its fields and the caller's; other failures
        are not logged.
        """
        observer = observe(self)
        error = BackendTLSError(HOSTNAME_MISMATCH, "not for x", "10.0.0.1:8443", "app", "x", 0)
        self.assertTrue(logBackendTLSFailure(Failure(error), listener="web", peer="192.0.2.1:5"))
        self.assertFalse(logBackendTLSFailure(Failure(ValueError())))
        [event] = observer
        self.assertEqual(event["log_format"], BACKEND_TLS_FAILED_FORMAT)
        self.assertTrue(event["log_format"].startswith(BACKEND_TLS_FAILED))
        self.assertEqual(
            (event["reason"], event["member"], event["pool"], event["listener"], event["peer"]),
            (HOSTNAME_MISMATCH, "10.0.0.1:8443", "app", "web", "192.0.2.1:5"),
        )
        self.assertEqual(
            (event["serverName"], event["depth"], event["error"]), ("x", 0, "not for x")
        )


# -- configuration and start-up checks ---------------------------------------


class ConfigurationTests(SynchronousTestCase):
    """
    C{[pools.tls]} in the configuration file and its start-up checks
    (L{mtlsproxy.config}, L{mtlsproxy.checks}).
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.dir, "pki"))
        p = backendPKI()
        self.write("pki/backend-ca.pem", pki.chainPEM([p.root.certificate, p.inter.certificate]))
        self.write("pki/backend-crls.pem", pki.crlPEM(p.rootCRL) + pki.crlPEM(p.interCRL))
        self.write("pki/proxy-client.crt", pki.certificatePEM(p.proxyClient.certificate))
        self.write("pki/proxy-client.key", pki.keyPEM(p.proxyClient.key))
        self.write("pki/stranger.key", pki.keyPEM(p.strangerClient.key))
        self.write("pki/stranger-crl.pem", pki.crlPEM(pki.buildCRL(p.clientRoot)))

    def write(self, name: str, data: bytes) -> None:
        with open(os.path.join(self.dir, name), "wb") as f:
            f.write(data)

    def load(self, tls: str) -> ProxyConfig:
        text = (
            '[[listeners]]\nname = "l"\nendpoint = "tcp:0"\nprotocol = "tcp"\npool = "app"\n'
            '[[pools]]\nname = "app"\n'
            '[[pools.members]]\naddress = "10.0.0.1"\nport = 8443\n'
            "[pools.tls]\n" + tls
        )
        self.write("proxy.toml", text.encode())
        return loadConfig(os.path.join(self.dir, "proxy.toml"))

    def check(self, tls: str) -> LoadedConfiguration:
        return checkConfiguration(self.load(tls), NOW)

    def assertProblem(self, tls: str, expected: str, check: bool = True) -> None:
        """
        Loading (and checking) C{tls} fails with C{expected} after the file
        name.
        """
        error = self.assertRaises(ConfigurationError, self.check if check else self.load, tls)
        self.assertEqual(str(error), f"{os.path.join(self.dir, 'proxy.toml')}: {expected}")

    FULL = (
        'ca_certificates = ["pki/backend-ca.pem"]\n'
        'crls = ["pki/backend-crls.pem"]\n'
        'server_name = "app.internal"\n'
        'cert = "pki/proxy-client.crt"\n'
        'key = "pki/proxy-client.key"\n'
        'min_version = "1.3"\n'
    )

    def test_loaded(self) -> None:
        """
        When a pool has a [pools.tls] table, its keys are read with paths
        resolved against the configuration file's folder and the defaults
        filled in.
        """
        tls = self.load(self.FULL).pools[0].tls
        assert tls is not None
        pkiDir = os.path.join(self.dir, "pki")
        self.assertEqual(
            tls,
            BackendTLSConfig(
                ca_certificates=(f"{pkiDir}/backend-ca.pem",),
                crls=(f"{pkiDir}/backend-crls.pem",),
                server_name="app.internal",
                cert=f"{pkiDir}/proxy-client.crt",
                key=f"{pkiDir}/proxy-client.key",
                min_version="1.3",
            ),
        )
        self.assertEqual((tls.crl_missing, tls.crl_expired), ("reject", "reject"))

    def test_noTLSByDefault(self) -> None:
        """
        When a pool has no [pools.tls] table, its tls is None.
        """
        self.assertIsNone(PoolConfig(name="p", members=(MemberConfig("h", 1),)).tls)

    def test_structureProblems(self) -> None:
        """
        When [pools.tls] misses its CAs, has a cert without a key, an unknown
        version or an unknown key, the error names the key path.
        """
        self.assertProblem(
            'crls = []\n', "pools[0].tls: missing required key 'ca_certificates'", False
        )
        self.assertProblem(
            'ca_certificates = []\n',
            "pools[0].tls.ca_certificates: at least one CA file is needed to verify the"
            " members' certificates (the system's CAs are never used)",
            False,
        )
        self.assertProblem(
            'ca_certificates = ["a.pem"]\ncert = "c.pem"\n',
            "pools[0].tls.key: cert and key go together: the client certificate and its"
            " private key",
            False,
        )
        self.assertProblem(
            'ca_certificates = ["a.pem"]\nmin_version = "1.1"\n',
            'pools[0].tls.min_version: expected one of "1.2", "1.3"; got "1.1"',
            False,
        )
        error = self.assertRaises(
            ConfigurationError, self.load, 'ca_certificates = ["a.pem"]\nsni = "x"\n'
        )
        self.assertEqual(error.key, "pools[0].tls")
        self.assertIn("unknown key 'sni'", error.problem)

    def test_materialLoaded(self) -> None:
        """
        When the files are valid, the checked configuration holds the pool's
        CAs, CRLs, client chain and key, and a L{BackendTLS} can be built
        from them.
        """
        p = backendPKI()
        loaded = self.check(self.FULL)
        material = loaded.backends["app"]
        self.assertEqual(material.cas, (p.root.certificate, p.inter.certificate))
        self.assertEqual(material.crls, (p.rootCRL, p.interCRL))
        self.assertEqual(material.chain, (p.proxyClient.certificate,))
        self.assertIsNotNone(material.key)
        config = loaded.config.pools[0].tls
        assert config is not None
        tls = BackendTLS.fromConfig("app", config, material)
        self.assertEqual(
            (tls.poolName, tls.serverName, tls.crlMissing, tls.crlExpired),
            ("app", "app.internal", CRLMissing.REJECT, CRLExpired.REJECT),
        )

    def test_missingFile(self) -> None:
        """
        When a CA file is missing, the error names the key path, the pool
        and the file.
        """
        self.assertProblem(
            'ca_certificates = ["pki/nope.pem"]\n',
            f"pools[0].tls.ca_certificates[0]: pool 'app': file not found:"
            f" {self.dir}/pki/nope.pem",
        )

    def test_keyMismatch(self) -> None:
        """
        When the key is not the client certificate's, the error names
        pools[0].tls.key and both files.
        """
        error = self.assertRaises(
            ConfigurationError,
            self.check,
            'ca_certificates = ["pki/backend-ca.pem"]\n'
            'cert = "pki/proxy-client.crt"\nkey = "pki/stranger.key"\n',
        )
        self.assertEqual(error.key, "pools[0].tls.key")
        self.assertIn(
            f"the private key in {self.dir}/pki/stranger.key does not match", error.problem
        )
        self.assertIn("proxy-client.crt", error.problem)

    def test_crlFromOtherCA(self) -> None:
        """
        When a CRL was not issued by one of the configured CAs, the error
        names pools[0].tls.crls[0].
        """
        error = self.assertRaises(
            ConfigurationError,
            self.check,
            'ca_certificates = ["pki/backend-ca.pem"]\ncrls = ["pki/stranger-crl.pem"]\n',
        )
        self.assertEqual(error.key, "pools[0].tls.crls[0]")
        self.assertIn("is not one of the configured CA certificates", error.problem)

    def test_clientCertificateExpiry(self) -> None:
        """
        When the client certificate has expired the configuration is
        refused; when it expires within 30 days there is a warning naming
        the pool.
        """
        p = backendPKI()
        for name, days in (("old", -1), ("soon", 10)):
            notAfter = NOW + timedelta(days=days)
            issued = pki.issueClientCertificate(
                p.clientRoot, name, notBefore=NOW - timedelta(days=60), notAfter=notAfter
            )
            self.write(f"pki/{name}.crt", pki.certificatePEM(issued.certificate))
            self.write(f"pki/{name}.key", pki.keyPEM(issued.key))
        error = self.assertRaises(
            ConfigurationError,
            self.check,
            'ca_certificates = ["pki/backend-ca.pem"]\ncert = "pki/old.crt"\nkey = "pki/old.key"\n',
        )
        self.assertEqual(error.key, "pools[0].tls.cert")
        self.assertIn("the client certificate (CN=old)", error.problem)
        self.assertIn("expired on", error.problem)
        loaded = self.check(
            'ca_certificates = ["pki/backend-ca.pem"]\n'
            'cert = "pki/soon.crt"\nkey = "pki/soon.key"\n'
        )
        [warning] = [w for w in loaded.warnings if "CN=soon" in w]
        self.assertTrue(
            warning.startswith("pool 'app' [pools.tls]: the client certificate (CN=soon)")
        )
        self.assertIn("in 9 days", warning)

    def test_crlMissingWarning(self) -> None:
        """
        When CRLs are configured but not for every CA, a warning says that
        member certificates verified through it are rejected.
        """
        p = backendPKI()
        self.write("pki/root-crl.pem", pki.crlPEM(p.rootCRL))
        loaded = self.check(
            'ca_certificates = ["pki/backend-ca.pem"]\ncrls = ["pki/root-crl.pem"]\n'
        )
        self.assertIn(
            "pool 'app' [pools.tls]: no CRL is configured for CA CN=Backend Intermediate;"
            ' with crl_missing = "reject" member certificates verified through it are rejected',
            loaded.warnings,
        )


# -- the relay ----------------------------------------------------------------


class RelayTests(SynchronousTestCase):
    """
    L{mtlsproxy.relay} connecting to the members of a pool with backend TLS,
    in memory: the client on a L{StringTransport}, each member over iosim.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.members = [
            PoolMember(MemberConfig("10.0.0.1", 8443)),
            PoolMember(MemberConfig("10.0.0.2", 8443)),
        ]
        self.pool = Pool("app", self.members, _FirstCandidate(), clock=self.reactor)
        self.factory = ProxyServerFactory(
            self.reactor,
            "web",
            self.pool,
            5.0,
            3,
            False,
            backendTLS={"app": backendTLS(serverName="app.internal")},
        )
        self.client = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        self.relay = self.factory.buildProtocol(None)
        self.relay.makeConnection(self.client)

    def connectMember(self, index: int, context: SSL.Context, flush: bool = True) -> Connection:
        """
        Let connection attempt number C{index} reach a member with
        C{context}.
        """
        host, port, factory, timeout, _ = self.reactor.tcpClients[index]
        self.assertIsInstance(factory, BackendTLSFactory)
        return connectToMember(factory, context, self.reactor, flush=flush)

    def test_clientBytesWaitForVerifiedMember(self) -> None:
        """
        When the client sends bytes before the member is verified and has
        accepted the proxy, they are kept and written only then, and the
        member's answer reaches the client.
        """
        self.relay.dataReceived(b"early")
        c = self.connectMember(0, memberContext(version=TLS13))
        c.pump.flush()
        self.assertEqual(c.member.received, b"early")
        self.assertEqual(c.member.peerSubject, "CN=mtlsproxy")
        c.member.transport.write(b"answer")  # type: ignore[union-attr]
        c.pump.flush()
        self.assertEqual(self.client.value(), b"answer")
        self.assertEqual(self.members[0].activeConnections, 1)

    def test_failedVerificationTriesNextMember(self) -> None:
        """
        When the first member fails verification, one backend_tls_failed
        event names it with the listener and client, the member counts a
        failed connection, and the next member serves; the first received
        nothing.
        """
        observer = observe(self)
        self.relay.dataReceived(b"request")
        p = backendPKI()
        bad = self.connectMember(0, memberContext(p.untrustedMember, p.untrustedMember))
        self.assertEqual(bad.member.received, b"")
        self.assertEqual(self.members[0].failedConnections, 1)
        [event] = [e for e in observer if e.get("log_format") == BACKEND_TLS_FAILED_FORMAT]
        self.assertEqual(
            (event["reason"], event["member"], event["pool"], event["listener"], event["peer"]),
            (UNKNOWN_CA, "10.0.0.1:8443", "app", "web", "192.0.2.7:40000"),
        )
        self.assertEqual(len(self.reactor.tcpClients), 2)
        good = self.connectMember(1, memberContext(version=TLS13))
        self.assertEqual(good.member.received, b"request")

    def test_clientGoneDuringHandshake(self) -> None:
        """
        When the client goes away while the member's handshake is under way,
        the attempt is abandoned: its connection is closed and nothing is
        logged as a backend TLS failure.
        """
        observer = observe(self)
        c = self.connectMember(0, memberContext(), flush=False)
        c.pump.pump()
        connector = self.reactor.connectors[0]
        connector.stopConnecting = _raiseNotConnecting  # type: ignore[method-assign]
        self.relay.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(connector._disconnected)
        c.proxyIO.loseConnection()
        c.pump.flush()
        self.assertEqual(
            [e for e in observer if e.get("log_format") == BACKEND_TLS_FAILED_FORMAT], []
        )


def _raiseNotConnecting() -> None:
    raise NotConnectingError()


@implementer(IBackendSelector)
class _FirstCandidate:
    """
    A selector that picks the first candidate.
    """

    def pick(self, candidates: list[Any], facts: Any) -> Any:
        return candidates[0]
