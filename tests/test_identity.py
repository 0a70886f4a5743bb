# -*- test-case-name: tests.test_identity -*-
"""
Tests for L{mtlsproxy.identity}: identity headers, PROXY v2 TLVs, and what
the TLS layer tells about a client (in memory, over iosim), including
C{client_auth = "passthrough"} in L{mtlsproxy.verify}.
"""

from __future__ import annotations

import base64
import struct
from typing import Any, Optional
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto
from proxyprotocol.tlv import ProxyProtocolTLV
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.test.iosim import connect
from twisted.trial.unittest import SynchronousTestCase

from mtlsproxy import pki
from mtlsproxy.identity import (
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_CERT_SESS,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_KEY_ALG,
    PP2_SUBTYPE_SSL_SIG_ALG,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_MTLSPROXY_CERTIFICATE,
    PP2_TYPE_SSL,
    ClientTLSInfo,
    identityHeaders,
    isIdentityHeader,
    sslTLVs,
    tlsInfoOf,
    tlv,
    verifyStatus,
    xfccHeader,
)
from mtlsproxy.tlsproto import HalfCloseTLSFactory, HalfCloseTLSProtocol
from mtlsproxy.verify import PASSTHROUGH_FORMAT, ClientCertificateVerifier, ClientIdentity
from tests.test_tlsproto import ClientCreator, PausableFakeTransport, ServerCreator

_certs: dict[str, Any] = {}


def certs() -> dict[str, Any]:
    """
    A root, an intermediate, a client with URI and DNS names under it, one
    with a non-ASCII name, a server, and a client from an untrusted root
    (generated once).
    """
    if not _certs:
        root = pki.createRootCA("Identity Root")
        inter = pki.createIntermediateCA(root, "Identity Inter")
        _certs.update(
            root=root,
            inter=inter,
            client=pki.issueClientCertificate(
                inter,
                "svc-a",
                uris=["spiffe://example.org/ns/a/sa/svc", "https://x.example/a;b"],
                dnsNames=["svc-a.example.org", "alt.example.org"],
            ),
            unicode=pki.issueClientCertificate(inter, "Zoë \"Q\", Müller"),
            server=pki.issueServerCertificate(inter, "localhost", dnsNames=["localhost"]),
            untrusted=pki.issueClientCertificate(pki.createRootCA("Rogue Root"), "rogue"),
        )
    return _certs


def info(name: str = "client", **kwargs: Any) -> ClientTLSInfo:
    issued = certs()[name]
    defaults: dict[str, Any] = dict(
        tls=True,
        version="TLSv1.3",
        cipher="TLS_AES_256_GCM_SHA384",
        sni="app.example.org",
        identity=ClientIdentity.fromCertificate(issued.certificate),
        chain=(certs()["inter"].certificate,),
    )
    defaults.update(kwargs)
    return ClientTLSInfo(**defaults)


def parseXFCC(value: bytes) -> list[tuple[str, str]]:
    """
    Split one XFCC element into key/value pairs (an independent reading of
    Envoy's grammar: C{;}-separated, values optionally double-quoted with
    backslash escapes).
    """
    text = value.decode("ascii")
    pairs = []
    i = 0
    while i < len(text):
        key, _, rest = text[i:].partition("=")
        i += len(key) + 1
        if text[i:i + 1] == '"':
            i += 1
            out = []
            while text[i] != '"':
                if text[i] == "\\":
                    i += 1
                out.append(text[i])
                i += 1
            i += 1
            val = "".join(out)
        else:
            end = text.find(";", i)
            end = len(text) if end < 0 else end
            val = text[i:end]
            i = end
        pairs.append((key, val))
        if text[i:i + 1] == ";":
            i += 1
    return pairs


