# -*- test-case-name: tests.test_verify,tests.test_reload,tests.test_trust_withdrawn -*-
"""
Certificate revocation policy.

OpenSSL does the revocation checking itself: L{mtlsproxy.tlscontext} puts the
configured CRLs into the listener's certificate store with C{CRL_CHECK |
CRL_CHECK_ALL}, so every certificate of a client's chain below the
self-signed trust anchor is looked up in the CRL of its issuer, and OpenSSL
reports C{X509_V_ERR_CERT_REVOKED}, C{X509_V_ERR_UNABLE_TO_GET_CRL} or
C{X509_V_ERR_CRL_HAS_EXPIRED} to the verify callback in
L{mtlsproxy.verify}.

This module holds what is ours rather than OpenSSL's:

  - the two policy settings of a listener, L{CRLMissing} (C{crl_missing})
    and L{CRLExpired} (C{crl_expired}), and their fail-closed defaults;
  - L{CRLIndex}, the configured CRLs indexed by issuer, which the verify
    callback uses to describe a revocation (date, reason) in the log, and
    which status and expiry reporting can use to find CRLs that are past,
    or close to, their nextUpdate (L{CRLIndex.status});
  - revocation of I{established} connections: OpenSSL only checks CRLs
    during a handshake, so when a reload brings a CRL that revokes a
    certificate a live connection was verified with (its leaf or any CA of
    its verified chain), L{closeRevokedConnections} finds and closes it
    (C{close_revoked_connections = true}, the default).  The same goes for
    the other side: when a reload brings a pool's C{[pools.tls]} a CRL that
    revokes a certificate of a member's chain,
    L{closeRevokedBackendConnections} closes the relayed connections to that
    member, client side too, and L{closeRevokedIdleBackends} the idle ones
    the C{https} listener keeps for reuse (the pool's
    C{close_revoked_connections = true}, the default);
  - withdrawn trust of I{established} connections: when a reload changes
    the CA certificates a listener (or one of its SNI sites) or a pool's
    C{[pools.tls]} trusts, OpenSSL verifies each established connection's
    chain again, against a store of the new CAs only
    (L{TrustStore}), and L{closeUntrustedConnections},
    L{closeUntrustedBackendConnections} and L{closeUntrustedIdleBackends}
    close those it no longer accepts (C{untrusted_live}), under the same
    C{close_revoked_connections} setting.

Nothing here does I/O or blocks; an index is built once per listener
context and only read afterwards.
"""

from __future__ import annotations

import enum
import hashlib
from datetime import datetime, timezone
from typing import Any, Callable, Collection, Final, Iterable, Literal, Mapping, Optional

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto
from twisted.logger import Logger

__all__ = [
    "CRLMissing",
    "CRLExpired",
    "CRL_MISSING_DEFAULT",
    "CRL_EXPIRED_DEFAULT",
    "CRLState",
    "CRLStatus",
    "CRLIndex",
    "crlState",
    "isSelfIssued",
    "ChainLink",
    "REVOKED_LIVE",
    "REVOKED_LIVE_FORMAT",
    "REVOKED_MEMBER_FORMAT",
    "Revocation",
    "closeRevokedBackendConnections",
    "closeRevokedConnections",
    "closeRevokedIdleBackends",
    "revocationIn",
    "verifiedChainOf",
    "UNTRUSTED_LIVE",
    "UNTRUSTED_LIVE_FORMAT",
    "UNTRUSTED_MEMBER_FORMAT",
    "ListenerTrust",
    "PeerChain",
    "TrustFailure",
    "TrustPurpose",
    "TrustStore",
    "closeUntrustedBackendConnections",
    "closeUntrustedConnections",
    "closeUntrustedIdleBackends",
    "listenerTrustSets",
    "peerChainOf",
    "trustSet",
]

log = Logger()


class CRLMissing(enum.Enum):
    """
    What to do with a client certificate whose issuer has no CRL configured
    (the listener setting C{crl_missing}).

    The self-signed trust anchor at the top of a chain never needs a CRL:
    nothing above it could revoke it.
    """

    REJECT = "reject"
    """
    Refuse the handshake (OpenSSL's C{unable to get certificate CRL}, alert
    C{unknown_ca}).  The default: a CA we cannot check is treated like a CA
    we do not trust.
    """

    ALLOW = "allow"
    """
    Accept the certificate as if it were not revoked, and log a warning for
    every handshake that relies on this.
    """


class CRLExpired(enum.Enum):
    """
    What to do when the CRL of a certificate's issuer is past its
    nextUpdate (the listener setting C{crl_expired}).

    A certificate that the expired CRL lists as revoked is rejected either
    way; this only decides about certificates the stale list does not
    mention.
    """

    REJECT = "reject"
    """
    Refuse the handshake (OpenSSL's C{CRL has expired}, alert
    C{certificate_expired}).  The default: a stale list may be missing
    recent revocations.
    """

    ALLOW = "allow"
    """
    Use the stale list anyway and log a warning for every handshake that
    relies on it.
    """


CRL_MISSING_DEFAULT: Final = CRLMissing.REJECT
"""
The documented default of C{crl_missing}: fail closed.
"""

