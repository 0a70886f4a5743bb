# -*- test-case-name: tests.test_verify -*-
"""
Client certificate verification: the pyOpenSSL verify callback, the
rejection reasons, and the one log event per rejected handshake.

OpenSSL builds and checks the chain (signatures, validity, purpose, CRLs:
see L{mtlsproxy.tlscontext}); the callback here only I{decides}: for each
problem OpenSSL reports it either applies a listener policy that overrides
the problem (C{crl_missing = "allow"}, C{crl_expired = "allow"}, a
self-signed trust anchor that needs no CRL) or rejects the handshake,
leaving OpenSSL's error in place so that the client receives the matching
TLS alert (C{certificate_revoked}, C{unknown_ca}, C{certificate_expired},
...).

Every rejected handshake is logged once, as an event with the stable
format L{REJECTED_FORMAT} and the fields documented there:

  - rejections decided by the verify callback are logged by it;
  - handshakes that fail before or without the callback (no client
    certificate in C{required} mode, an unsupported protocol version, no
    shared cipher) are logged by L{logHandshakeFailure}, which the protocol
    wrapped in TLS calls from C{connectionLost} when its handshake never
    completed.

L{peerIdentity} turns the verified peer certificate of an established
connection into a L{ClientIdentity} for access logs and backend selection.
"""

from __future__ import annotations

import weakref
from datetime import datetime
from typing import Any, Final, Iterable, Mapping

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtlsproxy.revocation import (
    CRL_EXPIRED_DEFAULT,
    CRL_MISSING_DEFAULT,
    CRLExpired,
    CRLIndex,
    CRLMissing,
)

__all__ = [
    "NO_CERTIFICATE",
    "UNKNOWN_CA",
    "REVOKED",
    "EXPIRED",
    "NOT_YET_VALID",
    "CRL_MISSING",
    "CRL_EXPIRED",
    "UNKNOWN_SNI",
    "HANDSHAKE_FAILED",
    "INTERNAL_ERROR",
    "REJECTED_FORMAT",
    "ALLOWED_FORMAT",
    "ClientIdentity",
    "ClientCertificateVerifier",
    "describeAddress",
    "logHandshakeFailure",
    "logUnknownServerName",
    "peerIdentity",
    "reasonForVerifyError",
    "rejectionReason",
    "verifyErrorString",
    "verificationFailure",
    "PASSTHROUGH_FORMAT",
]

log = Logger()

# ---------------------------------------------------------------------------
# Reasons
# ---------------------------------------------------------------------------

NO_CERTIFICATE: Final = "no_certificate"
"""
C{client_auth = "required"} and the client sent no certificate.
"""

UNKNOWN_CA: Final = "unknown_ca"
"""
The chain does not lead to a configured CA.
"""

REVOKED: Final = "revoked"
"""
A certificate of the chain (the leaf or an intermediate) is listed in its
issuer's CRL.
"""

EXPIRED: Final = "expired"
"""
A certificate of the chain is past its notAfter.
"""

NOT_YET_VALID: Final = "not_yet_valid"
"""
A certificate of the chain is before its notBefore.
"""

CRL_MISSING: Final = "crl_missing"
"""
No CRL is configured for the issuer of a certificate of the chain (and
C{crl_missing = "reject"}).
"""

CRL_EXPIRED: Final = "crl_expired"
"""
The CRL of the issuer of a certificate of the chain is past its nextUpdate
(and C{crl_expired = "reject"}).
"""

UNKNOWN_SNI: Final = "unknown_sni"
"""
The listener has C{strict_sni = true} and the server name the client asked
for matches none of its certificates (the event's C{sni} field holds it).
The client receives an C{unrecognized_name} alert.
"""

HANDSHAKE_FAILED: Final = "handshake_failed"
"""
The handshake failed for a reason other than the client certificate: a
protocol version or cipher the listener does not accept, a malformed
message, an alert from the client.  The event's C{error} field holds
OpenSSL's reason text.
"""

INTERNAL_ERROR: Final = "internal_error"
"""
The verify callback itself failed (a bug); the handshake is rejected.
"""