class HeaderNameTests(SynchronousTestCase):
    """
    L{isIdentityHeader}.
    """

    def test_identityHeaders(self) -> None:
        """
        Every header of the three formats is an identity header, in any
        case; ordinary headers are not.
        """
        for name in (b"X-Forwarded-Client-Cert", b"client-cert", b"CLIENT-CERT-CHAIN",
                     b"X-SSL-Client-Subject", b"x-ssl-client-verify", b"X-SSL-Client-Whatever"):
            self.assertTrue(isIdentityHeader(name), name)
        for name in (b"Host", b"X-Forwarded-For", b"X-SSL-Cipher", b"Client-Certificate-Hint"):
            self.assertFalse(isIdentityHeader(name), name)


class HeaderValueTests(SynchronousTestCase):
    """
    L{identityHeaders}.
    """

    def test_none(self) -> None:
        """
        C{"none"} adds nothing.
        """
        self.assertEqual(identityHeaders("none", info()), [])

    def test_xfcc(self) -> None:
        """
        XFCC carries the SHA-256 of the DER, the RFC 4514 subject, and each
        URI and DNS name, in Envoy's order, values with separators quoted.
        """
        [(name, value)] = identityHeaders("xfcc", info())
        self.assertEqual(name, b"X-Forwarded-Client-Cert")
        identity = info().identity
        assert identity is not None
        self.assertEqual(
            parseXFCC(value),
            [
                ("Hash", identity.fingerprint),
                ("Subject", "CN=svc-a"),
                ("URI", "spiffe://example.org/ns/a/sa/svc"),
                ("URI", "https://x.example/a;b"),
                ("DNS", "svc-a.example.org"),
                ("DNS", "alt.example.org"),
            ],
        )

    def test_xfccCert(self) -> None:
        """
        With C{xfcc_include_cert}, C{Cert=} holds the URL-encoded PEM.
        """
        [(_, value)] = identityHeaders("xfcc", info(), includeCertificate=True)
        cert = dict(parseXFCC(value))["Cert"]
        self.assertEqual(
            x509.load_pem_x509_certificate(unquote(cert).encode()),
            certs()["client"].certificate,
        )

    def test_xfccNoCertificate(self) -> None:
        """
        Without a client certificate there is no XFCC header.
        """
        self.assertEqual(identityHeaders("xfcc", info(identity=None)), [])
        self.assertIsNone(xfccHeader(info(identity=None), False))

    def test_rfc9440(self) -> None:
        """
        C{Client-Cert} is the leaf's DER as an RFC 8941 byte sequence,
        C{Client-Cert-Chain} the intermediates, comma separated.
        """
        headers = dict(identityHeaders("rfc9440", info()))
        value = headers[b"Client-Cert"]
        self.assertTrue(value.startswith(b":") and value.endswith(b":"))
        self.assertEqual(
            base64.b64decode(value[1:-1]), certs()["client"].certificate.public_bytes(Encoding.DER)
        )
        chain = [base64.b64decode(item.strip()[1:-1]) for item in headers[b"Client-Cert-Chain"].split(b",")]
        self.assertEqual(chain, [certs()["inter"].certificate.public_bytes(Encoding.DER)])

    def test_simple(self) -> None:
        """
        C{simple} sends the subject, issuer, serial, fingerprint, escaped
        PEM and C{SUCCESS}.
        """
        headers = dict(identityHeaders("simple", info()))
        identity = info().identity
        assert identity is not None
        self.assertEqual(headers[b"X-SSL-Client-Subject"], b"CN=svc-a")
        self.assertEqual(headers[b"X-SSL-Client-Issuer"], b"CN=Identity Inter")
        self.assertEqual(headers[b"X-SSL-Client-Serial"], identity.serial.encode())
        self.assertEqual(headers[b"X-SSL-Client-Fingerprint"], identity.fingerprint.encode())
        self.assertEqual(headers[b"X-SSL-Client-Verify"], b"SUCCESS")
        pem = unquote(headers[b"X-SSL-Client-Cert"].decode()).encode()
        self.assertEqual(x509.load_pem_x509_certificate(pem), certs()["client"].certificate)

    def test_simpleFailedAndNone(self) -> None:
        """
        A certificate that failed (passthrough) gives C{FAILED:<reason>}, no
        certificate C{NONE} (and no other identity header).
        """
        failed = dict(identityHeaders("simple", info(verifyFailure="unknown_ca")))
        self.assertEqual(failed[b"X-SSL-Client-Verify"], b"FAILED:unknown_ca")
        self.assertEqual(identityHeaders("simple", info(identity=None)), [(b"X-SSL-Client-Verify", b"NONE")])

    def test_passthroughAddsVerify(self) -> None:
        """
        On a passthrough listener, C{xfcc} and C{rfc9440} also carry
        C{X-SSL-Client-Verify}.
        """
        for mode in ("xfcc", "rfc9440"):
            headers = dict(identityHeaders(mode, info(verifyFailure="expired"), passthrough=True))
            self.assertEqual(headers[b"X-SSL-Client-Verify"], b"FAILED:expired")

    def test_nonASCIIEscaped(self) -> None:
        """
        A subject with non-ASCII characters is sent as ASCII with RFC 4514
        hex escapes; quotes are escaped in XFCC.
        """
        unicodeInfo = info("unicode")
        headers = dict(identityHeaders("simple", unicodeInfo))
        subject = headers[b"X-SSL-Client-Subject"]
        subject.decode("ascii")
        self.assertIn(b"Zo\\C3\\AB", subject)
        [(_, value)] = identityHeaders("xfcc", unicodeInfo)
        self.assertIn("Zo\\C3\\AB", dict(parseXFCC(value))["Subject"])

    def test_verifyStatus(self) -> None:
        """
        L{verifyStatus} names the three cases.
        """
        self.assertEqual(verifyStatus(info()), "SUCCESS")
        self.assertEqual(verifyStatus(info(identity=None)), "NONE")
        self.assertEqual(verifyStatus(info(verifyFailure="revoked")), "FAILED:revoked")

    def test_unknownMode(self) -> None:
        """
        An unknown mode is a programming error.
        """
        self.assertRaises(ValueError, identityHeaders, "json", info())


