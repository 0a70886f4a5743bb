# -*- test-case-name: tests.test_trust_withdrawn -*-
"""
Withdrawn trust of established connections.

OpenSSL verifies a peer's chain once, in the handshake.  When a reload
changes the CA certificates a listener (or one of its SNI sites) or a pool's
C{[pools.tls]} trusts, OpenSSL verifies each established connection's chain
again, against a store of the new CAs only (L{TrustStore}), and
L{closeUntrustedConnections}, L{closeUntrustedBackendConnections} and
L{closeUntrustedIdleBackends} close those it no longer accepts
(C{untrusted_live}), under the same C{close_revoked_connections} setting as
the CRL sweeps of L{mtlsproxy.revocation}.

Nothing here does I/O or blocks; a store is built on first use and each
distinct chain is verified once per sweep.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Collection, Final, Iterable, Literal, Optional

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto
from twisted.logger import Logger

from .revocation import NOT_ESTABLISHED, PeerChain, memberConnection, peerChainOf

__all__ = [
    "UNTRUSTED_LIVE",
    "UNTRUSTED_LIVE_FORMAT",
    "UNTRUSTED_MEMBER_FORMAT",
    "ListenerTrust",
    "TrustFailure",
    "TrustPurpose",
    "TrustStore",
    "closeUntrustedBackendConnections",
    "closeUntrustedConnections",
    "closeUntrustedIdleBackends",
    "listenerTrustSets",
    "trustSet",
]

log = Logger()

UNTRUSTED_LIVE: Final = "untrusted_live"
"""
The C{reason} of the event logged, and the access event's
C{close_reason}, when an established connection is closed because the CA
certificates a reload brought no longer verify its chain (a CA was taken
out of C{ca_certificates}).  Distinct from L{REVOKED_LIVE<mtlsproxy.revocation.REVOKED_LIVE>}: the remedy is
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
        (L{closeRevokedConnections<mtlsproxy.revocation.closeRevokedConnections>}), and a CA whose CRL is missing under
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
        if info.phase in NOT_ESTABLISHED:
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
        L{closeRevokedConnections<mtlsproxy.revocation.closeRevokedConnections>}.
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
    found = memberConnection(transport, poolName)
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