# OpenSSL's X509_V_ERR_* numbers that we give names to.
_UNABLE_TO_GET_ISSUER_CERT: Final = 2
_UNABLE_TO_GET_CRL: Final = 3
_CERT_NOT_YET_VALID: Final = 9
_CERT_HAS_EXPIRED: Final = 10
_CRL_HAS_EXPIRED: Final = 12
_DEPTH_ZERO_SELF_SIGNED_CERT: Final = 18
_SELF_SIGNED_CERT_IN_CHAIN: Final = 19
_UNABLE_TO_GET_ISSUER_CERT_LOCALLY: Final = 20
_UNABLE_TO_VERIFY_LEAF_SIGNATURE: Final = 21
_CERT_REVOKED: Final = 23

_REASONS: Final[Mapping[int, str]] = {
    _UNABLE_TO_GET_ISSUER_CERT: UNKNOWN_CA,
    _UNABLE_TO_GET_CRL: CRL_MISSING,
    _CERT_NOT_YET_VALID: NOT_YET_VALID,
    _CERT_HAS_EXPIRED: EXPIRED,
    _CRL_HAS_EXPIRED: CRL_EXPIRED,
    _DEPTH_ZERO_SELF_SIGNED_CERT: UNKNOWN_CA,
    _SELF_SIGNED_CERT_IN_CHAIN: UNKNOWN_CA,
    _UNABLE_TO_GET_ISSUER_CERT_LOCALLY: UNKNOWN_CA,
    _UNABLE_TO_VERIFY_LEAF_SIGNATURE: UNKNOWN_CA,
    _CERT_REVOKED: REVOKED,
}

_errorStrings: dict[int, str] = {}


def verifyErrorString(errorNumber: int) -> str:
    """
    OpenSSL's text for an C{X509_V_ERR_*} number, for example C{"certificate
    revoked"} for 23.
    """
    text = _errorStrings.get(errorNumber)
    if text is None:
        try:
            # The same private binding Twisted's _sslverify uses; pyOpenSSL
            # has no public wrapper for X509_verify_cert_error_string.
            from OpenSSL._util import ffi, lib

            raw = lib.X509_verify_cert_error_string(errorNumber)
            text = ffi.string(raw).decode("ascii", "replace")
        except Exception:
            text = f"certificate verify error {errorNumber}"
        _errorStrings[errorNumber] = text
    return text


def reasonForVerifyError(errorNumber: int) -> str:
    """
    The rejection reason for an C{X509_V_ERR_*} number: one of the named
    reasons of this module, or OpenSSL's own text for the others (for
    example C{"unsuitable certificate purpose"} for a certificate without
    the clientAuth extended key usage).
    """
    return _REASONS.get(errorNumber) or verifyErrorString(errorNumber)


# ---------------------------------------------------------------------------
# Log events
# ---------------------------------------------------------------------------

REJECTED_FORMAT: Final = (
    "Rejected TLS client {peer} on listener {listener}: {reason}"
    " ({error}; subject {subject}, serial {serial})"
)
"""
The C{log_format} of the one event logged (at level C{warn}) for every
rejected handshake.  Its fields:

  - C{reason}: L{NO_CERTIFICATE}, L{UNKNOWN_CA}, L{REVOKED}, L{EXPIRED},
    L{NOT_YET_VALID}, L{CRL_MISSING}, L{CRL_EXPIRED}, L{HANDSHAKE_FAILED},
    L{INTERNAL_ERROR}, or OpenSSL's verify error text;
  - C{peer}: the client's address as text (C{"192.0.2.7:50123"},
    C{"[2001:db8::1]:443"}), or L{None};
  - C{listener}: the listener's configured name;
  - C{subject}, C{serial}, C{fingerprint}, C{issuer}: the client's leaf
    certificate (RFC 4514 subject and issuer, serial number in lower-case
    hex, SHA-256 fingerprint in lower-case hex), or L{None} when no
    certificate was presented or the problem was found above the leaf
    before OpenSSL handed the leaf to us (see C{depth});
  - C{error}: OpenSSL's text: the verify error (C{"certificate revoked"})
    for a rejection by the verify callback, the reason
    (C{"unsupported protocol"}) for a handshake failure;
  - C{errorNumber}: OpenSSL's verify error number (C{X509_V_ERR_*}) for a
    rejection by the verify callback, else L{None};
  - C{depth}: the position in the chain of the certificate OpenSSL
    complained about (0 is the leaf), or L{None};
  - C{certificateSubject}, C{certificateSerial}, C{certificateIssuer}:
    that certificate, or L{None};
  - for L{REVOKED} also C{revokedSerial}, C{revokedIssuer} (the revoked
    certificate, which is an intermediate when C{depth} > 0),
    C{revocationDate} (ISO 8601) and C{revocationReason} (the CRL entry's
    reason code name), the last two L{None} if unknown.
"""

