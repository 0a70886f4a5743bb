# -*- test-case-name: tests.test_verify -*-
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
    or close to, their nextUpdate (L{CRLIndex.status}).

Nothing here does I/O or blocks; an index is built once per listener
context and only read afterwards.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Final, Iterable, Literal, Mapping

import attrs
from cryptography import x509

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
]


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
