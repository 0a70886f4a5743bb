# -*- test-case-name: tests.test_identity -*-
"""
The client's TLS identity as handed to backends: HTTP request headers for
C{https} listeners, PROXY protocol v2 TLVs for pools with
C{proxy_protocol = "v2"}.

L{tlsInfoOf} reads once, after the handshake, everything a backend may be
told about a client connection (L{ClientTLSInfo}).  Then:

  - L{identityHeaders} renders it in one of the header formats of
    C{client_identity_headers} (see C{docs/client-identity.md}):

      - C{"xfcc"}: Envoy's C{X-Forwarded-Client-Cert}
        (C{Hash=...;Cert="...";Subject="...";URI=...;DNS=...});
      - C{"rfc9440"}: C{Client-Cert} and C{Client-Cert-Chain} (RFC 9440
        byte sequences, C{:base64 DER:});
      - C{"simple"}: C{X-SSL-Client-Subject}, C{-Issuer}, C{-Serial},
        C{-Fingerprint}, C{-Cert}, C{-Verify}.

  - L{isIdentityHeader} names every header of all three formats: the HTTP
    proxy removes those from every request, whatever the setting, so that a
    client can never forge its identity.

  - L{sslTLVs} encodes the PROXY protocol v2 TLVs (C{PP2_TYPE_AUTHORITY},
    C{PP2_TYPE_SSL} with its sub-TLVs, and optionally the DER certificate
    in the custom TLV L{PP2_TYPE_MTLSPROXY_CERTIFICATE}).

Nothing here does I/O; all of it is computed from the connection's
L{OpenSSL.SSL.Connection} and the certificates it holds.
"""

from __future__ import annotations

import base64
import struct
from typing import Any, Final, Optional
from urllib.parse import quote

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto

from .verify import ClientIdentity, verificationFailure

__all__ = [
    "HEADER_MODES",
    "IDENTITY_HEADERS",
    "IDENTITY_HEADER_PREFIX",
    "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_CERT_SESS",
    "PP2_CLIENT_SSL",
    "PP2_SUBTYPE_SSL_CIPHER",
    "PP2_SUBTYPE_SSL_CN",
    "PP2_SUBTYPE_SSL_KEY_ALG",
    "PP2_SUBTYPE_SSL_SIG_ALG",
    "PP2_SUBTYPE_SSL_VERSION",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_MTLSPROXY_CERTIFICATE",
    "PP2_TYPE_SSL",
    "ClientTLSInfo",
    "identityHeaders",
    "isIdentityHeader",
    "sslTLVs",
    "tlsInfoOf",
    "tlv",
    "verifyStatus",
]

# ---------------------------------------------------------------------------
# What the TLS layer knows about the client
# ---------------------------------------------------------------------------


@attrs.frozen
class ClientTLSInfo:
    """
    Everything a backend may be told about a client connection.

    @ivar tls: The connection is TLS (C{False} on a C{tcp} listener: then
        every other field is empty).
    @ivar version: The protocol version as OpenSSL names it
        (C{"TLSv1.3"}), or L{None}.
    @ivar cipher: The cipher suite as OpenSSL names it, or L{None}.
    @ivar sni: The server name the client asked for, or L{None}.
    @ivar identity: The client's certificate, or L{None} if it sent none.
        It is verified unless C{verifyFailure} says otherwise (only a
        C{client_auth = "passthrough"} listener accepts a certificate that
        failed verification).
    @ivar chain: The other certificates the client sent (its
        intermediates), leaf excluded, in the order sent.
    @ivar verifyFailure: Why verification failed (a reason of
        L{mtlsproxy.verify}, C{"unknown_ca"}, C{"expired"}, ...), or
        L{None}.
    @ivar verifyErrorNumber: OpenSSL's C{X509_V_ERR_*} number of that
        failure, 0 if none.
    @ivar resumed: The session was resumed (the certificate was presented
        in an earlier connection of the session).
    """

    tls: bool = False
    version: Optional[str] = None
    cipher: Optional[str] = None
    sni: Optional[str] = None
    identity: Optional[ClientIdentity] = None
    chain: tuple[x509.Certificate, ...] = attrs.field(default=(), eq=False, repr=False)
    verifyFailure: Optional[str] = None
    verifyErrorNumber: int = 0
    resumed: bool = False

    @property
    def verified(self) -> bool:
        """
        The client presented a certificate and it was verified.
        """
        return self.identity is not None and self.verifyFailure is None