CRL_EXPIRED_DEFAULT: Final = CRLExpired.REJECT
"""
The documented default of C{crl_expired}: fail closed.
"""


CRLState = Literal["current", "expired", "not_yet_valid"]
"""
Where a CRL stands at a given time: C{"current"} between its lastUpdate and
nextUpdate (or after lastUpdate if it has no nextUpdate), C{"expired"} past
its nextUpdate, C{"not_yet_valid"} before its lastUpdate.
"""


def _utc(when: datetime) -> datetime:
    """
    Normalize C{when} to timezone-aware UTC; naive values are taken to be
    UTC, as C{cryptography} does.
    """
    if when.tzinfo is None:
        return when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc)


def crlState(crl: x509.CertificateRevocationList, now: datetime) -> CRLState:
    """
    Where C{crl} stands at C{now}, the same way OpenSSL judges it during
    verification (C{X509_V_ERR_CRL_HAS_EXPIRED} past nextUpdate,
    C{X509_V_ERR_CRL_NOT_YET_VALID} before lastUpdate).

    @param crl: The revocation list.
    @param now: The time to judge at; naive values are taken to be UTC.
    """
    now = _utc(now)
    if now < crl.last_update_utc:
        return "not_yet_valid"
    nextUpdate = crl.next_update_utc
    if nextUpdate is not None and now > nextUpdate:
        return "expired"
    return "current"


def isSelfIssued(certificate: x509.Certificate) -> bool:
    """
    Is C{certificate} its own issuer (a root), so that no CRL can cover it?
    """
    return certificate.issuer == certificate.subject


@attrs.frozen
class CRLStatus:
    """
    A summary of one configured CRL at a point in time, for status pages,
    start-up warnings and expiry alarms.

    @ivar issuer: The CRL issuer's distinguished name, RFC 4514.
    @ivar lastUpdate: The CRL's thisUpdate.
    @ivar nextUpdate: The CRL's nextUpdate, or L{None} if it has none.
    @ivar state: See L{CRLState}.
    @ivar revokedCount: How many certificates the CRL revokes.
    """

    issuer: str
    lastUpdate: datetime
    nextUpdate: datetime | None
    state: CRLState
    revokedCount: int


@attrs.frozen
class CRLIndex:
    """
    The CRLs of one listener, indexed by issuer name.

    Build it once with L{CRLIndex.fromCRLs}; lookups are dictionary lookups
    plus C{cryptography}'s own lookup by serial number, cheap enough for the
    (rare) rejection path of a handshake.
    """

    _byIssuer: Mapping[x509.Name, tuple[x509.CertificateRevocationList, ...]]

    @classmethod
    def fromCRLs(cls, crls: Iterable[x509.CertificateRevocationList]) -> CRLIndex:
        """
        Index C{crls} by issuer.  Several CRLs of one issuer are kept in the
        given order.
        """
        byIssuer: dict[x509.Name, list[x509.CertificateRevocationList]] = {}
        for crl in crls:
            byIssuer.setdefault(crl.issuer, []).append(crl)
        return cls({name: tuple(found) for name, found in byIssuer.items()})

    def crlsFor(self, issuer: x509.Name) -> tuple[x509.CertificateRevocationList, ...]:
        """
        The configured CRLs issued by C{issuer} (possibly none).
        """
        return self._byIssuer.get(issuer, ())

    def hasCRLFor(self, issuer: x509.Name) -> bool:
        """
        Is at least one CRL of C{issuer} configured?
        """
        return issuer in self._byIssuer

    def revocationOf(
        self, serialNumber: int, issuer: x509.Name
    ) -> x509.RevokedCertificate | None:
        """
        The revocation entry for the certificate with C{serialNumber} issued
        by C{issuer}, or L{None} if no configured CRL lists it.
        """
        for crl in self._byIssuer.get(issuer, ()):
            entry = crl.get_revoked_certificate_by_serial_number(serialNumber)
            if entry is not None:
                return entry
        return None

    def missingFor(
        self, authorities: Iterable[x509.Certificate]
    ) -> tuple[x509.Certificate, ...]:
        """
        The certificate authorities among C{authorities} whose certificates
        would fail the C{crl_missing} check: those that are not self-issued
        (a root needs no CRL) and are not covered by a CRL of their issuer,
        plus those whose own CRL (for the certificates they issue) is
        missing.

        @return: The CAs from C{authorities}, in the given order, for which
            some needed CRL is not configured.
        """
        missing = []
        for authority in authorities:
            issuesWithoutCRL = not self.hasCRLFor(authority.subject)
            coveredByIssuer = isSelfIssued(authority) or self.hasCRLFor(authority.issuer)
            if issuesWithoutCRL or not coveredByIssuer:
                missing.append(authority)
        return tuple(missing)

    def status(self, now: datetime) -> tuple[CRLStatus, ...]:
        """
        Summarize every configured CRL at C{now}.
        """
        return tuple(
            CRLStatus(
                issuer=crl.issuer.rfc4514_string(),
                lastUpdate=crl.last_update_utc,
                nextUpdate=crl.next_update_utc,
                state=crlState(crl, now),
                revokedCount=len(crl),
            )
            for crls in self._byIssuer.values()
            for crl in crls
        )

    def __len__(self) -> int:
        """
        How many CRLs are indexed.
        """
        return sum(len(crls) for crls in self._byIssuer.values())


