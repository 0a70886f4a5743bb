# -*- test-case-name: tests.test_backendtls -*-
"""
Mutual TLS towards the members of a pool (C{[pools.tls]}).

L{BackendTLS} is built per pool from its configuration and its loaded
material (L{BackendTLSMaterial}, see L{mtlsproxy.checks}), at start-up and
again by a reload that changes them; the relay, the routes and the health
checkers hold the pool's L{SwappableBackendTLS}, whose C{current} the
reload replaces.  A L{BackendTLS} owns one client L{OpenSSL.SSL.Context}:

  - TLS 1.2 (unless C{min_version = "1.3"}) and 1.3; on TLS 1.2 the same
    forward-secret AEAD ciphers as listeners; no compression, no
    renegotiation;
  - trust in the configured CAs only (never the system store), the member
    certificate's whole chain checked against the configured CRLs
    (C{CRL_CHECK | CRL_CHECK_ALL}) under the pool's C{crl_missing} and
    C{crl_expired} policies, as listeners check client certificates;
    without C{crls} revocation is not checked;
  - the proxy's client certificate chain and key, if configured.

L{BackendTLS.clientConnectionCreator} gives, per member, the
L{IOpenSSLClientConnectionCreator} of a connection: it sends the server
name as SNI (host names only) and checks it with C{service_identity} in the
verify callback, on the member's certificate, as Twisted's
C{ClientTLSOptions} does: a certificate that does not match fails the
handshake before it completes, so nothing is ever written to a member that
was not verified.  Every verification failure reaches the application as a
L{BackendTLSError} whose C{reason} says why (L{UNKNOWN_CA},
L{HOSTNAME_MISMATCH}, L{REVOKED}, L{EXPIRED}, ...).  Health checkers are
given the L{BackendTLS} itself and use the creator the same way.

The relay connects through L{BackendTLSFactory} (L{BackendTLS.wrapFactory}),
a L{HalfCloseTLSFactory} (so half-close works towards the member as it does
towards clients) that makes the TLS handshake part of connecting: the
application protocol is built only once the member has been verified I{and}
has accepted the proxy's certificate; anything that ends the connection
before that is reported to the wrapped factory's C{clientConnectionFailed}
with a L{BackendTLSError}, like a refused connection, so the relay tries the
next member.

Why "accepted": in TLS 1.3 the client's handshake is complete when it has
sent its Finished, before the server has looked at the client certificate;
a server that rejects it says so one round trip later with an alert
(C{certificate_required}, C{unknown_ca}, C{bad_certificate}, ...).  So when
a TLS 1.3 member asked for a certificate, L{BackendTLSProtocol} waits for
its verdict: the first message it sends after the handshake (servers send
session tickets right away, or application data) means accepted, an alert
means rejected (L{CLIENT_CERTIFICATE_REJECTED},
L{CLIENT_CERTIFICATE_REQUIRED}).  A member that sends nothing is taken to
have accepted after twice the time the handshake took (at least
L{ACCEPTANCE_WAIT_MIN}, at most L{ACCEPTANCE_WAIT_MAX} and the rest of the
connect timeout).  On TLS 1.2 the server's Finished comes after it checked
the client certificate, so there is nothing to wait for.

Failures are logged by the relay with L{logBackendTLSFailure}, one event
per failed attempt (L{BACKEND_TLS_FAILED_FORMAT}).
"""

from __future__ import annotations

import ipaddress
import weakref
from typing import TYPE_CHECKING, Any, Final, Mapping, Optional, Sequence, Union

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .material import PrivateKey, sourceKey
from .revocation import (
    CRL_EXPIRED_DEFAULT,
    CRL_MISSING_DEFAULT,
    CRLExpired,
    CRLIndex,
    CRLMissing,
)
from .tlscontext import TLS12_CIPHERS
from .tlsproto import TLS13, HalfCloseTLSFactory, HalfCloseTLSProtocol
from .verify import (
    CRL_EXPIRED,
    CRL_MISSING,
    EXPIRED,
    HANDSHAKE_FAILED,
    INTERNAL_ERROR,
    NOT_YET_VALID,
    REVOKED,
    UNKNOWN_CA,
    reasonForVerifyError,
    verifyErrorString,
)

if TYPE_CHECKING:
    from .config import BackendTLSConfig

__all__ = [
    "ACCEPTANCE_WAIT_MAX",
    "ACCEPTANCE_WAIT_MIN",
    "ALLOWED_FORMAT",
    "BACKEND_TLS_FAILED",
    "BACKEND_TLS_FAILED_FORMAT",
    "CLIENT_CERTIFICATE_REJECTED",
    "CLIENT_CERTIFICATE_REQUIRED",
    "CONNECTION_LOST",
    "CRL_EXPIRED",
    "CRL_MISSING",
    "EXPIRED",
    "HANDSHAKE_FAILED",
    "HANDSHAKE_TIMEOUT",
    "HOSTNAME_MISMATCH",
    "INTERNAL_ERROR",
    "NOT_YET_VALID",
    "REVOKED",
    "TLS_VERSIONS",
    "UNKNOWN_CA",
    "BackendConnectionCreator",
    "BackendTLS",
    "BackendTLSError",
    "BackendTLSFactory",
    "BackendTLSMaterial",
    "BackendTLSProtocol",
    "SwappableBackendTLS",
    "buildBackendContext",
    "describeFailure",
    "logBackendTLSFailure",
    "memberConnectionOf",
]