def tlsInfoOf(transport: Any) -> ClientTLSInfo:
    """
    Read what the TLS layer knows about an established client connection.

    @param transport: The protocol's transport: a TLS transport (a
        L{twisted.protocols.tls.TLSMemoryBIOProtocol}) whose C{getHandle()}
        is the L{SSL.Connection}; anything else gives a
        L{ClientTLSInfo} with C{tls=False}.
    """
    getHandle = getattr(transport, "getHandle", None)
    handle = getHandle() if getHandle is not None else None
    if not isinstance(handle, SSL.Connection):
        return ClientTLSInfo()
    servername = handle.get_servername()
    leaf = handle.get_peer_certificate(as_cryptography=True)
    identity = ClientIdentity.fromCertificate(leaf) if leaf is not None else None
    chain: tuple[x509.Certificate, ...] = ()
    if leaf is not None:
        sent = handle.get_peer_cert_chain(as_cryptography=True) or []
        chain = tuple(c for c in sent if c != leaf)
    failure = verificationFailure(handle) if leaf is not None else None
    return ClientTLSInfo(
        tls=True,
        version=handle.get_protocol_version_name(),
        cipher=handle.get_cipher_name(),
        sni=servername.decode("ascii", "replace") if servername else None,
        identity=identity,
        chain=chain,
        verifyFailure=failure[0] if failure else None,
        verifyErrorNumber=failure[1] if failure else 0,
        resumed=_sessionReused(handle),
    )


def _sessionReused(connection: SSL.Connection) -> bool:
    """
    Was the session of C{connection} resumed?  (pyOpenSSL has no public
    wrapper for C{SSL_session_reused}; this is the binding Twisted's
    C{_sslverify} also reaches into.)
    """
    try:
        from OpenSSL._util import lib

        return bool(lib.SSL_session_reused(connection._ssl))  # type: ignore[attr-defined]
    except Exception:
        return False


# ---------------------------------------------------------------------------
# HTTP headers
# ---------------------------------------------------------------------------

HEADER_MODES: Final = ("none", "xfcc", "rfc9440", "simple")
"""
The values of C{client_identity_headers}.
"""

XFCC: Final = b"x-forwarded-client-cert"
CLIENT_CERT: Final = b"client-cert"
CLIENT_CERT_CHAIN: Final = b"client-cert-chain"

IDENTITY_HEADERS: Final = frozenset([XFCC, CLIENT_CERT, CLIENT_CERT_CHAIN])
"""
Identity headers by exact (lower-case) name.
"""

IDENTITY_HEADER_PREFIX: Final = b"x-ssl-client-"
"""
Every header whose (lower-case) name starts with this is an identity
header too (C{X-SSL-Client-Subject}, C{X-SSL-Client-Verify}, ...).
"""


def isIdentityHeader(name: bytes) -> bool:
    """
    Is C{name} (any case) one of the headers through which backends learn
    the client's identity, in any of the supported formats?  Such headers
    are removed from every client request.
    """
    lowered = name.lower()
    return lowered in IDENTITY_HEADERS or lowered.startswith(IDENTITY_HEADER_PREFIX)


def _ascii(text: str) -> str:
    """
    Make a distinguished name (RFC 4514) safe for a header value: every
    character outside printable ASCII becomes its UTF-8 bytes as RFC 4514
    C{\\XX} escapes, which keeps the string a valid RFC 4514 name.
    """
    if text.isascii() and text.isprintable():
        return text
    out = []
    for c in text:
        if " " <= c <= "~":
            out.append(c)
        else:
            out.extend(f"\\{b:02X}" for b in c.encode("utf-8"))
    return "".join(out)


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(Encoding.PEM).decode("ascii")