def parseTLVs(data: bytes) -> list[tuple[int, bytes]]:
    """
    A TLV reader written from the PROXY protocol specification (section
    2.2.7), independent of the encoder.
    """
    out = []
    while data:
        kind, length = struct.unpack("!BH", data[:3])
        value, data = data[3:3 + length], data[3 + length:]
        assert len(value) == length, "truncated TLV"
        out.append((kind, value))
    return out


class TLVTests(SynchronousTestCase):
    """
    L{sslTLVs}, read back with a parser from the specification and with the
    C{proxy-protocol} package.
    """

    def test_notTLS(self) -> None:
        """
        A connection that is not TLS has no TLVs.
        """
        self.assertEqual(sslTLVs(ClientTLSInfo()), b"")

    def test_verifiedClient(self) -> None:
        """
        A verified client gives AUTHORITY (SNI) and SSL with client bits
        SSL, CERT_CONN and CERT_SESS, verify 0, version, cipher, CN and the
        certificate's algorithms.
        """
        data = sslTLVs(info())
        tlvs = dict(parseTLVs(data))
        self.assertEqual(tlvs[PP2_TYPE_AUTHORITY], b"app.example.org")
        ssl = tlvs[PP2_TYPE_SSL]
        client, verify = struct.unpack("!BI", ssl[:5])
        self.assertEqual(client, PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS)
        self.assertEqual(verify, 0)
        subs = dict(parseTLVs(ssl[5:]))
        self.assertEqual(subs[PP2_SUBTYPE_SSL_VERSION], b"TLSv1.3")
        self.assertEqual(subs[PP2_SUBTYPE_SSL_CIPHER], b"TLS_AES_256_GCM_SHA384")
        self.assertEqual(subs[PP2_SUBTYPE_SSL_CN], b"svc-a")
        self.assertEqual(subs[PP2_SUBTYPE_SSL_SIG_ALG], b"ecdsa-with-SHA256")
        self.assertEqual(subs[PP2_SUBTYPE_SSL_KEY_ALG], b"EC256")
        self.assertNotIn(PP2_TYPE_MTLSPROXY_CERTIFICATE, tlvs)

        # The same, read by the proxy-protocol package.
        parsed = ProxyProtocolTLV(data)
        self.assertEqual(parsed.authority, "app.example.org")
        self.assertTrue(parsed.ssl.has_ssl)
        self.assertTrue(parsed.ssl.has_cert_conn)
        self.assertTrue(parsed.ssl.verified)
        self.assertEqual(parsed.ssl.version, "TLSv1.3")
        self.assertEqual(parsed.ssl.cn, "svc-a")
        self.assertEqual(parsed.ssl.cipher, "TLS_AES_256_GCM_SHA384")

    def test_certificateTLV(self) -> None:
        """
        With the certificate option, TLV 0xE0 holds the leaf's DER.
        """
        tlvs = dict(parseTLVs(sslTLVs(info(), includeCertificate=True)))
        self.assertEqual(
            tlvs[PP2_TYPE_MTLSPROXY_CERTIFICATE],
            certs()["client"].certificate.public_bytes(Encoding.DER),
        )

    def test_failedAndAbsent(self) -> None:
        """
        A certificate that failed verification gives OpenSSL's error number
        as verify; no certificate gives verify 1 and only the SSL bit.
        """
        failed = dict(parseTLVs(sslTLVs(info(verifyFailure="unknown_ca", verifyErrorNumber=20))))
        self.assertEqual(struct.unpack("!BI", failed[PP2_TYPE_SSL][:5])[1], 20)
        parsed = ProxyProtocolTLV(sslTLVs(info(verifyFailure="unknown_ca", verifyErrorNumber=20)))
        self.assertFalse(parsed.ssl.verified)
        none = dict(parseTLVs(sslTLVs(info(identity=None, sni=None))))
        self.assertNotIn(PP2_TYPE_AUTHORITY, none)
        self.assertEqual(struct.unpack("!BI", none[PP2_TYPE_SSL][:5]), (PP2_CLIENT_SSL, 1))
        self.assertNotIn(PP2_SUBTYPE_SSL_CN, dict(parseTLVs(none[PP2_TYPE_SSL][5:])))

    def test_resumed(self) -> None:
        """
        On a resumed session the certificate was presented in an earlier
        connection: CERT_SESS without CERT_CONN.
        """
        ssl = dict(parseTLVs(sslTLVs(info(resumed=True))))[PP2_TYPE_SSL]
        self.assertEqual(ssl[0], PP2_CLIENT_SSL | PP2_CLIENT_CERT_SESS)

    def test_tlvTooLong(self) -> None:
        """
        A value longer than 65535 bytes cannot be encoded.
        """
        self.assertEqual(tlv(0xE1, b"ab"), b"\xe1\x00\x02ab")
        self.assertRaises(ValueError, tlv, 0xE1, b"x" * 65536)