ALLOWED_FORMAT: Final = (
    "Accepted TLS client {peer} on listener {listener} WITHOUT a valid CRL"
    " for {certificateSubject}: {reason}, allowed by {setting} = \"allow\""
)
"""
The C{log_format} of the warning logged every time C{crl_missing =
"allow"} or C{crl_expired = "allow"} lets a certificate through that the
default policy would reject.  Fields as in L{REJECTED_FORMAT} (with
C{reason} L{CRL_MISSING} or L{CRL_EXPIRED}) plus C{setting}: the listener
setting that allowed it, C{"crl_missing"} or C{"crl_expired"}.
"""

_LEAF_NONE: Final[Mapping[str, None]] = {
    "subject": None,
    "serial": None,
    "fingerprint": None,
    "issuer": None,
}

# Connections (and their TLS protocols) whose rejection has already been
# logged, so that logHandshakeFailure does not log it a second time.
_rejectionLogged: weakref.WeakSet[object] = weakref.WeakSet()

# The reason logged for each of them, for rejectionReason (metrics).
_rejectionReasons: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()


def rejectionReason(connectionOrTransport: object) -> str | None:
    """
    The C{reason} of the rejection logged for a connection whose handshake
    failed (L{UNKNOWN_CA}, L{REVOKED}, L{NO_CERTIFICATE}, ...), or L{None}
    if none was logged (the client went away without a TLS error).  The
    relay calls it from C{connectionLost} to count failed handshakes by
    reason.

    @param connectionOrTransport: The L{SSL.Connection} or its TLS
        transport.
    """
    for item in (connectionOrTransport, _connectionOf(connectionOrTransport)):
        try:
            reason = _rejectionReasons.get(item) if item is not None else None
        except TypeError:
            reason = None
        if reason is not None:
            return reason
    return None


def _markLogged(
    connection: SSL.Connection | None, tlsProtocol: object, reason: str | None = None
) -> bool:
    """
    Record that the rejection of a connection has been logged.

    @param connection: The OpenSSL connection, if still known.
    @param tlsProtocol: Its TLS protocol (the connection's app data), which
        outlives the connection's reference to it.

    @return: C{False} if it had already been recorded.
    """
    known = [item for item in (connection, tlsProtocol) if item is not None]
    try:
        if any(item in _rejectionLogged for item in known):
            return False
    except TypeError:
        # Something not weakly referenceable; the other item decides.
        pass
    for item in known:
        try:
            _rejectionLogged.add(item)
            if reason is not None:
                _rejectionReasons[item] = reason
        except TypeError:
            pass
    return True


def describeAddress(address: object) -> str | None:
    """
    Render a peer address (an L{IAddress} provider) for the log:
    C{"host:port"} for IPv4, C{"[host]:port"} for IPv6, the path for UNIX
    sockets, C{str()} of anything else, L{None} for L{None}.
    """
    if address is None:
        return None
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        if ":" in host:
            return f"[{host}]:{port}"
        return f"{host}:{port}"
    name = getattr(address, "name", None)
    if isinstance(name, (str, bytes)):
        return name if isinstance(name, str) else name.decode("utf-8", "replace")
    return str(address)


def _peerOf(tlsProtocol: object) -> str | None:
    """
    The peer address of the transport under C{tlsProtocol} (a
    L{TLSMemoryBIOProtocol}, or whatever was set as the connection's app
    data), as text.
    """
    getPeer = getattr(tlsProtocol, "getPeer", None)
    if getPeer is None:
        return None
    try:
        return describeAddress(getPeer())
    except Exception:
        return None


def _certificateFields(certificate: x509.Certificate) -> dict[str, str]:
    """
    The leaf fields of a log event for C{certificate}.
    """
    return {
        "subject": certificate.subject.rfc4514_string(),
        "serial": f"{certificate.serial_number:x}",
        "fingerprint": certificate.fingerprint(hashes.SHA256()).hex(),
        "issuer": certificate.issuer.rfc4514_string(),
    }