log = Logger()

# ---------------------------------------------------------------------------
# Reasons (besides the certificate reasons shared with L{mtlsproxy.verify}:
# UNKNOWN_CA, REVOKED, EXPIRED, NOT_YET_VALID, CRL_MISSING, CRL_EXPIRED,
# HANDSHAKE_FAILED, INTERNAL_ERROR, or OpenSSL's verify error text)
# ---------------------------------------------------------------------------

HOSTNAME_MISMATCH: Final = "hostname_mismatch"
"""
The member's certificate is valid but not for the name checked: the pool's
C{server_name}, or the member's address (a DNS name, or an IP address
matched against the certificate's IP address subjectAltNames).
"""

CLIENT_CERTIFICATE_REJECTED: Final = "client_certificate_rejected"
"""
The member refused the proxy's client certificate (a TLS alert such as
C{unknown_ca}, C{bad_certificate}, C{certificate_revoked} or
C{certificate_expired}).
"""

CLIENT_CERTIFICATE_REQUIRED: Final = "client_certificate_required"
"""
The member requires a client certificate and the pool has none (no
C{cert} / C{key}).
"""

HANDSHAKE_TIMEOUT: Final = "handshake_timeout"
"""
The TLS handshake did not finish within the pool's C{connect_timeout}.
"""

CONNECTION_LOST: Final = "connection_lost"
"""
The member closed the connection during the TLS handshake, without an
alert.
"""

BACKEND_TLS_FAILED: Final = "backend_tls_failed"
"""
The name of the event logged for every failed backend TLS connection.
"""

BACKEND_TLS_FAILED_FORMAT: Final = (
    BACKEND_TLS_FAILED + ": member {member} of pool {pool}: {reason} ({error})"
)
"""
The C{log_format} of the warning logged by L{logBackendTLSFailure} for a
connection attempt whose TLS handshake with a member failed.  Its fields:

  - C{reason}: L{UNKNOWN_CA}, L{HOSTNAME_MISMATCH}, L{REVOKED}, L{EXPIRED},
    L{NOT_YET_VALID}, L{CRL_MISSING}, L{CRL_EXPIRED},
    L{CLIENT_CERTIFICATE_REJECTED}, L{CLIENT_CERTIFICATE_REQUIRED},
    L{HANDSHAKE_TIMEOUT}, L{CONNECTION_LOST}, L{HANDSHAKE_FAILED},
    L{INTERNAL_ERROR}, or OpenSSL's verify error text;
  - C{member}: C{"host:port"} of the member;
  - C{pool}: the pool's name;
  - C{error}: what exactly went wrong, for humans;
  - C{serverName}: the name the member's certificate was checked against;
  - C{depth}, C{certificateSubject}, C{certificateIssuer},
    C{certificateSerial}: the certificate of the member's chain that
    failed (0 is the member's own), or L{None};
  - whatever context the caller adds (the relay adds C{listener} and
    C{peer}).
"""

ALLOWED_FORMAT: Final = (
    "Accepted member {member} of pool {pool} WITHOUT a valid CRL for"
    ' {certificateSubject}: {reason}, allowed by {setting} = "allow"'
)
"""
The C{log_format} of the warning logged every time C{crl_missing = "allow"}
or C{crl_expired = "allow"} lets a member certificate through that the
default policy would refuse.
"""

TLS_VERSIONS: Final[Mapping[str, int]] = {
    "1.2": SSL.TLS1_2_VERSION,
    "1.3": SSL.TLS1_3_VERSION,
}
"""
The values of C{min_version} and the OpenSSL versions they stand for.
"""

ACCEPTANCE_WAIT_MIN: Final = 0.05
"""
Seconds a TLS 1.3 member that asked for a client certificate is given, at
least, to reject it before it is taken to have accepted.
"""

ACCEPTANCE_WAIT_MAX: Final = 1.0
"""
Seconds a TLS 1.3 member that asked for a client certificate is given, at
most, to reject it.
"""

_CONTEXT_OPTIONS: Final = SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION

_REVOCATION_FLAGS: Final = (
    crypto.X509StoreFlags.CRL_CHECK | crypto.X509StoreFlags.CRL_CHECK_ALL
)

# Parts of OpenSSL's texts for alerts received about our certificate.
_CERTIFICATE_REQUIRED_ALERT: Final = "alert certificate required"
_CERTIFICATE_ALERTS: Final = ("certificate", "unknown ca", "access denied")


# ---------------------------------------------------------------------------
# Material and errors
# ---------------------------------------------------------------------------