# ---------------------------------------------------------------------------
# Live connections
# ---------------------------------------------------------------------------

REVOKED_LIVE: Final = "revoked_live"
"""
The C{reason} of the event logged when an established connection is closed
because a reloaded CRL revokes a certificate of its verified chain.
"""

REVOKED_LIVE_FORMAT: Final = (
    "Closing connection {connectionId} of {peer} on listener {listener}:"
    " {reason}: certificate {serial} ({subject}, issued by {issuer}) is revoked"
)
"""
The C{log_format} of the event (level C{warn}) logged for every connection
L{closeRevokedConnections} closes.  Fields: C{reason} (L{REVOKED_LIVE}),
C{connectionId}, C{peer}, C{listener}; the revoked certificate's C{serial}
(lower-case hex), C{subject} and C{issuer} (RFC 4514) and C{depth} in the
chain (0 is the client's own certificate); C{revocationDate} (ISO 8601) and
C{revocationReason} from the CRL entry (or L{None}); and the client's own
certificate as C{clientSubject} and C{clientSerial}.
"""


REVOKED_MEMBER_FORMAT: Final = (
    "Closing connection {connectionId} of {peer} on listener {listener}:"
    " {reason}: member {member} of pool {pool} presents certificate {serial}"
    " ({subject}, issued by {issuer}), which is revoked"
)
"""
The C{log_format} of the event (level C{warn}) logged for every connection
L{closeRevokedBackendConnections} or L{closeRevokedIdleBackends} closes.
Fields: C{reason} (L{REVOKED_LIVE}), C{connectionId} (L{None} for an idle
backend connection), C{peer} (the client's C{host:port}, or
C{"none (idle)"}), C{listener}, C{pool}, C{member} (C{host:port}); the
revoked certificate's C{serial}, C{subject}, C{issuer}, C{depth} (0 is the
member's own certificate), C{revocationDate} and C{revocationReason} as in
L{REVOKED_LIVE_FORMAT}; and the member's own certificate as
C{memberSubject} and C{memberSerial}.
"""

_NOT_ESTABLISHED: Final = frozenset({"new", "handshaking", "closed"})
"""
The phases (L{mtlsproxy.drain.ConnectionInfo.phase}) of connections a
sweep leaves alone.
"""


@attrs.frozen
class ChainLink:
    """
    One certificate of a connection's verified chain, as far as revocation
    is concerned.

    @ivar depth: Its position, 0 for the client's own certificate.
    @ivar serial: Its serial number.
    @ivar subject: Its subject.
    @ivar issuer: Its issuer, whose CRL would list it.
    """

    depth: int
    serial: int
    subject: x509.Name
    issuer: x509.Name


def verifiedChainOf(connectionOrTransport: Any) -> tuple[ChainLink, ...]:
    """
    The verified client chain of an established TLS connection: the leaf,
    then each issuer up to the trust anchor.

    OpenSSL keeps the chain it verified with the connection; a resumed
    session has none, and then the client certificate and the chain it sent
    in the original handshake (kept in the session) stand in for it.

    @param connectionOrTransport: An L{OpenSSL.SSL.Connection}, or a TLS
        transport with C{getHandle()}, or a relay protocol whose
        C{transport} is one.

    @return: The links, or C{()} for no TLS or no client certificate.
    """
    found = peerChainOf(connectionOrTransport)
    if found is None:
        return ()
    return tuple(
        ChainLink(depth, certificate.serial_number, certificate.subject, certificate.issuer)
        for depth, certificate in enumerate(found.verifiedOrSent())
    )


def _sslConnectionOf(connectionOrTransport: Any) -> Optional[SSL.Connection]:
    """
    The L{OpenSSL.SSL.Connection} behind a connection, a TLS transport
    (C{getHandle()}) or a protocol whose C{transport} is one, or L{None}.
    """
    target = connectionOrTransport
    for _ in range(3):
        if isinstance(target, SSL.Connection):
            break
        getHandle = getattr(target, "getHandle", None)
        if getHandle is not None:
            target = getHandle()
            continue
        target = getattr(target, "transport", None)
    return target if isinstance(target, SSL.Connection) else None


@attrs.frozen
class PeerChain:
    """
    The certificates of the peer of an established TLS connection.

    @ivar connection: The OpenSSL connection.
    @ivar leaf: The peer's own certificate.
    @ivar sent: The other certificates the peer sent with it (untrusted
        intermediates), in the order sent.
    @ivar verified: The chain OpenSSL verified in the handshake, leaf
        first, up to the trust anchor; empty for a resumed session.
    """

    connection: SSL.Connection
    leaf: x509.Certificate
    sent: tuple[x509.Certificate, ...]
    verified: tuple[x509.Certificate, ...]

    def verifiedOrSent(self) -> tuple[x509.Certificate, ...]:
        """
        The verified chain, or (resumed session) the leaf and what was sent.
        """
        return self.verified or (self.leaf,) + self.sent


