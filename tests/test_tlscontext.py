# -*- test-case-name: tests.test_tlscontext -*-
"""
Tests for L{mtlsproxy.tlscontext}: the listener's TLS policy, exercised with
real handshakes in memory (L{TLSMemoryBIOFactory} over
L{twisted.test.iosim}) between generated certificates.

The helpers at the top (L{GeneratedPKI}, L{listenerConfig}, L{listenerMaterial},
L{ClientCreator}, L{handshake}) are shared with L{tests.test_verify}.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Sequence

import attrs
from cryptography import x509
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mtlsproxy import pki
from mtlsproxy.config import CertificateConfig, ListenerConfig
from mtlsproxy.material import ListenerMaterial
from mtlsproxy.revocation import CRLExpired, CRLMissing
from mtlsproxy.tlscontext import (
    CONTEXT_OPTIONS,
    ServerContextFactory,
    buildServerContext,
    serverContextFactory,
    sessionIdContext,
)
from mtlsproxy.verify import (
    ClientCertificateVerifier,
    ClientIdentity,
    logHandshakeFailure,
    peerIdentity,
)

NOW = datetime.now(timezone.utc)
DAY = timedelta(days=1)

CLIENT_ADDRESS = IPv4Address("TCP", "192.0.2.7", 50123)
"""
The address the server side sees as its peer (a documentation address; no
traffic is sent anywhere, the connection is in memory).
"""

TLS12 = SSL.TLS1_2_VERSION
TLS13 = SSL.TLS1_3_VERSION
VERSIONS = {"TLSv1.2": TLS12, "TLSv1.3": TLS13}


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


class GeneratedPKI:
    """
    A small PKI, generated in memory: a root with an intermediate, a server
    certificate, and a valid client certificate directly under the root and
    one under the intermediate; a second, unconfigured root.
    """

    def __init__(self) -> None:
        self.root = pki.createRootCA("Test Root")
        self.intermediate = pki.createIntermediateCA(self.root, "Test Intermediate")
        self.otherRoot = pki.createRootCA("Untrusted Root")
        self.server = pki.issueServerCertificate(
            self.intermediate, "proxy.example", dnsNames=["proxy.example"]
        )
        self.client = pki.issueClientCertificate(self.root, "client-direct")
        self.intermediateClient = pki.issueClientCertificate(
            self.intermediate, "client-under-intermediate"
        )

    def rootCRL(self, *revoked: pki.Issued, **kwargs: Any) -> x509.CertificateRevocationList:
        """
        A CRL of the root revoking C{revoked}.
        """
        return pki.buildCRL(self.root, [r.certificate for r in revoked], **kwargs)

    def intermediateCRL(
        self, *revoked: pki.Issued, **kwargs: Any
    ) -> x509.CertificateRevocationList:
        """
        A CRL of the intermediate revoking C{revoked}.
        """
        return pki.buildCRL(self.intermediate, [r.certificate for r in revoked], **kwargs)


_PKI: GeneratedPKI | None = None


def sharedPKI() -> GeneratedPKI:
    """
    One L{GeneratedPKI} for all tests (key generation is the slow part); tests
    that need further certificates issue them from its CAs.
    """
    global _PKI
    if _PKI is None:
        _PKI = GeneratedPKI()
    return _PKI


def listenerConfig(**overrides: Any) -> ListenerConfig:
    """
    A TLS listener configuration requiring client certificates; the file
    paths are never read (the material is passed separately).
    """
    settings: dict[str, Any] = dict(
        name="mtls",
        endpoint="tcp:8443",
        protocol="tls",
        pool="backends",
        client_auth="required",
        ca_certificates=("/pki/ca.pem",),
        crls=("/pki/crls.pem",),
        certificates=(CertificateConfig("/pki/server.pem", "/pki/server.key"),),
    )
    settings.update(overrides)
    return ListenerConfig(**settings)


def listenerMaterial(
    tpki: GeneratedPKI,
    cas: Sequence[x509.Certificate] | None = None,
    crls: Sequence[x509.CertificateRevocationList] | None = None,
    server: pki.Issued | None = None,
    chain: Sequence[x509.Certificate] | None = None,
) -> ListenerMaterial:
    """
    Listener material: by default the server certificate with its
    intermediate, the root as the only CA and an empty root CRL.
    """
    if server is None:
        server = tpki.server
        if chain is None:
            chain = (tpki.server.certificate, tpki.intermediate.certificate)
    if chain is None:
        chain = (server.certificate,)
    return ListenerMaterial(
        chain=tuple(chain),
        key=server.key,
        cas=tuple(cas if cas is not None else (tpki.root.certificate,)),
        crls=tuple(crls if crls is not None else (tpki.rootCRL(),)),
    )


@implementer(IOpenSSLClientConnectionCreator)
@attrs.define
class ClientCreator:
    """
    A TLS client: optionally presents C{chain} (leaf first) with C{key},
    verifies the server against C{trust}, and can be limited to protocol
    versions and TLS 1.2 ciphers.  One context serves every connection, so
    that a session of one connection can be resumed by the next.

    @ivar connections: The connections created, in order.
    @ivar session: A session to resume on the next connection.
    """

    trust: Sequence[x509.Certificate]
    chain: Sequence[x509.Certificate] = ()
    key: Any = None
    minimumVersion: int = TLS12
    maximumVersion: int = TLS13
    ciphers: bytes | None = None
    connections: list[SSL.Connection] = attrs.field(factory=list)
    session: SSL.Session | None = None
    _context: SSL.Context | None = attrs.field(default=None, init=False)

    def clientContext(self) -> SSL.Context:
        """
        The client context, built on first use.
        """
        if self._context is None:
            context = SSL.Context(SSL.TLS_METHOD)
            context.set_min_proto_version(self.minimumVersion)
            context.set_max_proto_version(self.maximumVersion)
            if self.ciphers is not None:
                context.set_cipher_list(self.ciphers)
            if self.chain:
                context.use_certificate(self.chain[0])
                for extra in self.chain[1:]:
                    context.add_extra_chain_cert(extra)
                context.use_privatekey(self.key)
            store = context.get_cert_store()
            assert store is not None
            for authority in self.trust:
                store.add_cert(_pyX509(authority))
            context.set_verify(SSL.VERIFY_PEER)
            self._context = context
        return self._context

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """
        Create the client connection.
        """
        connection = SSL.Connection(self.clientContext(), None)
        connection.set_tlsext_host_name(b"proxy.example")
        if self.session is not None:
            connection.set_session(self.session)
        self.connections.append(connection)
        return connection


def _pyX509(certificate: x509.Certificate) -> Any:
    """
    A pyOpenSSL X509 for a C{cryptography} certificate (the store wants it).
    """
    from OpenSSL import crypto

    return crypto.X509.from_cryptography(certificate)


def clientFor(
    tpki: GeneratedPKI,
    issued: pki.Issued | None,
    extra: Sequence[pki.Issued] = (),
    version: int | None = None,
    **kwargs: Any,
) -> ClientCreator:
    """
    A client presenting C{issued} (and C{extra} as its chain), trusting the
    test root; limited to C{version} if given.
    """
    if version is not None:
        kwargs.setdefault("minimumVersion", version)
        kwargs.setdefault("maximumVersion", version)
    if issued is None:
        return ClientCreator(trust=(tpki.root.certificate,), **kwargs)
    return ClientCreator(
        trust=(tpki.root.certificate,),
        chain=(issued.certificate, *(e.certificate for e in extra)),
        key=issued.key,
        **kwargs,
    )


@implementer(IHandshakeListener)
class RecordingProtocol(Protocol):
    """
    The application protocol on either side: records the handshake, the
    data and the reason the connection was lost.  On the server side it
    calls L{logHandshakeFailure} from C{connectionLost} as the relay does.
    """

    def __init__(self, isServer: bool) -> None:
        self.isServer = isServer
        self.handshakeDone = False
        self.identity: ClientIdentity | None = None
        self.received = b""
        self.lostReason: Failure | None = None
        self.loggedFailure: bool | None = None

    def handshakeCompleted(self) -> None:
        self.handshakeDone = True
        if self.isServer:
            self.identity = peerIdentity(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lostReason = reason
        if self.isServer and not self.handshakeDone:
            self.loggedFailure = logHandshakeFailure(self.transport, reason)


@attrs.define
class Handshake:
    """
    The outcome of one in-memory connection.
    """

    server: RecordingProtocol
    client: RecordingProtocol
    serverTLS: TLSMemoryBIOProtocol
    clientTLS: TLSMemoryBIOProtocol
    pump: IOPump
    serverConnection: SSL.Connection
    clientConnection: SSL.Connection

    @property
    def accepted(self) -> bool:
        """
        Did both sides finish the handshake, and does data flow both ways?
        """
        return (
            self.server.handshakeDone
            and self.client.handshakeDone
            and self.server.lostReason is None
            and self.client.lostReason is None
            and self.server.received == b"from client"
            and self.client.received == b"from server"
        )

    def clientError(self) -> str:
        """
        The OpenSSL reason texts of the error the client's connection was
        lost with (the alert the server sent), or C{""}.
        """
        return _errorText(self.client.lostReason)

    def serverError(self) -> str:
        """
        The OpenSSL reason texts of the server side's error, or C{""}.
        """
        return _errorText(self.server.lostReason)


def sessionReused(connection: SSL.Connection) -> bool:
    """
    Did C{connection} resume a session?  pyOpenSSL has no public wrapper for
    C{SSL_session_reused}, so this uses its binding (as Twisted's own
    C{_sslverify} does for other functions).
    """
    from OpenSSL._util import lib

    return bool(lib.SSL_session_reused(connection._ssl))  # type: ignore[attr-defined]


def _errorText(reason: Failure | None) -> str:
    """
    The reason texts of an L{SSL.Error} in C{reason}, joined, or C{""}.
    """
    if reason is None or not isinstance(reason.value, SSL.Error):
        return ""
    return "; ".join(
        str(entry[2]) for entry in reason.value.args[0] if isinstance(entry, tuple)
    )


def handshake(serverFactory: Any, client: ClientCreator) -> Handshake:
    """
    Connect C{client} to a server using C{serverFactory} in memory, let
    them exchange one message each way, and report what happened.
    """
    clock = Clock()
    servers: list[RecordingProtocol] = []
    clients: list[RecordingProtocol] = []

    def makeServer() -> RecordingProtocol:
        servers.append(RecordingProtocol(isServer=True))
        return servers[-1]

    def makeClient() -> RecordingProtocol:
        clients.append(RecordingProtocol(isServer=False))
        return clients[-1]

    # (zope interfaces are invisible to mypy without its zope plugin.)
    serverTLSFactory = TLSMemoryBIOFactory(
        serverFactory,
        False,
        Factory.forProtocol(makeServer),  # type: ignore[arg-type]
        clock=clock,  # type: ignore[arg-type]
    )
    clientTLSFactory = TLSMemoryBIOFactory(
        client,  # type: ignore[arg-type]
        True,
        Factory.forProtocol(makeClient),  # type: ignore[arg-type]
        clock=clock,  # type: ignore[arg-type]
    )
    clientTLS, serverTLS, pump = connectedServerAndClient(
        lambda: serverTLSFactory.buildProtocol(CLIENT_ADDRESS),  # type: ignore[arg-type]
        lambda: clientTLSFactory.buildProtocol(None),
        serverTransportFactory=lambda p: FakeTransport(  # type: ignore[arg-type, return-value]
            p, isServer=True, peerAddress=CLIENT_ADDRESS
        ),
        clock=clock,
    )
    serverConnection = serverTLS.getHandle()
    clientConnection = clientTLS.getHandle()
    pump.flush()
    if clients[0].handshakeDone and clients[0].lostReason is None:
        clientTLS.write(b"from client")
        pump.flush()
    if servers[0].handshakeDone and servers[0].lostReason is None:
        serverTLS.write(b"from server")
        pump.flush()
    return Handshake(
        server=servers[0],
        client=clients[0],
        serverTLS=serverTLS,
        clientTLS=clientTLS,
        pump=pump,
        serverConnection=serverConnection,
        clientConnection=clientConnection,
    )


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


class ServerContextFactoryTests(SynchronousTestCase):
    """
    Tests for L{serverContextFactory} and L{ServerContextFactory}.
    """

    def setUp(self) -> None:
        self.pki = sharedPKI()

    def test_providesServerConnectionCreator(self) -> None:
        """
        When a factory is built, it provides
        L{IOpenSSLServerConnectionCreator}, so C{TLSMemoryBIOFactory} uses
        its C{serverConnectionForTLS}.
        """
        factory = serverContextFactory(listenerConfig(), listenerMaterial(self.pki))
        self.assertIsInstance(factory, ServerContextFactory)
        self.assertTrue(verifyObject(IOpenSSLServerConnectionCreator, factory))
        self.assertEqual(factory.listenerName, "mtls")

    def test_connectionsShareOneContext(self) -> None:
        """
        When the factory creates connections, they all use its one context.
        """
        factory = serverContextFactory(listenerConfig(), listenerMaterial(self.pki))
        first = factory.serverConnectionForTLS(None)  # type: ignore[arg-type]
        second = factory.serverConnectionForTLS(None)  # type: ignore[arg-type]
        self.assertIs(first.get_context(), factory.context)
        self.assertIs(second.get_context(), factory.context)

    def test_newContextPerFactory(self) -> None:
        """
        When a factory is built again from the same inputs (a reload), it
        has a new context, usable even though the first one is frozen by
        use, with the same session id context.
        """
        listener = listenerConfig()
        material = listenerMaterial(self.pki)
        first = serverContextFactory(listener, material)
        self.assertTrue(handshake(first, clientFor(self.pki, self.pki.client)).accepted)
        second = serverContextFactory(listener, material)
        self.assertIsNot(first.context, second.context)
        self.assertTrue(handshake(second, clientFor(self.pki, self.pki.client)).accepted)
        self.assertEqual(
            sessionIdContext(listener, material), sessionIdContext(listener, material)
        )

    def test_sessionIdContextDependsOnPolicy(self) -> None:
        """
        When the CRLs or the client certificate settings differ, the session
        id context differs; it is 32 ASCII bytes.
        """
        listener = listenerConfig()
        material = listenerMaterial(self.pki)
        base = sessionIdContext(listener, material)
        self.assertEqual(len(base), 32)
        base.decode("ascii")
        otherCRL = listenerMaterial(self.pki, crls=(self.pki.rootCRL(self.pki.client),))
        self.assertNotEqual(base, sessionIdContext(listener, otherCRL))
        optional = listenerConfig(client_auth="optional")
        self.assertNotEqual(base, sessionIdContext(optional, material))
        allow = listenerConfig(crl_missing="allow")
        self.assertNotEqual(base, sessionIdContext(allow, material))

    def test_options(self) -> None:
        """
        When a context is built with C{session_tickets = false},
        compression, renegotiation and stateless tickets are off and the
        server's cipher order wins.
        """
        factory = serverContextFactory(
            attrs.evolve(listenerConfig(), session_tickets=False), listenerMaterial(self.pki)
        )
        # set_options(0) changes nothing and returns the options in force.
        options = factory.context.set_options(0)
        self.assertEqual(options & CONTEXT_OPTIONS, CONTEXT_OPTIONS)
        for option in (
            SSL.OP_NO_COMPRESSION,
            SSL.OP_NO_RENEGOTIATION,
            SSL.OP_CIPHER_SERVER_PREFERENCE,
            SSL.OP_NO_TICKET,
        ):
            self.assertTrue(options & option)

    def test_verifyModes(self) -> None:
        """
        When C{client_auth} is C{"off"}, C{"optional"} or C{"required"},
        the context's verify mode is C{VERIFY_NONE}, C{VERIFY_PEER}, or
        C{VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT}.
        """
        material = listenerMaterial(self.pki)
        modes = {
            mode: serverContextFactory(
                listenerConfig(client_auth=mode), material
            ).context.get_verify_mode()
            for mode in ("off", "optional", "required")
        }
        self.assertEqual(
            modes,
            {
                "off": SSL.VERIFY_NONE,
                "optional": SSL.VERIFY_PEER,
                "required": SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            },
        )

    def test_keyMismatch(self) -> None:
        """
        When the private key does not belong to the server certificate,
        building the context raises L{SSL.Error}.
        """
        material = ListenerMaterial(
            chain=(self.pki.server.certificate,),
            key=self.pki.client.key,
            cas=(self.pki.root.certificate,),
            crls=(),
        )
        self.assertRaises(SSL.Error, serverContextFactory, listenerConfig(), material)

    def test_noCertificate(self) -> None:
        """
        When the material has no server certificate, building the context
        raises L{ValueError} naming the listener.
        """
        material = ListenerMaterial(
            chain=(), key=self.pki.server.key, cas=(self.pki.root.certificate,), crls=()
        )
        error = self.assertRaises(
            ValueError, serverContextFactory, listenerConfig(), material
        )
        self.assertIn("'mtls'", str(error))

    def test_clientAuthWithoutCAs(self) -> None:
        """
        When client certificates are asked for but no CA is given, building
        the context raises L{ValueError}.
        """
        material = listenerMaterial(self.pki, cas=(), crls=())
        self.assertRaises(
            ValueError,
            buildServerContext,
            listenerConfig(),
            material,
            ClientCertificateVerifier.create("mtls"),
        )

    def test_crlStatusUsesClock(self) -> None:
        """
        When the factory has a clock, C{crlStatus} judges the CRLs at the
        clock's time.
        """
        crl = self.pki.rootCRL(lastUpdate=NOW - 2 * DAY, nextUpdate=NOW + DAY)
        material = listenerMaterial(self.pki, crls=(crl,))
        clock = Clock()
        factory = serverContextFactory(
            listenerConfig(), material, clock=clock  # type: ignore[arg-type]
        )
        clock.advance(NOW.timestamp())
        [status] = factory.crlStatus()
        self.assertEqual(status.state, "current")
        self.assertEqual(status.issuer, "CN=Test Root")
        clock.advance((2 * DAY).total_seconds())
        [status] = factory.crlStatus()
        self.assertEqual(status.state, "expired")

    def test_policiesFromConfiguration(self) -> None:
        """
        When the listener sets C{crl_missing} and C{crl_expired}, the
        factory's verifier has the matching policies.
        """
        factory = serverContextFactory(
            listenerConfig(crl_missing="allow", crl_expired="allow"),
            listenerMaterial(self.pki),
        )
        self.assertIs(factory.verifier.crlMissing, CRLMissing.ALLOW)
        self.assertIs(factory.verifier.crlExpired, CRLExpired.ALLOW)
        defaults = serverContextFactory(listenerConfig(), listenerMaterial(self.pki))
        self.assertIs(defaults.verifier.crlMissing, CRLMissing.REJECT)
        self.assertIs(defaults.verifier.crlExpired, CRLExpired.REJECT)


class ProtocolPolicyTests(SynchronousTestCase):
    """
    Protocol versions, ciphers, certificates and sessions, seen from a
    client.
    """

    def setUp(self) -> None:
        self.pki = sharedPKI()
        self.factory = serverContextFactory(listenerConfig(), listenerMaterial(self.pki))

    def test_tls13Default(self) -> None:
        """
        When a client allows TLS 1.3, it is negotiated.
        """
        result = handshake(self.factory, clientFor(self.pki, self.pki.client))
        self.assertTrue(result.accepted)
        self.assertEqual(result.serverConnection.get_protocol_version_name(), "TLSv1.3")

    def test_tls12(self) -> None:
        """
        When a client allows only TLS 1.2, TLS 1.2 is negotiated with an
        ECDHE AEAD cipher, even if the client prefers a CBC cipher.
        """
        client = clientFor(
            self.pki,
            self.pki.client,
            version=TLS12,
            ciphers=b"ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA:"
            b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256",
        )
        result = handshake(self.factory, client)
        self.assertTrue(result.accepted)
        self.assertEqual(result.serverConnection.get_protocol_version_name(), "TLSv1.2")
        self.assertEqual(
            result.serverConnection.get_cipher_name(), "ECDHE-ECDSA-AES128-GCM-SHA256"
        )

    def test_tls11Refused(self) -> None:
        """
        When a client offers at most TLS 1.1, the handshake fails with a
        protocol version alert, logged as a handshake failure.
        """
        client = clientFor(
            self.pki,
            self.pki.client,
            minimumVersion=SSL.TLS1_1_VERSION,
            maximumVersion=SSL.TLS1_1_VERSION,
            ciphers=b"DEFAULT:@SECLEVEL=0",
        )
        result = handshake(self.factory, client)
        self.assertFalse(result.server.handshakeDone)
        self.assertFalse(result.client.handshakeDone)
        self.assertIn("unsupported protocol", result.serverError())
        self.assertIn("protocol version", result.clientError())
        self.assertTrue(result.server.loggedFailure)

    def test_cbcOnlyRefused(self) -> None:
        """
        When a TLS 1.2 client offers only CBC ciphers, the handshake fails:
        no shared cipher.
        """
        client = clientFor(
            self.pki,
            self.pki.client,
            version=TLS12,
            ciphers=b"ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:"
            b"ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA256:AES128-SHA",
        )
        result = handshake(self.factory, client)
        self.assertFalse(result.server.handshakeDone)
        self.assertIn("no shared cipher", result.serverError())
        self.assertIn("handshake failure", result.clientError())

    def test_chainSent(self) -> None:
        """
        When the server certificate has an intermediate, the server sends it,
        so a client trusting only the root verifies the server.
        """
        for name, version in VERSIONS.items():
            client = clientFor(self.pki, self.pki.client, version=version)
            result = handshake(self.factory, client)
            self.assertTrue(result.accepted, name)
            chain = result.clientConnection.get_peer_cert_chain(as_cryptography=True)
            assert chain is not None
            self.assertEqual(
                [c.subject for c in chain],
                [self.pki.server.certificate.subject, self.pki.intermediate.certificate.subject],
            )

    def test_rsaServerCertificate(self) -> None:
        """
        When the server certificate has an RSA key, TLS 1.2 negotiates an
        ECDHE-RSA AEAD cipher.
        """
        server = pki.issueServerCertificate(self.pki.root, "proxy.example", keyType="rsa")
        factory = serverContextFactory(
            listenerConfig(), listenerMaterial(self.pki, server=server)
        )
        result = handshake(factory, clientFor(self.pki, self.pki.client, version=TLS12))
        self.assertTrue(result.accepted)
        self.assertEqual(
            result.serverConnection.get_cipher_name(), "ECDHE-RSA-AES128-GCM-SHA256"
        )

    def test_caNamesAdvertised(self) -> None:
        """
        When client certificates are asked for, the CertificateRequest names
        exactly the configured CAs, in TLS 1.2 and 1.3.
        """
        cas = (self.pki.root.certificate, self.pki.intermediate.certificate)
        factory = serverContextFactory(
            listenerConfig(),
            listenerMaterial(self.pki, cas=cas, crls=(self.pki.rootCRL(), self.pki.intermediateCRL())),
        )
        for name, version in VERSIONS.items():
            result = handshake(factory, clientFor(self.pki, self.pki.client, version=version))
            self.assertTrue(result.accepted, name)
            self.assertEqual(
                result.clientConnection.get_client_ca_list(as_cryptography=True),
                [ca.subject for ca in cas],
                name,
            )

    def test_offDoesNotAsk(self) -> None:
        """
        When C{client_auth} is C{"off"}, the server sends no
        CertificateRequest: a client with a certificate does not present
        it, and the connection has no client identity.
        """
        factory = serverContextFactory(
            listenerConfig(client_auth="off"), listenerMaterial(self.pki)
        )
        for name, version in VERSIONS.items():
            result = handshake(factory, clientFor(self.pki, self.pki.client, version=version))
            self.assertTrue(result.accepted, name)
            self.assertEqual(result.clientConnection.get_client_ca_list(), [], name)
            self.assertIsNone(result.server.identity, name)

    def test_resumption(self) -> None:
        """
        When a client resumes its session on the same listener context, the
        resumption succeeds (the context has a session id context) and the
        resumed connection still has the client's identity.
        """
        for name, version in VERSIONS.items():
            client = clientFor(self.pki, self.pki.client, version=version)
            first = handshake(self.factory, client)
            self.assertTrue(first.accepted, name)
            self.assertFalse(sessionReused(first.serverConnection), name)
            client.session = first.clientConnection.get_session()
            second = handshake(self.factory, client)
            self.assertTrue(second.accepted, name)
            self.assertTrue(sessionReused(second.serverConnection), name)
            assert second.server.identity is not None
            self.assertEqual(second.server.identity.subject, "CN=client-direct")

    def test_noResumptionAcrossContexts(self) -> None:
        """
        When a client offers a session from one listener context to a new
        context (a reload), it gets a full handshake instead.
        """
        for name, version in VERSIONS.items():
            client = clientFor(self.pki, self.pki.client, version=version)
            first = handshake(self.factory, client)
            client.session = first.clientConnection.get_session()
            reloaded = serverContextFactory(listenerConfig(), listenerMaterial(self.pki))
            second = handshake(reloaded, client)
            self.assertTrue(second.accepted, name)
            self.assertFalse(sessionReused(second.serverConnection), name)