# ---------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------


@attrs.frozen
class ClientIdentity:
    """
    Who the client is, from its verified certificate: what the access log
    records and what a backend selector may route on.

    @ivar subject: The leaf's subject distinguished name, RFC 4514.
    @ivar issuer: The leaf's issuer distinguished name, RFC 4514.
    @ivar serial: The leaf's serial number, lower-case hex.
    @ivar fingerprint: The SHA-256 fingerprint of the leaf's DER encoding,
        lower-case hex without separators.
    @ivar commonName: The subject's first common name, or L{None}.
    @ivar notAfter: The end of the leaf's validity, UTC.
    @ivar certificate: The leaf certificate itself, for callers that need
        more (subject alternative names, extensions).
    """

    subject: str
    issuer: str
    serial: str
    fingerprint: str
    commonName: str | None
    notAfter: datetime
    certificate: x509.Certificate = attrs.field(eq=False, repr=False)

    @classmethod
    def fromCertificate(cls, certificate: x509.Certificate) -> ClientIdentity:
        """
        Describe C{certificate}.
        """
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        commonName = names[0].value if names else None
        if isinstance(commonName, bytes):
            commonName = commonName.decode("utf-8", "replace")
        fields = _certificateFields(certificate)
        return cls(
            subject=fields["subject"],
            issuer=fields["issuer"],
            serial=fields["serial"],
            fingerprint=fields["fingerprint"],
            commonName=commonName,
            notAfter=certificate.not_valid_after_utc,
            certificate=certificate,
        )


def _connectionOf(connectionOrTransport: object) -> SSL.Connection | None:
    """
    The L{SSL.Connection} given, or the one behind a TLS transport.
    """
    if isinstance(connectionOrTransport, SSL.Connection):
        return connectionOrTransport
    getHandle = getattr(connectionOrTransport, "getHandle", None)
    if getHandle is None:
        return None
    handle = getHandle()
    return handle if isinstance(handle, SSL.Connection) else None


def peerIdentity(connectionOrTransport: object) -> ClientIdentity | None:
    """
    The identity of the client certificate of an established TLS
    connection.

    Call it after the handshake completed (from C{handshakeCompleted}, or
    later): by then OpenSSL and L{ClientCertificateVerifier} have accepted
    the certificate, so it is verified.  It also works for a resumed
    session, which keeps the peer certificate of the original handshake.

    @param connectionOrTransport: An L{OpenSSL.SSL.Connection}, or a TLS
        transport with C{getHandle()} returning one (a
        L{twisted.protocols.tls.TLSMemoryBIOProtocol}, which is what the
        wrapped protocol has as its C{transport}).

    @return: The identity, or L{None} if the client presented no
        certificate (C{client_auth = "optional"} or C{"off"}) or there is
        no TLS connection.
    """
    connection = _connectionOf(connectionOrTransport)
    if connection is None:
        return None
    certificate = connection.get_peer_certificate()
    if certificate is None:
        return None
    der = crypto.dump_certificate(crypto.FILETYPE_ASN1, certificate)
    identity = _recentIdentities.get(der)
    if identity is None:
        identity = ClientIdentity.fromCertificate(x509.load_der_x509_certificate(der))
        if len(_recentIdentities) >= _RECENT_IDENTITIES:
            del _recentIdentities[next(iter(_recentIdentities))]
        _recentIdentities[der] = identity
    return identity


_RECENT_IDENTITIES: Final = 256
"""
How many client certificates L{peerIdentity} remembers the identity of.
"""

_recentIdentities: dict[bytes, ClientIdentity] = {}
"""
The identities of recently seen client certificates by their DER encoding,
oldest first: clients reconnect with the same certificate, and describing
one (names, fingerprint) costs more than the rest of a connection's
bookkeeping.  The key is the whole certificate, so an entry is only ever
used for the very same certificate, which OpenSSL has verified again for
the connection at hand.
"""


# ---------------------------------------------------------------------------
# The verify callback
# ---------------------------------------------------------------------------