def peerChainOf(connectionOrTransport: Any) -> Optional[PeerChain]:
    """
    The peer's certificates of an established TLS connection: its own, the
    ones it sent, and the chain OpenSSL verified.

    OpenSSL keeps the chain it verified with the connection; a resumed
    session has none (and the certificates sent in the original handshake
    are kept in the session).  A server's C{get_peer_cert_chain()} lacks the
    client's own certificate, a client's starts with the server's: C{sent}
    never holds the leaf.

    @param connectionOrTransport: As for L{verifiedChainOf}.

    @return: The chain, or L{None} for no TLS or no peer certificate.
    """
    target = _sslConnectionOf(connectionOrTransport)
    if target is None:
        return None
    leaf = target.get_peer_certificate(as_cryptography=True)
    if leaf is None:
        return None
    sent = tuple(c for c in target.get_peer_cert_chain(as_cryptography=True) or () if c != leaf)
    verified = tuple(target.get_verified_chain(as_cryptography=True) or ())
    return PeerChain(target, leaf, sent, verified)


@attrs.frozen
class Revocation:
    """
    A certificate of a chain that a CRL revokes.

    @ivar link: The certificate.
    @ivar entry: The CRL entry revoking it.
    """

    link: ChainLink
    entry: x509.RevokedCertificate


def revocationIn(chain: Iterable[ChainLink], crls: CRLIndex) -> Optional[Revocation]:
    """
    The first certificate of C{chain}, from the leaf up, that a CRL of its
    issuer in C{crls} revokes, or L{None}.
    """
    for link in chain:
        if isSelfIssuedName(link):
            continue
        entry = crls.revocationOf(link.serial, link.issuer)
        if entry is not None:
            return Revocation(link, entry)
    return None


def isSelfIssuedName(link: ChainLink) -> bool:
    """
    Is the linked certificate its own issuer (a root, which no CRL covers)?
    """
    return link.subject == link.issuer


def _reasonName(entry: x509.RevokedCertificate) -> Optional[str]:
    """
    The reason code of a CRL entry, or L{None}.
    """
    try:
        extension = entry.extensions.get_extension_for_class(x509.CRLReason)
    except x509.ExtensionNotFound:
        return None
    return str(extension.value.reason.value)


def _revocationFields(chain: tuple[ChainLink, ...], revocation: Revocation) -> dict[str, Any]:
    """
    The fields every revocation event has: the revoked certificate, its CRL
    entry.
    """
    link, entry = revocation.link, revocation.entry
    return {
        "reason": REVOKED_LIVE,
        "serial": f"{link.serial:x}",
        "subject": link.subject.rfc4514_string(),
        "issuer": link.issuer.rfc4514_string(),
        "depth": link.depth,
        "revocationDate": entry.revocation_date_utc.isoformat(),
        "revocationReason": _reasonName(entry),
    }


def _loggedIfRevoked(
    found: tuple[tuple[ChainLink, ...], dict[str, Any]],
    crls: CRLIndex,
    logFormat: str,
    **who: Any,
) -> bool:
    """
    Whether C{crls} revoke the chain of C{found} (the chain and the fields
    that say whose it is); if so, log it with C{logFormat}, C{who} (the
    connection's id, peer, listener) and the revocation's fields.
    """
    chain, fields = found
    revocation = revocationIn(chain, crls)
    if revocation is None:
        return False
    log.warn(logFormat, **who, **fields, **_revocationFields(chain, revocation))
    return True


def _closeRevoked(
    connections: Iterable[Any],
    crls: CRLIndex,
    chainOf: Any,
    logFormat: str,
) -> list[Any]:
    """
    The sweep behind L{closeRevokedConnections} and
    L{closeRevokedBackendConnections}: close every established connection
    whose chain (as C{chainOf} finds it) C{crls} revoke, with
    L{REVOKED_LIVE} as its close reason, and log each.

    @param chainOf: Called with a connection and its
        L{ConnectionInfo<mtlsproxy.drain.ConnectionInfo>}: the chain to
        check and the event's fields that describe whose it is, or L{None}
        to leave the connection alone.
    """
    closed = []
    for connection in connections:
        info = connection.describe()
        if info.phase in _NOT_ESTABLISHED:
            continue
        found = chainOf(connection, info)
        if found is None or not _loggedIfRevoked(
            found, crls, logFormat, connectionId=info.id, peer=info.peer, listener=info.listener
        ):
            continue
        connection.closeNow(REVOKED_LIVE)
        closed.append(connection)
    return closed