# ---------------------------------------------------------------------------
# From a real (in-memory) handshake
# ---------------------------------------------------------------------------


class _Quiet(Protocol):
    pass


def _handshake(clientName: Optional[str], passthrough: bool) -> HalfCloseTLSProtocol:
    """
    A TLS 1.3 handshake over iosim against a server that trusts the
    identity root; returns the server's TLS protocol.
    """
    c = certs()
    verifier = ClientCertificateVerifier.create(
        "l", authorities=[c["root"].certificate], passthrough=passthrough
    )
    server = SSL.Context(SSL.TLS_SERVER_METHOD)
    server.use_certificate(crypto.X509.from_cryptography(c["server"].certificate))
    server.use_privatekey(crypto.PKey.from_cryptography_key(c["server"].key))
    server.get_cert_store().add_cert(crypto.X509.from_cryptography(c["root"].certificate))
    server.set_verify(SSL.VERIFY_PEER, verifier.verifyCallback)
    server.set_app_data(verifier)
    client = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client.set_verify(SSL.VERIFY_NONE)
    if clientName is not None:
        issued = c[clientName]
        client.use_certificate(crypto.X509.from_cryptography(issued.certificate))
        client.use_privatekey(crypto.PKey.from_cryptography_key(issued.key))
        if clientName != "untrusted":
            client.add_extra_chain_cert(crypto.X509.from_cryptography(c["inter"].certificate))
    clock = Clock()
    serverTLS = HalfCloseTLSFactory(ServerCreator(server), False, Factory.forProtocol(_Quiet), clock=clock).buildProtocol(None)
    clientTLS = HalfCloseTLSFactory(ClientCreator(client), True, Factory.forProtocol(_Quiet), clock=clock).buildProtocol(None)
    assert isinstance(serverTLS, HalfCloseTLSProtocol) and isinstance(clientTLS, HalfCloseTLSProtocol)
    pump = connect(
        serverTLS, PausableFakeTransport(serverTLS, isServer=True),
        clientTLS, PausableFakeTransport(clientTLS, isServer=False),
        greet=False, clock=clock,
    )
    pump.flush()
    return serverTLS