def _urlEncodedPEM(certificate: x509.Certificate) -> str:
    """
    The certificate's PEM, percent-encoded (everything but unreserved
    characters), as Envoy's C{Cert=} and nginx's
    C{$ssl_client_escaped_cert} carry it.
    """
    return quote(_pem(certificate), safe="")


def _xfccQuoted(value: str) -> str:
    """
    An XFCC value in double quotes, with C{"} and C{\\} escaped.
    """
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _xfccValue(value: str) -> str:
    """
    An XFCC value, quoted if it holds a separator (C{,;=}), a quote or a
    space.
    """
    value = _ascii(value)
    if any(c in value for c in ',;=" \\'):
        return _xfccQuoted(value)
    return value


def _sans(certificate: x509.Certificate) -> tuple[list[str], list[str]]:
    """
    The URI and DNS subject alternative names of a certificate.
    """
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return ([], [])
    uris = [str(u) for u in names.get_values_for_type(x509.UniformResourceIdentifier)]
    dns = [str(d) for d in names.get_values_for_type(x509.DNSName)]
    return (uris, dns)


def verifyStatus(info: ClientTLSInfo) -> str:
    """
    The C{X-SSL-Client-Verify} value: C{"SUCCESS"} for a verified
    certificate, C{"FAILED:<reason>"} for one that failed verification (on
    a C{client_auth = "passthrough"} listener), C{"NONE"} without a
    certificate (nginx's C{$ssl_client_verify} values).
    """
    if info.identity is None:
        return "NONE"
    if info.verifyFailure is not None:
        return "FAILED:" + _ascii(info.verifyFailure)
    return "SUCCESS"


def xfccHeader(info: ClientTLSInfo, includeCertificate: bool) -> Optional[bytes]:
    """
    The C{X-Forwarded-Client-Cert} value (Envoy's format, one element), or
    L{None} without a client certificate: C{Hash} (SHA-256 of the DER, hex),
    C{Cert} (URL-encoded PEM) if C{includeCertificate}, C{Subject} (RFC
    4514), then a C{URI} and a C{DNS} pair for each such subject
    alternative name.
    """
    identity = info.identity
    if identity is None:
        return None
    parts = [f"Hash={identity.fingerprint}"]
    if includeCertificate:
        parts.append(f"Cert={_xfccQuoted(_urlEncodedPEM(identity.certificate))}")
    parts.append(f"Subject={_xfccQuoted(_ascii(identity.subject))}")
    uris, dns = _sans(identity.certificate)
    parts.extend(f"URI={_xfccValue(uri)}" for uri in uris)
    parts.extend(f"DNS={_xfccValue(name)}" for name in dns)
    return ";".join(parts).encode("ascii")


def _byteSequence(certificate: x509.Certificate) -> str:
    """
    An RFC 8941 byte sequence of the DER: C{:base64:}.
    """
    return ":" + base64.b64encode(certificate.public_bytes(Encoding.DER)).decode("ascii") + ":"