def closeRevokedConnections(
    connections: Iterable[Any], listenerName: str, crls: CRLIndex
) -> list[Any]:
    """
    Close the established connections of a listener that were verified with
    a certificate C{crls} now revokes, and log each (L{REVOKED_LIVE_FORMAT}).

    Connections still in their handshake are left alone: OpenSSL checks
    them against the CRLs of the context they started on.

    @param connections: The live connections (the relay's protocols, as the
        L{mtlsproxy.drain.ConnectionRegistry} holds them: C{describe()},
        C{closeNow(reason)}, C{transport}, C{phase}).
    @param listenerName: Only this listener's connections are looked at.
    @param crls: The listener's CRLs after the reload.

    @return: The connections closed.
    """

    def clientChain(connection: Any, info: Any) -> Optional[tuple[tuple[ChainLink, ...], dict[str, Any]]]:
        if info.listener != listenerName:
            return None
        chain = verifiedChainOf(connection)
        if not chain:
            return None
        return chain, {
            "clientSubject": chain[0].subject.rfc4514_string(),
            "clientSerial": f"{chain[0].serial:x}",
        }

    return _closeRevoked(connections, crls, clientChain, REVOKED_LIVE_FORMAT)


def _memberOf(transport: Any, poolName: str) -> Optional[tuple[SSL.Connection, str]]:
    """
    The OpenSSL connection and the member (C{host:port}) at the other end
    of an established backend TLS connection of pool C{poolName}; L{None}
    for a connection of another pool or without TLS.
    """
    from .backendtls import memberConnectionOf

    found = memberConnectionOf(transport)
    if found is None:
        return None
    creator, connection = found
    if creator.tls.poolName != poolName:
        return None
    return connection, creator.member


def _memberChain(
    transport: Any, poolName: str
) -> Optional[tuple[tuple[ChainLink, ...], dict[str, Any]]]:
    """
    The verified chain of the member at the other end of an established
    backend TLS connection of pool C{poolName}, and the event fields naming
    the member; L{None} for a connection of another pool or without TLS.
    """
    found = _memberOf(transport, poolName)
    if found is None:
        return None
    connection, member = found
    chain = verifiedChainOf(connection)
    if not chain:
        return None
    return chain, {
        "pool": poolName,
        "member": member,
        "memberSubject": chain[0].subject.rfc4514_string(),
        "memberSerial": f"{chain[0].serial:x}",
    }


def closeRevokedBackendConnections(
    connections: Iterable[Any], poolName: str, crls: CRLIndex
) -> list[Any]:
    """
    Close the established connections relayed over TLS to a member of pool
    C{poolName} whose certificate chain C{crls} now revoke, both sides, and
    log each (L{REVOKED_MEMBER_FORMAT}).

    OpenSSL checked the member's chain against the pool's CRLs of the time
    of the handshake; this checks the chain it verified then
    (L{verifiedChainOf} of the backend connection) against the new ones.

    @param connections: The live connections, as the
        L{mtlsproxy.drain.ConnectionRegistry} holds them; those with a
        C{backendTransport()} (the relay's, the C{https} listener's) are
        looked at.
    @param poolName: Only connections made with this pool's backend TLS are
        looked at.
    @param crls: The pool's CRLs after the reload.

    @return: The connections closed.
    """

    def memberChain(connection: Any, info: Any) -> Optional[tuple[tuple[ChainLink, ...], dict[str, Any]]]:
        backendTransport = getattr(connection, "backendTransport", None)
        if backendTransport is None:
            return None
        return _memberChain(backendTransport(), poolName)

    return _closeRevoked(connections, crls, memberChain, REVOKED_MEMBER_FORMAT)


def closeRevokedIdleBackends(
    cache: Any, listenerName: str, poolName: str, crls: CRLIndex
) -> list[Any]:
    """
    Close the idle backend connections an C{https} listener keeps for reuse
    (its L{BackendConnectionCache<mtlsproxy.http.BackendConnectionCache>})
    that go over TLS to a member of pool C{poolName} whose chain C{crls}
    now revoke, and log each (L{REVOKED_MEMBER_FORMAT}, without a client).

    @return: The backend connections closed.
    """
    closed = []
    for backend in cache.idleConnections():
        found = _memberChain(backend.transport, poolName)
        if found is None or not _loggedIfRevoked(
            found, crls, REVOKED_MEMBER_FORMAT, connectionId=None, peer="none (idle)", listener=listenerName
        ):
            continue
        cache.discard(backend)
        backend.close()
        closed.append(backend)
    return closed


# ---------------------------------------------------------------------------
# Withdrawn trust
# ---------------------------------------------------------------------------

UNTRUSTED_LIVE: Final = "untrusted_live"
"""
The C{reason} of the event logged, and the access event's
C{close_reason}, when an established connection is closed because the CA
certificates a reload brought no longer verify its chain (a CA was taken
out of C{ca_certificates}).  Distinct from L{REVOKED_LIVE}: the remedy is
different (a CRL lists the certificate; the configuration stopped trusting
its issuer).
"""

UNTRUSTED_LIVE_FORMAT: Final = (
    "Closing connection {connectionId} of {peer} on listener {listener}:"
    " {reason}: certificate {serial} ({subject}, issued by {issuer}) is no"
    " longer trusted: {error}"
)
"""
The C{log_format} of the event (level C{warn}) logged for every connection
L{closeUntrustedConnections} closes.  Fields: C{reason}
(L{UNTRUSTED_LIVE}), C{connectionId}, C{peer}, C{listener}; the
certificate no longer trusted as C{serial} (lower-case hex), C{subject},
C{issuer} (RFC 4514) and C{depth} (its place in the chain verified at the
handshake, 0 for the client's own): the first CA of that chain the new
C{ca_certificates} lack, else the certificate OpenSSL's new verification
failed at; C{withdrawn} (the subjects of all CAs of the verified chain the
new CA certificates lack, leaf side first); C{error} and C{errorNumber}
(OpenSSL's verdict under the new CAs, e.g. C{"unable to get local issuer
certificate"}, 20); and the client's own certificate as C{clientSubject}
and C{clientSerial}.
"""