@attrs.frozen
class BackendTLSMaterial:
    """
    The loaded and checked material of one pool's C{[pools.tls]}.

    @ivar cas: The CA certificates member certificates are verified with,
        from all C{ca_certificates} files in order.
    @ivar crls: The CRLs from all C{crls} files, each signed by one of
        C{cas}.
    @ivar chain: The proxy's client certificate first, then its
        intermediates; empty if the pool has no C{cert}.
    @ivar key: The private key of C{chain[0]}, or L{None}.
    """

    cas: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    chain: tuple[x509.Certificate, ...] = ()
    key: Optional[PrivateKey] = None
    sources: Mapping[bytes, str] = attrs.field(factory=dict, eq=False, repr=False)

    def sourceOf(
        self, item: Union[x509.Certificate, x509.CertificateRevocationList]
    ) -> Optional[str]:
        """
        The file a certificate or CRL of this material was read from, if
        known (L{sources}, keyed by L{mtlsproxy.material.sourceKey}).
        """
        return self.sources.get(sourceKey(item))

    def differences(self, other: BackendTLSMaterial) -> list[str]:
        """
        What differs between this material and C{other}, by configuration
        key: C{"ca_certificates"}, C{"crls"}, C{"cert"}, C{"key"}; empty if
        they are the same.  (Private keys are compared by their public
        halves: they cannot be compared directly.)
        """
        changed: list[str] = []
        if self.cas != other.cas:
            changed.append("ca_certificates")
        if self.crls != other.crls:
            changed.append("crls")
        if self.chain != other.chain:
            changed.append("cert")
        if _publicHalf(self.key) != _publicHalf(other.key):
            changed.append("key")
        return changed


def _publicHalf(key: Optional[PrivateKey]) -> Optional[bytes]:
    """
    The DER SubjectPublicKeyInfo of a private key's public key, or L{None}.
    """
    if key is None:
        return None
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class BackendTLSError(Exception):
    """
    The TLS connection to a member failed: it could not be verified, it
    refused the proxy's certificate, or the handshake did not complete.

    C{str()} is C{"<reason>: <error>"}.

    @ivar reason: Why, as a short stable word (see
        L{BACKEND_TLS_FAILED_FORMAT}).
    @ivar error: What exactly went wrong, for humans.
    @ivar member: C{"host:port"} of the member.
    @ivar pool: The pool's name.
    @ivar serverName: The name the member's certificate is checked
        against.
    @ivar depth: The position in the member's chain of the certificate
        that failed, or L{None}.
    @ivar certificateSubject: That certificate's subject (RFC 4514), or
        L{None}.
    @ivar certificateIssuer: Its issuer (RFC 4514), or L{None}.
    @ivar certificateSerial: Its serial number (lower-case hex), or L{None}.
    """

    def __init__(
        self,
        reason: str,
        error: str,
        member: str,
        pool: str,
        serverName: Optional[str] = None,
        depth: Optional[int] = None,
        certificate: Optional[x509.Certificate] = None,
    ) -> None:
        super().__init__(reason, error, member)
        self.reason = reason
        self.error = error
        self.member = member
        self.pool = pool
        self.serverName = serverName
        self.depth = depth
        self.certificateSubject: Optional[str] = None
        self.certificateIssuer: Optional[str] = None
        self.certificateSerial: Optional[str] = None
        if certificate is not None:
            self.certificateSubject = certificate.subject.rfc4514_string()
            self.certificateIssuer = certificate.issuer.rfc4514_string()
            self.certificateSerial = f"{certificate.serial_number:x}"

    def __str__(self) -> str:
        return f"{self.reason}: {self.error}"

    def logFields(self) -> dict[str, Any]:
        """
        The fields of its L{BACKEND_TLS_FAILED_FORMAT} event.
        """
        return {
            "reason": self.reason,
            "error": self.error,
            "member": self.member,
            "pool": self.pool,
            "serverName": self.serverName,
            "depth": self.depth,
            "certificateSubject": self.certificateSubject,
            "certificateIssuer": self.certificateIssuer,
            "certificateSerial": self.certificateSerial,
        }


