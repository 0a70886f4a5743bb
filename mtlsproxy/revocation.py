# -*- test-case-name: tests.test_verify,tests.test_reload -*-
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
  - the chains of established connections (L{peerChainOf},
    L{verifiedChainOf}), which L{mtlsproxy.trust} also checks when a reload
    withdraws a CA.

Nothing here does I/O or blocks; an index is built once per listener
context and only read afterwards.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any, Final, Iterable, Literal, Mapping, Optional

import attrs
from cryptography import x509
from OpenSSL import SSL
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
    "NOT_ESTABLISHED",
    "PeerChain",
    "memberConnection",
    "peerChainOf",
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

NOT_ESTABLISHED: Final = frozenset({"new", "handshaking", "closed"})
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
        if info.phase in NOT_ESTABLISHED:
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


def memberConnection(transport: Any, poolName: str) -> Optional[tuple[SSL.Connection, str]]:
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
    found = memberConnection(transport, poolName)
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