UNTRUSTED_MEMBER_FORMAT: Final = (
    "Closing connection {connectionId} of {peer} on listener {listener}:"
    " {reason}: member {member} of pool {pool} presents certificate"
    " {memberSerial} ({memberSubject}), whose chain through {serial}"
    " ({subject}, issued by {issuer}) is no longer trusted: {error}"
)
"""
The C{log_format} of the event (level C{warn}) logged for every connection
L{closeUntrustedBackendConnections} or L{closeUntrustedIdleBackends}
closes.  Fields as in L{UNTRUSTED_LIVE_FORMAT}, with C{pool}, C{member}
(C{host:port}), C{memberSubject} and C{memberSerial} instead of the
client's; for an idle backend connection C{connectionId} is L{None} and
C{peer} C{"none (idle)"}.
"""

_NO_CHECK_TIME: Final = 0x200000
"""
OpenSSL's C{X509_V_FLAG_NO_CHECK_TIME} (1.1.0 and later; pyOpenSSL does not
export it).  See L{TrustStore}.
"""

TrustPurpose = Literal["client", "server"]
"""
Whose chain a L{TrustStore} verifies: a client's (as a listener does, TLS
purpose C{sslclient}) or a member's (as the backend side does, C{sslserver}).
"""


def _fingerprint(certificate: x509.Certificate) -> bytes:
    """
    The SHA-256 of a certificate's DER encoding.
    """
    return hashlib.sha256(certificate.public_bytes(Encoding.DER)).digest()


def trustSet(cas: Iterable[x509.Certificate]) -> frozenset[bytes]:
    """
    The CA certificates C{cas} as a set of DER fingerprints: two
    configurations trust the same when their sets are equal, whatever the
    files, their order or duplicates.
    """
    return frozenset(_fingerprint(ca) for ca in cas)


def listenerTrustSets(material: Any) -> tuple[frozenset[bytes], ...]:
    """
    What each site (C{[[listeners.certificates]]} entry, in order) of a
    listener's L{ListenerMaterial<mtlsproxy.material.ListenerMaterial>}
    trusts, as L{trustSet}s: its own CAs or the listener's.  A reload
    re-verifies established connections only when this changes.
    """
    return tuple(trustSet(material.trustOf(entry)[0]) for entry in material.certificates)


@attrs.frozen
class TrustFailure:
    """
    Why a chain verified at its handshake is not trusted any more.

    @ivar certificate: The certificate no longer trusted: the first CA of
        the verified chain (from the leaf up) that the new CAs lack, else
        the one OpenSSL's verification failed at.
    @ivar depth: Its place in the chain, 0 for the peer's own certificate.
    @ivar error: OpenSSL's verify error text.
    @ivar errorNumber: OpenSSL's C{X509_V_ERR_*} number.
    @ivar withdrawn: Every CA of the verified chain the new CAs lack, leaf
        side first (empty for a resumed session, whose verified chain is
        not known).
    """

    certificate: x509.Certificate
    depth: int
    error: str
    errorNumber: int
    withdrawn: tuple[x509.Certificate, ...]