def _hostPort(host: str, port: int) -> str:
    """
    C{host:port}, with brackets around an IPv6 address.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _openSSLTexts(error: BaseException) -> list[str]:
    """
    The reason texts of a pyOpenSSL C{SSL.Error}, whose argument is a list
    of C{(library, function, reason)} tuples.
    """
    texts: list[str] = []
    for argument in error.args:
        if isinstance(argument, list):
            texts.extend(
                str(entry[2]) for entry in argument if isinstance(entry, tuple) and len(entry) == 3
            )
    return texts


def describeFailure(
    reason: Failure, member: str, pool: str, serverName: Optional[str] = None
) -> BackendTLSError:
    """
    Say why a TLS connection to a member ended before it could be used.

    @param reason: What the connection was lost with: a L{BackendTLSError}
        (returned as it is), an L{OpenSSL.SSL.Error} (an alert from the
        member, a protocol failure) or anything else (the member closed the
        connection).
    @param member: C{"host:port"} of the member.
    @param pool: The pool's name.
    @param serverName: The name checked, for the error.
    """
    value = reason.value
    if isinstance(value, BackendTLSError):
        return value
    if isinstance(value, SSL.Error):
        texts = _openSSLTexts(value)
        text = "; ".join(texts) or str(value) or "TLS error"
        lowered = text.lower()
        if _CERTIFICATE_REQUIRED_ALERT in lowered:
            why = CLIENT_CERTIFICATE_REQUIRED
        elif "alert" in lowered and any(part in lowered for part in _CERTIFICATE_ALERTS):
            why = CLIENT_CERTIFICATE_REJECTED
        else:
            why = HANDSHAKE_FAILED
        return BackendTLSError(why, text, member, pool, serverName)
    text = reason.getErrorMessage() if not reason.check(ConnectionDone) else "connection closed"
    return BackendTLSError(
        CONNECTION_LOST,
        f"the member closed the connection during the TLS handshake ({text})",
        member,
        pool,
        serverName,
    )


def logBackendTLSFailure(reason: Failure, **context: Any) -> bool:
    """
    Log a failed backend connection attempt as L{BACKEND_TLS_FAILED_FORMAT}
    if it failed because of TLS.

    @param reason: Why the attempt failed.
    @param context: Further fields for the event (C{listener}, C{peer}).

    @return: Whether an event was logged (C{reason} is a
        L{BackendTLSError}).
    """
    error = reason.value
    if not isinstance(error, BackendTLSError):
        return False
    log.warn(BACKEND_TLS_FAILED_FORMAT, **{**context, **error.logFields()})
    return True


# ---------------------------------------------------------------------------
# The context
# ---------------------------------------------------------------------------


def buildBackendContext(material: BackendTLSMaterial, minVersion: str = "1.2") -> SSL.Context:
    """
    Build the client context of a pool (see the module docstring).

    The context verifies member certificates (C{VERIFY_PEER}) with a
    callback that accepts what OpenSSL accepts; L{BackendConnectionCreator}
    replaces it per connection with one that also checks the name and
    applies the CRL policies.

    @param material: The pool's CAs, CRLs and client certificate.
    @param minVersion: C{"1.2"} or C{"1.3"}.

    @raise ValueError: If there is no CA, C{minVersion} is unknown, or there
        is a key without a certificate.
    @raise OpenSSL.SSL.Error: If the key does not match the certificate.
    """
    if not material.cas:
        raise ValueError("backend TLS needs at least one CA certificate")
    try:
        version = TLS_VERSIONS[minVersion]
    except KeyError:
        raise ValueError(
            f"min_version must be one of {', '.join(TLS_VERSIONS)}, not {minVersion!r}"
        ) from None
    if (material.key is None) != (not material.chain):
        raise ValueError("a client certificate needs its key, and a key its certificate")

    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(version)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    context.set_options(_CONTEXT_OPTIONS)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.set_cipher_list(TLS12_CIPHERS)

    if material.chain:
        leaf, *intermediates = material.chain
        context.use_certificate(leaf)
        for intermediate in intermediates:
            context.add_extra_chain_cert(intermediate)
        assert material.key is not None
        context.use_privatekey(material.key)
        context.check_privatekey()

    # Only the configured CAs: set_default_verify_paths is never called.
    store = context.get_cert_store()
    assert store is not None
    for authority in material.cas:
        store.add_cert(crypto.X509.from_cryptography(authority))
    if material.crls:
        for crl in material.crls:
            store.add_crl(crl)
        store.set_flags(_REVOCATION_FLAGS)
    context.set_verify(
        SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
        lambda connection, certificate, errorNumber, depth, ok: bool(ok),
    )
    return context


@attrs.frozen(eq=False)
class BackendTLS:
    """
    The backend TLS settings of one pool: what
    L{IHealthCheckerFactory.newChecker<mtlsproxy.interfaces.IHealthCheckerFactory.newChecker>}
    receives as C{tls} and what the relay connects members with.

    Build it with L{BackendTLS.create} or L{BackendTLS.fromConfig}, once
    per pool (and again on a reload: the context is frozen once used; the
    pool's L{SwappableBackendTLS} hands out the one in force).

    @ivar poolName: The pool's name, for errors and logs.
    @ivar context: The client context shared by all connections of the
        pool; do not mutate it.
    @ivar serverName: The configured C{server_name}, or L{None} to check
        each member's address.
    @ivar crlMissing: The C{crl_missing} policy.
    @ivar crlExpired: The C{crl_expired} policy.
    @ivar anchors: SHA-256 digests (pyOpenSSL's C{X509.digest} format) of
        the configured self-signed CAs: they need no CRL.
    @ivar crls: The configured CRLs by issuer, the ones the context checks
        members against: what a reload checks I{established} connections
        against (L{mtlsproxy.revocation.closeRevokedBackendConnections}).
    """

    poolName: str
    context: SSL.Context
    serverName: Optional[str] = None
    crlMissing: CRLMissing = CRL_MISSING_DEFAULT
    crlExpired: CRLExpired = CRL_EXPIRED_DEFAULT
    anchors: frozenset[bytes] = frozenset()
    crls: CRLIndex = attrs.field(factory=lambda: CRLIndex.fromCRLs(()))
    _sessions: weakref.WeakKeyDictionary[SSL.Connection, _Session] = attrs.field(
        factory=weakref.WeakKeyDictionary, init=False, repr=False
    )

    def __attrs_post_init__(self) -> None:
        """
        Watch the handshakes of the context's connections (see
        L{_infoCallback}).
        """
        self.context.set_info_callback(self._infoCallback)

    @classmethod
    def create(
        cls,
        poolName: str,
        material: BackendTLSMaterial,
        serverName: Optional[str] = None,
        minVersion: str = "1.2",
        crlMissing: CRLMissing = CRL_MISSING_DEFAULT,
        crlExpired: CRLExpired = CRL_EXPIRED_DEFAULT,
    ) -> BackendTLS:
        """
        Build the backend TLS settings of a pool.

        @param poolName: The pool's name.
        @param material: Its CAs, CRLs and client certificate.
        @param serverName: The name to check (and send as SNI) instead of
            each member's address.
        @param minVersion: C{"1.2"} or C{"1.3"}.
        @param crlMissing: The C{crl_missing} policy.
        @param crlExpired: The C{crl_expired} policy.

        @raise ValueError: See L{buildBackendContext}.
        """
        anchors = frozenset(
            crypto.X509.from_cryptography(authority).digest("sha256")
            for authority in material.cas
            if authority.issuer == authority.subject
        )
        return cls(
            poolName=poolName,
            context=buildBackendContext(material, minVersion),
            serverName=serverName,
            crlMissing=crlMissing,
            crlExpired=crlExpired,
            anchors=anchors,
            crls=CRLIndex.fromCRLs(material.crls),
        )

    @classmethod
    def fromConfig(
        cls, poolName: str, config: BackendTLSConfig, material: BackendTLSMaterial
    ) -> BackendTLS:
        """
        Build the backend TLS settings of a pool from its C{[pools.tls]}
        table and the material L{mtlsproxy.checks} loaded for it.
        """
        return cls.create(
            poolName,
            material,
            serverName=config.server_name,
            minVersion=config.min_version,
            crlMissing=CRLMissing(config.crl_missing),
            crlExpired=CRLExpired(config.crl_expired),
        )

    def clientConnectionCreator(self, member: Any) -> BackendConnectionCreator:
        """
        The TLS connection creator for connections to C{member}.

        @param member: Anything with C{address} and C{port} (an
            L{IMemberState} provider, a L{MemberConfig
            <mtlsproxy.config.MemberConfig>}).
        """
        name = self.serverName if self.serverName is not None else member.address
        try:
            ipaddress.ip_address(name)
        except ValueError:
            isAddress = False
        else:
            isAddress = True
        return BackendConnectionCreator(
            tls=self,
            member=_hostPort(member.address, member.port),
            serverName=name,
            isIPAddress=isAddress,
        )

    def wrapFactory(
        self,
        member: Any,
        wrappedFactory: IProtocolFactory,
        clock: IReactorTime,
        timeout: float,
    ) -> BackendTLSFactory:
        """
        Wrap the factory of one connection attempt to C{member} so that it
        connects over TLS: see L{BackendTLSFactory}.

        @param member: See L{clientConnectionCreator}.
        @param wrappedFactory: The attempt's factory (a C{ClientFactory}):
            it builds its protocol only once the member is verified and has
            accepted the proxy, and hears of any TLS failure through
            C{clientConnectionFailed}.
        @param clock: For the handshake timeout.
        @param timeout: Seconds the TLS handshake may take once TCP is
            connected.
        """
        return BackendTLSFactory(
            self.clientConnectionCreator(member), wrappedFactory, clock, timeout
        )

    # -- per-connection state -----------------------------------------------

    def _register(self, connection: SSL.Connection, session: _Session) -> None:
        """
        Remember the verification state of a new connection.
        """
        self._sessions[connection] = session

    def _sessionOf(self, connection: Optional[SSL.Connection]) -> Optional[_Session]:
        """
        The verification state of a connection of this context, if any.
        """
        if connection is None:
            return None
        return self._sessions.get(connection)

    def _infoCallback(self, connection: SSL.Connection, where: int, ret: int) -> None:
        """
        Note, for L{BackendTLSProtocol}, whether the member asked for a
        client certificate and whether it sent anything after the handshake.
        The context's info callback; called by OpenSSL in the middle of a
        read, so it only records.
        """
        session = self._sessions.get(connection)
        if session is None:
            return
        if where & SSL.SSL_CB_HANDSHAKE_DONE:
            session.handshakeDone = True
        elif where & SSL.SSL_CB_LOOP:
            state = connection.get_state_string() or b""
            if not session.handshakeDone:
                if b"certificate request" in state:
                    session.certificateRequested = True
            elif b"read" in state:
                # A post-handshake message (a session ticket): the member
                # got past our Finished and certificate.
                session.postHandshakeMessage = True


def memberConnectionOf(
    transport: Any,
) -> Optional[tuple[BackendConnectionCreator, SSL.Connection]]:
    """
    The member and the OpenSSL connection behind an established backend
    connection, if it is a TLS connection to a member that was verified and
    accepted.

    @param transport: The transport of a backend connection's application
        protocol (the relay's or the C{https} listener's): a
        L{BackendTLSProtocol} for a pool with C{[pools.tls]}, a TCP
        transport otherwise.

    @return: The creator of the connection (its C{tls.poolName}, C{member}
        and C{serverName}) and its L{OpenSSL.SSL.Connection}
        (C{get_peer_cert_chain()}, C{get_verified_chain()}), or L{None}.
    """
    if not isinstance(transport, BackendTLSProtocol) or not transport.accepted:
        return None
    connection = transport.getHandle()
    if not isinstance(connection, SSL.Connection):
        return None
    return transport.factory.creator, connection


class SwappableBackendTLS:
    """
    The backend TLS settings of a pool as the relay, the routers and the
    health checkers keep them for the proxy's whole life: it delegates to
    L{current}, which a reload replaces in one assignment (as
    L{SwappableContextFactory<mtlsproxy.tlscontext.SwappableContextFactory>}
    does for listeners).

    Every connection asks for its creator when it is made
    (L{clientConnectionCreator}, L{wrapFactory}), so I{new} connections and
    health checks use the material in force; a connection made before keeps
    the L{BackendTLS} (context, CAs, CRLs, client certificate) it was made
    with until it ends.

    It offers the whole interface of L{BackendTLS} (C{poolName},
    C{context}, C{serverName}, ... are those of L{current}), so it is what
    health checker plugins receive as C{tls}.  A plugin should ask it for a
    creator per connection, not keep one: a creator, like a L{BackendTLS},
    is bound to the material of its time.

    @ivar current: The L{BackendTLS} new connections are made with.
    """

    def __init__(self, current: BackendTLS) -> None:
        self.current = current

    def clientConnectionCreator(self, member: Any) -> BackendConnectionCreator:
        """
        The connection creator of the material in force: see
        L{BackendTLS.clientConnectionCreator}.
        """
        return self.current.clientConnectionCreator(member)

    def wrapFactory(
        self,
        member: Any,
        wrappedFactory: IProtocolFactory,
        clock: IReactorTime,
        timeout: float,
    ) -> BackendTLSFactory:
        """
        Wrap one connection attempt with the material in force: see
        L{BackendTLS.wrapFactory}.
        """
        return self.current.wrapFactory(member, wrappedFactory, clock, timeout)

    def __getattr__(self, name: str) -> Any:
        """
        Everything else (C{poolName}, C{context}, C{serverName}, ...) from
        the current settings.
        """
        if name == "current":
            raise AttributeError(name)
        return getattr(self.current, name)

    def __repr__(self) -> str:
        return f"<SwappableBackendTLS of pool {self.current.poolName!r}>"


@attrs.define(eq=False)
class _Session:
    """
    The verification state of one connection to a member.

    @ivar creator: The creator that made the connection.
    @ivar failure: The first verification failure, if any.
    @ivar certificateRequested: The member sent a CertificateRequest.
    @ivar handshakeDone: OpenSSL reported the handshake done.
    @ivar postHandshakeMessage: The member sent a handshake message after
        the handshake (a TLS 1.3 session ticket).
    """

    creator: BackendConnectionCreator
    failure: Optional[BackendTLSError] = None
    certificateRequested: bool = False
    handshakeDone: bool = False
    postHandshakeMessage: bool = False

    def verifyCallback(
        self,
        connection: SSL.Connection,
        certificate: crypto.X509,
        errorNumber: int,
        depth: int,
        ok: int,
    ) -> bool:
        """
        Decide about one certificate of the member's chain (the signature
        C{set_verify} expects): apply the pool's CRL policies to what
        OpenSSL found wrong, and check the name on the member's own
        certificate once the chain verified.

        Never raises: an unexpected exception is logged and fails the
        handshake.
        """
        try:
            if not ok:
                if self._allowed(certificate, errorNumber):
                    return True
                self._fail(
                    connection,
                    reasonForVerifyError(errorNumber),
                    f"{verifyErrorString(errorNumber)} (depth {depth})",
                    depth,
                    certificate.to_cryptography(),
                )
                return False
            if depth == 0:
                described = certificate.to_cryptography()
                problem = self.creator.nameProblem(described)
                if problem is not None:
                    self._fail(connection, HOSTNAME_MISMATCH, problem, depth, described)
                    return False
            return True
        except Exception:
            log.failure(
                "Verifying the certificate of member {member} of pool {pool} failed",
                member=self.creator.member,
                pool=self.creator.tls.poolName,
            )
            try:
                self._fail(
                    connection, INTERNAL_ERROR, "verification raised an exception", depth, None
                )
            except Exception:
                pass
            return False

    def _allowed(self, certificate: crypto.X509, errorNumber: int) -> bool:
        """
        Does a policy override this problem?  A missing CRL for a configured
        self-signed CA (nothing could revoke it), C{crl_missing = "allow"},
        C{crl_expired = "allow"}.
        """
        tls = self.creator.tls
        reason = reasonForVerifyError(errorNumber)
        setting: Optional[str] = None
        if reason == CRL_MISSING:
            if certificate.digest("sha256") in tls.anchors:
                return True
            if tls.crlMissing is CRLMissing.ALLOW:
                setting = "crl_missing"
        elif reason == CRL_EXPIRED and tls.crlExpired is CRLExpired.ALLOW:
            setting = "crl_expired"
        if setting is None:
            return False
        log.warn(
            ALLOWED_FORMAT,
            member=self.creator.member,
            pool=tls.poolName,
            certificateSubject=certificate.to_cryptography().subject.rfc4514_string(),
            reason=reason,
            setting=setting,
        )
        return True

    def _fail(
        self,
        connection: SSL.Connection,
        reason: str,
        error: str,
        depth: Optional[int],
        certificate: Optional[x509.Certificate],
    ) -> None:
        """
        Record a verification failure and abort the connection with it, the
        way Twisted's C{ClientTLSOptions} does: the TLS protocol's
        C{failVerification} makes it the reason its application protocol's
        C{connectionLost} receives.
        """
        failure = BackendTLSError(
            reason,
            error,
            self.creator.member,
            self.creator.tls.poolName,
            self.creator.serverName,
            depth,
            certificate,
        )
        if self.failure is None:
            self.failure = failure
        failVerification = getattr(connection.get_app_data(), "failVerification", None)
        if failVerification is not None:
            failVerification(Failure(failure))


@implementer(IOpenSSLClientConnectionCreator)
@attrs.frozen(eq=False)
class BackendConnectionCreator:
    """
    Makes the TLS connections to one member.

    @ivar tls: The pool's L{BackendTLS}.
    @ivar member: C{"host:port"} of the member.
    @ivar serverName: The name the member's certificate must be valid for.
    @ivar isIPAddress: C{serverName} is an IP address: it is matched
        against IP address subjectAltNames and not sent as SNI.
    """

    tls: BackendTLS
    member: str
    serverName: str
    isIPAddress: bool

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """
        Create the OpenSSL connection to the member, with SNI and a verify
        callback of its own; Twisted puts it in connect state.
        """
        connection = SSL.Connection(self.tls.context, None)
        connection.set_app_data(tlsProtocol)
        if not self.isIPAddress:
            connection.set_tlsext_host_name(self._serverNameBytes())
        session = _Session(self)
        self.tls._register(connection, session)
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, session.verifyCallback
        )
        return connection

    def _serverNameBytes(self) -> bytes:
        """
        The server name for SNI: IDNA for a non-ASCII name.
        """
        try:
            return self.serverName.encode("ascii")
        except UnicodeEncodeError:
            return self.serverName.encode("idna")

    def nameProblem(self, certificate: x509.Certificate) -> Optional[str]:
        """
        Check that C{certificate} is valid for L{serverName}
        (C{service_identity}: subjectAltName DNS names with wildcards, or IP
        addresses).

        @return: L{None} if it is, otherwise what is wrong.
        """
        try:
            if self.isIPAddress:
                verify_certificate_ip_address(certificate, self.serverName)
            else:
                verify_certificate_hostname(certificate, self.serverName)
        except (VerificationError, CertificateError):
            kind = "IP address" if self.isIPAddress else "host name"
            return (
                f"the certificate of {self.member} ({certificate.subject.rfc4514_string()})"
                f" is not valid for the {kind} {self.serverName}; its names:"
                f" {_subjectAltNames(certificate)}"
            )
        return None


def _subjectAltNames(certificate: x509.Certificate) -> str:
    """
    The DNS names and IP addresses of a certificate's subjectAltName, for a
    message.
    """
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "none (no subjectAltName)"
    listed: Sequence[object] = [
        *names.get_values_for_type(x509.DNSName),
        *(str(address) for address in names.get_values_for_type(x509.IPAddress)),
    ]
    return ", ".join(str(name) for name in listed) or "none"


# ---------------------------------------------------------------------------
# Connecting: the handshake as part of the connection attempt
# ---------------------------------------------------------------------------


@implementer(IHandshakeListener, IHalfCloseableProtocol)
class _Unaccepted(Protocol):
    """
    Stands in for the application protocol of a L{BackendTLSProtocol}
    until the member is verified and has accepted the proxy: it hears of
    the handshake and of a member that speaks first, and of a connection
    that ends before.
    """

    def __init__(self) -> None:
        self.tls: Optional[BackendTLSProtocol] = None

    def handshakeCompleted(self) -> None:
        assert self.tls is not None
        self.tls._memberHandshakeCompleted()

    def dataReceived(self, data: bytes) -> None:
        # The member sent application data: it accepted us.
        assert self.tls is not None
        self.tls._memberAccepted()
        if self.tls.wrappedProtocol is not self:
            self.tls.wrappedProtocol.dataReceived(data)

    def readConnectionLost(self) -> None:
        # An orderly TLS 1.3 close_notify, not an alert: it accepted us.
        assert self.tls is not None
        self.tls._memberAccepted()
        wrapped = self.tls.wrappedProtocol
        if wrapped is not self and IHalfCloseableProtocol.providedBy(wrapped):
            wrapped.readConnectionLost()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        assert self.tls is not None
        self.tls._memberFailed(reason)


class BackendTLSProtocol(HalfCloseTLSProtocol):
    """
    A client TLS connection to a member whose application protocol is
    built only when the member is verified and has accepted the proxy's
    certificate (see the module docstring).

    @ivar accepted: The application protocol has been built.
    """

    factory: BackendTLSFactory

    accepted = False
    _connectedAt = 0.0
    _timeoutCall: Optional[IDelayedCall] = None
    _acceptanceCall: Optional[IDelayedCall] = None

    def makeConnection(self, transport: Any) -> None:
        """
        TCP is connected: start the handshake and its timeout.
        """
        clock = self.factory.clock
        self._connectedAt = clock.seconds()
        self._timeoutCall = clock.callLater(self.factory.timeout, self._memberTimedOut)
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        """
        Process TLS bytes; if they held the member's first message after
        the handshake (a session ticket), it has accepted the proxy.
        """
        super().dataReceived(data)
        if self._acceptanceCall is not None and not self._lostTLSConnection:
            session = self._session()
            if session is not None and session.postHandshakeMessage:
                self._memberAccepted()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        """
        Cancel the timers; the wrapped protocol (or L{_Unaccepted}) hears
        the rest.
        """
        self._cancelTimers()
        super().connectionLost(reason)

    def _session(self) -> Optional[_Session]:
        """
        The verification state of this connection.
        """
        return self.factory.creator.tls._sessionOf(self._tlsConnection)

    def _cancelTimers(self) -> None:
        for name in ("_timeoutCall", "_acceptanceCall"):
            call = getattr(self, name)
            setattr(self, name, None)
            if call is not None and call.active():
                call.cancel()

    def _memberTimedOut(self) -> None:
        """
        The handshake took longer than the connect timeout.
        """
        self._timeoutCall = None
        creator = self.factory.creator
        self.failVerification(
            Failure(
                BackendTLSError(
                    HANDSHAKE_TIMEOUT,
                    f"the TLS handshake did not finish within {self.factory.timeout:g}s",
                    creator.member,
                    creator.tls.poolName,
                    creator.serverName,
                )
            )
        )

    def _memberHandshakeCompleted(self) -> None:
        """
        The handshake is complete and the member verified.  Unless a TLS 1.3
        member asked for our certificate and has yet to say what it thinks
        of it, it is accepted now.
        """
        session = self._session()
        waitForVerdict = (
            session is not None
            and session.certificateRequested
            and not session.postHandshakeMessage
            and self._tlsConnection.get_protocol_version_name() == TLS13
        )
        if not waitForVerdict:
            self._memberAccepted()
            return
        clock = self.factory.clock
        now = clock.seconds()
        handshakeTime = now - self._connectedAt
        remaining = self.factory.timeout - handshakeTime
        wait = min(
            max(2 * handshakeTime, ACCEPTANCE_WAIT_MIN), ACCEPTANCE_WAIT_MAX, max(remaining, 0.0)
        )
        if self._timeoutCall is not None and self._timeoutCall.active():
            self._timeoutCall.cancel()
        self._timeoutCall = None
        self._acceptanceCall = clock.callLater(wait, self._memberAccepted)

    def _memberAccepted(self) -> None:
        """
        The member is verified and accepted the proxy: build the application
        protocol and connect it.
        """
        if self.accepted or self._lostTLSConnection or self.disconnecting:
            return
        self.accepted = True
        self.factory.accepted = True
        self._cancelTimers()
        protocol = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if protocol is None:
            self.loseConnection()
            return
        self.wrappedProtocol = protocol
        protocol.makeConnection(self)

    def _memberFailed(self, reason: Failure) -> None:
        """
        The connection ended before the member was accepted: tell the
        wrapped factory that connecting failed, and why.
        """
        self._cancelTimers()
        if self.accepted:
            return
        self.factory.connectionFailed(self.transport, reason)


class BackendTLSFactory(HalfCloseTLSFactory):
    """
    Wraps the factory of one connection attempt to one member so that the
    attempt connects over TLS and succeeds only once the member is verified
    and has accepted the proxy's certificate (L{BackendTLSProtocol}).

    Use one per attempt (C{connectTCP(host, port, factory)}): a TLS failure
    is reported to the wrapped factory's C{clientConnectionFailed} with a
    L{BackendTLSError}, and the C{clientConnectionLost} that follows it is
    not passed on.

    @ivar creator: Makes the TLS connection to the member.
    @ivar clock: For the handshake timeout and the acceptance wait.
    @ivar timeout: Seconds the handshake may take once TCP is connected.
    @ivar accepted: The member was accepted and the wrapped factory's
        protocol built.
    """

    protocol = BackendTLSProtocol

    noisy = False

    def __init__(
        self,
        creator: BackendConnectionCreator,
        wrappedFactory: IProtocolFactory,
        clock: IReactorTime,
        timeout: float,
    ) -> None:
        super().__init__(creator, True, wrappedFactory, clock=clock)
        self.creator = creator
        self.clock = clock
        self.timeout = timeout
        self.accepted = False
        self._failed = False

    def buildProtocol(self, addr: Any) -> BackendTLSProtocol:
        """
        Make the TLS protocol, with a stand-in for the application protocol
        until the member is accepted.
        """
        standIn = _Unaccepted()
        protocol = self.protocol(self, standIn)
        standIn.tls = protocol
        return protocol

    def connectionFailed(self, transport: Any, reason: Failure) -> None:
        """
        Report the TLS failure of the connection on C{transport} (once).
        """
        if self._failed:
            return
        self._failed = True
        error = describeFailure(
            reason, self.creator.member, self.creator.tls.poolName, self.creator.serverName
        )
        self.wrappedFactory.clientConnectionFailed(  # type: ignore[attr-defined]
            getattr(transport, "connector", None), Failure(error)
        )

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        """
        Pass the loss of an accepted connection on; one that was never
        accepted has been reported as failed already.
        """
        if self.accepted:
            super().clientConnectionLost(connector, reason)
