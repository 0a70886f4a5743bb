# -*- test-case-name: tests.test_tlscontext,tests.test_sni,tests.test_policy -*-
"""
Building the pyOpenSSL server contexts of a TLS listener.

L{serverContextFactory} turns a listener's configuration and its loaded
material into a L{ServerContextFactory}: one L{OpenSSL.SSL.Context} per
C{[[listeners.certificates]]} entry (a I{site}), built once, wrapped in an
L{IOpenSSLServerConnectionCreator} that plugs into
C{TLSMemoryBIOFactory(contextFactory, False, wrappedFactory)}.  The
service puts a L{SwappableContextFactory} in between, so that a reload
replaces the listener's contexts with one attribute assignment.

pyOpenSSL freezes a context once a connection has been made from it, so a
reload builds a new factory from the new material; building is a pure
function of its inputs (same configuration and material, same settings and
session id context) and does no I/O.

The policy, in one place:

  - protocol versions, TLS 1.2 ciphers, TLS 1.3 suites and key exchange
    groups from the listener's TLS policy (L{mtlsproxy.policy}; by default
    C{tls12_modern}: TLS 1.2 and 1.3, TLS 1.2 with ECDHE and AEAD ciphers
    only, server preference);
  - no compression, no renegotiation; sessions resume only on the context
    that created them (a per-context session cache; stateless tickets only
    with C{session_tickets = true}, under a key that dies with the context);
  - ALPN protocols offered as the listener's C{alpn} says (server
    preference; a client with none in common goes on without ALPN);
  - each site's server certificate with its intermediates, and a check
    that the key matches;
  - client certificates per the site's C{client_auth}: C{"off"} does not
    ask, C{"optional"} asks and verifies what is sent, C{"required"}
    refuses a client without one;
  - trust in the site's configured CAs only (never the system store),
    whose names are sent in the CertificateRequest; clients may send
    intermediates that chain to them;
  - revocation checked by OpenSSL for every certificate of the chain below
    the self-signed root (C{CRL_CHECK | CRL_CHECK_ALL}) against the
    configured CRLs, the problems decided by the
    L{mtlsproxy.verify.ClientCertificateVerifier} callback under the
    listener's C{crl_missing} / C{crl_expired} policies.

Choosing the site (L{mtlsproxy.sni}): every connection starts on the
default site's context; OpenSSL's server name callback then switches it to
the site the client's name selects.  C{SSL_set_SSL_CTX} takes the new
certificate, trust store and CA names but I{not} the verify mode and
callback, which each connection copied from the first context; the
callback therefore sets them on the connection too.  Sessions are looked
up before the callback runs, in the default context's cache, so when the
sites of a listener verify clients differently no session is cached and no
ticket issued: a client verified (or not) for one name could otherwise
resume under another.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Final, Mapping, Optional, Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mtlsproxy.material import ServerCertificate
from mtlsproxy.policy import TLSPolicy, listenerPolicy, setGroups
from mtlsproxy.revocation import CRLExpired, CRLIndex, CRLMissing, CRLStatus
from mtlsproxy.sni import SiteTable, installServerNameCallback, normalizeServerName
from mtlsproxy.verify import ClientCertificateVerifier, logUnknownServerName

if TYPE_CHECKING:
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    from mtlsproxy.config import ListenerConfig
    from mtlsproxy.material import ListenerMaterial

__all__ = [
    "MINIMUM_VERSION",
    "MAXIMUM_VERSION",
    "TLS12_CIPHERS",
    "CONTEXT_OPTIONS",
    "VERIFY_MODES",
    "PROTOCOL_VERSIONS",
    "ServerContextFactory",
    "SiteContext",
    "SwappableContextFactory",
    "buildServerContext",
    "serverContextFactory",
    "sessionIdContext",
]

log = Logger()

MINIMUM_VERSION: Final = SSL.TLS1_2_VERSION
"""
The oldest protocol version any listener accepts.
"""

MAXIMUM_VERSION: Final = SSL.TLS1_3_VERSION
"""
The newest protocol version any listener accepts.
"""

PROTOCOL_VERSIONS: Final[Mapping[str, int]] = {
    "1.2": SSL.TLS1_2_VERSION,
    "1.3": SSL.TLS1_3_VERSION,
}
"""
The OpenSSL constant for each configured protocol version.
"""

TLS12_CIPHERS: Final = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
"""
The TLS 1.2 cipher list of the default policy (C{tls12_modern}), in the
server's order of preference: forward secret key exchange and
authenticated encryption only.
"""

CONTEXT_OPTIONS: Final = (
    SSL.OP_NO_COMPRESSION
    | SSL.OP_NO_RENEGOTIATION
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | SSL.OP_NO_TICKET
)
"""
The options set on every listener context (without C{OP_NO_TICKET} when
C{session_tickets = true}).  C{OP_NO_TICKET} makes OpenSSL keep resumable
sessions in the context's own cache instead of issuing stateless tickets.
"""

VERIFY_MODES: Final[Mapping[str, int]] = {
    "off": SSL.VERIFY_NONE,
    "optional": SSL.VERIFY_PEER,
    "required": SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
    # Asks like "optional"; the verifier records failures instead (issue 8).
    "passthrough": SSL.VERIFY_PEER,
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


def _digest(parts: Sequence[str], groups: Sequence[Sequence[Any]]) -> Any:
    """
    A SHA-256 over length-prefixed text C{parts} and groups of certificates
    and CRLs.
    """
    digest = hashlib.sha256()
    for part in parts:
        encoded = str(part).encode("utf-8")
        digest.update(len(encoded).to_bytes(4, "big") + encoded)
    for group in groups:
        digest.update(len(group).to_bytes(4, "big"))
        for item in group:
            encoded = _der(item)
            digest.update(len(encoded).to_bytes(4, "big") + encoded)
    return digest


def sessionIdContext(listener: ListenerConfig, material: ListenerMaterial) -> bytes:
    """
    The session id context of a listener's TLS contexts: 32 ASCII bytes
    derived from everything that decides whether a client is accepted (the
    listener's name and client certificate settings, its certificates,
    CAs and CRLs, and those of each certificate entry).

    OpenSSL needs one whenever client certificates are verified, or it
    refuses to resume sessions; it also keeps a session from being resumed
    under a context with a different policy.
    """
    parts = [listener.name, listener.client_auth, listener.crl_missing, listener.crl_expired]
    groups: list[Sequence[Any]] = [material.chain, material.cas, material.crls]
    for index, certificate in enumerate(material.certificates):
        cas, crls = material.trustOf(certificate)
        parts.append(_siteClientAuth(listener, index))
        groups.extend([certificate.chain, cas, crls])
    return _digest(parts, groups).hexdigest()[:32].encode("ascii")


def _siteClientAuth(listener: ListenerConfig, index: int) -> str:
    """
    The C{client_auth} of certificate entry C{index}: its own, or the
    listener's.
    """
    certificates = getattr(listener, "certificates", ())
    if index < len(certificates):
        own = getattr(certificates[index], "client_auth", None)
        if own is not None:
            return str(own)
    return listener.client_auth


def _trustKey(
    listener: ListenerConfig,
    clientAuth: str,
    cas: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList],
) -> bytes:
    """
    What decides whether a site accepts a client certificate: two sites
    with the same key may share sessions.
    """
    parts = [clientAuth, listener.crl_missing, listener.crl_expired]
    return _digest(parts, [cas, crls]).digest()


def _applyPolicy(context: SSL.Context, policy: TLSPolicy) -> None:
    """
    Set protocol versions, ciphers, suites and groups of C{policy}.

    @raise ValueError: If OpenSSL refuses part of it (the configuration
        loader checks policies, so this is a bug or an unusual OpenSSL).
    """
    context.set_min_proto_version(PROTOCOL_VERSIONS[policy.minVersion])
    context.set_max_proto_version(PROTOCOL_VERSIONS[policy.maxVersion])
    context.set_cipher_list(policy.ciphers.encode("ascii"))
    context.set_tls13_ciphersuites(policy.ciphersuites.encode("ascii"))
    if policy.groups and not setGroups(context, policy.groups):
        raise ValueError(f"OpenSSL refused the groups {', '.join(policy.groups)}")


def _alpnSelector(protocols: Sequence[str]) -> Any:
    """
    An ALPN select callback choosing, in our order of preference, the
    first of C{protocols} the client offers; a client with none of them
    goes on without ALPN.
    """
    ours = [p.encode("ascii") for p in protocols]

    def select(connection: SSL.Connection, offered: list[bytes]) -> Any:
        for protocol in ours:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return select


def buildServerContext(
    listener: ListenerConfig,
    material: ListenerMaterial,
    verifier: ClientCertificateVerifier,
    certificate: Optional[ServerCertificate] = None,
    clientAuth: Optional[str] = None,
    sessionId: Optional[bytes] = None,
    resumable: bool = True,
) -> SSL.Context:
    """
    Build one server context of a listener: for C{certificate} (default
    the first) with its client certificate settings.

    @param listener: The listener's configuration (its TLS policy and
        session settings; C{crl_missing} and C{crl_expired} are
        C{verifier}'s).
    @param material: Its certificate chains, private keys, CAs and CRLs.
    @param verifier: The verify callback's policy object; it also becomes
        the context's app data, which is how
        L{mtlsproxy.verify.logHandshakeFailure} finds the listener's name.
    @param certificate: The site's certificate and trust; default the first
        of C{material} with the listener's trust.
    @param clientAuth: The site's C{client_auth}; default the listener's.
    @param sessionId: The session id context; default
        L{sessionIdContext}.
    @param resumable: Whether sessions may be resumed at all (see the
        module docstring).

    @raise ValueError: If C{material} has no certificate, or
        C{client_auth} is not one of C{"off"}, C{"optional"},
        C{"required"}, or asks for client certificates with no CA.
    @raise OpenSSL.SSL.Error: If the private key does not match the
        certificate.
    """
    if certificate is None:
        if not material.chain:
            raise ValueError(f"listener {listener.name!r}: no server certificate")
        certificate = ServerCertificate(material.chain, material.key)
    if clientAuth is None:
        clientAuth = listener.client_auth
    cas, crls = material.trustOf(certificate)
    try:
        verifyMode = VERIFY_MODES[clientAuth]
    except KeyError:
        raise ValueError(
            f"listener {listener.name!r}: client_auth must be one of"
            f" {', '.join(VERIFY_MODES)}, not {clientAuth!r}"
        ) from None
    if verifyMode != SSL.VERIFY_NONE and not cas:
        raise ValueError(
            f"listener {listener.name!r}: client_auth = {clientAuth!r}"
            " needs at least one CA certificate"
        )

    context = SSL.Context(SSL.TLS_METHOD)
    _applyPolicy(context, listenerPolicy(listener))
    options = CONTEXT_OPTIONS
    if resumable and getattr(listener, "session_tickets", True):
        options &= ~SSL.OP_NO_TICKET
    context.set_options(options)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    alpn = getattr(listener, "alpn", ())
    if alpn:
        context.set_alpn_select_callback(_alpnSelector(alpn))

    leaf, *intermediates = certificate.chain
    context.use_certificate(leaf)
    for intermediate in intermediates:
        context.add_extra_chain_cert(intermediate)
    context.use_privatekey(certificate.key)
    context.check_privatekey()

    context.set_session_id(sessionId or sessionIdContext(listener, material))
    context.set_session_cache_mode(SSL.SESS_CACHE_SERVER if resumable else SSL.SESS_CACHE_OFF)
    context.set_app_data(verifier)

    if verifyMode == SSL.VERIFY_NONE:
        context.set_verify(SSL.VERIFY_NONE)
        return context

    # The context's store starts empty: only the configured CAs are trusted
    # (set_default_verify_paths is never called).
    store = context.get_cert_store()
    assert store is not None
    for authority in cas:
        store.add_cert(crypto.X509.from_cryptography(authority))
        context.add_client_ca(authority)
    for crl in crls:
        store.add_crl(crl)
    store.set_flags(_REVOCATION_FLAGS)
    context.set_verify(verifyMode, verifier.verifyCallback)
    return context


@attrs.frozen(eq=False)
class SiteContext:
    """
    The context of one C{[[listeners.certificates]]} entry and how it
    verifies clients.

    @ivar index: The entry's position in the listener's C{certificates}.
    @ivar names: The DNS names it answers for (its certificate's
        subjectAltName).
    @ivar context: Its context; do not mutate it.
    @ivar verifier: Its verify callback and policy.
    @ivar verifyMode: The OpenSSL verify mode of its C{client_auth}.
    @ivar clientAuth: Its C{client_auth}.
    """

    index: int
    names: tuple[str, ...]
    context: SSL.Context
    verifier: ClientCertificateVerifier
    verifyMode: int
    clientAuth: str

    def applyTo(self, connection: SSL.Connection) -> None:
        """
        Put C{connection} on this site: its context (certificate, trust
        store, CA names) and its verify mode and callback, which
        C{SSL_set_SSL_CTX} does not carry over.
        """
        if connection.get_context() is not self.context:
            connection.set_context(self.context)
        if self.verifyMode == SSL.VERIFY_NONE:
            connection.set_verify(SSL.VERIFY_NONE)
        else:
            connection.set_verify(self.verifyMode, self.verifier.verifyCallback)


@implementer(IOpenSSLServerConnectionCreator)
@attrs.frozen(eq=False)
class ServerContextFactory:
    """
    The TLS connection creator of one listener (for one generation of its
    material).

    @ivar listenerName: The listener's name.
    @ivar context: The default site's context; every connection starts on
        it.  Do not mutate it.
    @ivar verifier: The default site's verify callback and policy.
    @ivar crls: All the listener's CRLs by issuer.
    @ivar clock: The L{IReactorTime} provider L{crlStatus} reads the time
        from, or L{None} for the system clock.  OpenSSL itself always
        verifies certificates and CRLs against the system clock.
    @ivar sites: One L{SiteContext} per certificate entry, in order; empty
        for a factory built by hand around one context.
    @ivar table: Which site answers for which server name, or L{None} when
        no name needs looking at (one site, not strict).
    @ivar resumable: Whether sessions may be resumed (all sites verify
        clients the same way).
    @ivar policy: The TLS policy in force.
    """

    listenerName: str
    context: SSL.Context
    verifier: ClientCertificateVerifier
    crls: CRLIndex
    clock: Any = None
    sites: tuple[SiteContext, ...] = ()
    table: Optional[SiteTable[SiteContext]] = None
    resumable: bool = True
    policy: Optional[TLSPolicy] = None

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """
        Create the OpenSSL connection for a new client, on the default
        site; Twisted puts it in accept state and sets C{tlsProtocol} as its
        app data.
        """
        return SSL.Connection(self.context, None)

    def chooseSite(self, connection: SSL.Connection) -> bool:
        """
        The server name callback: put C{connection} on the site its server
        name selects.

        @return: C{False} to refuse the handshake (C{strict_sni} and an
            unknown name; or a session resumed across sites, which cannot
            happen while L{resumable} is honoured).
        """
        assert self.table is not None
        raw = connection.get_servername()
        serverName = normalizeServerName(raw)
        site = self.table.select(serverName)
        if site is None:
            shown = serverName or (raw.decode("ascii", "replace") if raw else None)
            logUnknownServerName(connection, self.listenerName, shown)
            return False
        if not self.resumable and _sessionReused(connection):
            log.error(
                "Listener {listener}: refusing a resumed session for server name"
                " {sni}: its sites verify clients differently",
                listener=self.listenerName,
                sni=serverName,
            )
            return False
        site.applyTo(connection)
        return True

    def siteFor(self, serverName: Optional[str]) -> Optional[SiteContext]:
        """
        The site that answers for C{serverName} (L{None}: no name), or
        L{None} if the listener refuses the name.
        """
        if self.table is None:
            return self.sites[0] if self.sites else None
        return self.table.select(normalizeServerName(serverName))

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


def _sessionReused(connection: SSL.Connection) -> bool:
    """
    Is C{connection} resuming a session?  (pyOpenSSL has no wrapper for
    C{SSL_session_reused}; this uses its binding.)
    """
    from OpenSSL._util import lib

    return bool(lib.SSL_session_reused(connection._ssl))  # type: ignore[attr-defined]


@implementer(IOpenSSLServerConnectionCreator)
class SwappableContextFactory:
    """
    The connection creator a listener's TLS factory keeps for its whole
    life: it delegates to L{current}, which a reload replaces (one
    assignment; connections made before keep the context they were made
    with).

    @ivar current: The L{ServerContextFactory} new connections are made
        with.
    """

    def __init__(self, current: ServerContextFactory) -> None:
        self.current = current

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """
        Create the OpenSSL connection with the current factory.
        """
        return self.current.serverConnectionForTLS(tlsProtocol)

    def __getattr__(self, name: str) -> Any:
        """
        Everything else (C{crlStatus}, C{sites}, ...) from the current
        factory.
        """
        if name == "current":
            raise AttributeError(name)
        return getattr(self.current, name)


def serverContextFactory(
    listener: ListenerConfig,
    material: ListenerMaterial,
    clock: IReactorTime | None = None,
) -> ServerContextFactory:
    """
    Build the TLS connection creator of a listener: one context per
    certificate entry, the server name callback when there is a choice to
    make, the policy and the session settings.

    @param listener: The listener's configuration.
    @param material: The listener's loaded and checked certificates, keys,
        CAs and CRLs.
    @param clock: The time source of L{ServerContextFactory.crlStatus};
        L{None} for the system clock.

    @return: An L{IOpenSSLServerConnectionCreator} provider for
        C{TLSMemoryBIOFactory(factory, False, wrappedFactory)}.

    @raise ValueError: See L{buildServerContext}.
    @raise OpenSSL.SSL.Error: If a key does not match its certificate.
    """
    if not material.chain:
        raise ValueError(f"listener {listener.name!r}: no server certificate")
    certificates = material.certificates
    settings = []
    for index, certificate in enumerate(certificates):
        clientAuth = _siteClientAuth(listener, index)
        cas, crls = material.trustOf(certificate)
        settings.append((clientAuth, cas, crls))
    resumable = len({_trustKey(listener, *s) for s in settings}) <= 1
    # A resumed session skips the verify callback, which is where a
    # passthrough failure is recorded: never resume on such a listener.
    resumable = resumable and all(s[0] != "passthrough" for s in settings)
    sessionId = sessionIdContext(listener, material)
    sites = []
    for index, (certificate, (clientAuth, cas, crls)) in enumerate(zip(certificates, settings)):
        verifier = ClientCertificateVerifier.create(
            listenerName=listener.name,
            authorities=cas,
            crls=crls,
            crlMissing=CRLMissing(listener.crl_missing),
            crlExpired=CRLExpired(listener.crl_expired),
            passthrough=clientAuth == "passthrough",
        )
        siteSessionId = sessionId
        if not resumable:
            # Never used for resumption; still needed with client certificates.
            siteSessionId = hashlib.sha256(sessionId + b"%d" % index).hexdigest()[:32].encode()
        context = buildServerContext(
            listener,
            material,
            verifier,
            certificate=certificate,
            clientAuth=clientAuth,
            sessionId=siteSessionId,
            resumable=resumable,
        )
        sites.append(
            SiteContext(
                index=index,
                names=certificate.names,
                context=context,
                verifier=verifier,
                verifyMode=VERIFY_MODES[clientAuth],
                clientAuth=clientAuth,
            )
        )
    entries = getattr(listener, "certificates", ())
    defaultIndex = next(
        (i for i, entry in enumerate(entries) if getattr(entry, "default", False)), 0
    )
    default = sites[defaultIndex]
    strict = bool(getattr(listener, "strict_sni", False))
    table: Optional[SiteTable[SiteContext]] = None
    factory = ServerContextFactory(
        listenerName=listener.name,
        context=default.context,
        verifier=default.verifier,
        crls=CRLIndex.fromCRLs(material.allCRLs()),
        clock=clock,
        sites=tuple(sites),
        resumable=resumable,
        policy=listenerPolicy(listener),
    )
    if len(sites) > 1 or strict:
        table = SiteTable(((site.names, site) for site in sites), default, strict)
        factory = attrs.evolve(factory, table=table)
        # Every site's context gets the callback: OpenSSL calls the one of
        # the context a connection is on (a second ClientHello after a
        # HelloRetryRequest comes after the switch).
        for site in sites:
            installServerNameCallback(site.context, factory.chooseSite)
    return factory