@attrs.frozen(eq=False)
class ClientCertificateVerifier:
    """
    The verification policy of one listener context: its C{verifyCallback}
    is given to C{Context.set_verify}.

    Build it once per context with L{ClientCertificateVerifier.create}; the
    callback then does no per-handshake set-up.  For a certificate OpenSSL
    accepts it returns at once; the work of describing certificates happens
    only on the rejection and override paths.

    @ivar listenerName: The listener's configured name, for the log.
    @ivar crlMissing: The C{crl_missing} policy.
    @ivar crlExpired: The C{crl_expired} policy.
    @ivar crls: The listener's CRLs by issuer, to describe revocations.
    @ivar anchors: The SHA-256 digests, in pyOpenSSL's C{X509.digest}
        format, of the configured self-signed CAs.  OpenSSL (3.x and 4.0)
        does not look for a CRL for the trust anchor even with
        C{CRL_CHECK_ALL}; should a version do so, the callback accepts the
        missing CRL for these certificates only.
    """

    listenerName: str
    crlMissing: CRLMissing = CRL_MISSING_DEFAULT
    crlExpired: CRLExpired = CRL_EXPIRED_DEFAULT
    crls: CRLIndex = attrs.field(factory=lambda: CRLIndex.fromCRLs(()))
    anchors: frozenset[bytes] = frozenset()
    # client_auth = "passthrough" (issue 8): record problems, never reject.
    passthrough: bool = False

    @classmethod
    def create(
        cls,
        listenerName: str,
        authorities: Iterable[x509.Certificate] = (),
        crls: Iterable[x509.CertificateRevocationList] = (),
        crlMissing: CRLMissing = CRL_MISSING_DEFAULT,
        crlExpired: CRLExpired = CRL_EXPIRED_DEFAULT,
        passthrough: bool = False,
    ) -> ClientCertificateVerifier:
        """
        Build the verifier for a listener.

        @param listenerName: The listener's name, for the log.
        @param authorities: The configured CA certificates.
        @param crls: The configured CRLs.
        @param crlMissing: The C{crl_missing} policy.
        @param crlExpired: The C{crl_expired} policy.
        @param passthrough: C{client_auth = "passthrough"}: a problem that
            would reject the handshake is recorded instead (see
            L{verificationFailure}) and the handshake goes on.
        """
        anchors = frozenset(
            crypto.X509.from_cryptography(authority).digest("sha256")
            for authority in authorities
            if authority.issuer == authority.subject
        )
        return cls(
            listenerName=listenerName,
            crlMissing=crlMissing,
            crlExpired=crlExpired,
            crls=CRLIndex.fromCRLs(crls),
            anchors=anchors,
            passthrough=passthrough,
        )

    def verifyCallback(
        self,
        connection: SSL.Connection,
        certificate: crypto.X509,
        errorNumber: int,
        errorDepth: int,
        ok: int,
    ) -> bool:
        """
        Decide about one certificate of the client's chain; the signature
        pyOpenSSL's C{Context.set_verify} expects.

        OpenSSL calls this once for every problem it finds (with C{ok}
        false) and, when verification succeeds, once per certificate from
        the root down to the leaf (with C{ok} true).  Returning C{False}
        ends verification with OpenSSL's error left as it is, so the client
        gets the alert for that error; returning C{True} for a problem
        clears it and lets OpenSSL go on looking for more.

        Never raises: an unexpected exception is logged and rejects the
        handshake (pyOpenSSL would otherwise re-raise it out of the
        handshake, into Twisted's data path).
        """
        if ok:
            return True
        try:
            return self._problem(connection, certificate, errorNumber, errorDepth)
        except Exception:
            _markLogged(connection, connection.get_app_data(), INTERNAL_ERROR)
            fields: dict[str, Any] = dict(
                _LEAF_NONE,
                reason=INTERNAL_ERROR,
                peer=_peerOf(connection.get_app_data()),
                listener=self.listenerName,
                error=None,
                errorNumber=errorNumber,
                depth=errorDepth,
                certificateSubject=None,
                certificateSerial=None,
                certificateIssuer=None,
            )
            log.failure(REJECTED_FORMAT, **fields)
            return False

    def _problem(
        self,
        connection: SSL.Connection,
        certificate: crypto.X509,
        errorNumber: int,
        errorDepth: int,
    ) -> bool:
        """
        Apply the listener's policies to one problem OpenSSL reported.

        @return: C{True} to override the problem, C{False} to reject.
        """
        setting: str | None = None
        if errorNumber == _UNABLE_TO_GET_CRL:
            if certificate.digest("sha256") in self.anchors:
                # A self-signed trust anchor: nothing could revoke it.
                return True
            if self.crlMissing is CRLMissing.ALLOW:
                setting = "crl_missing"
        elif errorNumber == _CRL_HAS_EXPIRED and self.crlExpired is CRLExpired.ALLOW:
            setting = "crl_expired"

        described = certificate.to_cryptography()
        reason = reasonForVerifyError(errorNumber)
        fields: dict[str, Any] = {
            "reason": reason,
            "peer": _peerOf(connection.get_app_data()),
            "listener": self.listenerName,
            "error": verifyErrorString(errorNumber),
            "errorNumber": errorNumber,
            "depth": errorDepth,
            "certificateSubject": described.subject.rfc4514_string(),
            "certificateSerial": f"{described.serial_number:x}",
            "certificateIssuer": described.issuer.rfc4514_string(),
        }
        # OpenSSL hands us the leaf only when the problem is the leaf's;
        # above it, the leaf is not available to a verify callback.
        fields.update(_certificateFields(described) if errorDepth == 0 else _LEAF_NONE)

        if setting is not None:
            log.warn(ALLOWED_FORMAT, setting=setting, **fields)
            return True

        if errorNumber == _CERT_REVOKED:
            entry = self.crls.revocationOf(described.serial_number, described.issuer)
            fields.update(
                revokedSerial=fields["certificateSerial"],
                revokedIssuer=fields["certificateIssuer"],
                revocationDate=_revocationDate(entry),
                revocationReason=_revocationReason(entry),
            )
        if self.passthrough:
            return _recordPassthroughFailure(connection, reason, errorNumber, fields)
        _markLogged(connection, connection.get_app_data(), reason)
        log.warn(REJECTED_FORMAT, **fields)
        return False