class TLSInfoTests(SynchronousTestCase):
    """
    L{tlsInfoOf} after real handshakes, and passthrough verification.
    """

    def test_verifiedClient(self) -> None:
        """
        After a verified handshake the info has the version, cipher, SNI,
        identity and the intermediate the client sent, and no failure.
        """
        serverTLS = _handshake("client", passthrough=False)
        result = tlsInfoOf(serverTLS)
        self.assertTrue(result.tls)
        self.assertEqual(result.version, "TLSv1.3")
        self.assertEqual(result.sni, "localhost")
        self.assertIsNotNone(result.cipher)
        assert result.identity is not None
        self.assertEqual(result.identity.commonName, "svc-a")
        self.assertEqual(result.chain, (certs()["inter"].certificate,))
        self.assertTrue(result.verified)
        self.assertFalse(result.resumed)

    def test_passthroughRecordsFailure(self) -> None:
        """
        When a passthrough listener gets a certificate from an unknown CA,
        the handshake completes and the info says C{unknown_ca}, with
        OpenSSL's error number; the event is logged at info level.
        """
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher

        observer = EventLoggingObserver()
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        serverTLS = _handshake("untrusted", passthrough=True)
        self.assertTrue(serverTLS._handshakeDone)
        result = tlsInfoOf(serverTLS)
        assert result.identity is not None
        self.assertEqual(result.identity.commonName, "rogue")
        self.assertEqual(result.verifyFailure, "unknown_ca")
        self.assertIn(result.verifyErrorNumber, (2, 18, 19, 20, 21))
        self.assertFalse(result.verified)
        self.assertEqual(verifyStatus(result), "FAILED:unknown_ca")
        events = [e for e in observer if e.get("log_format") == PASSTHROUGH_FORMAT]
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["reason"], "unknown_ca")

    def test_withoutPassthroughRejected(self) -> None:
        """
        The same certificate without passthrough fails the handshake.
        """
        serverTLS = _handshake("untrusted", passthrough=False)
        self.assertFalse(serverTLS._handshakeDone)
        self.flushLoggedErrors()

    def test_passthroughNoCertificate(self) -> None:
        """
        A passthrough listener lets a client without certificate in: NONE.
        """
        serverTLS = _handshake(None, passthrough=True)
        result = tlsInfoOf(serverTLS)
        self.assertIsNone(result.identity)
        self.assertEqual(verifyStatus(result), "NONE")
