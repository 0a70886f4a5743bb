# -*- test-case-name: tests.test_sni -*-
"""
Tests for L{mtlsproxy.sni} and the server name handling of
L{mtlsproxy.tlscontext}: choosing the certificate, and the client
certificate settings, by the name the client asks for.

The handshakes are real (pyOpenSSL on both sides) and in memory, as in
L{tests.test_tlscontext}; every combination of name (none, exact, wildcard,
unknown, strict) and per-name client authentication (required, optional,
off) is run over TLS 1.2 and TLS 1.3.  L{tests.test_integration_reload}
repeats the essentials against the real C{twistd mtlsproxy}.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import attrs
from cryptography import x509
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mtlsproxy import pki
from mtlsproxy.config import CertificateConfig, ListenerConfig
from mtlsproxy.material import ListenerMaterial, ServerCertificate
from mtlsproxy.sni import SiteTable, nameMatches, normalizeServerName
from mtlsproxy.tlscontext import serverContextFactory
from mtlsproxy.verify import NO_CERTIFICATE, REVOKED, UNKNOWN_CA, UNKNOWN_SNI
from tests.test_tlscontext import TLS12, TLS13, VERSIONS, Handshake, handshake, sessionReused


class SNIPKI:
    """
    Certificates for a listener with three names:

      - C{www}: C{www.example.com} and C{example.com}, no client
        certificates (the listener's C{client_auth = "off"});
      - C{api}: C{api.example.com}, client certificates required from the
        C{apiClients} CA, whose CRL revokes C{apiRevoked};
      - C{partners}: C{*.example.net}, client certificates optional, from
        the C{partnerClients} CA.

    The server certificates come from C{serverRoot}, which every client
    trusts.
    """

    def __init__(self) -> None:
        self.serverRoot = pki.createRootCA("Server Root")
        self.www = pki.issueServerCertificate(
            self.serverRoot, "www.example.com", dnsNames=["www.example.com", "example.com"]
        )
        self.api = pki.issueServerCertificate(
            self.serverRoot, "api.example.com", dnsNames=["API.example.com"]
        )
        self.partners = pki.issueServerCertificate(
            self.serverRoot, "partners", dnsNames=["*.example.net"]
        )
        self.apiClients = pki.createRootCA("API Clients")
        self.partnerClients = pki.createRootCA("Partner Clients")
        self.apiClient = pki.issueClientCertificate(self.apiClients, "api-client")
        self.apiRevoked = pki.issueClientCertificate(self.apiClients, "api-revoked")
        self.partnerClient = pki.issueClientCertificate(self.partnerClients, "partner-client")
        self.apiCRL = pki.buildCRL(self.apiClients, [self.apiRevoked.certificate])
        self.partnerCRL = pki.buildCRL(self.partnerClients)


_PKI: Optional[SNIPKI] = None


def sniPKI() -> SNIPKI:
    """
    One L{SNIPKI} for all tests.
    """
    global _PKI
    if _PKI is None:
        _PKI = SNIPKI()
    return _PKI


def siteListener(
    strict: bool = False, default: Optional[int] = None, **overrides: Any
) -> ListenerConfig:
    """
    The configuration of the three-name listener of L{SNIPKI} (paths are
    never read).

    @param default: The entry marked C{default = true}, if any.
    """
    entries = [
        CertificateConfig("/pki/www.pem", "/pki/www.key"),
        CertificateConfig(
            "/pki/api.pem",
            "/pki/api.key",
            client_auth="required",
            ca_certificates=("/pki/api-clients.pem",),
            crls=("/pki/api-clients.crl",),
        ),
        CertificateConfig(
            "/pki/partners.pem",
            "/pki/partners.key",
            client_auth="optional",
            ca_certificates=("/pki/partner-clients.pem",),
            crls=("/pki/partner-clients.crl",),
        ),
    ]
    if default is not None:
        entries[default] = attrs.evolve(entries[default], default=True)
    settings: dict[str, Any] = dict(
        name="sites",
        endpoint="tcp:8443",
        protocol="tls",
        pool="backends",
        client_auth="off",
        certificates=tuple(entries),
        strict_sni=strict,
    )
    settings.update(overrides)
    return ListenerConfig(**settings)


def siteMaterial(tpki: SNIPKI) -> ListenerMaterial:
    """
    The material matching L{siteListener}.
    """
    www = ServerCertificate((tpki.www.certificate,), tpki.www.key)
    api = ServerCertificate(
        (tpki.api.certificate,),
        tpki.api.key,
        cas=(tpki.apiClients.certificate,),
        crls=(tpki.apiCRL,),
    )
    partners = ServerCertificate(
        (tpki.partners.certificate,),
        tpki.partners.key,
        cas=(tpki.partnerClients.certificate,),
        crls=(tpki.partnerCRL,),
    )
    return ListenerMaterial(
        chain=www.chain,
        key=www.key,
        cas=(),
        crls=(),
        additional=(api, partners),
        entries=(www, api, partners),
    )


@implementer(IOpenSSLClientConnectionCreator)
@attrs.define
class NamedClient:
    """
    A TLS client that asks for C{serverName} (or none), trusts the server
    root, and optionally presents C{issued}; optionally limited to one
    protocol C{version}, key exchange C{groups} and TLS 1.2 C{ciphers}, and
    offering C{alpn} protocols.
    """

    trust: x509.Certificate
    serverName: Optional[bytes]
    issued: Optional[pki.Issued] = None
    version: Optional[int] = None
    groups: Optional[str] = None
    session: Optional[SSL.Session] = None
    alpn: Optional[list[bytes]] = None
    ciphers: Optional[bytes] = None
    _context: Optional[SSL.Context] = attrs.field(default=None, init=False)

    def clientContext(self) -> SSL.Context:
        if self._context is None:
            context = SSL.Context(SSL.TLS_METHOD)
            if self.version is not None:
                context.set_min_proto_version(self.version)
                context.set_max_proto_version(self.version)
            if self.groups is not None:
                from OpenSSL._util import lib

                lib.SSL_CTX_set1_curves_list(context._context, self.groups.encode())
            if self.alpn is not None:
                context.set_alpn_protos(self.alpn)
            if self.ciphers is not None:
                context.set_cipher_list(self.ciphers)
            if self.issued is not None:
                context.use_certificate(self.issued.certificate)
                context.use_privatekey(self.issued.key)
            store = context.get_cert_store()
            assert store is not None
            from OpenSSL import crypto

            store.add_cert(crypto.X509.from_cryptography(self.trust))
            context.set_verify(SSL.VERIFY_PEER)
            self._context = context
        return self._context

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self.clientContext(), None)
        if self.serverName is not None:
            connection.set_tlsext_host_name(self.serverName)
        if self.session is not None:
            connection.set_session(self.session)
        return connection


def inMemory(factory: Any, client: NamedClient) -> Handshake:
    """
    L{tests.test_tlscontext.handshake} with a L{NamedClient}.
    """
    return handshake(factory, client)  # type: ignore[arg-type]


def served(result: Handshake) -> Optional[str]:
    """
    The common name of the certificate the client received, or L{None}.
    """
    certificate = result.clientConnection.get_peer_certificate(as_cryptography=True)
    if certificate is None:
        return None
    [name] = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(name.value)


class NameMatchingTests(SynchronousTestCase):
    """
    Tests for L{nameMatches}, L{normalizeServerName} and L{SiteTable}.
    """

    def test_exact(self) -> None:
        """
        When the pattern has no wildcard, only the same name matches, in
        any case.
        """
        self.assertTrue(nameMatches("api.example.com", "API.Example.com"))
        self.assertFalse(nameMatches("api.example.com", "www.example.com"))
        self.assertFalse(nameMatches("api.example.com", "x.api.example.com"))

    def test_wildcardOneLabel(self) -> None:
        """
        When the pattern is C{*.example.com}, exactly one leftmost label
        matches it: not the bare domain, not two labels.
        """
        self.assertTrue(nameMatches("*.example.com", "api.example.com"))
        self.assertTrue(nameMatches("*.EXAMPLE.com", "Www.example.COM"))
        self.assertFalse(nameMatches("*.example.com", "example.com"))
        self.assertFalse(nameMatches("*.example.com", "a.b.example.com"))
        self.assertFalse(nameMatches("*.example.com", ".example.com"))
        self.assertFalse(nameMatches("api*.example.com", "api1.example.com"))

    def test_normalize(self) -> None:
        """
        When a client sends a name, it is compared in lower case without a
        final dot; no name and non-ASCII bytes are L{None}.
        """
        self.assertEqual(normalizeServerName(b"WWW.Example.COM."), "www.example.com")
        self.assertIsNone(normalizeServerName(None))
        self.assertIsNone(normalizeServerName(b""))
        self.assertIsNone(normalizeServerName("caf\xe9".encode("latin-1")))

    def test_exactBeatsWildcard(self) -> None:
        """
        When both an exact name and a wildcard answer for a name, the exact
        one wins whatever the order; among equals the first wins.
        """
        table = SiteTable(
            [(["*.example.com"], "wild"), (["api.example.com"], "api"), (["*.example.com"], "late")],
            "default",
        )
        self.assertEqual(table.select("api.example.com"), "api")
        self.assertEqual(table.select("www.example.com"), "wild")
        self.assertEqual(table.select("example.com"), "default")
        self.assertEqual(table.select(None), "default")

    def test_strict(self) -> None:
        """
        When the table is strict, an unknown name selects nothing, but no
        name at all still gets the default.
        """
        table = SiteTable([(["api.example.com"], "api")], "api", strict=True)
        self.assertIsNone(table.select("www.example.com"))
        self.assertEqual(table.select(None), "api")
        self.assertEqual(table.select("api.example.com"), "api")


class _SNIHandshakeMixin:
    """
    Handshakes against the three-name listener, run for each protocol
    version by the subclasses.
    """

    version: int
    assertEqual: Any
    assertTrue: Any
    assertFalse: Any
    assertIsNone: Any
    assertIn: Any

    def setUp(self) -> None:
        self.pki = sniPKI()
        self.events = EventLoggingObserver.createWithCleanup(
            self, globalLogPublisher  # type: ignore[arg-type]
        )
        self.factory = serverContextFactory(siteListener(), siteMaterial(self.pki))
        self.seen = 0

    def clearEvents(self) -> None:
        """
        Forget the events logged so far.
        """
        self.seen = len(list(self.events))

    def client(self, issued: Optional[pki.Issued] = None, **kwargs: Any) -> NamedClient:
        """
        A client trusting the server root and presenting C{issued}; reuse
        it to offer a session again.
        """
        return NamedClient(
            self.pki.serverRoot.certificate, None, issued, self.version, **kwargs
        )

    def connect(
        self,
        serverName: Optional[bytes],
        issued: Optional[pki.Issued] = None,
        factory: Any = None,
        client: Optional[NamedClient] = None,
        **kwargs: Any,
    ) -> Handshake:
        """
        Connect a client asking for C{serverName}.
        """
        if client is None:
            client = self.client(issued, **kwargs)
        client.serverName = serverName
        return inMemory(factory or self.factory, client)

    def rejections(self) -> list[dict[str, Any]]:
        """
        The rejection events logged since L{clearEvents}.
        """
        return [
            e
            for e in list(self.events)[self.seen :]
            if e.get("log_namespace") == "mtlsproxy.verify"
            and e.get("log_format", "").startswith("Rejected")
        ]

    def assertServed(
        self, result: Handshake, name: str, identity: Optional[str] = None
    ) -> None:
        """
        The handshake succeeded with the certificate C{name}, data flowed,
        and the server saw the client certificate C{identity}.
        """
        self.assertEqual(served(result), name)
        self.assertTrue(result.accepted, (result.clientError(), result.serverError()))
        if identity is None:
            self.assertIsNone(result.server.identity)
        else:
            assert result.server.identity is not None
            self.assertEqual(result.server.identity.commonName, identity)
        self.assertEqual(self.rejections(), [])

    def assertRefused(self, result: Handshake, reason: str) -> dict[str, Any]:
        """
        The handshake failed and one rejection with C{reason} was logged.
        """
        self.assertFalse(result.accepted)
        self.assertFalse(result.server.handshakeDone and result.server.lostReason is None)
        [event] = self.rejections()
        self.assertEqual(event["reason"], reason)
        self.assertEqual(event["listener"], "sites")
        return event

    def assertAsked(self, result: Handshake, asked: bool) -> None:
        """
        The client was (or was not) asked for a certificate.
        """
        self.assertEqual(bool(result.clientConnection.get_client_ca_list()), asked)

    # -- names ---------------------------------------------------------------

    def test_noServerName(self) -> None:
        """
        When the client sends no server name, it gets the first certificate
        and, like that name, is not asked for a client certificate.
        """
        result = self.connect(None)
        self.assertServed(result, "www.example.com")
        self.assertAsked(result, False)

    def test_defaultName(self) -> None:
        """
        When the client asks for a name of the default certificate (any
        case, final dot), it gets that certificate.
        """
        for name in (b"www.example.com", b"example.com", b"WWW.Example.Com."):
            self.clearEvents()
            self.assertServed(self.connect(name), "www.example.com")

    def test_unknownNameGetsDefault(self) -> None:
        """
        When the client asks for a name no certificate answers for, it gets
        the default certificate and that certificate's (lack of) client
        authentication.
        """
        for name in (b"unknown.example.org", b"example.net", b"a.b.example.net"):
            self.clearEvents()
            result = self.connect(name)
            self.assertServed(result, "www.example.com")
            self.assertAsked(result, False)

    def test_markedDefault(self) -> None:
        """
        When an entry is marked C{default = true}, clients without a name
        or with an unknown one get it, with its client authentication:
        required here, so one without a certificate is refused.
        """
        factory = serverContextFactory(siteListener(default=1), siteMaterial(self.pki))
        self.assertServed(
            self.connect(None, self.pki.apiClient, factory=factory),
            "api.example.com",
            "api-client",
        )
        self.assertServed(
            self.connect(b"nope.example.org", self.pki.apiClient, factory=factory),
            "api.example.com",
            "api-client",
        )
        self.assertRefused(self.connect(None, factory=factory), NO_CERTIFICATE)

    def test_strictRefusesUnknown(self) -> None:
        """
        When the listener is strict and the name is unknown, the handshake
        is refused with an unrecognized_name alert and logged once with
        reason C{unknown_sni} and the name.
        """
        factory = serverContextFactory(siteListener(strict=True), siteMaterial(self.pki))
        result = self.connect(b"Unknown.Example.org", factory=factory)
        event = self.assertRefused(result, UNKNOWN_SNI)
        self.assertEqual(event["sni"], "unknown.example.org")
        self.assertEqual(event["peer"], "192.0.2.7:50123")
        self.assertIn("unrecognized name", result.clientError())

    def test_strictKnownAndNoName(self) -> None:
        """
        When the listener is strict, known names and clients without a
        name are served as usual.
        """
        factory = serverContextFactory(siteListener(strict=True), siteMaterial(self.pki))
        self.assertServed(self.connect(None, factory=factory), "www.example.com")
        self.assertServed(self.connect(b"x.example.net", factory=factory), "partners")
        self.assertServed(
            self.connect(b"api.example.com", self.pki.apiClient, factory=factory),
            "api.example.com",
            "api-client",
        )

    def test_strictSingleCertificate(self) -> None:
        """
        When a strict listener has one certificate, names it does not hold
        are refused too.
        """
        listener = siteListener(
            strict=True, certificates=(CertificateConfig("/pki/api.pem", "/pki/api.key"),)
        )
        material = ListenerMaterial(
            chain=(self.pki.api.certificate,), key=self.pki.api.key, cas=(), crls=()
        )
        factory = serverContextFactory(listener, material)
        self.assertServed(self.connect(b"api.example.com", factory=factory), "api.example.com")
        self.assertRefused(self.connect(b"www.example.com", factory=factory), UNKNOWN_SNI)

    # -- required client certificates for one name ---------------------------

    def test_requiredNameWithCertificate(self) -> None:
        """
        When the client asks for the name that requires client certificates
        and presents one from that name's CA, it is accepted with that
        identity, and was told that CA's name.
        """
        result = self.connect(b"api.example.com", self.pki.apiClient)
        self.assertServed(result, "api.example.com", "api-client")
        [caName] = result.clientConnection.get_client_ca_list()
        self.assertEqual(caName.CN, "API Clients")

    def test_requiredNameWithoutCertificate(self) -> None:
        """
        When the client asks for the name that requires client certificates
        and presents none, it is refused with C{no_certificate}, although
        the first (default) certificate does not ask for any.
        """
        self.assertRefused(self.connect(b"api.example.com"), NO_CERTIFICATE)

    def test_requiredNameOtherNamesCA(self) -> None:
        """
        When the client asks for the name that requires client certificates
        and presents one from the other name's CA, it is refused with
        C{unknown_ca}.
        """
        self.assertRefused(
            self.connect(b"api.example.com", self.pki.partnerClient), UNKNOWN_CA
        )

    def test_requiredNameRevoked(self) -> None:
        """
        When the client's certificate is on that name's CRL, it is refused
        with C{revoked}.
        """
        self.assertRefused(self.connect(b"api.example.com", self.pki.apiRevoked), REVOKED)

    # -- optional client certificates for a wildcard name ---------------------

    def test_optionalWildcardWithout(self) -> None:
        """
        When the client asks for a name under the wildcard (optional client
        certificates) and presents none, it is accepted without identity.
        """
        result = self.connect(b"shop.example.net")
        self.assertServed(result, "partners")
        self.assertAsked(result, True)

    def test_optionalWildcardWith(self) -> None:
        """
        When the client presents a certificate from that name's CA, it is
        accepted with that identity.
        """
        self.assertServed(
            self.connect(b"shop.example.net", self.pki.partnerClient), "partners", "partner-client"
        )

    def test_optionalWildcardOtherNamesCA(self) -> None:
        """
        When the client presents a certificate from the other name's CA to
        the optional name, it is refused: optional does not mean unchecked.
        """
        self.assertRefused(self.connect(b"shop.example.net", self.pki.apiClient), UNKNOWN_CA)

    def test_offNameIgnoresCertificate(self) -> None:
        """
        When the client asks for the name without client authentication, it
        is not asked for a certificate even though it has one.
        """
        result = self.connect(b"www.example.com", self.pki.apiClient)
        self.assertServed(result, "www.example.com")
        self.assertAsked(result, False)

    # -- sessions and retries -------------------------------------------------

    def test_noResumptionAcrossNames(self) -> None:
        """
        When the names of a listener verify clients differently, a session
        from the name without client authentication does not let a client
        without a certificate into the name that requires one: sessions are
        not resumed at all, so it gets a full handshake and is refused.
        """
        client = self.client()
        first = self.connect(b"www.example.com", client=client)
        self.assertServed(first, "www.example.com")
        self.assertFalse(self.factory.resumable)
        client.session = first.clientConnection.get_session()
        again = self.connect(b"www.example.com", client=client)
        self.assertServed(again, "www.example.com")
        self.assertFalse(sessionReused(again.serverConnection))
        result = self.connect(b"api.example.com", client=client)
        self.assertRefused(result, NO_CERTIFICATE)

    def test_resumptionWithSameTrust(self) -> None:
        """
        When every name of a listener verifies clients the same way, sessions
        are resumed, and the identity is kept.
        """
        listener = siteListener(
            client_auth="required",
            ca_certificates=("/pki/api-clients.pem",),
            crls=("/pki/api-clients.crl",),
            certificates=(
                CertificateConfig("/pki/www.pem", "/pki/www.key"),
                CertificateConfig("/pki/api.pem", "/pki/api.key"),
            ),
        )
        material = ListenerMaterial(
            chain=(self.pki.www.certificate,),
            key=self.pki.www.key,
            cas=(self.pki.apiClients.certificate,),
            crls=(self.pki.apiCRL,),
            additional=(ServerCertificate((self.pki.api.certificate,), self.pki.api.key),),
        )
        factory = serverContextFactory(listener, material)
        self.assertTrue(factory.resumable)
        client = self.client(self.pki.apiClient)
        first = self.connect(b"api.example.com", factory=factory, client=client)
        self.assertServed(first, "api.example.com", "api-client")
        client.session = first.clientConnection.get_session()
        second = self.connect(b"api.example.com", factory=factory, client=client)
        self.assertServed(second, "api.example.com", "api-client")
        self.assertTrue(sessionReused(second.serverConnection))

    def test_helloRetry(self) -> None:
        """
        When the server makes the client send a second ClientHello (a
        HelloRetryRequest for another key exchange group, TLS 1.3), the
        name's certificate and client authentication still apply.
        """
        listener = siteListener(groups=("P-256",))
        factory = serverContextFactory(listener, siteMaterial(self.pki))
        result = self.connect(
            b"api.example.com", self.pki.apiClient, factory=factory, groups="X25519:P-256"
        )
        self.assertServed(result, "api.example.com", "api-client")
        self.assertEqual(result.serverConnection.get_group_name(), "secp256r1")
        self.clearEvents()
        self.assertRefused(
            self.connect(b"api.example.com", factory=factory, groups="X25519:P-256"),
            NO_CERTIFICATE,
        )


class TLS12SNITests(_SNIHandshakeMixin, SynchronousTestCase):
    """
    Server names over TLS 1.2.
    """

    version = TLS12


class TLS13SNITests(_SNIHandshakeMixin, SynchronousTestCase):
    """
    Server names over TLS 1.3.
    """

    version = TLS13


# ---------------------------------------------------------------------------
# Certificate entries in the configuration file: formats, passwords, trust
# ---------------------------------------------------------------------------


class CertificateEntryTests(SynchronousTestCase):
    """
    C{[[listeners.certificates]]} entries read from files: PEM (encrypted
    keys with C{password_file} or C{password_env}) and PKCS#12, and the
    per-entry C{client_auth}, C{ca_certificates}, C{crls} and C{default}.
    """

    def setUp(self) -> None:
        import os

        self.pki = sniPKI()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.intermediate = pki.createIntermediateCA(self.pki.serverRoot, "Server Intermediate")
        self.server = pki.issueServerCertificate(
            self.intermediate, "p12.example.com", dnsNames=["p12.example.com"]
        )
        self.write("server.p12", pki.pkcs12Bytes(
            self.server, [self.pki.serverRoot.certificate, self.intermediate.certificate], b"s3cret"
        ))
        self.write("plain.p12", pki.pkcs12Bytes(self.server, [self.intermediate.certificate]))
        self.write("password", b"s3cret\n")
        self.write("wrong-password", b"nope\n")
        self.write("server.pem", pki.chainPEM([self.server.certificate, self.intermediate.certificate]))
        self.write("server-encrypted.key", pki.keyPEM(self.server.key, b"s3cret"))
        self.write("www.pem", pki.certificatePEM(self.pki.www.certificate))
        self.write("www.key", pki.keyPEM(self.pki.www.key))
        self.write("api-clients.pem", pki.certificatePEM(self.pki.apiClients.certificate))
        self.write("api-clients.crl", pki.crlPEM(self.pki.apiCRL))
        self.write("partner.crl", pki.crlPEM(self.pki.partnerCRL))

    def write(self, name: str, data: bytes) -> str:
        import os

        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def check(self, entries: str, listener: str = "") -> Any:
        """
        Load and check a configuration with C{entries} as its certificate
        tables; return the listener's material.
        """
        import os
        from datetime import datetime, timezone

        from mtlsproxy.checks import checkConfiguration
        from mtlsproxy.config import loadConfig

        self.config = os.path.join(self.dir, "proxy.toml")
        with open(self.config, "w") as f:
            f.write(
                '[[listeners]]\nname = "web"\nendpoint = "tcp:0"\nprotocol = "tls"\n'
                f'pool = "app"\n{listener}\n{entries}\n'
                '[[pools]]\nname = "app"\n[[pools.members]]\naddress = "127.0.0.1"\nport = 1\n'
            )
        return checkConfiguration(loadConfig(self.config), datetime.now(timezone.utc)).listeners["web"]

    def assertCheckError(self, entries: str, message: str, listener: str = "") -> None:
        from mtlsproxy.errors import ConfigurationError

        error = self.assertRaises(ConfigurationError, self.check, entries, listener)
        self.assertEqual(str(error), f"{self.config}: {message}")

    def assertServes(self, material: ListenerMaterial, entries: int = 1) -> None:
        """
        A client gets the PKCS#12 certificate with its intermediate.
        """
        listener = siteListener(
            certificates=tuple(CertificateConfig("/x", "/y") for _ in range(entries))
        )
        factory = serverContextFactory(listener, material)
        client = NamedClient(self.pki.serverRoot.certificate, b"p12.example.com", None, TLS13)
        result = inMemory(factory, client)
        self.assertTrue(result.accepted, result.clientError())
        chain = result.clientConnection.get_peer_cert_chain(as_cryptography=True)
        self.assertEqual(chain, [self.server.certificate, self.intermediate.certificate])

    def test_pkcs12PasswordFile(self) -> None:
        """
        When the PKCS#12 file's password is in a file (final line break not
        part of it), the certificate, key and intermediate are loaded, the
        root left out, and clients are served the chain.
        """
        material = self.check('[[listeners.certificates]]\npkcs12 = "server.p12"\npassword_file = "password"\n')
        self.assertEqual(material.chain, (self.server.certificate, self.intermediate.certificate))
        self.assertServes(material)
        self.assertEqual(material.sourceOf(self.server.certificate), f"{self.dir}/server.p12")

    def test_pkcs12PasswordEnv(self) -> None:
        """
        When the password is in an environment variable, it is used.
        """
        import os

        os.environ["MTLSPROXY_TEST_P12"] = "s3cret"
        self.addCleanup(os.environ.pop, "MTLSPROXY_TEST_P12")
        material = self.check(
            '[[listeners.certificates]]\npkcs12 = "server.p12"\npassword_env = "MTLSPROXY_TEST_P12"\n'
        )
        self.assertServes(material)

    def test_pkcs12Unencrypted(self) -> None:
        """
        When the PKCS#12 file has no password, none is needed.
        """
        self.assertServes(self.check('[[listeners.certificates]]\npkcs12 = "plain.p12"\n'))

    def test_pkcs12WrongPassword(self) -> None:
        """
        When the password is wrong, the error names the pkcs12 key and the
        file, without a traceback.
        """
        self.assertCheckError(
            '[[listeners.certificates]]\npkcs12 = "server.p12"\npassword_file = "wrong-password"\n',
            f"listeners[0].certificates[0].pkcs12: wrong password for the PKCS#12 file"
            f" {self.dir}/server.p12",
        )

    def test_pkcs12NoPassword(self) -> None:
        """
        When the PKCS#12 file is encrypted and no password is configured,
        the error says how to give one.
        """
        self.assertCheckError(
            '[[listeners.certificates]]\npkcs12 = "server.p12"\n',
            f"listeners[0].certificates[0].pkcs12: the PKCS#12 file {self.dir}/server.p12 is"
            " encrypted; give its password with password_file or password_env in the same"
            " [[listeners.certificates]] table",
        )

    def test_notPKCS12(self) -> None:
        """
        When the file is not PKCS#12, the error says so.
        """
        self.assertCheckError(
            '[[listeners.certificates]]\npkcs12 = "server.pem"\npassword_file = "password"\n',
            f"listeners[0].certificates[0].pkcs12: {self.dir}/server.pem is not a PKCS#12 file",
        )

    def test_passwordEnvMissing(self) -> None:
        """
        When the environment variable is not set, the error names it.
        """
        self.assertCheckError(
            '[[listeners.certificates]]\npkcs12 = "server.p12"\npassword_env = "MTLSPROXY_NOT_SET_ANYWHERE"\n',
            "listeners[0].certificates[0].password_env: environment variable"
            " MTLSPROXY_NOT_SET_ANYWHERE is not set",
        )

    def test_encryptedPEMKey(self) -> None:
        """
        When a PEM key is encrypted and its password given, it is used; a
        wrong password is an error naming the key path and file.
        """
        material = self.check(
            '[[listeners.certificates]]\ncert = "server.pem"\nkey = "server-encrypted.key"\n'
            'password_file = "password"\n'
        )
        self.assertServes(material)
        self.assertCheckError(
            '[[listeners.certificates]]\ncert = "server.pem"\nkey = "server-encrypted.key"\n'
            'password_file = "wrong-password"\n',
            "listeners[0].certificates[0].key: wrong password for the encrypted private key"
            f" in {self.dir}/server-encrypted.key",
        )

    def test_pkcs12AndPEM(self) -> None:
        """
        When an entry has both pkcs12 and cert, the loader refuses it; one
        with neither too.
        """
        self.assertCheckError(
            '[[listeners.certificates]]\npkcs12 = "server.p12"\ncert = "server.pem"\n',
            "listeners[0].certificates[0].cert: pkcs12 replaces cert and key: set either"
            " pkcs12, or cert and key",
        )
        self.assertCheckError(
            '[[listeners.certificates]]\npassword_file = "password"\n',
            "listeners[0].certificates[0]: missing required key 'cert' (or pkcs12 instead"
            " of cert and key)",
        )
        self.assertCheckError(
            '[[listeners.certificates]]\npkcs12 = "server.p12"\npassword_file = "password"\n'
            'password_env = "X"\n',
            "listeners[0].certificates[0].password_env: password_file and password_env are"
            " alternatives: set one",
        )

    def test_perEntryTrust(self) -> None:
        """
        When an entry has its own client_auth, CAs and CRLs, they are loaded
        for it (the listener has none) and its names require client
        certificates from that CA.
        """
        material = self.check(
            '[[listeners.certificates]]\ncert = "www.pem"\nkey = "www.key"\n'
            '[[listeners.certificates]]\npkcs12 = "server.p12"\npassword_file = "password"\n'
            'client_auth = "required"\nca_certificates = ["api-clients.pem"]\n'
            'crls = ["api-clients.crl"]\ndefault = true\n'
        )
        entry = material.certificates[1]
        self.assertEqual(entry.cas, (self.pki.apiClients.certificate,))
        self.assertEqual(entry.crls, (self.pki.apiCRL,))
        self.assertEqual(material.trustOf(material.certificates[0]), ((), ()))
        self.assertEqual(entry.names, ("p12.example.com",))

    def test_perEntryCRLMustMatchItsCAs(self) -> None:
        """
        When an entry's CRL was not issued by the entry's CAs, the error
        names the entry's key path.
        """
        self.assertCheckError(
            '[[listeners.certificates]]\ncert = "www.pem"\nkey = "www.key"\n'
            'client_auth = "required"\nca_certificates = ["api-clients.pem"]\n'
            'crls = ["partner.crl"]\n',
            f"listeners[0].certificates[0].crls[0]: the CRL in {self.dir}/partner.crl was"
            " issued by CN=Partner Clients, which is not one of the configured CA"
            " certificates (CN=API Clients)",
        )

    def test_perEntryClientAuthNeedsCAs(self) -> None:
        """
        When an entry requires client certificates and neither it nor the
        listener has CAs, the error names the entry.
        """
        self.assertCheckError(
            '[[listeners.certificates]]\ncert = "www.pem"\nkey = "www.key"\n'
            '[[listeners.certificates]]\ncert = "www.pem"\nkey = "www.key"\n'
            'client_auth = "optional"\n',
            'listeners[0].certificates[1].ca_certificates: client_auth = "optional" needs'
            " at least one CA file to verify client certificates with",
        )

    def test_twoDefaults(self) -> None:
        """
        When two entries are marked default, the second is refused.
        """
        self.assertCheckError(
            '[[listeners.certificates]]\ncert = "www.pem"\nkey = "www.key"\ndefault = true\n'
            '[[listeners.certificates]]\ncert = "www.pem"\nkey = "www.key"\ndefault = true\n',
            "listeners[0].certificates[1].default: only one certificate may be the default;"
            " certificates[0] is already",
        )