# ---------------------------------------------------------------------------
# Passthrough (client_auth = "passthrough"): record instead of rejecting
# ---------------------------------------------------------------------------

PASSTHROUGH_FORMAT: Final = (
    "Passing TLS client {peer} on listener {listener} through with a certificate"
    " that failed verification: {reason} (subject {subject}, serial {serial})"
)
"""
The C{log_format} of the event (level C{info}) logged when a
C{client_auth = "passthrough"} listener accepts a certificate that failed
verification; fields as in L{REJECTED_FORMAT}.
"""

# The first failure of each passthrough connection: (reason, errorNumber).
_passthroughFailures: weakref.WeakKeyDictionary[SSL.Connection, tuple[str, int]] = (
    weakref.WeakKeyDictionary()
)


def _recordPassthroughFailure(
    connection: SSL.Connection, reason: str, errorNumber: int, fields: dict[str, Any]
) -> bool:
    """
    Remember the first verification failure of a passthrough connection,
    log it, and let the handshake go on.
    """
    if connection not in _passthroughFailures:
        _passthroughFailures[connection] = (reason, errorNumber)
        log.info(PASSTHROUGH_FORMAT, **fields)
    return True


def verificationFailure(connectionOrTransport: object) -> tuple[str, int] | None:
    """
    Why the client certificate of a C{client_auth = "passthrough"}
    connection failed verification: the reason (as in L{REJECTED_FORMAT},
    C{"unknown_ca"}, C{"expired"}, ...) and OpenSSL's C{X509_V_ERR_*}
    number of the first problem; L{None} if it passed (or on any other
    listener, where a failure rejects the handshake).

    @param connectionOrTransport: The L{SSL.Connection} or its TLS
        transport.
    """
    connection = _connectionOf(connectionOrTransport)
    if connection is None:
        return None
    return _passthroughFailures.get(connection)


def _revocationDate(entry: x509.RevokedCertificate | None) -> str | None:
    """
    The revocation date of a CRL entry, ISO 8601, or L{None}.
    """
    if entry is None:
        return None
    return entry.revocation_date_utc.isoformat()


def _revocationReason(entry: x509.RevokedCertificate | None) -> str | None:
    """
    The reason code of a CRL entry (C{"keyCompromise"}, ...), or L{None}.
    """
    if entry is None:
        return None
    try:
        extension = entry.extensions.get_extension_for_class(x509.CRLReason)
    except x509.ExtensionNotFound:
        return None
    return str(extension.value.reason.value)