class TrustStore:
    """
    The CA certificates a listener site or a pool trusts after a reload, as
    an OpenSSL store that verifies the chains of established connections
    again.

    The store is built like a listener's or pool's own (only the given CAs,
    never the system store, no partial chains: an intermediate is a trust
    anchor only with its root) and verifies for the same TLS purpose, with
    two differences, both so that only trust decides:

      - no CRL flags: revocation is the CRL sweep's business
        (L{closeRevokedConnections}), and a CA whose CRL is missing under
        C{crl_missing = "allow"} must not close connections here;
      - no time checks (C{X509_V_FLAG_NO_CHECK_TIME}): a client certificate
        that merely expired during a long connection is not closed, and a
        CA certificate re-issued with the same key (a new root with a later
        notBefore replacing the old one) keeps the connections it still
        anchors.  Setting the store's time to the connection's start would
        close those.

    Verdicts are cached by the peer's certificates (its own and the ones it
    sent), so a sweep verifies each distinct chain once.
    """

    def __init__(self, cas: Iterable[x509.Certificate], purpose: TrustPurpose) -> None:
        """
        @param cas: The CA certificates now trusted.
        @param purpose: Whose chains are verified.
        """
        self.cas = tuple(cas)
        self.purpose = purpose
        self.fingerprints = trustSet(self.cas)
        self._store: Optional[crypto.X509Store] = None
        self._verdicts: dict[tuple[bytes, ...], Optional[tuple[int, int, str, x509.Certificate]]] = {}

    def _x509Store(self) -> crypto.X509Store:
        """
        The OpenSSL store, built on first use.
        """
        if self._store is None:
            from OpenSSL._util import lib

            store = crypto.X509Store()
            for authority in self.cas:
                store.add_cert(crypto.X509.from_cryptography(authority))
            store.set_flags(_NO_CHECK_TIME)
            purpose = lib.X509_PURPOSE_SSL_CLIENT if self.purpose == "client" else lib.X509_PURPOSE_SSL_SERVER
            if lib.X509_STORE_set_purpose(store._store, purpose) != 1:  # type: ignore[attr-defined]
                raise ValueError(f"OpenSSL refused the purpose {self.purpose!r}")
            self._store = store
        return self._store

    def _verdict(self, chain: PeerChain) -> Optional[tuple[int, int, str, x509.Certificate]]:
        """
        OpenSSL's verdict on C{chain}'s leaf with the certificates the peer
        sent as untrusted intermediates: L{None} if it verifies, else the
        error number, depth, text and the certificate it failed at.
        """
        key = tuple(c.public_bytes(Encoding.DER) for c in (chain.leaf,) + chain.sent)
        if key in self._verdicts:
            return self._verdicts[key]
        context = crypto.X509StoreContext(
            self._x509Store(),
            crypto.X509.from_cryptography(chain.leaf),
            [crypto.X509.from_cryptography(c) for c in chain.sent],
        )
        verdict: Optional[tuple[int, int, str, x509.Certificate]] = None
        try:
            context.verify_certificate()
        except crypto.X509StoreContextError as e:
            errorNumber, depth, text = e.errors
            verdict = (int(errorNumber), int(depth), str(text), e.certificate.to_cryptography())
        self._verdicts[key] = verdict
        return verdict

    def failureOf(self, chain: PeerChain) -> Optional[TrustFailure]:
        """
        Whether these CAs still verify the chain of an established
        connection, as a new handshake with the same certificates would be
        verified: the peer's certificate, with the ones it sent as
        untrusted intermediates (not the CAs of the old store: a
        withdrawn intermediate must not vouch for its clients).

        @return: L{None} if they do, else what is no longer trusted.
        """
        verdict = self._verdict(chain)
        if verdict is None:
            return None
        errorNumber, depth, text, failed = verdict
        # The anchor of the verified chain came from the old store; a CA
        # below it did too unless the peer sent it.
        verified = chain.verified
        withdrawn = tuple(
            certificate
            for index, certificate in enumerate(verified)
            if index > 0
            and (index == len(verified) - 1 or certificate not in chain.sent)
            and _fingerprint(certificate) not in self.fingerprints
        )
        if withdrawn:
            failed = withdrawn[0]
            depth = verified.index(failed)
        return TrustFailure(failed, depth, text, errorNumber, withdrawn)


@attrs.frozen(eq=False)
class ListenerTrust:
    """
    What each site of a listener trusts after a reload: an established
    client connection is checked against the L{TrustStore} of the site its
    server name selects in the new contexts (the one a new handshake with
    that name would be verified by), so a connection to an SNI site with
    its own C{ca_certificates} is checked against those.

    @ivar factory: The listener's new
        L{ServerContextFactory<mtlsproxy.tlscontext.ServerContextFactory>}.
    @ivar stores: One store per site, in order; L{None} for a site that
        does not verify clients (C{client_auth = "off"}, or
        C{"passthrough"}, which never refuses a client and so closes none).
    """

    factory: Any
    stores: tuple[Optional[TrustStore], ...]

    @classmethod
    def fromFactory(cls, factory: Any, material: Any) -> ListenerTrust:
        """
        The trust of C{factory}'s sites, built from C{material} (what the
        factory was built from).
        """
        stores: list[Optional[TrustStore]] = []
        for site, entry in zip(factory.sites, material.certificates):
            if site.clientAuth in ("off", "passthrough"):
                stores.append(None)
            else:
                stores.append(TrustStore(material.trustOf(entry)[0], "client"))
        return cls(factory, tuple(stores))

    def storeFor(self, connection: SSL.Connection) -> Optional[TrustStore]:
        """
        The store a client connection is checked against, or L{None} to
        leave it alone (a site that does not verify clients, or a name the
        listener now refuses under C{strict_sni}).
        """
        from .sni import normalizeServerName

        site = self.factory.siteFor(normalizeServerName(connection.get_servername()))
        if site is None or site.index >= len(self.stores):
            return None
        return self.stores[site.index]


_Untrusted = tuple[PeerChain, TrustStore, dict[str, Any]]


def _untrustedFields(failure: TrustFailure) -> dict[str, Any]:
    """
    The fields every withdrawn-trust event has.
    """
    certificate = failure.certificate
    return {
        "reason": UNTRUSTED_LIVE,
        "serial": f"{certificate.serial_number:x}",
        "subject": certificate.subject.rfc4514_string(),
        "issuer": certificate.issuer.rfc4514_string(),
        "depth": failure.depth,
        "error": failure.error,
        "errorNumber": failure.errorNumber,
        "withdrawn": [ca.subject.rfc4514_string() for ca in failure.withdrawn],
    }


