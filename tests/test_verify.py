# -*- test-case-name: tests.test_verify -*-
"""
Tests for L{mtlsproxy.verify} and L{mtlsproxy.revocation}: client
certificate verification through real TLS 1.2 and 1.3 handshakes in memory,
with generated CAs, intermediates, leaves and CRLs; the rejection reasons,
the alerts clients see, and the log events.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mtlsproxy import pki
from mtlsproxy.revocation import (
    CRL_EXPIRED_DEFAULT,
    CRL_MISSING_DEFAULT,
    CRLExpired,
    CRLIndex,
    CRLMissing,
    crlState,
    isSelfIssued,
)
from mtlsproxy.tlscontext import (
    ServerContextFactory,
    buildServerContext,
    serverContextFactory,
)
from mtlsproxy.verify import (
    ALLOWED_FORMAT,
    CRL_EXPIRED,
    CRL_MISSING,
    EXPIRED,
    HANDSHAKE_FAILED,
    INTERNAL_ERROR,
    NO_CERTIFICATE,
    NOT_YET_VALID,
    REJECTED_FORMAT,
    REVOKED,
    UNKNOWN_CA,
    ClientCertificateVerifier,
    ClientIdentity,
    describeAddress,
    logHandshakeFailure,
    peerIdentity,
    reasonForVerifyError,
    verifyErrorString,
)
from tests.test_tlscontext import (
    TLS12,
    TLS13,
    Handshake,
    GeneratedPKI,
    clientFor,
    handshake,
    listenerConfig,
    listenerMaterial,
    sharedPKI,
)

NOW = datetime.now(timezone.utc)
DAY = timedelta(days=1)
PEER = "192.0.2.7:50123"

LEAF_FIELDS = ("subject", "serial", "fingerprint", "issuer")


def fingerprint(issued: pki.Issued) -> str:
    """
    The SHA-256 fingerprint of C{issued}'s certificate, lower-case hex.
    """
    return issued.certificate.fingerprint(hashes.SHA256()).hex()


def serial(issued: pki.Issued) -> str:
    """
    The serial number of C{issued}'s certificate, lower-case hex.
    """
    return f"{issued.certificate.serial_number:x}"


class _VerifyTestsMixin:
    """
    Client certificate verification cases, run once per protocol version by
    the subclasses below.

    @ivar version: The protocol version the client is limited to.
    """

    version: int

    # Provided by SynchronousTestCase.
    assertEqual: Any
    assertIn: Any
    assertIs: Any
    assertIsNone: Any
    assertTrue: Any
    assertFalse: Any
    fail: Any

    def setUp(self) -> None:
        self.pki: GeneratedPKI = sharedPKI()
        self.events = EventLoggingObserver.createWithCleanup(
            self, globalLogPublisher  # type: ignore[arg-type]
        )

    # -- helpers -----------------------------------------------------------

    def connect(
        self,
        issued: pki.Issued | None,
        extra: Sequence[pki.Issued] = (),
        cas: Sequence[x509.Certificate] | None = None,
        crls: Sequence[x509.CertificateRevocationList] | None = None,
        **settings: Any,
    ) -> Handshake:
        """
        Connect a client presenting C{issued} (plus C{extra}) to a listener
        with the given CAs, CRLs and settings.
        """
        factory = serverContextFactory(
            listenerConfig(**settings), listenerMaterial(self.pki, cas=cas, crls=crls)
        )
        return handshake(factory, clientFor(self.pki, issued, extra, version=self.version))

    def verifyEvents(self) -> list[dict[str, Any]]:
        """
        The events logged by L{mtlsproxy.verify}.
        """
        return [e for e in self.events if e.get("log_namespace") == "mtlsproxy.verify"]

    def assertAccepted(self, result: Handshake) -> None:
        """
        The handshake succeeded and data flowed.
        """
        if not result.accepted:
            self.fail(
                f"not accepted: server {result.serverError() or result.server.lostReason},"
                f" client {result.clientError() or result.client.lostReason}"
            )

    def assertRejected(
        self, result: Handshake, reason: str, alert: str
    ) -> dict[str, Any]:
        """
        The server refused the handshake, the client saw C{alert}, and
        exactly one rejection event with C{reason} was logged.

        @return: The event.
        """
        self.assertFalse(result.server.handshakeDone)
        self.assertIsNone(result.server.identity)
        self.assertEqual(result.server.received, b"")
        self.assertIn(alert, result.clientError())
        rejections = [
            e for e in self.verifyEvents() if e["log_format"] == REJECTED_FORMAT
        ]
        self.assertEqual(len(rejections), 1, rejections)
        [event] = rejections
        self.assertEqual(event["reason"], reason)
        self.assertEqual(event["peer"], PEER)
        self.assertEqual(event["listener"], "mtls")
        self.assertIs(event["log_level"], LogLevel.warn)
        # The relay's hook found it already logged.
        self.assertEqual(result.server.loggedFailure, reason == NO_CERTIFICATE)
        return event

    def assertLeafFields(self, event: dict[str, Any], issued: pki.Issued | None) -> None:
        """
        The event describes C{issued} as the leaf, or no leaf for L{None}.
        """
        if issued is None:
            self.assertEqual({k: event[k] for k in LEAF_FIELDS}, dict.fromkeys(LEAF_FIELDS))
            return
        self.assertEqual(
            {k: event[k] for k in LEAF_FIELDS},
            {
                "subject": issued.certificate.subject.rfc4514_string(),
                "serial": serial(issued),
                "fingerprint": fingerprint(issued),
                "issuer": issued.certificate.issuer.rfc4514_string(),
            },
        )

    def allowedEvents(self) -> list[dict[str, Any]]:
        """
        The warnings about certificates let through by an C{allow} policy.
        """
        return [e for e in self.verifyEvents() if e["log_format"] == ALLOWED_FORMAT]

    # -- accepted ----------------------------------------------------------

    def test_validClient(self) -> None:
        """
        When the client presents a valid certificate issued by the configured
        root, covered by a current CRL, the handshake succeeds, nothing is
        logged and the connection has the client's identity.
        """
        result = self.connect(self.pki.client)
        self.assertAccepted(result)
        self.assertEqual(self.verifyEvents(), [])
        identity = result.server.identity
        assert identity is not None
        self.assertEqual(identity.subject, "CN=client-direct")
        self.assertEqual(identity.issuer, "CN=Test Root")
        self.assertEqual(identity.serial, serial(self.pki.client))
        self.assertEqual(identity.fingerprint, fingerprint(self.pki.client))
        self.assertEqual(identity.commonName, "client-direct")

    def test_intermediateSentByClient(self) -> None:
        """
        When only the root is configured and the client sends the
        intermediate that issued its certificate, the handshake succeeds
        (both CAs' CRLs are present).
        """
        result = self.connect(
            self.pki.intermediateClient,
            extra=[self.pki.intermediate],
            crls=(self.pki.rootCRL(), self.pki.intermediateCRL()),
        )
        self.assertAccepted(result)
        self.assertEqual(self.verifyEvents(), [])
        assert result.server.identity is not None
        self.assertEqual(result.server.identity.issuer, "CN=Test Intermediate")

    def test_intermediateConfigured(self) -> None:
        """
        When the intermediate is configured along with the root, a client
        sending only its own certificate is accepted.
        """
        result = self.connect(
            self.pki.intermediateClient,
            cas=(self.pki.root.certificate, self.pki.intermediate.certificate),
            crls=(self.pki.rootCRL(), self.pki.intermediateCRL()),
        )
        self.assertAccepted(result)

    def test_optionalNoCertificate(self) -> None:
        """
        When client certificates are optional and the client sends none, the
        handshake succeeds without an identity and nothing is logged.
        """
        result = self.connect(None, client_auth="optional")
        self.assertAccepted(result)
        self.assertIsNone(result.server.identity)
        self.assertEqual(self.verifyEvents(), [])

    def test_optionalValidCertificate(self) -> None:
        """
        When client certificates are optional and the client sends a valid
        one, the connection has its identity.
        """
        result = self.connect(self.pki.client, client_auth="optional")
        self.assertAccepted(result)
        assert result.server.identity is not None
        self.assertEqual(result.server.identity.subject, "CN=client-direct")

    # -- rejected ----------------------------------------------------------

    def test_requiredNoCertificate(self) -> None:
        """
        When client certificates are required and the client sends none, the
        handshake fails, the client sees a handshake_failure (TLS 1.2) or
        certificate_required (TLS 1.3) alert, and the failure hook logs
        reason C{no_certificate} once, without certificate fields.
        """
        alert = "handshake failure" if self.version == TLS12 else "certificate required"
        result = self.connect(None)
        event = self.assertRejected(result, NO_CERTIFICATE, alert)
        self.assertLeafFields(event, None)
        self.assertIsNone(event["depth"])
        self.assertEqual(event["error"], "peer did not return a certificate")

    def test_optionalRevokedCertificate(self) -> None:
        """
        When client certificates are optional and the client sends a revoked
        one, the handshake is rejected: optional means a certificate may be
        missing, not that a bad one is ignored.
        """
        revoked = pki.issueClientCertificate(self.pki.root, "client-revoked")
        result = self.connect(
            revoked, client_auth="optional", crls=(self.pki.rootCRL(revoked),)
        )
        self.assertRejected(result, REVOKED, "certificate revoked")

    def test_unknownCA(self) -> None:
        """
        When the client's certificate was issued by a CA that is not
        configured, the handshake is rejected with reason C{unknown_ca} and
        the client sees an unknown_ca alert.
        """
        stranger = pki.issueClientCertificate(self.pki.otherRoot, "stranger")
        result = self.connect(stranger)
        event = self.assertRejected(result, UNKNOWN_CA, "unknown ca")
        self.assertLeafFields(event, stranger)
        self.assertEqual(event["depth"], 0)
        self.assertEqual(event["errorNumber"], 20)
        self.assertEqual(event["error"], "unable to get local issuer certificate")

    def test_unknownCAWithItsRoot(self) -> None:
        """
        When the client sends an unconfigured root along with its
        certificate, the handshake is rejected with reason C{unknown_ca};
        the problem is found at the root (depth 1), before OpenSSL hands the
        leaf to the callback, so the event names the root instead.
        """
        stranger = pki.issueClientCertificate(self.pki.otherRoot, "stranger")
        result = self.connect(stranger, extra=[self.pki.otherRoot])
        event = self.assertRejected(result, UNKNOWN_CA, "unknown ca")
        self.assertEqual(event["depth"], 1)
        self.assertEqual(event["certificateSubject"], "CN=Untrusted Root")
        self.assertLeafFields(event, None)

    def test_revokedLeaf(self) -> None:
        """
        When the client's certificate is listed in its issuer's CRL, the
        handshake is rejected with reason C{revoked}, the revoked serial and
        issuer and the revocation date, and the client sees a
        certificate_revoked alert.
        """
        revoked = pki.issueClientCertificate(self.pki.root, "client-revoked")
        crl = self.pki.rootCRL(revoked)
        result = self.connect(revoked, crls=(crl,))
        event = self.assertRejected(result, REVOKED, "certificate revoked")
        self.assertLeafFields(event, revoked)
        self.assertEqual(event["revokedSerial"], serial(revoked))
        self.assertEqual(event["revokedIssuer"], "CN=Test Root")
        entry = crl.get_revoked_certificate_by_serial_number(
            revoked.certificate.serial_number
        )
        assert entry is not None
        self.assertEqual(event["revocationDate"], entry.revocation_date_utc.isoformat())
        self.assertEqual(event["depth"], 0)
        self.assertEqual(event["errorNumber"], 23)

    def test_revokedIntermediate(self) -> None:
        """
        When the intermediate above the client's certificate is revoked by
        the root's CRL, the handshake is rejected with reason C{revoked}
        naming the intermediate's serial, and the client sees a
        certificate_revoked alert.
        """
        intermediate = self.pki.intermediate
        result = self.connect(
            self.pki.intermediateClient,
            extra=[intermediate],
            cas=(self.pki.root.certificate, intermediate.certificate),
            crls=(self.pki.rootCRL(intermediate), self.pki.intermediateCRL()),
        )
        event = self.assertRejected(result, REVOKED, "certificate revoked")
        self.assertEqual(event["depth"], 1)
        self.assertEqual(event["revokedSerial"], serial(intermediate))
        self.assertEqual(event["revokedIssuer"], "CN=Test Root")
        self.assertEqual(event["certificateSubject"], "CN=Test Intermediate")
        # OpenSSL stops at the intermediate before handing over the leaf.
        self.assertLeafFields(event, None)

    def test_revokedIntermediateSentByClient(self) -> None:
        """
        When only the root is configured and the intermediate the client
        sends is revoked by the root's CRL, the handshake is rejected with
        reason C{revoked}.
        """
        intermediate = self.pki.intermediate
        result = self.connect(
            self.pki.intermediateClient,
            extra=[intermediate],
            crls=(self.pki.rootCRL(intermediate), self.pki.intermediateCRL()),
        )
        event = self.assertRejected(result, REVOKED, "certificate revoked")
        self.assertEqual(event["revokedSerial"], serial(intermediate))

    def test_revokedIntermediateWithoutItsCRLAllowed(self) -> None:
        """
        When C{crl_missing = "allow"} lets a leaf through whose issuer has no
        CRL, a revoked intermediate above it is still rejected.
        """
        intermediate = self.pki.intermediate
        result = self.connect(
            self.pki.intermediateClient,
            extra=[intermediate],
            crls=(self.pki.rootCRL(intermediate),),
            crl_missing="allow",
        )
        event = self.assertRejected(result, REVOKED, "certificate revoked")
        self.assertEqual(event["revokedSerial"], serial(intermediate))
        [allowed] = self.allowedEvents()
        self.assertEqual(allowed["reason"], CRL_MISSING)
        self.assertLeafFields(allowed, self.pki.intermediateClient)

    def test_expired(self) -> None:
        """
        When the client's certificate is past its notAfter, the handshake is
        rejected with reason C{expired} and the client sees a
        certificate_expired alert.
        """
        expired = pki.issueClientCertificate(
            self.pki.root, "client-expired", notBefore=NOW - 30 * DAY, notAfter=NOW - DAY
        )
        result = self.connect(expired)
        event = self.assertRejected(result, EXPIRED, "certificate expired")
        self.assertLeafFields(event, expired)

    def test_notYetValid(self) -> None:
        """
        When the client's certificate is before its notBefore, the handshake
        is rejected with reason C{not_yet_valid} and the client sees a
        bad_certificate alert.
        """
        future = pki.issueClientCertificate(
            self.pki.root, "client-future", notBefore=NOW + DAY, notAfter=NOW + 30 * DAY
        )
        result = self.connect(future)
        event = self.assertRejected(result, NOT_YET_VALID, "bad certificate")
        self.assertLeafFields(event, future)

    def test_wrongPurpose(self) -> None:
        """
        When the client presents a certificate without the clientAuth
        extended key usage, the handshake is rejected with OpenSSL's text as
        the reason.
        """
        server = pki.issueServerCertificate(self.pki.root, "not-a-client.example")
        result = self.connect(server)
        event = self.assertRejected(
            result, "unsuitable certificate purpose", "unsupported certificate"
        )
        self.assertEqual(event["errorNumber"], 26)
        self.assertLeafFields(event, server)

    # -- CRL policies ------------------------------------------------------

    def test_crlMissingRejected(self) -> None:
        """
        When no CRL of the client certificate's issuer is configured, the
        handshake is rejected with reason C{crl_missing} by default and the
        client sees an unknown_ca alert.
        """
        result = self.connect(self.pki.client, crls=())
        event = self.assertRejected(result, CRL_MISSING, "unknown ca")
        self.assertLeafFields(event, self.pki.client)
        self.assertEqual(event["errorNumber"], 3)
        self.assertEqual(self.allowedEvents(), [])

    def test_intermediateWithoutItsCRL(self) -> None:
        """
        When the client sends an intermediate whose CRL is not configured,
        the handshake is rejected with reason C{crl_missing} by default.
        """
        result = self.connect(
            self.pki.intermediateClient, extra=[self.pki.intermediate]
        )
        event = self.assertRejected(result, CRL_MISSING, "unknown ca")
        self.assertEqual(event["certificateIssuer"], "CN=Test Intermediate")

    def test_crlMissingAllowed(self) -> None:
        """
        When C{crl_missing = "allow"}, a certificate whose issuer has no CRL
        is accepted, and a warning is logged for every such handshake.
        """
        factory = serverContextFactory(
            listenerConfig(crl_missing="allow"), listenerMaterial(self.pki, crls=())
        )
        for _ in range(2):
            result = handshake(
                factory, clientFor(self.pki, self.pki.client, version=self.version)
            )
            self.assertAccepted(result)
        allowed = self.allowedEvents()
        self.assertEqual(len(allowed), 2)
        for event in allowed:
            self.assertEqual(event["reason"], CRL_MISSING)
            self.assertEqual(event["setting"], "crl_missing")
            self.assertEqual(event["peer"], PEER)
            self.assertEqual(event["listener"], "mtls")
            self.assertIs(event["log_level"], LogLevel.warn)
            self.assertLeafFields(event, self.pki.client)
        self.assertEqual(
            [e for e in self.verifyEvents() if e["log_format"] == REJECTED_FORMAT], []
        )

    def test_intermediateWithoutItsCRLAllowed(self) -> None:
        """
        When only the root is configured, the client sends its intermediate
        and no CRL of the intermediate is configured, C{crl_missing =
        "allow"} accepts the client with a warning naming the intermediate.
        """
        result = self.connect(
            self.pki.intermediateClient,
            extra=[self.pki.intermediate],
            crl_missing="allow",
        )
        self.assertAccepted(result)
        [allowed] = self.allowedEvents()
        self.assertEqual(allowed["certificateIssuer"], "CN=Test Intermediate")

    def test_crlExpiredRejected(self) -> None:
        """
        When the CRL of the client certificate's issuer is past its
        nextUpdate, the handshake is rejected with reason C{crl_expired} by
        default and the client sees a certificate_expired alert.
        """
        stale = self.pki.rootCRL(lastUpdate=NOW - 10 * DAY, nextUpdate=NOW - DAY)
        result = self.connect(self.pki.client, crls=(stale,))
        event = self.assertRejected(result, CRL_EXPIRED, "certificate expired")
        self.assertLeafFields(event, self.pki.client)
        self.assertEqual(event["errorNumber"], 12)

    def test_crlExpiredAllowed(self) -> None:
        """
        When C{crl_expired = "allow"}, a certificate checked against a stale
        CRL that does not list it is accepted with a warning.
        """
        stale = self.pki.rootCRL(lastUpdate=NOW - 10 * DAY, nextUpdate=NOW - DAY)
        result = self.connect(self.pki.client, crls=(stale,), crl_expired="allow")
        self.assertAccepted(result)
        [allowed] = self.allowedEvents()
        self.assertEqual(allowed["reason"], CRL_EXPIRED)
        self.assertEqual(allowed["setting"], "crl_expired")
        self.assertLeafFields(allowed, self.pki.client)

    def test_crlExpiredAllowedStillRevokes(self) -> None:
        """
        When C{crl_expired = "allow"} and the stale CRL lists the client's
        certificate, the handshake is rejected with reason C{revoked}.
        """
        revoked = pki.issueClientCertificate(self.pki.root, "client-revoked")
        stale = self.pki.rootCRL(revoked, lastUpdate=NOW - 10 * DAY, nextUpdate=NOW - DAY)
        result = self.connect(revoked, crls=(stale,), crl_expired="allow")
        self.assertRejected(result, REVOKED, "certificate revoked")

    # -- robustness --------------------------------------------------------

    def test_internalError(self) -> None:
        """
        When the verify callback fails unexpectedly, the handshake is
        rejected and logged once with reason C{internal_error} and the
        traceback, rather than the exception escaping into the reactor.
        """
        revoked = pki.issueClientCertificate(self.pki.root, "client-revoked")
        listener = listenerConfig()
        material = listenerMaterial(self.pki, crls=(self.pki.rootCRL(revoked),))
        # A verifier whose CRL index is broken fails describing the revocation.
        broken = ClientCertificateVerifier(listenerName="mtls", crls=None)  # type: ignore[arg-type]
        factory = ServerContextFactory(
            listenerName="mtls",
            context=buildServerContext(listener, material, broken),
            verifier=broken,
            crls=CRLIndex.fromCRLs(()),
        )
        result = handshake(factory, clientFor(self.pki, revoked, version=self.version))
        self.assertFalse(result.server.handshakeDone)
        [event] = self.verifyEvents()
        self.assertEqual(event["reason"], INTERNAL_ERROR)
        self.assertEqual(event["peer"], PEER)
        self.assertIn("log_failure", event)
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)  # type: ignore[attr-defined]

    def test_handshakeFailureLoggedOnce(self) -> None:
        """
        When the failure hook is called again for a connection whose
        rejection was already logged, it logs nothing.
        """
        result = self.connect(None)
        reason = result.server.lostReason
        assert reason is not None
        self.assertFalse(logHandshakeFailure(result.serverTLS, reason))
        self.assertEqual(len(self.verifyEvents()), 1)


class TLS12VerifyTests(_VerifyTestsMixin, SynchronousTestCase):
    """
    Client certificate verification over TLS 1.2.
    """

    version = TLS12


class TLS13VerifyTests(_VerifyTestsMixin, SynchronousTestCase):
    """
    Client certificate verification over TLS 1.3.
    """

    version = TLS13


class HandshakeFailureTests(SynchronousTestCase):
    """
    Tests for L{logHandshakeFailure} with failures that are not rejections.
    """

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(
            self, globalLogPublisher  # type: ignore[arg-type]
        )

    def test_notTLSError(self) -> None:
        """
        When the connection was lost for a reason other than a TLS error
        (the client went away mid-handshake), nothing is logged.
        """

        class Transport:
            def getHandle(self) -> None:
                return None

        self.assertFalse(logHandshakeFailure(Transport(), Failure(ConnectionDone())))  # type: ignore[arg-type]
        self.assertEqual(list(self.events), [])

    def test_protocolError(self) -> None:
        """
        When the handshake failed with a TLS error other than a missing
        certificate, it is logged with reason C{handshake_failed} and
        OpenSSL's text.
        """

        class Transport:
            def getHandle(self) -> None:
                return None

            def getPeer(self) -> IPv6Address:
                return IPv6Address("TCP", "2001:db8::1", 4433)

        error = SSL.Error([("SSL routines", "", "unsupported protocol")])
        self.assertTrue(logHandshakeFailure(Transport(), Failure(error)))  # type: ignore[arg-type]
        [event] = self.events
        self.assertEqual(event["reason"], HANDSHAKE_FAILED)
        self.assertEqual(event["error"], "unsupported protocol")
        self.assertEqual(event["peer"], "[2001:db8::1]:4433")
        self.assertIsNone(event["listener"])


class ReasonTests(SynchronousTestCase):
    """
    Tests for the mapping of OpenSSL verify errors to reasons.
    """

    def test_namedReasons(self) -> None:
        """
        When OpenSSL reports one of the errors we name, the reason is our
        name for it.
        """
        self.assertEqual(
            {n: reasonForVerifyError(n) for n in (2, 3, 9, 10, 12, 18, 19, 20, 21, 23)},
            {
                2: UNKNOWN_CA,
                3: CRL_MISSING,
                9: NOT_YET_VALID,
                10: EXPIRED,
                12: CRL_EXPIRED,
                18: UNKNOWN_CA,
                19: UNKNOWN_CA,
                20: UNKNOWN_CA,
                21: UNKNOWN_CA,
                23: REVOKED,
            },
        )

    def test_otherReasons(self) -> None:
        """
        When OpenSSL reports another error, the reason is OpenSSL's text.
        """
        self.assertEqual(reasonForVerifyError(26), "unsuitable certificate purpose")
        self.assertEqual(verifyErrorString(23), "certificate revoked")


class AddressTests(SynchronousTestCase):
    """
    Tests for L{describeAddress}.
    """

    def test_addresses(self) -> None:
        """
        When addresses are described, IPv4 is C{host:port}, IPv6
        C{[host]:port}, a UNIX socket its path, and L{None} stays L{None}.
        """
        self.assertEqual(describeAddress(IPv4Address("TCP", "192.0.2.1", 80)), "192.0.2.1:80")
        self.assertEqual(
            describeAddress(IPv6Address("TCP", "2001:db8::2", 443)), "[2001:db8::2]:443"
        )
        self.assertEqual(describeAddress(UNIXAddress(b"/run/proxy.sock")), "/run/proxy.sock")
        self.assertIsNone(describeAddress(None))


class PeerIdentityTests(SynchronousTestCase):
    """
    Tests for L{peerIdentity} and L{ClientIdentity}.
    """

    def test_fromCertificate(self) -> None:
        """
        When a certificate is described, the identity has its RFC 4514
        subject and issuer, hex serial, SHA-256 fingerprint, common name and
        notAfter.
        """
        client = sharedPKI().client
        identity = ClientIdentity.fromCertificate(client.certificate)
        self.assertEqual(identity.subject, "CN=client-direct")
        self.assertEqual(identity.issuer, "CN=Test Root")
        self.assertEqual(identity.serial, serial(client))
        self.assertEqual(identity.fingerprint, fingerprint(client))
        self.assertEqual(len(identity.fingerprint), 64)
        self.assertEqual(identity.commonName, "client-direct")
        self.assertEqual(identity.notAfter, client.certificate.not_valid_after_utc)
        self.assertIs(identity.certificate, client.certificate)

    def test_connectionDirectly(self) -> None:
        """
        When given the L{SSL.Connection} itself instead of the transport,
        L{peerIdentity} describes its peer certificate the same way.
        """
        tpki = sharedPKI()
        factory = serverContextFactory(listenerConfig(), listenerMaterial(tpki))
        result = handshake(factory, clientFor(tpki, tpki.client))
        self.assertEqual(peerIdentity(result.serverConnection), result.server.identity)

    def test_noTLS(self) -> None:
        """
        When given something without a TLS connection, L{peerIdentity}
        returns L{None}.
        """
        self.assertIsNone(peerIdentity(object()))


class RevocationTests(SynchronousTestCase):
    """
    Tests for L{mtlsproxy.revocation}.
    """

    def setUp(self) -> None:
        self.pki = sharedPKI()

    def test_policies(self) -> None:
        """
        When the configuration strings are converted, C{"reject"} and
        C{"allow"} give the policy members; both defaults reject.
        """
        self.assertIs(CRLMissing("reject"), CRLMissing.REJECT)
        self.assertIs(CRLMissing("allow"), CRLMissing.ALLOW)
        self.assertIs(CRLExpired("reject"), CRLExpired.REJECT)
        self.assertIs(CRLExpired("allow"), CRLExpired.ALLOW)
        self.assertIs(CRL_MISSING_DEFAULT, CRLMissing.REJECT)
        self.assertIs(CRL_EXPIRED_DEFAULT, CRLExpired.REJECT)
        self.assertRaises(ValueError, CRLMissing, "ignore")

    def test_crlState(self) -> None:
        """
        When a CRL is judged, it is C{not_yet_valid} before its lastUpdate,
        C{current} until its nextUpdate and C{expired} after.
        """
        crl = self.pki.rootCRL(lastUpdate=NOW, nextUpdate=NOW + DAY)
        self.assertEqual(crlState(crl, NOW - DAY), "not_yet_valid")
        self.assertEqual(crlState(crl, NOW + DAY / 2), "current")
        self.assertEqual(crlState(crl, NOW + 2 * DAY), "expired")
        # Naive datetimes are UTC.
        naive = (NOW + 2 * DAY).replace(tzinfo=None)
        self.assertEqual(crlState(crl, naive), "expired")

    def test_index(self) -> None:
        """
        When CRLs are indexed, they are found by issuer, and a revoked
        serial is found with its entry.
        """
        revoked = pki.issueClientCertificate(self.pki.root, "client-revoked")
        rootCRL = self.pki.rootCRL(revoked)
        intermediateCRL = self.pki.intermediateCRL()
        index = CRLIndex.fromCRLs([rootCRL, intermediateCRL])
        self.assertEqual(len(index), 2)
        root = self.pki.root.certificate.subject
        self.assertEqual(index.crlsFor(root), (rootCRL,))
        self.assertEqual(index.crlsFor(self.pki.otherRoot.certificate.subject), ())
        self.assertTrue(index.hasCRLFor(root))
        entry = index.revocationOf(revoked.certificate.serial_number, root)
        assert entry is not None
        self.assertEqual(entry.serial_number, revoked.certificate.serial_number)
        self.assertIsNone(index.revocationOf(self.pki.client.certificate.serial_number, root))

    def test_missingFor(self) -> None:
        """
        When asked which CAs lack a needed CRL, the index names CAs without
        their own CRL and intermediates without their issuer's CRL, but not
        a root for lacking a CRL above it.
        """
        root = self.pki.root.certificate
        intermediate = self.pki.intermediate.certificate
        complete = CRLIndex.fromCRLs([self.pki.rootCRL(), self.pki.intermediateCRL()])
        self.assertEqual(complete.missingFor([root, intermediate]), ())
        onlyIntermediate = CRLIndex.fromCRLs([self.pki.intermediateCRL()])
        self.assertEqual(onlyIntermediate.missingFor([root, intermediate]), (root, intermediate))
        onlyRoot = CRLIndex.fromCRLs([self.pki.rootCRL()])
        self.assertEqual(onlyRoot.missingFor([root, intermediate]), (intermediate,))

    def test_status(self) -> None:
        """
        When the index reports its status, each CRL is summarized with its
        issuer, dates, state and number of revoked certificates.
        """
        revoked = pki.issueClientCertificate(self.pki.root, "client-revoked")
        crl = self.pki.rootCRL(revoked, lastUpdate=NOW - DAY, nextUpdate=NOW + DAY)
        [status] = CRLIndex.fromCRLs([crl]).status(NOW)
        self.assertEqual(status.issuer, "CN=Test Root")
        self.assertEqual(status.state, "current")
        self.assertEqual(status.nextUpdate, crl.next_update_utc)
        self.assertEqual(status.lastUpdate, crl.last_update_utc)
        self.assertEqual(status.revokedCount, 1)

    def test_selfIssued(self) -> None:
        """
        When a certificate names itself as issuer it is self-issued; an
        intermediate is not.
        """
        self.assertTrue(isSelfIssued(self.pki.root.certificate))
        self.assertFalse(isSelfIssued(self.pki.intermediate.certificate))