# ---------------------------------------------------------------------------
# The handshake-failure hook
# ---------------------------------------------------------------------------

_NO_CERTIFICATE_TEXT: Final = "peer did not return a certificate"


def _openSSLReasons(error: BaseException) -> list[str]:
    """
    The reason texts in a pyOpenSSL C{SSL.Error} (its argument is a list of
    C{(library, function, reason)} tuples).
    """
    reasons = []
    for argument in error.args:
        if isinstance(argument, list):
            for entry in argument:
                if isinstance(entry, tuple) and len(entry) == 3:
                    reasons.append(str(entry[2]))
    return reasons


def _logHandshakeFailure(
    tlsProtocol: object, reason: Failure, listenerName: str | None
) -> bool:
    """
    See L{logHandshakeFailure}.
    """
    if not isinstance(reason.value, SSL.Error):
        return False
    texts = _openSSLReasons(reason.value)
    why = NO_CERTIFICATE if _NO_CERTIFICATE_TEXT in texts else HANDSHAKE_FAILED
    if not _markLogged(_connectionOf(tlsProtocol), tlsProtocol, why):
        return False
    fields: dict[str, Any] = dict(
        _LEAF_NONE,
        reason=why,
        peer=_peerOf(tlsProtocol),
        listener=listenerName,
        error="; ".join(texts) or None,
        errorNumber=None,
        depth=None,
        certificateSubject=None,
        certificateSerial=None,
        certificateIssuer=None,
    )
    log.warn(REJECTED_FORMAT, **fields)
    return True


def logHandshakeFailure(tlsProtocol: object, reason: Failure) -> bool:
    """
    Log a TLS handshake that failed, unless the verify callback already
    logged it.

    The protocol wrapped in TLS (the relay's client-side protocol) calls
    this from its C{connectionLost} when C{handshakeCompleted} was never
    called, passing its C{transport} (the L{TLSMemoryBIOProtocol}) and the
    C{reason} it was given::

        def connectionLost(self, reason):
            if not self._handshakeDone:
                verify.logHandshakeFailure(self.transport, reason)

    Failures that are not TLS errors (the client closed the connection or
    timed out before finishing the handshake) are not rejections and are
    not logged here.  A TLS failure is logged once with L{REJECTED_FORMAT}:
    reason L{NO_CERTIFICATE} when C{client_auth = "required"} and the
    client sent no certificate, L{HANDSHAKE_FAILED} (OpenSSL's text in
    C{error}) for anything else the verify callback did not already log.

    @param tlsProtocol: The TLS transport of the failed connection (a
        L{twisted.protocols.tls.TLSMemoryBIOProtocol}, or anything with its
        C{getHandle} and C{getPeer}).
    @param reason: Why the connection was lost.

    @return: Whether an event was logged.
    """
    listenerName: str | None = None
    connection = _connectionOf(tlsProtocol)
    if connection is not None:
        verifier = connection.get_context().get_app_data()
        if isinstance(verifier, ClientCertificateVerifier):
            listenerName = verifier.listenerName
    return _logHandshakeFailure(tlsProtocol, reason, listenerName)


def logUnknownServerName(
    connection: SSL.Connection, listenerName: str, serverName: str | None
) -> None:
    """
    Log the rejection of a client whose server name no certificate of a
    C{strict_sni} listener answers for: reason L{UNKNOWN_SNI}, with the
    name in the C{sni} field.  The handshake failure that follows is not
    logged again.

    @param connection: The server connection, during its ClientHello.
    @param listenerName: The listener's name.
    @param serverName: The name the client sent.
    """
    tlsProtocol = connection.get_app_data()
    _markLogged(connection, tlsProtocol, UNKNOWN_SNI)
    fields: dict[str, Any] = dict(
        _LEAF_NONE,
        reason=UNKNOWN_SNI,
        peer=_peerOf(tlsProtocol),
        listener=listenerName,
        sni=serverName,
        error="unrecognized server name",
        errorNumber=None,
        depth=None,
        certificateSubject=None,
        certificateSerial=None,
        certificateIssuer=None,
    )
    log.warn(REJECTED_FORMAT, **fields)
