# -*- test-case-name: tests.test_reload -*-
"""
Certificates and CRLs that run out: found ahead of time.

L{expiryReport} lists, for the material in force, every server certificate
(and the intermediates sent with it), every CA certificate that verifies
clients and every CRL (its nextUpdate), with the file it came from and the
time left; and for each pool with C{[pools.tls]} the proxy's client
certificate presented to members (and its intermediates), the CA
certificates that verify the members and their CRLs.  L{ExpiryMonitor}
logs the ones due within C{expiry_warning_days} (L{EXPIRING_FORMAT}) at
start-up, after each reload and once a day.  The status endpoint reads the same report as data.

A CRL is usually replaced long before its nextUpdate (a CA that publishes
every day may give each list a week), so warning about every CRL due
within C{expiry_warning_days} would warn all the time.  A CRL is reported
once it is due within C{expiry_warning_days} I{and} past the first half of
its validity (thisUpdate to nextUpdate): a list that should have been
replaced by then.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Final, Iterable, Mapping, Optional, Sequence, Union

import attrs
from cryptography import x509
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from .material import ListenerMaterial, sourceKey

if TYPE_CHECKING:
    from .backendtls import BackendTLSMaterial

__all__ = [
    "CA_CERTIFICATE",
    "CHAIN_CERTIFICATE",
    "CLIENT_CERTIFICATE",
    "CRL",
    "DAY",
    "EXPIRING_FORMAT",
    "POOL_PREFIX",
    "SERVER_CERTIFICATE",
    "ExpiryItem",
    "ExpiryMonitor",
    "expiryReport",
]

SERVER_CERTIFICATE: Final = "server_certificate"
"""
L{ExpiryItem.kind} of a listener's server certificate.
"""

CHAIN_CERTIFICATE: Final = "chain_certificate"
"""
L{ExpiryItem.kind} of an intermediate CA certificate sent with a server
certificate (or with the client certificate of a pool).
"""

CLIENT_CERTIFICATE: Final = "client_certificate"
"""
L{ExpiryItem.kind} of the client certificate the proxy presents to the
members of a pool (C{[pools.tls]} C{cert}).
"""

CA_CERTIFICATE: Final = "ca_certificate"
"""
L{ExpiryItem.kind} of a CA certificate that verifies client certificates
(of a listener) or member certificates (of a pool).
"""

POOL_PREFIX: Final = "pool:"
"""
What L{ExpiryItem.listener} is for the material of a pool's
C{[pools.tls]}: C{"pool:"} and the pool's name (C{"pool:app"}), so that
the metrics' C{listener} label tells the pools apart from the listeners
and from each other.  L{ExpiryItem.pool} has the pool's name alone.
"""

CRL: Final = "crl"
"""
L{ExpiryItem.kind} of a certificate revocation list (its nextUpdate).
"""

DAY: Final = 86400.0
"""
Seconds between two daily expiry checks.
"""

EXPIRING_FORMAT: Final = (
    "Expiry warning: {kind} {subject} of {owner} ({file})"
    " {state} {not_after} ({days_left} days left)"
)
"""
The C{log_format} of the warning logged for each item due within
C{expiry_warning_days}.  Fields: those of L{ExpiryItem.asDict}, plus
C{owner} (L{ExpiryItem.owner}: C{"listener public"}, C{"pool app
[pools.tls]"}), C{state} (C{"expires"}, or C{"expired"} for an item
already past) and C{days_left} (whole days, negative once past) and
C{warning_days}.
"""


@attrs.frozen
class ExpiryItem:
    """
    When one certificate or CRL in force runs out.

    @ivar listener: The listener's name (C{"status"} for the status
        endpoint); for a pool's C{[pools.tls]} material L{POOL_PREFIX} and
        the pool's name (C{"pool:app"}).
    @ivar kind: L{SERVER_CERTIFICATE}, L{CHAIN_CERTIFICATE},
        L{CLIENT_CERTIFICATE}, L{CA_CERTIFICATE} or L{CRL}.
    @ivar file: The file it was read from, or L{None} if not known.
    @ivar subject: The certificate's subject, or the CRL's issuer (RFC 4514).
    @ivar serial: The certificate's serial number (lower-case hex); L{None}
        for a CRL.
    @ivar not_after: The certificate's notAfter or the CRL's nextUpdate
        (UTC); L{None} for a CRL without nextUpdate.
    @ivar seconds_left: Seconds from the report's time to C{not_after}
        (negative once past); L{None} without C{not_after}.
    @ivar validity_seconds: The length of its validity (notBefore to
        notAfter, thisUpdate to nextUpdate), or L{None}.
    @ivar pool: For the material of a pool's C{[pools.tls]}, the pool's
        name; L{None} for a listener's.
    """

    listener: str
    kind: str
    file: Optional[str]
    subject: str
    serial: Optional[str]
    not_after: Optional[datetime]
    seconds_left: Optional[float]
    validity_seconds: Optional[float] = None
    pool: Optional[str] = None

    @property
    def owner(self) -> str:
        """
        Whose material it is, for messages: C{"listener public"} or
        C{"pool app [pools.tls]"}.
        """
        if self.pool is not None:
            return f"pool {self.pool} [pools.tls]"
        return f"listener {self.listener}"

    def asDict(self) -> dict[str, Any]:
        """
        The item as JSON-serializable data (C{not_after} in ISO 8601).
        """
        data = attrs.asdict(self)
        if self.not_after is not None:
            data["not_after"] = self.not_after.astimezone(timezone.utc).isoformat()
        return data

    def dueWithin(self, seconds: float) -> bool:
        """
        Does it run out within C{seconds} (or has it already)?
        """
        return self.seconds_left is not None and self.seconds_left <= seconds

    def warnWithin(self, seconds: float) -> bool:
        """
        Should it be warned about with a warning period of C{seconds}: due
        within it, and for a CRL also past half its validity (see the
        module docstring)?
        """
        if self.kind == CRL and self.validity_seconds is not None:
            seconds = min(seconds, self.validity_seconds / 2)
        return self.dueWithin(seconds)


class _Items:
    """
    Collects the items of one listener's or pool's material, each
    certificate and CRL once.
    """

    def __init__(
        self,
        listener: str,
        sourceOf: Callable[[Union[x509.Certificate, x509.CertificateRevocationList]], Optional[str]],
        now: datetime,
        pool: Optional[str] = None,
    ) -> None:
        self.listener = listener
        self.sourceOf = sourceOf
        self.now = now
        self.pool = pool
        self.items: list[ExpiryItem] = []
        self._seen: set[tuple[str, bytes]] = set()

    def add(self, kind: str, item: Union[x509.Certificate, x509.CertificateRevocationList]) -> None:
        key = (kind, sourceKey(item))
        if key in self._seen:
            return
        self._seen.add(key)
        if isinstance(item, x509.Certificate):
            subject = item.subject.rfc4514_string()
            serial: Optional[str] = f"{item.serial_number:x}"
            notBefore: datetime = item.not_valid_before_utc
            notAfter: Optional[datetime] = item.not_valid_after_utc
        else:
            subject = item.issuer.rfc4514_string()
            serial = None
            notBefore = item.last_update_utc
            notAfter = item.next_update_utc
        left = validity = None
        if notAfter is not None:
            left = (notAfter - self.now).total_seconds()
            validity = (notAfter - notBefore).total_seconds()
        self.items.append(
            ExpiryItem(
                self.listener,
                kind,
                self.sourceOf(item),
                subject,
                serial,
                notAfter,
                left,
                validity,
                self.pool,
            )
        )

    def addChain(self, leafKind: str, chain: Sequence[x509.Certificate]) -> None:
        """
        Add a certificate chain: its leaf as C{leafKind}, the rest as
        intermediates.
        """
        if chain:
            self.add(leafKind, chain[0])
            for intermediate in chain[1:]:
                self.add(CHAIN_CERTIFICATE, intermediate)

    def addTrust(
        self, cas: Iterable[x509.Certificate], crls: Iterable[x509.CertificateRevocationList]
    ) -> None:
        """
        Add CA certificates and their CRLs.
        """
        for ca in cas:
            self.add(CA_CERTIFICATE, ca)
        for crl in crls:
            self.add(CRL, crl)


def _listenerItems(
    listener: str, material: ListenerMaterial, now: datetime
) -> list[ExpiryItem]:
    """
    The items of one listener's material, each certificate and CRL once.
    """
    items = _Items(listener, material.sourceOf, now)
    for certificate in material.certificates:
        items.addChain(SERVER_CERTIFICATE, certificate.chain)
    for certificate in material.certificates:
        items.addTrust(*material.trustOf(certificate))
    items.addTrust(material.cas, material.crls)
    return items.items


def _poolItems(pool: str, material: BackendTLSMaterial, now: datetime) -> list[ExpiryItem]:
    """
    The items of one pool's C{[pools.tls]} material: the client certificate
    and its intermediates, the CAs that verify members, their CRLs.
    """
    sourceOf = getattr(material, "sourceOf", lambda item: None)
    items = _Items(POOL_PREFIX + pool, sourceOf, now, pool)
    items.addChain(CLIENT_CERTIFICATE, material.chain)
    items.addTrust(material.cas, material.crls)
    return items.items


def expiryReport(
    materials: Mapping[str, ListenerMaterial],
    now: datetime,
    backends: Optional[Mapping[str, BackendTLSMaterial]] = None,
) -> list[ExpiryItem]:
    """
    Every certificate and CRL of C{materials} and C{backends}, soonest to
    run out first (CRLs without nextUpdate last).

    @param materials: The material in force, by listener name.
    @param now: The time the C{seconds_left} count from.
    @param backends: The C{[pools.tls]} material in force, by pool name.
    """
    items: list[ExpiryItem] = []
    for listener, material in materials.items():
        items.extend(_listenerItems(listener, material, now))
    for pool, backend in (backends or {}).items():
        items.extend(_poolItems(pool, backend, now))
    return sorted(
        items,
        key=lambda i: (i.seconds_left is None, i.seconds_left or 0.0, i.listener, i.kind),
    )


class ExpiryMonitor:
    """
    Logs what is due within C{warningDays}: on L{check}, and daily between
    L{start} and L{stop}.

    @ivar clock: Provides C{callLater}.
    @ivar materials: Returns the material in force, by listener name.
    @ivar warningDays: The C{expiry_warning_days} setting.
    @ivar now: Returns the current time.
    @ivar backends: Returns the C{[pools.tls]} material in force, by pool
        name.
    """

    log = Logger()

    def __init__(
        self,
        clock: Any,
        materials: Callable[[], Mapping[str, ListenerMaterial]],
        warningDays: int,
        now: Optional[Callable[[], datetime]] = None,
        backends: Optional[Callable[[], Mapping[str, BackendTLSMaterial]]] = None,
    ) -> None:
        """
        @param now: Default the C{clock}'s C{seconds()} as UTC.
        @param backends: Default no pool material.
        """
        self.clock = clock
        self.materials = materials
        self.warningDays = warningDays
        self.now = now or (lambda: datetime.fromtimestamp(clock.seconds(), timezone.utc))
        self.backends = backends if backends is not None else (lambda: {})
        self._daily: Optional[IDelayedCall] = None

    def report(self) -> list[ExpiryItem]:
        """
        The L{expiryReport} of the material in force, now.
        """
        return expiryReport(self.materials(), self.now(), self.backends())

    def check(self) -> list[ExpiryItem]:
        """
        Log a warning for each item due within C{warningDays} (see
        L{ExpiryItem.warnWithin}).

        @return: Those items.
        """
        due = [i for i in self.report() if i.warnWithin(self.warningDays * DAY)]
        for item in due:
            assert item.seconds_left is not None and item.not_after is not None
            self.log.warn(
                EXPIRING_FORMAT,
                owner=item.owner,
                state="expired" if item.seconds_left < 0 else "expires",
                days_left=int(item.seconds_left // DAY),
                warning_days=self.warningDays,
                **item.asDict(),
            )
        return due

    def start(self) -> None:
        """
        Check now and then every day until L{stop}.
        """
        self.stop()
        self.check()
        self._daily = self.clock.callLater(DAY, self._tick)

    def _tick(self) -> None:
        self._daily = None
        self.start()

    def stop(self) -> None:
        """
        Cancel the daily check.
        """
        daily, self._daily = self._daily, None
        if daily is not None and daily.active():
            daily.cancel()

    @property
    def running(self) -> bool:
        """
        Is the daily check scheduled?
        """
        return self._daily is not None