def identityHeaders(
    mode: str, info: ClientTLSInfo, includeCertificate: bool = False, passthrough: bool = False
) -> list[tuple[bytes, bytes]]:
    """
    The identity headers to add to every request of a client connection.

    @param mode: One of L{HEADER_MODES}.
    @param info: The connection, from L{tlsInfoOf}.
    @param includeCertificate: C{xfcc_include_cert}: add C{Cert=} to XFCC.
    @param passthrough: The listener has C{client_auth = "passthrough"}:
        C{xfcc} and C{rfc9440}, which have no field for it, get the
        verification result in C{X-SSL-Client-Verify} as well.
    @raise ValueError: For an unknown C{mode}.
    """
    if mode not in HEADER_MODES:
        raise ValueError(f"unknown client_identity_headers {mode!r}")
    headers: list[tuple[bytes, bytes]] = []
    identity = info.identity
    if mode == "none":
        return headers
    if mode == "xfcc":
        value = xfccHeader(info, includeCertificate)
        if value is not None:
            headers.append((b"X-Forwarded-Client-Cert", value))
    elif mode == "rfc9440":
        if identity is not None:
            headers.append((b"Client-Cert", _byteSequence(identity.certificate).encode("ascii")))
            if info.chain:
                headers.append(
                    (
                        b"Client-Cert-Chain",
                        ", ".join(_byteSequence(c) for c in info.chain).encode("ascii"),
                    )
                )
    elif mode == "simple":
        if identity is not None:
            headers.extend(
                [
                    (b"X-SSL-Client-Subject", _ascii(identity.subject).encode("ascii")),
                    (b"X-SSL-Client-Issuer", _ascii(identity.issuer).encode("ascii")),
                    (b"X-SSL-Client-Serial", identity.serial.encode("ascii")),
                    (b"X-SSL-Client-Fingerprint", identity.fingerprint.encode("ascii")),
                    (b"X-SSL-Client-Cert", _urlEncodedPEM(identity.certificate).encode("ascii")),
                ]
            )
        headers.append((b"X-SSL-Client-Verify", verifyStatus(info).encode("ascii")))
    if passthrough and mode in ("xfcc", "rfc9440"):
        headers.append((b"X-SSL-Client-Verify", verifyStatus(info).encode("ascii")))
    return headers


# ---------------------------------------------------------------------------
# PROXY protocol v2 TLVs
# ---------------------------------------------------------------------------

PP2_TYPE_AUTHORITY: Final = 0x02
"""The host name the client asked for (SNI), UTF-8."""
PP2_TYPE_SSL: Final = 0x20
"""The TLS TLV: client flags (1 byte), verify result (4 bytes), sub-TLVs."""
PP2_SUBTYPE_SSL_VERSION: Final = 0x21
"""Sub-TLV of L{PP2_TYPE_SSL}: the protocol version, US-ASCII (C{"TLSv1.3"})."""
PP2_SUBTYPE_SSL_CN: Final = 0x22
"""Sub-TLV of L{PP2_TYPE_SSL}: the client certificate's subject common name, UTF-8."""
PP2_SUBTYPE_SSL_CIPHER: Final = 0x23
"""Sub-TLV of L{PP2_TYPE_SSL}: the cipher suite, US-ASCII (OpenSSL's name)."""
PP2_SUBTYPE_SSL_SIG_ALG: Final = 0x24
"""Sub-TLV of L{PP2_TYPE_SSL}: the client certificate's signature algorithm."""
PP2_SUBTYPE_SSL_KEY_ALG: Final = 0x25
"""Sub-TLV of L{PP2_TYPE_SSL}: the client certificate's key algorithm (C{"RSA2048"}, C{"EC256"})."""
PP2_TYPE_MTLSPROXY_CERTIFICATE: Final = 0xE0
"""
mtlsproxy's custom TLV (the first of the range the specification reserves
for applications, 0xE0-0xEF): the client's leaf certificate, DER.  Sent
only with C{proxy_protocol_certificate = true}.
"""

PP2_CLIENT_SSL: Final = 0x01
"""Client flag: the client connected over TLS."""
PP2_CLIENT_CERT_CONN: Final = 0x02
"""Client flag: the client presented a certificate on this connection."""
PP2_CLIENT_CERT_SESS: Final = 0x04
"""Client flag: the client presented a certificate in this TLS session
(on this connection or, resumed, an earlier one)."""

_TLV_HEADER: Final = struct.Struct("!BH")
_SSL_PREFIX: Final = struct.Struct("!BI")


def tlv(kind: int, value: bytes) -> bytes:
    """
    One TLV: type (1 byte), length (2 bytes, big endian), value.

    @raise ValueError: If C{value} is longer than 65535 bytes.
    """
    if len(value) > 0xFFFF:
        raise ValueError(f"TLV 0x{kind:02X} value of {len(value)} bytes is too long")
    return _TLV_HEADER.pack(kind, len(value)) + value