def _loggedIfUntrusted(found: _Untrusted, logFormat: str, **who: Any) -> bool:
    """
    Whether the store of C{found} (the chain, the store, the fields that
    say whose it is) no longer verifies its chain; if so, log it with
    C{logFormat}, C{who} and the failure's fields.
    """
    chain, store, fields = found
    failure = store.failureOf(chain)
    if failure is None:
        return False
    log.warn(logFormat, **who, **fields, **_untrustedFields(failure))
    return True


def _closeUntrusted(
    connections: Iterable[Any],
    check: Callable[[Any, Any], Optional[_Untrusted]],
    logFormat: str,
    exclude: Collection[Any],
) -> list[Any]:
    """
    The sweep behind L{closeUntrustedConnections} and
    L{closeUntrustedBackendConnections}: close every established
    connection (not in C{exclude}) whose chain, as C{check} finds it, its
    store no longer verifies, with L{UNTRUSTED_LIVE} as its close reason,
    and log each.
    """
    skip = {id(connection) for connection in exclude}
    closed = []
    for connection in connections:
        if id(connection) in skip:
            continue
        info = connection.describe()
        if info.phase in _NOT_ESTABLISHED:
            continue
        found = check(connection, info)
        if found is None or not _loggedIfUntrusted(
            found, logFormat, connectionId=info.id, peer=info.peer, listener=info.listener
        ):
            continue
        connection.closeNow(UNTRUSTED_LIVE)
        closed.append(connection)
    return closed


def closeUntrustedConnections(
    connections: Iterable[Any],
    listenerName: str,
    trust: ListenerTrust,
    exclude: Collection[Any] = (),
) -> list[Any]:
    """
    Close the established connections of a listener whose client chain the
    listener's CA certificates after a reload no longer verify, and log
    each (L{UNTRUSTED_LIVE_FORMAT}).

    Connections without a client certificate, and those of sites that do
    not verify clients, are left alone; so are connections still in their
    handshake (OpenSSL verifies them against the CAs of the context they
    started on; the reload checks them again later).

    @param connections: The live connections, as for
        L{closeRevokedConnections}.
    @param listenerName: Only this listener's connections are looked at.
    @param trust: What the listener's sites trust after the reload.
    @param exclude: Connections to leave alone (those the CRL sweep has
        just closed).

    @return: The connections closed.
    """

    def check(connection: Any, info: Any) -> Optional[_Untrusted]:
        if info.listener != listenerName:
            return None
        chain = peerChainOf(connection)
        if chain is None:
            return None
        store = trust.storeFor(chain.connection)
        if store is None:
            return None
        return chain, store, {
            "clientSubject": chain.leaf.subject.rfc4514_string(),
            "clientSerial": f"{chain.leaf.serial_number:x}",
        }

    return _closeUntrusted(connections, check, UNTRUSTED_LIVE_FORMAT, exclude)


def _memberUntrusted(transport: Any, poolName: str, store: TrustStore) -> Optional[_Untrusted]:
    """
    The member's chain of an established backend TLS connection of pool
    C{poolName}, C{store}, and the fields naming the member; L{None} for a
    connection of another pool or without TLS.
    """
    found = _memberOf(transport, poolName)
    if found is None:
        return None
    connection, member = found
    chain = peerChainOf(connection)
    if chain is None:
        return None
    return chain, store, {
        "pool": poolName,
        "member": member,
        "memberSubject": chain.leaf.subject.rfc4514_string(),
        "memberSerial": f"{chain.leaf.serial_number:x}",
    }


def closeUntrustedBackendConnections(
    connections: Iterable[Any],
    poolName: str,
    store: TrustStore,
    exclude: Collection[Any] = (),
) -> list[Any]:
    """
    Close the established connections relayed over TLS to a member of pool
    C{poolName} whose chain the pool's C{[pools.tls]} CA certificates after
    a reload (C{store}, purpose C{"server"}) no longer verify, both sides,
    and log each (L{UNTRUSTED_MEMBER_FORMAT}).

    @param exclude: Connections to leave alone (those the CRL sweep has
        just closed).

    @return: The connections closed.
    """

    def check(connection: Any, info: Any) -> Optional[_Untrusted]:
        backendTransport = getattr(connection, "backendTransport", None)
        if backendTransport is None:
            return None
        return _memberUntrusted(backendTransport(), poolName, store)

    return _closeUntrusted(connections, check, UNTRUSTED_MEMBER_FORMAT, exclude)


def closeUntrustedIdleBackends(
    cache: Any, listenerName: str, poolName: str, store: TrustStore
) -> list[Any]:
    """
    Close the idle backend connections an C{https} listener keeps for reuse
    that go over TLS to a member of pool C{poolName} whose chain C{store}
    no longer verifies, and log each (L{UNTRUSTED_MEMBER_FORMAT}, without a
    client).

    @return: The backend connections closed.
    """
    closed = []
    for backend in cache.idleConnections():
        found = _memberUntrusted(backend.transport, poolName, store)
        if found is None or not _loggedIfUntrusted(
            found, UNTRUSTED_MEMBER_FORMAT, connectionId=None, peer="none (idle)", listener=listenerName
        ):
            continue
        cache.discard(backend)
        backend.close()
        closed.append(backend)
    return closed
