# -*- test-case-name: tests.test_tlscontext -*-
"""
Building the pyOpenSSL server context of a TLS listener.

L{serverContextFactory} turns a listener's configuration and its loaded
material into a L{ServerContextFactory}: one L{OpenSSL.SSL.Context}, built
once, wrapped in an L{IOpenSSLServerConnectionCreator} that plugs into
C{TLSMemoryBIOFactory(contextFactory, False, wrappedFactory)}.

pyOpenSSL freezes a context once a connection has been made from it, so a
reload builds a new factory from the new material; building is a pure
function of its inputs (same configuration and material, same settings and
session id context) and does no I/O.

The policy, in one place:

  - TLS 1.2 and 1.3 only;
  - TLS 1.2: ECDHE key exchange with AEAD ciphers only (AES-GCM,
    ChaCha20-Poly1305), server preference; TLS 1.3: OpenSSL's default
    suites (all AEAD);
  - no compression, no renegotiation; sessions resume only on the context
    that created them (a per-context session cache, no stateless tickets
    whose keys would outlive a reload);
  - the server certificate with its intermediates, and a check that the
    key matches;
  - client certificates per C{client_auth}: C{"off"} does not ask,
    C{"optional"} asks and verifies what is sent, C{"required"} refuses a
    client without one;
  - trust in the configured CAs only (never the system store), whose names
    are sent in the CertificateRequest; clients may send intermediates
    that chain to them;
  - revocation checked by OpenSSL for every certificate of the chain below
    the self-signed root (C{CRL_CHECK | CRL_CHECK_ALL}) against the
    configured CRLs, the problems decided by the
    L{mtlsproxy.verify.ClientCertificateVerifier} callback under the
    listener's C{crl_missing} / C{crl_expired} policies.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Final, Mapping

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from zope.interface import implementer

from mtlsproxy.revocation import CRLExpired, CRLIndex, CRLMissing, CRLStatus
from mtlsproxy.verify import ClientCertificateVerifier

if TYPE_CHECKING:
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    from mtlsproxy.material import ListenerMaterial
    from mtlsproxy.config import ListenerConfig

__all__ = [
    "MINIMUM_VERSION",
    "MAXIMUM_VERSION",
    "TLS12_CIPHERS",
    "CONTEXT_OPTIONS",
    "VERIFY_MODES",
    "ServerContextFactory",
    "buildServerContext",
    "serverContextFactory",
    "sessionIdContext",
]

MINIMUM_VERSION: Final = SSL.TLS1_2_VERSION
"""
The oldest protocol version a listener accepts.
"""

MAXIMUM_VERSION: Final = SSL.TLS1_3_VERSION
"""
The newest protocol version a listener accepts.
"""

TLS12_CIPHERS: Final = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
"""
The TLS 1.2 cipher list, in the server's order of preference: forward
secret key exchange and authenticated encryption only.  (TLS 1.3 suites are
not affected by this list; OpenSSL's defaults are all AEAD.)
"""

CONTEXT_OPTIONS: Final = (
    SSL.OP_NO_COMPRESSION
    | SSL.OP_NO_RENEGOTIATION
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | SSL.OP_NO_TICKET
)
"""
The options set on every listener context.  C{OP_NO_TICKET} makes OpenSSL
keep resumable sessions in the context's own cache instead of issuing
stateless tickets encrypted under a key that would live as long as the
context.
"""

VERIFY_MODES: Final[Mapping[str, int]] = {
    "off": SSL.VERIFY_NONE,
    "optional": SSL.VERIFY_PEER,
    "required": SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
}
"""
The OpenSSL verify mode for each C{client_auth} setting.
"""

_REVOCATION_FLAGS: Final = (
    crypto.X509StoreFlags.CRL_CHECK | crypto.X509StoreFlags.CRL_CHECK_ALL
)


def _der(item: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    """
    The DER encoding of a certificate or CRL.
    """
    return item.public_bytes(Encoding.DER)


def sessionIdContext(listener: ListenerConfig, material: ListenerMaterial) -> bytes:
    """
    The session id context of a listener's TLS context: 32 ASCII bytes
    derived from everything that decides whether a client is accepted (the
    listener's name and client certificate settings, its certificates,
    CAs and CRLs).

    OpenSSL needs one whenever client certificates are verified, or it
    refuses to resume sessions; it also keeps a session from being resumed
    under a context with a different policy.
    """
    digest = hashlib.sha256()
    for part in (
        listener.name,
        listener.client_auth,
        listener.crl_missing,
        listener.crl_expired,
    ):
        encoded = str(part).encode("utf-8")
        digest.update(len(encoded).to_bytes(4, "big") + encoded)
    for group in (material.chain, material.cas, material.crls):
        digest.update(len(group).to_bytes(4, "big"))
        for item in group:
            encoded = _der(item)
            digest.update(len(encoded).to_bytes(4, "big") + encoded)
    return digest.hexdigest()[:32].encode("ascii")


def buildServerContext(
    listener: ListenerConfig,
    material: ListenerMaterial,
    verifier: ClientCertificateVerifier,
) -> SSL.Context:
    """
    Build the server context of a listener.

    @param listener: The listener's configuration (C{client_auth} is read
        here; C{crl_missing} and C{crl_expired} are C{verifier}'s).
    @param material: Its certificate chain (leaf first), private key, CAs
        and CRLs.
    @param verifier: The verify callback's policy object; it also becomes
        the context's app data, which is how
        L{mtlsproxy.verify.logHandshakeFailure} finds the listener's name.

    @raise ValueError: If C{material} has no certificate, or
        C{client_auth} is not one of C{"off"}, C{"optional"},
        C{"required"}, or asks for client certificates with no CA.
    @raise OpenSSL.SSL.Error: If the private key does not match the
        certificate.
    """
    if not material.chain:
        raise ValueError(f"listener {listener.name!r}: no server certificate")
    try:
        verifyMode = VERIFY_MODES[listener.client_auth]
    except KeyError:
        raise ValueError(
            f"listener {listener.name!r}: client_auth must be one of"
            f" {', '.join(VERIFY_MODES)}, not {listener.client_auth!r}"
        ) from None
    if verifyMode != SSL.VERIFY_NONE and not material.cas:
        raise ValueError(
            f"listener {listener.name!r}: client_auth = {listener.client_auth!r}"
            " needs at least one CA certificate"
        )

    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(MINIMUM_VERSION)
    context.set_max_proto_version(MAXIMUM_VERSION)
    context.set_options(CONTEXT_OPTIONS)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.set_cipher_list(TLS12_CIPHERS)

    leaf, *intermediates = material.chain
    context.use_certificate(leaf)
    for intermediate in intermediates:
        context.add_extra_chain_cert(intermediate)
    context.use_privatekey(material.key)
    context.check_privatekey()

    context.set_session_id(sessionIdContext(listener, material))
    context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    context.set_app_data(verifier)

    if verifyMode == SSL.VERIFY_NONE:
        context.set_verify(SSL.VERIFY_NONE)
        return context

    # The context's store starts empty: only the configured CAs are trusted
    # (set_default_verify_paths is never called).
    store = context.get_cert_store()
    assert store is not None
    for authority in material.cas:
        store.add_cert(crypto.X509.from_cryptography(authority))
        context.add_client_ca(authority)
    for crl in material.crls:
        store.add_crl(crl)
    store.set_flags(_REVOCATION_FLAGS)
    context.set_verify(verifyMode, verifier.verifyCallback)
    return context


@implementer(IOpenSSLServerConnectionCreator)
@attrs.frozen(eq=False)
class ServerContextFactory:
    """
    The TLS connection creator of one listener (for one generation of its
    material): every connection shares the one L{SSL.Context}.

    @ivar listenerName: The listener's name.
    @ivar context: The context; do not mutate it.
    @ivar verifier: The listener's verify callback and policy.
    @ivar crls: The listener's CRLs by issuer.
    @ivar clock: The L{IReactorTime} provider L{crlStatus} reads the time
        from, or L{None} for the system clock.  OpenSSL itself always
        verifies certificates and CRLs against the system clock.
    """

    listenerName: str
    context: SSL.Context
    verifier: ClientCertificateVerifier
    crls: CRLIndex
    clock: Any = None

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """
        Create the OpenSSL connection for a new client; Twisted puts it in
        accept state and sets C{tlsProtocol} as its app data.
        """
        return SSL.Connection(self.context, None)

    def crlStatus(self) -> tuple[CRLStatus, ...]:
        """
        Where each of the listener's CRLs stands now (current, expired, not
        yet valid, and its nextUpdate), for status reports and expiry
        warnings.
        """
        if self.clock is None:
            now = datetime.now(timezone.utc)
        else:
            now = datetime.fromtimestamp(self.clock.seconds(), timezone.utc)
        return self.crls.status(now)


def serverContextFactory(
    listener: ListenerConfig,
    material: ListenerMaterial,
    clock: IReactorTime | None = None,
) -> ServerContextFactory:
    """
    Build the TLS connection creator of a listener.

    @param listener: The listener's configuration.
    @param material: The listener's loaded and checked certificates, key,
        CAs and CRLs.
    @param clock: The time source of L{ServerContextFactory.crlStatus};
        L{None} for the system clock.

    @return: An L{IOpenSSLServerConnectionCreator} provider for
        C{TLSMemoryBIOFactory(factory, False, wrappedFactory)}.

    @raise ValueError: See L{buildServerContext}.
    @raise OpenSSL.SSL.Error: If the key does not match the certificate.
    """
    verifier = ClientCertificateVerifier.create(
        listenerName=listener.name,
        authorities=material.cas,
        crls=material.crls,
        crlMissing=CRLMissing(listener.crl_missing),
        crlExpired=CRLExpired(listener.crl_expired),
    )
    context = buildServerContext(listener, material, verifier)
    return ServerContextFactory(
        listenerName=listener.name,
        context=context,
        verifier=verifier,
        crls=verifier.crls,
        clock=clock,
    )