def _keyAlgorithm(certificate: x509.Certificate) -> Optional[str]:
    """
    The key algorithm and size the way HAProxy names it: C{"RSA2048"},
    C{"EC256"}, C{"ED25519"}.
    """
    key = certificate.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC{key.curve.key_size}"
    if isinstance(key, dsa.DSAPublicKey):
        return f"DSA{key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ED25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "ED448"
    return None


def _signatureAlgorithm(certificate: x509.Certificate) -> Optional[str]:
    """
    The certificate's signature algorithm as OpenSSL names it
    (C{"ecdsa-with-SHA256"}, C{"sha256WithRSAEncryption"}).
    """
    try:
        return crypto.X509.from_cryptography(certificate).get_signature_algorithm().decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return None


def sslTLVs(info: ClientTLSInfo, includeCertificate: bool = False) -> bytes:
    """
    The PROXY protocol v2 TLVs for a client connection: L{PP2_TYPE_AUTHORITY}
    (when the client sent SNI), L{PP2_TYPE_SSL} and, if
    C{includeCertificate} and the client sent one, the DER certificate in
    L{PP2_TYPE_MTLSPROXY_CERTIFICATE}.  C{b""} for a connection that is
    not TLS.

    L{PP2_TYPE_SSL} holds: the client flags (L{PP2_CLIENT_SSL}, plus
    L{PP2_CLIENT_CERT_SESS} with a certificate and L{PP2_CLIENT_CERT_CONN}
    if the session was not resumed); the verify result, 0 when a
    certificate was presented and verified, otherwise OpenSSL's
    C{X509_V_ERR_*} number of the failure (C{client_auth = "passthrough"})
    or 1 when no certificate was presented; and the sub-TLVs
    L{PP2_SUBTYPE_SSL_VERSION}, L{PP2_SUBTYPE_SSL_CIPHER}, and with a
    certificate L{PP2_SUBTYPE_SSL_CN} (if the subject has a common name),
    L{PP2_SUBTYPE_SSL_SIG_ALG} and L{PP2_SUBTYPE_SSL_KEY_ALG}.
    """
    if not info.tls:
        return b""
    identity = info.identity
    client = PP2_CLIENT_SSL
    if identity is not None:
        client |= PP2_CLIENT_CERT_SESS
        if not info.resumed:
            client |= PP2_CLIENT_CERT_CONN
    if identity is None:
        verify = 1
    elif info.verifyFailure is not None:
        verify = info.verifyErrorNumber or 1
    else:
        verify = 0
    subs = []
    if info.version:
        subs.append(tlv(PP2_SUBTYPE_SSL_VERSION, info.version.encode("ascii")))
    if info.cipher:
        subs.append(tlv(PP2_SUBTYPE_SSL_CIPHER, info.cipher.encode("ascii")))
    if identity is not None:
        if identity.commonName:
            subs.append(tlv(PP2_SUBTYPE_SSL_CN, identity.commonName.encode("utf-8")))
        sigAlg = _signatureAlgorithm(identity.certificate)
        if sigAlg:
            subs.append(tlv(PP2_SUBTYPE_SSL_SIG_ALG, sigAlg.encode("ascii")))
        keyAlg = _keyAlgorithm(identity.certificate)
        if keyAlg:
            subs.append(tlv(PP2_SUBTYPE_SSL_KEY_ALG, keyAlg.encode("ascii")))
    out = []
    if info.sni:
        out.append(tlv(PP2_TYPE_AUTHORITY, info.sni.encode("utf-8")))
    out.append(tlv(PP2_TYPE_SSL, _SSL_PREFIX.pack(client, verify) + b"".join(subs)))
    if includeCertificate and identity is not None:
        out.append(
            tlv(PP2_TYPE_MTLSPROXY_CERTIFICATE, identity.certificate.public_bytes(Encoding.DER))
        )
    return b"".join(out)
