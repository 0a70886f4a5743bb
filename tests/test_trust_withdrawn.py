# -*- test-case-name: tests.test_trust_withdrawn -*-
"""
Tests for withdrawn trust of established connections
(L{mtlsproxy.trust.closeUntrustedConnections} and its backend
counterparts, driven by L{mtlsproxy.reload.Reloader}), and for the close
reason an C{https} listener's request reports when a reload closes its
connection.

Every certificate is generated here and every handshake is a real one in
memory (L{tests.test_reload}'s fixtures: a real L{ProxyService} on a
L{MemoryReactorClock}, configuration and PKI files in a temporary folder).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

from OpenSSL import SSL
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mtlsproxy import pki
from mtlsproxy.http import Outcome
from mtlsproxy.revocation import REVOKED_LIVE, REVOKED_LIVE_FORMAT, PeerChain, peerChainOf
from mtlsproxy.trust import (
    UNTRUSTED_LIVE,
    UNTRUSTED_LIVE_FORMAT,
    UNTRUSTED_MEMBER_FORMAT,
    TrustStore,
    closeUntrustedIdleBackends,
    trustSet,
)
from tests.test_backendtls import TLS13 as BACKEND_TLS13
from tests.test_backendtls import AttemptFactory, Connection, Member, connectToMember, memberContext
from tests.test_http import HTTPHarness
from tests.test_reload import (
    BackendFixture,
    FakeConnection,
    ProxyFixture,
    _EventsMixin,
    _IdleBackend,
    reloadPKI,
)
from tests.test_sni import NamedClient, inMemory
from tests.test_tlscontext import TLS13, Handshake


class TrustPKI:
    """
    What these tests add to L{tests.test_reload.ReloadPKI}: a partner root
    with a client (C{dave}) and an intermediate with a client under it
    (C{erin}); a server certificate for a second name (C{api.example});
    a second CA for the members, with a member under its intermediate; a
    client certificate that has expired.
    """

    def __init__(self) -> None:
        base = reloadPKI()
        now = datetime.now(timezone.utc)
        self.partnerRoot = pki.createRootCA("Partner Root")
        self.partnerInter = pki.createIntermediateCA(self.partnerRoot, "Partner Intermediate")
        self.dave = pki.issueClientCertificate(self.partnerRoot, "dave")
        self.erin = pki.issueClientCertificate(self.partnerInter, "erin")
        self.apiServer = pki.issueServerCertificate(
            base.serverRoot, "api.example", dnsNames=["api.example"]
        )
        self.expired = pki.issueClientCertificate(
            base.clientRoot, "expired", notBefore=now - timedelta(days=30), notAfter=now - timedelta(days=1)
        )
        self.memberRootB = pki.createRootCA("Backend Root B")
        self.memberInterB = pki.createIntermediateCA(self.memberRootB, "Backend Intermediate B")
        self.memberB = pki.issueServerCertificate(
            self.memberInterB, "app.internal", dnsNames=["app.internal"], ipAddresses=["10.0.0.1"]
        )


_TRUST: Optional[TrustPKI] = None


def trustPKI() -> TrustPKI:
    """
    The PKI of this module, generated once per run.
    """
    global _TRUST
    if _TRUST is None:
        _TRUST = TrustPKI()
    return _TRUST


_SITE = """
[[listeners.certificates]]
cert = "{pki}/api.pem"
key = "{pki}/api.key"
ca_certificates = ["{pki}/api-ca.pem"]
crls = ["{pki}/api.crl"]
"""


class TrustFixture(ProxyFixture):
    """
    L{ProxyFixture} whose listener trusts L{cas} (C{clients-ca.pem}, with
    an empty CRL of each in C{clients.crl}) and, with C{site}, a second
    certificate entry for C{api.example} that trusts L{siteCAs} only.
    """

    def __init__(self, testCase: SynchronousTestCase, site: bool = False) -> None:
        base = reloadPKI()
        self.trust = trustPKI()
        self.cas: list[pki.Issued] = [base.clientRoot, base.clientInter, self.trust.partnerRoot]
        self.siteCAs: list[pki.Issued] = [self.trust.partnerRoot]
        self.site = site
        super().__init__(testCase)

    def writeCRLs(self, *revoked: pki.Issued, crlNumber: int = 1) -> None:
        """
        C{clients-ca.pem} and C{clients.crl} for L{cas} (C{revoked} listed
        by their issuer's CRL), and the site's files.
        """
        self.write("clients-ca.pem", pki.chainPEM([ca.certificate for ca in self.cas]))
        self.write(
            "clients.crl",
            b"".join(
                pki.crlPEM(
                    pki.buildCRL(
                        ca,
                        [r.certificate for r in revoked if r.certificate.issuer == ca.certificate.subject],
                        crlNumber=crlNumber,
                    )
                )
                for ca in self.cas
            ),
        )
        self.write("api-ca.pem", pki.chainPEM([ca.certificate for ca in self.siteCAs]))
        self.write(
            "api.crl",
            b"".join(pki.crlPEM(pki.buildCRL(ca, crlNumber=crlNumber)) for ca in self.siteCAs),
        )

    def writeConfig(self) -> None:
        if self.site:
            self.write("api.pem", pki.certificatePEM(self.trust.apiServer.certificate))
            self.write("api.key", pki.keyPEM(self.trust.apiServer.key))
            self.extraListener = _SITE.format(pki=self.pkiDir)
        super().writeConfig()

    def trustOnly(self, *cas: pki.Issued, site: Optional[list[pki.Issued]] = None) -> None:
        """
        From now on the listener trusts C{cas} (and its site C{site}).
        """
        self.cas = list(cas)
        if site is not None:
            self.siteCAs = site
        self.writeCRLs(crlNumber=2)

    def connectTo(
        self, serverName: bytes, issued: pki.Issued, extra: tuple[pki.Issued, ...] = ()
    ) -> Handshake:
        """
        A handshake asking for C{serverName}, presenting C{issued} (and
        C{extra} intermediates).
        """
        client = NamedClient(self.pki.serverRoot.certificate, serverName, issued, TLS13)
        context = client.clientContext()
        for intermediate in extra:
            context.add_extra_chain_cert(intermediate.certificate)
        return inMemory(self.proxy.contextFactories["mtls"], client)


class ListenerTrustTests(_EventsMixin, SynchronousTestCase):
    """
    A reload that changes a listener's C{ca_certificates} closes the
    established connections whose client chain the new CAs no longer
    verify.
    """

    def setUp(self) -> None:
        super().setUp()
        self.fixture = TrustFixture(self)
        self.start()

    def start(self) -> None:
        self.proxy = self.fixture.proxy
        self.proxy.startService()
        self.addCleanup(self.proxy.stopService)
        self.pki = self.fixture.pki
        self.trust = self.fixture.trust

    def register(
        self,
        issued: pki.Issued,
        extra: tuple[pki.Issued, ...] = (),
        serverName: bytes = b"proxy.example",
    ) -> FakeConnection:
        result = self.fixture.connectTo(serverName, issued, extra)
        self.assertTrue(result.accepted, (result.clientError(), result.serverError()))
        connection = FakeConnection(0, "mtls", result)
        connection.id = self.proxy.connections.add(connection)
        return connection

    def test_removedRootClosesItsClients(self) -> None:
        """
        When the reload takes a root out of C{ca_certificates}, the
        connection of a client under it is closed with C{untrusted_live}
        (aborted if still open 5 seconds later) and a warning names the
        connection, the peer, the listener, the root no longer trusted and
        the client; a client under a root still trusted is left alone, and
        the client under the removed root cannot connect again.
        """
        dave = self.register(self.trust.dave)
        alice = self.register(self.pki.alice)
        self.fixture.trustOnly(self.pki.clientRoot, self.pki.clientInter)
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertEqual((result.untrusted, result.revoked), (1, 0))
        self.assertEqual(dave.closed, [UNTRUSTED_LIVE])
        self.assertEqual(alice.closed, [])
        [event] = self.logged(UNTRUSTED_LIVE_FORMAT)
        self.assertEqual(event["log_level"].name, "warn")
        self.assertEqual(event["reason"], UNTRUSTED_LIVE)
        self.assertEqual(event["connectionId"], dave.id)
        self.assertEqual(event["peer"], "192.0.2.7:50123")
        self.assertEqual(event["listener"], "mtls")
        self.assertEqual(event["subject"], "CN=Partner Root")
        self.assertEqual(event["serial"], f"{self.trust.partnerRoot.certificate.serial_number:x}")
        self.assertEqual(event["depth"], 1)
        self.assertEqual(event["withdrawn"], ["CN=Partner Root"])
        self.assertEqual(event["clientSubject"], "CN=dave")
        self.assertEqual(event["clientSerial"], f"{self.trust.dave.certificate.serial_number:x}")
        self.assertEqual(event["error"], "unable to get local issuer certificate")
        self.assertEqual(self.logged(REVOKED_LIVE_FORMAT), [])
        self.fixture.reactor.advance(5.0)
        self.assertEqual((dave.aborted, alice.aborted), (1, 0))
        self.assertFalse(self.fixture.connectTo(b"proxy.example", self.trust.dave).accepted)

    def test_removedIntermediate(self) -> None:
        """
        When the reload takes an intermediate CA out of C{ca_certificates}
        (its root stays), a client that sent only its own certificate
        (the intermediate came from the configuration) is closed, naming
        the intermediate; a client that sends the intermediate itself is
        left alone, as a new handshake of it would be accepted.
        """
        alone = self.register(self.pki.carol)
        withChain = self.register(self.pki.carol, (self.pki.clientInter,))
        # The intermediate's CRL goes with it: the clients under it then
        # rely on crl_missing = "allow".
        config = open(self.fixture.configPath).read()
        with open(self.fixture.configPath, "w") as f:
            f.write(config.replace('client_auth = "required"', 'client_auth = "required"\ncrl_missing = "allow"'))
        self.fixture.trustOnly(self.pki.clientRoot, self.trust.partnerRoot)
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertEqual(alone.closed, [UNTRUSTED_LIVE])
        self.assertEqual(withChain.closed, [])
        [event] = self.logged(UNTRUSTED_LIVE_FORMAT)
        self.assertEqual((event["subject"], event["depth"]), ("CN=Client Intermediate", 1))
        self.assertEqual(event["clientSubject"], "CN=carol")

    def test_unchangedCAsNotVerified(self) -> None:
        """
        A reload that does not change the set of CA certificates (another
        CRL, the same CAs in another order and twice) verifies no
        connection again; one that does, does.
        """
        calls: list[str] = []
        from mtlsproxy import reload as reloadModule

        original = reloadModule.closeUntrustedConnections

        def recording(connections: Any, listenerName: str, *args: Any) -> list[Any]:
            calls.append(listenerName)
            return original(connections, listenerName, *args)

        self.patch(reloadModule, "closeUntrustedConnections", recording)
        self.register(self.trust.dave)
        self.fixture.writeCRLs(self.pki.bob, crlNumber=2)
        self.assertTrue(self.fixture.reloader.reload().ok)
        self.fixture.trustOnly(self.trust.partnerRoot, self.pki.clientInter, self.pki.clientRoot, self.pki.clientRoot)
        self.assertTrue(self.fixture.reloader.reload().ok)
        self.assertEqual(calls, [])
        self.assertEqual(
            trustSet([ca.certificate for ca in self.fixture.cas]),
            trustSet([self.pki.clientRoot.certificate, self.pki.clientInter.certificate, self.trust.partnerRoot.certificate]),
        )
        self.fixture.trustOnly(self.pki.clientRoot)
        self.assertTrue(self.fixture.reloader.reload().ok)
        self.assertEqual(calls, ["mtls"])

    def test_revokedAndUntrustedClosedOnce(self) -> None:
        """
        When the same reload revokes an intermediate CA and takes it out of
        C{ca_certificates}, the connection of a client under it (which did
        not send it) is closed and logged once, as revoked.
        """
        carol = self.register(self.pki.carol)
        self.fixture.cas = [self.pki.clientRoot, self.trust.partnerRoot]
        self.fixture.writeCRLs(self.pki.clientInter, crlNumber=2)
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertEqual(carol.closed, [REVOKED_LIVE])
        self.assertEqual((result.revoked, result.untrusted), (1, 0))
        self.assertEqual(len(self.logged(REVOKED_LIVE_FORMAT)), 1)
        self.assertEqual(self.logged(UNTRUSTED_LIVE_FORMAT), [])

    def test_handshakingLaterSwept(self) -> None:
        """
        A connection still handshaking at the reload (verified against the
        old CAs) is checked again once its handshake had to be over.
        """
        dave = self.register(self.trust.dave)
        dave.phase = "handshaking"
        self.fixture.trustOnly(self.pki.clientRoot, self.pki.clientInter)
        self.assertEqual(self.fixture.reloader.reload().untrusted, 0)
        self.assertEqual(dave.closed, [])
        dave.phase = "relaying"
        self.fixture.reactor.advance(30.0)
        self.assertEqual(dave.closed, [UNTRUSTED_LIVE])

    def test_disabled(self) -> None:
        """
        With C{close_revoked_connections = false}, established connections
        are left alone; the client under the removed root is refused from
        its next handshake on.
        """
        dave = self.register(self.trust.dave)
        config = open(self.fixture.configPath).read()
        with open(self.fixture.configPath, "w") as f:
            f.write(config.replace('client_auth = "required"', 'client_auth = "required"\nclose_revoked_connections = false'))
        self.fixture.trustOnly(self.pki.clientRoot, self.pki.clientInter)
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertEqual(result.untrusted, 0)
        self.assertEqual(dave.closed, [])
        self.assertFalse(self.fixture.connectTo(b"proxy.example", self.trust.dave).accepted)


class SiteTrustTests(ListenerTrustTests):
    """
    With an SNI site that has its own C{ca_certificates}, each connection
    is checked against the CAs of the site its server name selects.
    """

    def setUp(self) -> None:
        _EventsMixin.setUp(self)
        self.fixture = TrustFixture(self, site=True)
        self.start()

    def test_siteCheckedAgainstItsOwnCAs(self) -> None:
        """
        When the listener's own CAs change, a connection to the site with
        its own CAs is checked against those (and stays); when the site's
        change, it is closed, and the default site's connection stays.
        """
        daveAPI = self.register(self.trust.dave, serverName=b"api.example")
        alice = self.register(self.pki.alice)
        # The listener stops trusting the partner root; the site does not.
        self.fixture.trustOnly(self.pki.clientRoot, self.pki.clientInter)
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertEqual(result.untrusted, 0)
        self.assertEqual((daveAPI.closed, alice.closed), ([], []))
        # The site trusts another root from now on.
        self.fixture.trustOnly(self.pki.clientRoot, self.pki.clientInter, site=[self.pki.otherRoot])
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertEqual(result.untrusted, 1)
        self.assertEqual((daveAPI.closed, alice.closed), ([UNTRUSTED_LIVE], []))
        [event] = self.logged(UNTRUSTED_LIVE_FORMAT)
        self.assertEqual((event["subject"], event["clientSubject"]), ("CN=Partner Root", "CN=dave"))

    def test_defaultSiteNotCheckedAgainstSite(self) -> None:
        """
        A connection to the default site is checked against the
        listener's CAs, not the other site's: a client the site would
        refuse stays while the listener trusts it.
        """
        alice = self.register(self.pki.alice)
        self.fixture.trustOnly(*self.fixture.cas, site=[self.pki.otherRoot])
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertEqual(alice.closed, [])
        self.fixture.trustOnly(self.trust.partnerRoot)
        self.assertEqual(self.fixture.reloader.reload().untrusted, 1)
        self.assertEqual(alice.closed, [UNTRUSTED_LIVE])


class TrustStoreTests(SynchronousTestCase):
    """
    L{TrustStore} verifies with OpenSSL, for the right purpose, without
    looking at the time.
    """

    def chain(self, leaf: pki.Issued, sent: tuple[pki.Issued, ...] = ()) -> PeerChain:
        """
        The chain of a client that presents C{leaf} and C{sent}, verified
        by a real handshake with a listener that trusts its roots.
        """
        fixture = TrustFixture(self)
        fixture.cas.append(trustPKI().partnerInter)
        fixture.writeCRLs()
        self.assertTrue(fixture.reloader.reload().ok)
        result = fixture.connectTo(b"proxy.example", leaf, sent)
        self.assertTrue(result.accepted, (result.clientError(), result.serverError()))
        found = peerChainOf(result.serverTLS)
        assert found is not None
        return found

    def test_chainOfConnection(self) -> None:
        """
        The peer chain of a server-side connection is the client's
        certificate, what it sent besides, and what OpenSSL verified.
        """
        trust = trustPKI()
        found = self.chain(trust.erin, (trust.partnerInter,))
        self.assertEqual(found.leaf, trust.erin.certificate)
        self.assertEqual(found.sent, (trust.partnerInter.certificate,))
        self.assertEqual(
            found.verified,
            (trust.erin.certificate, trust.partnerInter.certificate, trust.partnerRoot.certificate),
        )

    def test_verdicts(self) -> None:
        """
        A store of the chain's root accepts it; a store without it names
        the root; a store of the root for the other purpose refuses it.
        """
        trust = trustPKI()
        found = self.chain(trust.erin, (trust.partnerInter,))
        self.assertIsNone(TrustStore([trust.partnerRoot.certificate], "client").failureOf(found))
        failure = TrustStore([reloadPKI().clientRoot.certificate], "client").failureOf(found)
        assert failure is not None
        self.assertEqual(failure.certificate, trust.partnerRoot.certificate)
        self.assertEqual(failure.depth, 2)
        self.assertEqual(failure.withdrawn, (trust.partnerRoot.certificate,))
        purpose = TrustStore([trust.partnerRoot.certificate], "server").failureOf(found)
        assert purpose is not None
        self.assertEqual(purpose.error, "unsuitable certificate purpose")
        self.assertEqual(purpose.certificate, trust.erin.certificate)

    def test_expiredLeafStillTrusted(self) -> None:
        """
        A certificate that expired during the connection is not a matter
        of trust: the store accepts it (expiry is not checked), and
        refuses it when its root is not in the store.
        """
        trust = trustPKI()
        live = self.chain(reloadPKI().alice)
        expired = PeerChain(
            live.connection,
            trust.expired.certificate,
            (),
            (trust.expired.certificate, reloadPKI().clientRoot.certificate),
        )
        self.assertIsNone(TrustStore([reloadPKI().clientRoot.certificate], "client").failureOf(expired))
        self.assertIsNotNone(TrustStore([trust.partnerRoot.certificate], "client").failureOf(expired))

    def test_resumedSessionFallsBackToOpenSSL(self) -> None:
        """
        Without a verified chain (a resumed session), the certificate
        OpenSSL failed at is named.
        """
        trust = trustPKI()
        found = self.chain(trust.erin, (trust.partnerInter,))
        resumed = PeerChain(found.connection, found.leaf, found.sent, ())
        failure = TrustStore([reloadPKI().clientRoot.certificate], "client").failureOf(resumed)
        assert failure is not None
        self.assertEqual(failure.withdrawn, ())
        self.assertEqual(failure.certificate, trust.partnerInter.certificate)
        self.assertEqual(failure.depth, 1)


class MemberTrustFixture(BackendFixture):
    """
    L{BackendFixture} whose pool trusts L{backendCAs}: the members' CA of
    L{tests.test_backendtls} and a second one (root and intermediate).
    """

    def __init__(self, testCase: SynchronousTestCase) -> None:
        self.trust = trustPKI()
        self.backendCAs: Optional[list[pki.Issued]] = None
        super().__init__(testCase)

    def writeBackendCRLs(self, *revoked: pki.Issued, crlNumber: int = 1) -> None:
        """
        C{backend-ca.pem} with L{backendCAs} and C{backend-crls.pem} with
        an empty CRL of each.
        """
        if self.backendCAs is None:
            self.backendCAs = [
                self.backend.root,
                self.backend.inter,
                self.trust.memberRootB,
                self.trust.memberInterB,
            ]
        self.write("backend-ca.pem", pki.chainPEM([ca.certificate for ca in self.backendCAs]))
        self.write(
            "backend-crls.pem",
            b"".join(pki.crlPEM(pki.buildCRL(ca, crlNumber=crlNumber)) for ca in self.backendCAs),
        )


class MemberTrustTests(_EventsMixin, SynchronousTestCase):
    """
    A reload that changes a pool's C{[pools.tls]} C{ca_certificates}
    closes the established connections to members whose chain the new
    CAs no longer verify, both sides.
    """

    def setUp(self) -> None:
        super().setUp()
        self.fixture = MemberTrustFixture(self)
        self.proxy = self.fixture.proxy
        self.proxy.startService()
        self.addCleanup(self.proxy.stopService)
        self.backend = self.fixture.backend
        self.trust = self.fixture.trust

    def relay(self, leaf: pki.Issued, issuer: pki.Issued, port: int) -> tuple[Connection, StringTransport, Any]:
        connection = self.fixture.relay(leaf, port, issuer)
        self.assertEqual(connection.member.received, b"request")
        return connection, self.fixture.lastClient, self.fixture.lastRelay

    def withdrawB(self) -> None:
        self.fixture.backendCAs = [self.backend.root, self.backend.inter]
        self.fixture.writeBackendCRLs(crlNumber=2)

    def test_removedCAClosesRelay(self) -> None:
        """
        When the pool's CAs no longer include the second members' root, the
        relay to a member under it is closed on both sides with
        C{untrusted_live} (access event too) and a warning names the pool,
        the member, the root no longer trusted and the client; the relay to
        a member still trusted goes on.
        """
        b, bClient, bRelay = self.relay(self.trust.memberB, self.trust.memberInterB, 40000)
        a, aClient, _ = self.relay(self.backend.member, self.backend.inter, 40001)
        self.withdrawB()
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertEqual((result.untrusted, result.revoked), (1, 0))
        self.assertTrue(bClient.disconnecting)
        b.pump.flush()
        self.assertIn("readConnectionLost", b.member.events)
        [event] = self.logged(UNTRUSTED_MEMBER_FORMAT)
        self.assertEqual(event["reason"], UNTRUSTED_LIVE)
        self.assertEqual(event["pool"], "app")
        self.assertEqual(event["member"], bRelay.describe().backend)
        self.assertEqual(event["listener"], "plain")
        self.assertEqual(event["peer"], "192.0.2.7:40000")
        self.assertEqual(event["connectionId"], bRelay.connectionId)
        self.assertEqual(event["subject"], "CN=Backend Root B")
        self.assertEqual(event["memberSerial"], f"{self.trust.memberB.certificate.serial_number:x}")
        self.assertEqual(event["withdrawn"], ["CN=Backend Root B"])
        b.member.transport.loseConnection()
        b.pump.flush()
        bRelay.connectionLost(Failure(ConnectionDone()))
        [access] = [e for e in self.events if e.get("close_reason") is not None]
        self.assertEqual(access["close_reason"], UNTRUSTED_LIVE)
        self.assertFalse(aClient.disconnecting)
        a.member.transport.write(b"answer")
        a.pump.flush()
        self.assertTrue(aClient.value().endswith(b"answer"))

    def test_unchangedCAsLeaveRelay(self) -> None:
        """
        A reload that changes only the pool's CRLs leaves the relay to a
        member of the second CA alone.
        """
        _, client, _ = self.relay(self.trust.memberB, self.trust.memberInterB, 40000)
        self.fixture.writeBackendCRLs(crlNumber=2)
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertEqual(result.untrusted, 0)
        self.assertFalse(client.disconnecting)

    def test_disabled(self) -> None:
        """
        With the pool's C{close_revoked_connections = false}, the relay is
        left alone.
        """
        _, client, _ = self.relay(self.trust.memberB, self.trust.memberInterB, 40000)
        self.fixture.closeRevoked = False
        self.fixture.writeConfig()
        self.withdrawB()
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertEqual(result.untrusted, 0)
        self.assertFalse(client.disconnecting)

    def test_idleHTTPSBackendsClosed(self) -> None:
        """
        The idle backend connections an C{https} listener keeps for reuse
        are closed too when the pool's CAs no longer verify their member,
        and leave the cache; those to a trusted member stay.
        """
        from mtlsproxy.http import BackendConnectionCache

        cache = BackendConnectionCache(self.fixture.reactor)
        idle = []
        for leaf, issuer in ((self.trust.memberB, self.trust.memberInterB), (self.backend.member, self.backend.inter)):
            attempt = AttemptFactory()
            connection = connectToMember(
                self.proxy.backendTLS["app"].wrapFactory(
                    Member("10.0.0.1"), attempt, self.fixture.reactor, 5.0
                ),
                memberContext(leaf, issuer, version=BACKEND_TLS13),
                self.fixture.reactor,
            )
            [protocol] = attempt.built
            backend = _IdleBackend(protocol.transport, leaf)
            cache.put(backend)
            idle.append((backend, connection))
        store = TrustStore([self.backend.root.certificate, self.backend.inter.certificate], "server")
        closed = closeUntrustedIdleBackends(cache, "web", "app", store)
        (untrusted, untrustedConnection), (kept, _) = idle
        self.assertEqual(closed, [untrusted])
        self.assertEqual(cache.idleConnections(), [kept])
        untrustedConnection.pump.flush()
        self.assertIn("readConnectionLost", untrustedConnection.member.events)
        [event] = self.logged(UNTRUSTED_MEMBER_FORMAT)
        self.assertEqual(
            (event["listener"], event["pool"], event["member"], event["peer"], event["connectionId"]),
            ("web", "app", "10.0.0.1:8443", "none (idle)", None),
        )
        self.assertEqual(closeUntrustedIdleBackends(cache, "web", "other", store), [])


class HTTPSCloseReasonTests(_EventsMixin, SynchronousTestCase):
    """
    An C{https} listener's request under way reports why a reload closed
    its connection.
    """

    def closeInFlight(self, reason: str) -> tuple[HTTPHarness, dict[str, Any]]:
        h = HTTPHarness()
        h.request()
        backend = h.connectBackend()
        h.client.closeNow(reason)
        self.assertTrue(h.clientTransport.disconnecting)
        self.assertTrue(backend.transport.disconnecting)
        [access] = [e for e in self.events if e.get("log_category") == "access"]
        return h, access

    def test_revokedLive(self) -> None:
        """
        When the reload's CRL sweep closes the connection, the request's
        access event says C{revoked_live}.
        """
        _, access = self.closeInFlight(REVOKED_LIVE)
        self.assertEqual(access["close_reason"], REVOKED_LIVE)
        self.assertEqual(Outcome.REVOKED_LIVE, REVOKED_LIVE)

    def test_untrustedLive(self) -> None:
        """
        When the reload's trust sweep closes the connection, the request's
        access event says C{untrusted_live}.
        """
        _, access = self.closeInFlight(UNTRUSTED_LIVE)
        self.assertEqual(access["close_reason"], UNTRUSTED_LIVE)
        self.assertEqual(Outcome.UNTRUSTED_LIVE, UNTRUSTED_LIVE)

    def test_otherReasonsClosed(self) -> None:
        """
        Any other reason (the operator, shutdown) is reported as
        C{closed}, as before.
        """
        _, access = self.closeInFlight("closed_by_operator")
        self.assertEqual(access["close_reason"], Outcome.CLOSED)
