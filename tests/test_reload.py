# -*- test-case-name: tests.test_reload -*-
"""
Tests for L{mtlsproxy.reload}, L{mtlsproxy.expiry} and the live-connection
side of L{mtlsproxy.revocation}.

A real L{ProxyService} runs on a L{MemoryReactorClock} (nothing listens),
with a configuration and PKI written to a temporary folder; handshakes go
through the service's own context factories in memory, as in
L{tests.test_tlscontext}.  L{tests.test_integration_reload} does the same
against the real C{twistd mtlsproxy}.
"""

from __future__ import annotations

import os
import signal
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from twisted.internet.address import IPv4Address
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.internet.error import ConnectionDone
from twisted.logger import globalLogPublisher
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mtlsproxy import pki
from mtlsproxy.checks import checkConfiguration
from mtlsproxy.config import loadConfig
from mtlsproxy.drain import ConnectionInfo
from mtlsproxy.backendtls import BACKEND_TLS_FAILED_FORMAT, HOSTNAME_MISMATCH, REVOKED
from mtlsproxy.expiry import (
    CA_CERTIFICATE,
    CLIENT_CERTIFICATE,
    CRL,
    DAY,
    EXPIRING_FORMAT,
    SERVER_CERTIFICATE,
    ExpiryMonitor,
    expiryReport,
)
from mtlsproxy.health import OptionError
from mtlsproxy.interfaces import IHealthCheckerFactory
from mtlsproxy.reload import (
    HEALTH_CHECKS_REMOVED_FORMAT,
    RELOAD_FAILED_FORMAT,
    RELOADED_FORMAT,
    RESTART_NEEDED_FORMAT,
    Reloader,
    watchedFiles,
)
from mtlsproxy.revocation import (
    REVOKED_LIVE,
    REVOKED_LIVE_FORMAT,
    REVOKED_MEMBER_FORMAT,
    CRLIndex,
    closeRevokedBackendConnections,
    closeRevokedConnections,
    closeRevokedIdleBackends,
    verifiedChainOf,
)
from mtlsproxy.service import ProxyService
from tests.test_backendtls import TLS13 as BACKEND_TLS13
from tests.test_backendtls import (
    AttemptFactory,
    Connection,
    Member,
    backendPKI,
    connectToMember,
    memberContext,
)
from tests.test_sni import NamedClient, inMemory
from tests.test_tlscontext import TLS13, Handshake

CONFIG = """\
reload_poll_interval = {poll}
expiry_warning_days = {days}

[[listeners]]
name = "mtls"
endpoint = "tcp:0:interface=127.0.0.1"
protocol = "tls"
pool = "app"
client_auth = "required"
ca_certificates = ["{pki}/clients-ca.pem"]
crls = ["{pki}/clients.crl"]

[[listeners.certificates]]
cert = "{pki}/server.pem"
key = "{pki}/server.key"
{extraListener}
[[pools]]
name = "app"
{members}
"""


class ReloadPKI:
    """
    The certificates of the reload tests: a server root with two server
    certificates for C{proxy.example} (the one in service and its
    replacement), a client root with an intermediate, clients under each.
    """

    def __init__(self) -> None:
        self.serverRoot = pki.createRootCA("Server Root")
        self.server = pki.issueServerCertificate(
            self.serverRoot, "proxy.example", dnsNames=["proxy.example"]
        )
        self.renewed = pki.issueServerCertificate(
            self.serverRoot, "proxy.example", dnsNames=["proxy.example"]
        )
        self.clientRoot = pki.createRootCA("Client Root")
        self.clientInter = pki.createIntermediateCA(self.clientRoot, "Client Intermediate")
        self.alice = pki.issueClientCertificate(self.clientRoot, "alice")
        self.bob = pki.issueClientCertificate(self.clientRoot, "bob")
        self.carol = pki.issueClientCertificate(self.clientInter, "carol")
        self.otherRoot = pki.createRootCA("Other Root")


_PKI: Optional[ReloadPKI] = None


def reloadPKI() -> ReloadPKI:
    global _PKI
    if _PKI is None:
        _PKI = ReloadPKI()
    return _PKI


class ProxyFixture:
    """
    Files for one running proxy and the proxy itself.

    @ivar dir: The folder of the configuration.
    @ivar pkiDir: The folder of its certificate files.
    """

    def __init__(self, testCase: SynchronousTestCase, poll: float = 5.0, days: int = 30) -> None:
        self.pki = reloadPKI()
        self.dir = os.path.abspath(testCase.mktemp())
        self.pkiDir = os.path.join(self.dir, "pki")
        os.makedirs(self.pkiDir)
        self.poll = poll
        self.days = days
        self.members = [("127.0.0.1", 9001, 1), ("127.0.0.1", 9002, 1)]
        self.extraListener = ""
        self.writeServer(self.pki.server)
        self.write("clients-ca.pem", pki.chainPEM([self.pki.clientRoot.certificate, self.pki.clientInter.certificate]))
        self.writeCRLs()
        self.writeConfig()
        self.reactor = MemoryReactorClock()
        loaded = checkConfiguration(loadConfig(self.configPath), datetime.now(timezone.utc))
        self.proxy = ProxyService(self.reactor, loaded)
        self.reloader: Reloader = self.proxy.reloader

    @property
    def configPath(self) -> str:
        return os.path.join(self.dir, "proxy.toml")

    def path(self, name: str) -> str:
        return os.path.join(self.pkiDir, name)

    def write(self, name: str, data: bytes) -> None:
        """
        Replace a file the way an operator would (write a new file, rename
        it over the old one).
        """
        temporary = self.path(name + ".new")
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, self.path(name))

    def writeServer(self, issued: pki.Issued) -> None:
        self.write("server.pem", pki.certificatePEM(issued.certificate))
        self.write("server.key", pki.keyPEM(issued.key))

    def writeCRLs(self, *revoked: pki.Issued, crlNumber: int = 1) -> None:
        """
        CRLs of the client root and intermediate revoking C{revoked}.
        """
        root = [r.certificate for r in revoked if r.certificate.issuer == self.pki.clientRoot.certificate.subject]
        inter = [r.certificate for r in revoked if r.certificate.issuer == self.pki.clientInter.certificate.subject]
        self.write(
            "clients.crl",
            pki.crlPEM(pki.buildCRL(self.pki.clientRoot, root, crlNumber=crlNumber))
            + pki.crlPEM(pki.buildCRL(self.pki.clientInter, inter, crlNumber=crlNumber)),
        )

    def writeConfig(self) -> None:
        members = "".join(
            f'\n[[pools.members]]\naddress = "{a}"\nport = {p}\nweight = {w}\n'
            for a, p, w in self.members
        )
        text = CONFIG.format(
            poll=self.poll,
            days=self.days,
            pki=self.pkiDir,
            members=members,
            extraListener=self.extraListener,
        )
        with open(self.configPath + ".new", "w") as f:
            f.write(text)
        os.replace(self.configPath + ".new", self.configPath)

    def client(self, issued: Optional[pki.Issued] = None) -> NamedClient:
        if issued is None:
            issued = self.pki.alice
        chain = issued
        return NamedClient(self.pki.serverRoot.certificate, b"proxy.example", chain, TLS13)

    def connect(self, issued: Optional[pki.Issued] = None, extra: tuple[pki.Issued, ...] = ()) -> Handshake:
        """
        A handshake with the listener's current contexts.
        """
        client = self.client(issued)
        if extra:
            context = client.clientContext()
            for e in extra:
                context.add_extra_chain_cert(e.certificate)
        return inMemory(self.proxy.contextFactories["mtls"], client)


def servedSerial(result: Handshake) -> int:
    certificate = result.clientConnection.get_peer_certificate(as_cryptography=True)
    assert certificate is not None
    return int(certificate.serial_number)


class _EventsMixin:
    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(
            self, globalLogPublisher  # type: ignore[arg-type]
        )

    def logged(self, format: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_format") == format]


class ReloadTests(_EventsMixin, SynchronousTestCase):
    """
    Tests for L{Reloader.reload}.
    """

    def setUp(self) -> None:
        super().setUp()
        self.fixture = ProxyFixture(self)
        self.proxy = self.fixture.proxy
        self.proxy.startService()
        self.addCleanup(self.proxy.stopService)

    def test_swapsServerCertificate(self) -> None:
        """
        When the server certificate file is replaced and the proxy reloads,
        new clients get the new certificate, and the swappable factory
        (what the listener holds) is the same object with a new current
        factory.
        """
        swappable = self.proxy.contextFactories["mtls"]
        before = swappable.current
        self.assertEqual(servedSerial(self.fixture.connect()), self.fixture.pki.server.certificate.serial_number)
        self.fixture.writeServer(self.fixture.pki.renewed)
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertIs(self.proxy.contextFactories["mtls"], swappable)
        self.assertIsNot(swappable.current, before)
        self.assertEqual(
            servedSerial(self.fixture.connect()), self.fixture.pki.renewed.certificate.serial_number
        )
        [event] = self.logged(RELOADED_FORMAT)
        self.assertIn("listener 'mtls': new TLS contexts", event["changes"])
        self.assertEqual(self.proxy.loaded.listeners["mtls"].chain[0], self.fixture.pki.renewed.certificate)

    def test_establishedConnectionKeepsOldContext(self) -> None:
        """
        When a reload swaps the contexts, a connection made before keeps
        working on the old context and still carries data.
        """
        established = self.fixture.connect()
        self.assertTrue(established.accepted)
        self.fixture.writeServer(self.fixture.pki.renewed)
        self.assertTrue(self.fixture.reloader.reload().ok)
        established.clientTLS.write(b"after reload")
        established.pump.flush()
        self.assertEqual(established.server.received, b"from clientafter reload")
        established.serverTLS.write(b" and back")
        established.pump.flush()
        self.assertEqual(established.client.received, b"from server and back")

    def assertKeepsOldMaterial(self, fileName: str, message: str) -> dict[str, Any]:
        """
        A reload fails, logs an error containing C{message} (naming the
        file), and the old certificate is still served.
        """
        swappable = self.proxy.contextFactories["mtls"]
        before = swappable.current
        result = self.fixture.reloader.reload()
        self.assertFalse(result.ok)
        self.assertIn(message, result.error)
        self.assertIn(self.fixture.path(fileName), result.error)
        self.assertIs(swappable.current, before)
        self.assertEqual(
            servedSerial(self.fixture.connect()), self.fixture.pki.server.certificate.serial_number
        )
        [event] = self.logged(RELOAD_FAILED_FORMAT)
        self.assertEqual(event["error"], result.error)
        self.assertEqual(event["file"], self.fixture.configPath)
        self.assertEqual(self.logged(RELOADED_FORMAT), [])
        return event

    def test_brokenPEMKeepsOld(self) -> None:
        """
        When the new certificate file is not PEM, the old material stays in
        service and the error names the file and the key path.
        """
        self.fixture.write("server.pem", b"garbage")
        event = self.assertKeepsOldMaterial("server.pem", "no PEM certificate")
        self.assertEqual(event["key"], "listeners[0].certificates[0].cert")

    def test_keyMismatchKeepsOld(self) -> None:
        """
        When only the certificate is replaced (its key no longer matches),
        the old material stays in service.
        """
        self.fixture.write("server.pem", pki.certificatePEM(self.fixture.pki.renewed.certificate))
        self.assertKeepsOldMaterial("server.key", "does not match the certificate")

    def test_vanishedFileKeepsOld(self) -> None:
        """
        When a file vanished, the old material stays in service.
        """
        os.remove(self.fixture.path("clients.crl"))
        self.assertKeepsOldMaterial("clients.crl", "file not found")

    def test_crlFromUnknownIssuerKeepsOld(self) -> None:
        """
        When the new CRL file holds a CRL of a CA that is not configured,
        the old material stays in service.
        """
        self.fixture.write("clients.crl", pki.crlPEM(pki.buildCRL(self.fixture.pki.otherRoot)))
        self.assertKeepsOldMaterial("clients.crl", "which is not one of the configured CA")

    def test_crlBadSignatureKeepsOld(self) -> None:
        """
        When the new CRL names the right issuer but another key signed it,
        the old material stays in service.
        """
        forged = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.fixture.pki.clientRoot.certificate.subject)
            .last_update(datetime.now(timezone.utc) - timedelta(hours=1))
            .next_update(datetime.now(timezone.utc) + timedelta(days=1))
            .sign(self.fixture.pki.otherRoot.key, hashes.SHA256())
        )
        self.fixture.write("clients.crl", pki.crlPEM(forged))
        self.assertKeepsOldMaterial("clients.crl", "signature does not verify")

    def test_brokenConfigKeepsOld(self) -> None:
        """
        When the configuration file itself is broken, the running
        configuration stays, and the error gives the line.
        """
        with open(self.fixture.configPath, "a") as f:
            f.write("\n[[listeners]\n")
        result = self.fixture.reloader.reload()
        self.assertFalse(result.ok)
        self.assertIn(f"{self.fixture.configPath}: line", result.error)

    def test_fixedAfterBroken(self) -> None:
        """
        When a broken file is fixed, the next reload applies it.
        """
        self.fixture.write("server.pem", b"garbage")
        self.assertFalse(self.fixture.reloader.reload().ok)
        self.fixture.writeServer(self.fixture.pki.renewed)
        self.assertTrue(self.fixture.reloader.reload().ok)
        self.assertEqual(
            servedSerial(self.fixture.connect()), self.fixture.pki.renewed.certificate.serial_number
        )

    def test_poolMembers(self) -> None:
        """
        When members are added, removed and re-weighted in the file, the
        run-time pool is updated in place: kept members are the same
        objects with their connection counts, the removed one leaves the
        pool (its connections may finish), the new one joins.
        """
        pool = self.proxy.pools["app"]
        kept, removed = pool.members
        kept.connectionOpened()
        removed.connectionOpened()
        self.fixture.members = [("127.0.0.1", 9003, 2), ("127.0.0.1", 9001, 5)]
        self.fixture.writeConfig()
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertIs(self.proxy.pools["app"], pool)
        self.assertEqual([m.key for m in pool.members], [("127.0.0.1", 9003), ("127.0.0.1", 9001)])
        self.assertIs(pool.members[1], kept)
        self.assertEqual(kept.weight, 5)
        self.assertEqual(kept.activeConnections, 1)
        self.assertEqual(pool.members[0].weight, 2)
        self.assertNotIn(removed, pool.members)
        removed.connectionClosed()
        self.assertEqual(removed.activeConnections, 0)
        self.assertIn("pool 'app': member 127.0.0.1:9002 removed (1 connection(s) left to finish)", result.changes)
        self.assertIn("pool 'app': member 127.0.0.1:9001 weight 1 -> 5", result.changes)
        self.assertIn("pool 'app': member 127.0.0.1:9003 added", result.changes)

    def test_relaySettings(self) -> None:
        """
        When the listener is pointed at a new pool with its own connect
        settings, new connections are relayed with them.
        """
        with open(self.fixture.configPath) as f:
            text = f.read()
        text = text.replace('pool = "app"\nclient_auth', 'pool = "other"\nclient_auth')
        text += (
            '\n[[pools]]\nname = "other"\nconnect_timeout = 1.5\nmax_connect_attempts = 7\n'
            '[[pools.members]]\naddress = "127.0.0.1"\nport = 9100\n'
        )
        with open(self.fixture.configPath, "w") as f:
            f.write(text)
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        factory = self.proxy.listeners["mtls"].factory
        while hasattr(factory, "wrappedFactory"):
            factory = factory.wrappedFactory
        self.assertIs(factory.pool, self.proxy.pools["other"])
        self.assertEqual((factory.connectTimeout, factory.maxAttempts), (1.5, 7))
        self.assertIn("new pool 'other'", result.changes)
        self.assertEqual(self.proxy.listeners["mtls"].listenerConfig.pool, "other")

    def test_restartNeeded(self) -> None:
        """
        When a listener's endpoint changes or a listener is added, the
        reload applies the rest and logs what needs a restart; the running
        listener keeps its endpoint.
        """
        with open(self.fixture.configPath) as f:
            text = f.read()
        text = text.replace('endpoint = "tcp:0:interface=127.0.0.1"', 'endpoint = "tcp:8443"', 1)
        text += '\n[[listeners]]\nname = "plain"\nendpoint = "tcp:0"\nprotocol = "tcp"\npool = "app"\n'
        with open(self.fixture.configPath, "w") as f:
            f.write(text)
        self.fixture.writeServer(self.fixture.pki.renewed)
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        changes = [e["change"] for e in self.logged(RESTART_NEEDED_FORMAT)]
        self.assertIn("new listener 'plain'", changes)
        self.assertIn("listener 'mtls': endpoint 'tcp:0:interface=127.0.0.1' -> 'tcp:8443'", changes)
        self.assertEqual(
            self.proxy.listeners["mtls"].listenerConfig.endpoint, "tcp:0:interface=127.0.0.1"
        )
        self.assertEqual(
            servedSerial(self.fixture.connect()), self.fixture.pki.renewed.certificate.serial_number
        )

    def test_nothingChanged(self) -> None:
        """
        When nothing changed, a reload still succeeds and needs no restart.
        """
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok)
        self.assertEqual(result.restartNeeded, ())
        self.assertIn("reloaded", str(result))

    def test_sighup(self) -> None:
        """
        When the service runs in the main thread, C{SIGHUP} reloads (from
        the reactor thread); stopping restores the previous handler.
        """
        handler = signal.getsignal(signal.SIGHUP)
        self.assertEqual(handler, self.fixture.reloader._onSIGHUP)
        calls: list[Any] = []
        self.fixture.reactor.callFromThread = lambda f, *a: calls.append((f, a))  # type: ignore[attr-defined]
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(calls, [(self.fixture.reloader.reload, ("SIGHUP",))])
        self.fixture.reloader.stopService()
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), handler)


class PollTests(_EventsMixin, SynchronousTestCase):
    """
    Tests for polling watched files.
    """

    def setUp(self) -> None:
        super().setUp()
        self.fixture = ProxyFixture(self, poll=2.0)
        self.proxy = self.fixture.proxy
        self.proxy.startService()
        self.addCleanup(self.proxy.stopService)

    def test_watchedFiles(self) -> None:
        """
        The configuration file and every file of the TLS listener are
        watched.
        """
        self.assertEqual(
            watchedFiles(self.proxy.loaded.config),
            [
                self.fixture.configPath,
                self.fixture.path("clients-ca.pem"),
                self.fixture.path("clients.crl"),
                self.fixture.path("server.pem"),
                self.fixture.path("server.key"),
            ],
        )

    def test_unchanged(self) -> None:
        """
        When no file changed, polling does not reload.
        """
        self.assertIsNone(self.fixture.reloader.poll())
        self.fixture.reactor.advance(2.0)
        self.assertEqual(self.fixture.reloader.reloads, 0)

    def test_changeReloads(self) -> None:
        """
        When a file's content changes, the next poll (every
        C{reload_poll_interval} seconds) reloads.
        """
        self.fixture.writeServer(self.fixture.pki.renewed)
        self.fixture.reactor.advance(1.9)
        self.assertEqual(self.fixture.reloader.reloads, 0)
        self.fixture.reactor.advance(0.1)
        self.assertEqual(self.fixture.reloader.reloads, 1)
        self.assertEqual(
            servedSerial(self.fixture.connect()), self.fixture.pki.renewed.certificate.serial_number
        )
        self.fixture.reactor.advance(2.0)
        self.assertEqual(self.fixture.reloader.reloads, 1)

    def test_brokenReportedOnce(self) -> None:
        """
        When a changed file is broken, the error is logged once, not on
        every poll; fixing it reloads.
        """
        self.fixture.write("server.pem", b"garbage")
        for _ in range(3):
            self.fixture.reactor.advance(2.0)
        self.assertEqual(len(self.logged(RELOAD_FAILED_FORMAT)), 1)
        self.fixture.writeServer(self.fixture.pki.renewed)
        self.fixture.reactor.advance(2.0)
        self.assertEqual(self.fixture.reloader.reloads, 1)

    def test_kubernetesSymlinkSwap(self) -> None:
        """
        When the files are symbolic links into a C{..data} link that is
        replaced atomically (how Kubernetes updates a secret volume), the
        poller sees the new content.
        """
        secret = os.path.join(self.fixture.dir, "secret")
        os.makedirs(os.path.join(secret, "..2024_01"))
        for name in ("server.pem", "server.key"):
            os.rename(self.fixture.path(name), os.path.join(secret, "..2024_01", name))
        os.symlink("..2024_01", os.path.join(secret, "..data"))
        for name in ("server.pem", "server.key"):
            os.symlink(os.path.join(secret, "..data", name), self.fixture.path(name))
        self.assertTrue(self.fixture.reloader.reload().ok)
        self.assertIsNone(self.fixture.reloader.poll())
        # The update: a new timestamped folder, a new ..data link renamed
        # over the old one.
        os.makedirs(os.path.join(secret, "..2024_02"))
        with open(os.path.join(secret, "..2024_02", "server.pem"), "wb") as f:
            f.write(pki.certificatePEM(self.fixture.pki.renewed.certificate))
        with open(os.path.join(secret, "..2024_02", "server.key"), "wb") as f:
            f.write(pki.keyPEM(self.fixture.pki.renewed.key))
        os.symlink("..2024_02", os.path.join(secret, "..data_tmp"))
        os.rename(os.path.join(secret, "..data_tmp"), os.path.join(secret, "..data"))
        result = self.fixture.reloader.poll()
        self.assertIsNotNone(result)
        assert result is not None
        self.assertTrue(result.ok, result)
        self.assertEqual(
            servedSerial(self.fixture.connect()), self.fixture.pki.renewed.certificate.serial_number
        )

    def test_intervalFromReload(self) -> None:
        """
        When a reload changes C{reload_poll_interval}, polling follows it;
        0 turns it off.
        """
        self.fixture.poll = 0
        self.fixture.writeConfig()
        self.fixture.reactor.advance(2.0)
        self.assertEqual(self.fixture.reloader.reloads, 1)
        self.assertIsNone(self.fixture.reloader._poller)
        self.fixture.writeServer(self.fixture.pki.renewed)
        self.fixture.reactor.advance(10.0)
        self.assertEqual(self.fixture.reloader.reloads, 1)

    def test_stopCancelsTimers(self) -> None:
        """
        When the service stops, no poll, expiry check or sweep is left
        pending.
        """
        self.proxy.stopService()
        pending = [c for c in self.fixture.reactor.getDelayedCalls() if c.active()]
        self.assertEqual(
            [c for c in pending if "Reloader" in repr(c) or "Expiry" in repr(c)], []
        )


@attrs.define
class FakeConnection:
    """
    A registered connection (what L{mtlsproxy.drain.ConnectionRegistry}
    holds) over a real in-memory TLS connection.
    """

    id: int
    listener: str
    result: Handshake
    phase: str = "relaying"
    closed: list[str] = attrs.field(factory=list)
    aborted: int = 0

    @property
    def transport(self) -> Any:
        return self.result.serverTLS

    def describe(self) -> ConnectionInfo:
        return ConnectionInfo(id=self.id, listener=self.listener, peer="192.0.2.7:50123", phase=self.phase, started=0.0)

    def closeNow(self, reason: str) -> None:
        self.closed.append(reason)

    def abort(self) -> None:
        self.aborted += 1


class LiveRevocationTests(_EventsMixin, SynchronousTestCase):
    """
    Tests for closing established connections whose certificates a
    reloaded CRL revokes.
    """

    def setUp(self) -> None:
        super().setUp()
        self.fixture = ProxyFixture(self)
        self.proxy = self.fixture.proxy
        self.proxy.startService()
        self.addCleanup(self.proxy.stopService)
        self.pki = self.fixture.pki

    def register(self, issued: pki.Issued, extra: tuple[pki.Issued, ...] = (), listener: str = "mtls") -> FakeConnection:
        result = self.fixture.connect(issued, extra)
        self.assertTrue(result.accepted, (result.clientError(), result.serverError()))
        connection = FakeConnection(0, listener, result)
        connection.id = self.proxy.connections.add(connection)
        return connection

    def test_chain(self) -> None:
        """
        The verified chain of a connection is its client certificate, then
        each issuer up to the root.
        """
        connection = self.register(self.pki.carol, (self.pki.clientInter,))
        chain = verifiedChainOf(connection)
        self.assertEqual(
            [link.serial for link in chain],
            [
                self.pki.carol.certificate.serial_number,
                self.pki.clientInter.certificate.serial_number,
                self.pki.clientRoot.certificate.serial_number,
            ],
        )

    def test_revokedLeafClosed(self) -> None:
        """
        When a reloaded CRL revokes one client's certificate, that client's
        connection is closed (and aborted if still open 5 seconds later)
        and logged with reason C{revoked_live}; the other client's is not.
        """
        alice = self.register(self.pki.alice)
        bob = self.register(self.pki.bob)
        self.fixture.writeCRLs(self.pki.alice, crlNumber=2)
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertEqual(result.revoked, 1)
        self.assertEqual(alice.closed, [REVOKED_LIVE])
        self.assertEqual(bob.closed, [])
        [event] = self.logged(REVOKED_LIVE_FORMAT)
        self.assertEqual(event["reason"], REVOKED_LIVE)
        self.assertEqual(event["serial"], f"{self.pki.alice.certificate.serial_number:x}")
        self.assertEqual(event["subject"], "CN=alice")
        self.assertEqual(event["peer"], "192.0.2.7:50123")
        self.assertEqual(event["listener"], "mtls")
        self.assertEqual(event["depth"], 0)
        self.assertEqual(event["connectionId"], alice.id)
        self.fixture.reactor.advance(5.0)
        self.assertEqual(alice.aborted, 1)
        self.assertEqual(bob.aborted, 0)

    def test_revokedIntermediateClosed(self) -> None:
        """
        When a reloaded CRL revokes the intermediate CA a client's
        certificate chains through, that connection is closed.
        """
        carol = self.register(self.pki.carol, (self.pki.clientInter,))
        alice = self.register(self.pki.alice)
        self.fixture.writeCRLs(self.pki.clientInter, crlNumber=2)
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertEqual(carol.closed, [REVOKED_LIVE])
        self.assertEqual(alice.closed, [])
        [event] = self.logged(REVOKED_LIVE_FORMAT)
        self.assertEqual(event["depth"], 1)
        self.assertEqual(event["subject"], "CN=Client Intermediate")
        self.assertEqual(event["clientSubject"], "CN=carol")

    def test_handshakingLaterSwept(self) -> None:
        """
        When a connection was still handshaking at the reload, it is
        checked again once its handshake had to be over.
        """
        alice = self.register(self.pki.alice)
        alice.phase = "handshaking"
        self.fixture.writeCRLs(self.pki.alice, crlNumber=2)
        self.assertTrue(self.fixture.reloader.reload().ok)
        self.assertEqual(alice.closed, [])
        alice.phase = "relaying"
        self.fixture.reactor.advance(30.0)
        self.assertEqual(alice.closed, [REVOKED_LIVE])

    def test_disabled(self) -> None:
        """
        When C{close_revoked_connections = false}, established connections
        are left alone (new handshakes are still refused).
        """
        alice = self.register(self.pki.alice)
        with open(self.fixture.configPath) as f:
            text = f.read()
        with open(self.fixture.configPath, "w") as f:
            f.write(text.replace('client_auth = "required"', 'client_auth = "required"\nclose_revoked_connections = false'))
        self.fixture.writeCRLs(self.pki.alice, crlNumber=2)
        self.assertTrue(self.fixture.reloader.reload().ok)
        self.assertEqual(alice.closed, [])
        self.assertFalse(self.fixture.connect(self.pki.alice).accepted)

    def test_otherListenerUntouched(self) -> None:
        """
        Only the connections of the listener whose CRLs revoke are looked
        at.
        """
        connection = self.register(self.pki.alice, listener="elsewhere")
        crls = CRLIndex.fromCRLs([pki.buildCRL(self.pki.clientRoot, [self.pki.alice.certificate])])
        self.assertEqual(closeRevokedConnections(self.proxy.connections, "mtls", crls), [])
        self.assertEqual(closeRevokedConnections(self.proxy.connections, "elsewhere", crls), [connection])


class ExpiryTests(_EventsMixin, SynchronousTestCase):
    """
    Tests for L{mtlsproxy.expiry} and L{Reloader.expiryReport}.
    """

    def test_report(self) -> None:
        """
        The report lists every server certificate, CA and CRL in force with
        its listener, kind, file, subject, end and seconds left, soonest
        first.
        """
        fixture = ProxyFixture(self)
        report = fixture.reloader.expiryReport()
        kinds = sorted((i.kind, i.subject) for i in report)
        self.assertEqual(
            kinds,
            [
                (CA_CERTIFICATE, "CN=Client Intermediate"),
                (CA_CERTIFICATE, "CN=Client Root"),
                (CRL, "CN=Client Intermediate"),
                (CRL, "CN=Client Root"),
                (SERVER_CERTIFICATE, "CN=proxy.example"),
            ],
        )
        server = next(i for i in report if i.kind == SERVER_CERTIFICATE)
        self.assertEqual(server.file, fixture.path("server.pem"))
        self.assertEqual(server.listener, "mtls")
        self.assertEqual(server.serial, f"{fixture.pki.server.certificate.serial_number:x}")
        self.assertEqual(report[0].kind, CRL)  # 30 days
        self.assertEqual(
            sorted(report, key=lambda i: i.seconds_left or 0), report
        )
        data = server.asDict()
        self.assertEqual(
            sorted(data),
            [
                "file",
                "kind",
                "listener",
                "not_after",
                "pool",
                "seconds_left",
                "serial",
                "subject",
                "validity_seconds",
            ],
        )
        self.assertIsInstance(data["not_after"], str)

    def test_statusEndpointReadsReport(self) -> None:
        """
        The proxy's C{reloader.expiryReport()} is what the status
        endpoint's expiry list is made of.
        """
        from mtlsproxy import status

        fixture = ProxyFixture(self)
        entries = status.expiryReport(fixture.proxy, datetime.now(timezone.utc))
        self.assertEqual(len(entries), len(fixture.reloader.expiryReport()))

    def test_warnings(self) -> None:
        """
        When something is due within C{expiry_warning_days}, the monitor
        logs it at start, then daily; stopping cancels the daily check.
        CRLs in the first half of their validity are not reported.
        """
        fixture = ProxyFixture(self, days=400)
        fixture.proxy.startService()
        self.addCleanup(fixture.proxy.stopService)
        events = self.logged(EXPIRING_FORMAT)
        self.assertEqual(
            sorted((e["kind"], e["subject"]) for e in events),
            [(SERVER_CERTIFICATE, "CN=proxy.example")],
        )
        [event] = events
        self.assertEqual(event["file"], fixture.path("server.pem"))
        self.assertEqual(event["state"], "expires")
        self.assertIn(event["days_left"], (396, 397))
        self.assertEqual(event["listener"], "mtls")
        fixture.reactor.advance(DAY)
        self.assertEqual(len(self.logged(EXPIRING_FORMAT)), 2)
        fixture.proxy.stopService()
        fixture.reactor.advance(DAY)
        self.assertEqual(len(self.logged(EXPIRING_FORMAT)), 2)

    def test_staleCRL(self) -> None:
        """
        When a CRL is past half its validity and due within the warning
        period, it is reported.
        """
        fixture = ProxyFixture(self, days=30)
        now = datetime.now(timezone.utc)
        fixture.write(
            "clients.crl",
            pki.crlPEM(
                pki.buildCRL(
                    fixture.pki.clientRoot, lastUpdate=now - timedelta(days=6), nextUpdate=now + timedelta(days=1)
                )
            )
            + pki.crlPEM(pki.buildCRL(fixture.pki.clientInter)),
        )
        self.assertTrue(fixture.reloader.reload().ok)
        [event] = self.logged(EXPIRING_FORMAT)
        self.assertEqual((event["kind"], event["subject"]), (CRL, "CN=Client Root"))
        self.assertEqual(event["days_left"], 0)

    def test_afterReload(self) -> None:
        """
        A reload logs what is due, with the new material.
        """
        fixture = ProxyFixture(self, days=1)
        fixture.proxy.startService()
        self.addCleanup(fixture.proxy.stopService)
        self.assertEqual(self.logged(EXPIRING_FORMAT), [])
        soon = pki.issueServerCertificate(
            fixture.pki.serverRoot,
            "proxy.example",
            dnsNames=["proxy.example"],
            notAfter=datetime.now(timezone.utc) + timedelta(hours=5),
        )
        fixture.writeServer(soon)
        self.assertTrue(fixture.reloader.reload().ok)
        [event] = self.logged(EXPIRING_FORMAT)
        self.assertEqual(event["kind"], SERVER_CERTIFICATE)
        self.assertEqual(event["state"], "expires")
        self.assertEqual(event["days_left"], 0)

    def test_expired(self) -> None:
        """
        An item already past is reported as expired, with negative time
        left.
        """
        clock = MemoryReactorClock()
        material = ProxyFixture(self).proxy.loaded.listeners
        later = datetime.now(timezone.utc) + timedelta(days=40)
        monitor = ExpiryMonitor(clock, lambda: material, 30, lambda: later)
        due = monitor.check()
        self.assertTrue(any(i.seconds_left is not None and i.seconds_left < 0 for i in due))
        states = {e["state"] for e in self.logged(EXPIRING_FORMAT)}
        self.assertIn("expired", states)
        self.assertEqual(expiryReport({}, later), [])


# -- [pools.tls] ----------------------------------------------------------------


class BackendFixture(ProxyFixture):
    """
    L{ProxyFixture} whose pool C{app} connects to its members with mutual
    TLS (C{[pools.tls]}, the PKI of L{tests.test_backendtls}), with a plain
    C{tcp} listener C{plain} in front of it too (so that the relay can be
    driven without a client handshake) and, if asked, a C{tls} health
    check.

    @ivar backend: The members' PKI (L{tests.test_backendtls.BackendPKI}).
    @ivar rotated: Another client certificate of the proxy, from the CA
        the members trust.
    """

    def __init__(self, testCase: SynchronousTestCase, healthCheck: bool = False, **kwargs: Any) -> None:
        self.backend = backendPKI()
        self.rotated = rotatedClient()
        self.healthCheck = healthCheck
        self.closeRevoked: Optional[bool] = None
        super().__init__(testCase, **kwargs)

    def writeConfig(self) -> None:
        """
        The listener configuration, a C{tcp} listener, C{[pools.tls]}.
        """
        if not os.path.exists(self.path("backend-ca.pem")):
            self.write(
                "backend-ca.pem",
                pki.chainPEM([self.backend.root.certificate, self.backend.inter.certificate]),
            )
            self.writeBackendCRLs()
            self.writeClient(self.backend.proxyClient)
        super().writeConfig()
        with open(self.configPath) as f:
            text = f.read()
        plain = '[[listeners]]\nname = "plain"\nendpoint = "tcp:0"\nprotocol = "tcp"\npool = "app"\n\n'
        text = text.replace("[[pools]]\n", plain + "[[pools]]\n", 1)
        text += (
            "\n[pools.tls]\n"
            f'ca_certificates = ["{self.path("backend-ca.pem")}"]\n'
            f'crls = ["{self.path("backend-crls.pem")}"]\n'
            f'cert = "{self.path("proxy-client.pem")}"\n'
            f'key = "{self.path("proxy-client.key")}"\n'
            'server_name = "app.internal"\n'
        )
        if self.closeRevoked is not None:
            text += f"close_revoked_connections = {str(self.closeRevoked).lower()}\n"
        if self.healthCheck:
            text += '\n[pools.health_check]\ntype = "tls"\n'
        with open(self.configPath, "w") as f:
            f.write(text)

    def writeBackendCRLs(self, *revoked: pki.Issued, crlNumber: int = 1) -> None:
        """
        The CRLs of the members' root and intermediate, the intermediate's
        revoking C{revoked} (members it issued).
        """
        self.write(
            "backend-crls.pem",
            pki.crlPEM(pki.buildCRL(self.backend.root, crlNumber=crlNumber))
            + pki.crlPEM(
                pki.buildCRL(
                    self.backend.inter, [r.certificate for r in revoked], crlNumber=crlNumber
                )
            ),
        )

    def writeClient(self, issued: pki.Issued) -> None:
        """
        The client certificate (and key) the proxy presents to members.
        """
        self.write("proxy-client.pem", pki.certificatePEM(issued.certificate))
        self.write("proxy-client.key", pki.keyPEM(issued.key))

    def relay(self, leaf: Optional[pki.Issued] = None, clientPort: int = 40000,
              issuer: Optional[pki.Issued] = None) -> Connection:
        """
        A client connection to the C{tcp} listener: the relay's attempt to
        reach a member, completed in memory with a member that presents
        C{leaf} (default L{BackendPKI.member}) and C{issuer} (default its
        intermediate).  The client's transport is L{lastClient}, its
        protocol L{lastRelay}.
        """
        factory = self.proxy.listeners["plain"].factory
        client = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", clientPort))
        protocol = factory.buildProtocol(client.getPeer())
        protocol.makeConnection(client)
        protocol.dataReceived(b"request")
        self.lastClient = client
        self.lastRelay = protocol
        attempt = self.reactor.tcpClients[-1][2]
        connection = connectToMember(
            attempt, memberContext(leaf, issuer, version=BACKEND_TLS13), self.reactor
        )
        connection.pump.flush()
        return connection


_ROTATED: Optional[pki.Issued] = None


def rotatedClient() -> pki.Issued:
    """
    A second client certificate of the proxy, issued by the CA the members
    trust.
    """
    global _ROTATED
    if _ROTATED is None:
        _ROTATED = pki.issueClientCertificate(backendPKI().clientRoot, "mtlsproxy rotated")
    return _ROTATED


class BackendTLSReloadTests(_EventsMixin, SynchronousTestCase):
    """
    Reloading a pool's C{[pools.tls]}: new backend connections and health
    checks use the new material, established ones keep theirs, broken
    files keep the old material.  Real handshakes with members in memory.
    """

    def setUp(self) -> None:
        super().setUp()
        self.fixture = BackendFixture(self, healthCheck=True)
        self.proxy = self.fixture.proxy

    def assertRefused(self, connection: Connection, reason: str) -> None:
        """
        The relay's attempt failed its handshake with C{reason}: the member
        received nothing and a C{backend_tls_failed} event says why.
        """
        self.assertEqual(connection.member.received, b"")
        self.assertNotIn("handshakeCompleted", connection.member.events)
        [event] = self.logged(BACKEND_TLS_FAILED_FORMAT)
        self.assertEqual((event["reason"], event["pool"]), (reason, "app"))

    def test_revokedMemberRefusedAfterReload(self) -> None:
        """
        When a new backend CRL revokes a member's certificate, the next
        connection to it after the reload is refused as C{revoked}; with
        the pool's C{close_revoked_connections = false} the connection made
        before keeps relaying both ways (L{BackendLiveRevocationTests} for
        the default); the pool's holder is the same object with new
        settings.
        """
        holder = self.proxy.backendTLS["app"]
        before = holder.current
        established = self.fixture.relay()
        client = self.fixture.lastClient
        self.assertEqual(established.member.received, b"request")
        self.fixture.closeRevoked = False
        self.fixture.writeConfig()
        self.fixture.writeBackendCRLs(self.fixture.backend.member, crlNumber=2)
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertEqual(result.restartNeeded, ())
        self.assertIn("pool 'app': new backend TLS (crls)", result.changes)
        self.assertIs(self.proxy.backendTLS["app"], holder)
        self.assertIsNot(holder.current, before)
        refused = self.fixture.relay()
        self.assertRefused(refused, REVOKED)
        established.member.transport.write(b"answer")  # type: ignore[union-attr]
        established.pump.flush()
        self.assertEqual(client.value(), b"answer")
        established.proxyTLS.write(b" more")
        established.pump.flush()
        self.assertEqual(established.member.received, b"request more")

    def test_rotatedClientCertificate(self) -> None:
        """
        When our client certificate and key are replaced, members see the
        new certificate on the connections made after the reload, from the
        relay and from the health checker alike.
        """
        self.assertEqual(self.fixture.relay().member.peerSubject, "CN=mtlsproxy")
        self.fixture.writeClient(self.fixture.rotated)
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertIn("pool 'app': new backend TLS (cert, key)", result.changes)
        self.assertEqual(self.fixture.relay().member.peerSubject, "CN=mtlsproxy rotated")
        checker = self.proxy.healthMonitors["app"].checker
        results: list[Any] = []
        checker.check(self.proxy.pools["app"].members[0]).addBoth(results.append)
        attempt = self.fixture.reactor.tcpClients[-1][2]
        check = connectToMember(attempt, memberContext(version=BACKEND_TLS13), self.fixture.reactor)
        check.pump.flush()
        self.assertEqual(check.member.peerSubject, "CN=mtlsproxy rotated")
        [checked] = results
        self.assertTrue(checked.healthy, checked)

    def assertKeepsOldBackendTLS(self, fileName: str, message: str) -> dict[str, Any]:
        """
        A reload fails with an error naming the pool, C{fileName} and
        C{message}; the old backend TLS stays in service (members still see
        the old client certificate).
        """
        holder = self.proxy.backendTLS["app"]
        before = holder.current
        result = self.fixture.reloader.reload()
        self.assertFalse(result.ok)
        assert result.error is not None
        self.assertIn(message, result.error)
        self.assertIn(self.fixture.path(fileName), result.error)
        self.assertIn("pool 'app'", result.error)
        self.assertIs(holder.current, before)
        [event] = self.logged(RELOAD_FAILED_FORMAT)
        self.assertEqual(event["error"], result.error)
        self.assertTrue(event["key"].startswith("pools[0].tls."), event["key"])
        connection = self.fixture.relay()
        self.assertEqual(connection.member.received, b"request")
        self.assertEqual(connection.member.peerSubject, "CN=mtlsproxy")
        return event

    def test_malformedCRLKeepsOld(self) -> None:
        """
        When the new backend CRL file is not a CRL, the reload is refused,
        the error names the file, the key path and the pool, and the old
        CRLs stay in force: a member they do not revoke is still served.
        """
        self.fixture.write("backend-crls.pem", b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n")
        event = self.assertKeepsOldBackendTLS("backend-crls.pem", "pool 'app'")
        self.assertEqual(event["key"], "pools[0].tls.crls[0]")
        self.assertEqual(self.proxy.loaded.backends["app"].crls, self.fixture.reloader.backendsInForce["app"].crls)

    def test_keyMismatchKeepsOld(self) -> None:
        """
        When only our client certificate is replaced (the key no longer
        matches), the reload is refused naming the key file and the pool.
        """
        self.fixture.write("proxy-client.pem", pki.certificatePEM(self.fixture.rotated.certificate))
        event = self.assertKeepsOldBackendTLS("proxy-client.key", "does not match")
        self.assertEqual(event["key"], "pools[0].tls.key")

    def test_missingFileKeepsOld(self) -> None:
        """
        When the backend CA file vanished, the reload is refused naming it
        and the pool.
        """
        os.remove(self.fixture.path("backend-ca.pem"))
        self.assertKeepsOldBackendTLS("backend-ca.pem", "file not found")

    def test_unchangedKeepsSettings(self) -> None:
        """
        When nothing of [pools.tls] changed, a reload keeps the settings in
        service (the same context, so TLS sessions stay usable).
        """
        holder = self.proxy.backendTLS["app"]
        before = holder.current
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertIs(holder.current, before)
        self.assertFalse([c for c in result.changes if "backend TLS" in c], result.changes)

    def test_settingChanged(self) -> None:
        """
        When a [pools.tls] setting changes, new connections check the
        member against it: a server_name its certificate lacks is refused
        as C{hostname_mismatch}.
        """
        with open(self.fixture.configPath) as f:
            text = f.read()
        with open(self.fixture.configPath, "w") as f:
            f.write(text.replace('server_name = "app.internal"', 'server_name = "db.internal"'))
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertIn("pool 'app': new backend TLS (server_name)", result.changes)
        self.assertRefused(self.fixture.relay(), HOSTNAME_MISMATCH)

    def test_plainPoolGainsTLSNeedsRestart(self) -> None:
        """
        When a pool that connects with plain TCP gets a [pools.tls] table,
        that needs a restart: its members are still connected without TLS.
        """
        fixture = ProxyFixture(self)
        with open(fixture.configPath, "a") as f:
            f.write(f'\n[pools.tls]\nca_certificates = ["{fixture.path("clients-ca.pem")}"]\n')
        result = fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertIn("pool 'app': [pools.tls] added", result.restartNeeded)
        self.assertEqual(fixture.proxy.backendTLS, {})

    def test_newPoolWithTLS(self) -> None:
        """
        When a listener is switched to a new pool with [pools.tls], its
        relay connects to the new pool's members with TLS.
        """
        with open(self.fixture.configPath) as f:
            text = f.read()
        text = text.replace('protocol = "tcp"\npool = "app"', 'protocol = "tcp"\npool = "other"')
        tls = text[text.index("[pools.tls]"):].split("\n[pools.health_check]")[0]
        text += (
            '\n[[pools]]\nname = "other"\n'
            '[[pools.members]]\naddress = "127.0.0.1"\nport = 9100\n' + tls
        )
        with open(self.fixture.configPath, "w") as f:
            f.write(text)
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertIn("pool 'other': backend TLS", result.changes)
        connection = self.fixture.relay()
        self.assertEqual(self.fixture.reactor.tcpClients[-1][1], 9100)
        self.assertEqual(connection.member.received, b"request")
        self.assertEqual(connection.member.peerSubject, "CN=mtlsproxy")

    def test_pollWatchesBackendFiles(self) -> None:
        """
        The files of [pools.tls] are watched: replacing the backend CRL
        file reloads at the next poll.
        """
        watched = watchedFiles(self.proxy.loaded.config)
        for name in ("backend-ca.pem", "backend-crls.pem", "proxy-client.pem", "proxy-client.key"):
            self.assertIn(self.fixture.path(name), watched)
        self.proxy.startService()
        self.addCleanup(self.proxy.stopService)
        self.assertIsNone(self.fixture.reloader.poll())
        self.fixture.writeBackendCRLs(self.fixture.backend.member, crlNumber=2)
        result = self.fixture.reloader.poll()
        assert result is not None
        self.assertTrue(result.ok, result)
        self.assertIn("pool 'app': new backend TLS (crls)", result.changes)


_SECOND_MEMBER: Optional[pki.Issued] = None


@attrs.define(eq=False)
class _IdleBackend:
    """
    What L{mtlsproxy.http.BackendConnectionCache} keeps of an idle backend
    connection, over a real TLS connection to a member.
    """

    transport: Any
    member: Any
    owner: object = None
    gone: bool = False

    def close(self) -> None:
        self.transport.loseConnection()


def secondMember() -> pki.Issued:
    """
    The certificate of another member of the pool, from the same
    intermediate as L{BackendPKI.member}.
    """
    global _SECOND_MEMBER
    if _SECOND_MEMBER is None:
        _SECOND_MEMBER = pki.issueServerCertificate(
            backendPKI().inter, "app.internal", dnsNames=["app.internal"]
        )
    return _SECOND_MEMBER


class BackendLiveRevocationTests(_EventsMixin, SynchronousTestCase):
    """
    A reload whose C{[pools.tls]} CRLs revoke a member's certificate closes
    the established relays to that member (C{close_revoked_connections} of
    the pool).  Real handshakes with members in memory.
    """

    def setUp(self) -> None:
        super().setUp()
        self.fixture = BackendFixture(self)
        self.proxy = self.fixture.proxy
        self.proxy.startService()
        self.addCleanup(self.proxy.stopService)
        self.backend = self.fixture.backend

    def relay(self, leaf: Optional[pki.Issued], port: int) -> tuple[Connection, StringTransport, Any]:
        connection = self.fixture.relay(leaf, clientPort=port)
        self.assertEqual(connection.member.received, b"request")
        return connection, self.fixture.lastClient, self.fixture.lastRelay

    def assertRelays(self, connection: Connection, client: StringTransport) -> None:
        """
        The relay still carries bytes both ways.
        """
        self.assertFalse(client.disconnecting)
        connection.member.transport.write(b"answer")
        connection.pump.flush()
        self.assertTrue(client.value().endswith(b"answer"))
        connection.proxyTLS.write(b" more")
        connection.pump.flush()
        self.assertTrue(connection.member.received.endswith(b" more"))

    def test_chainOfBackendConnection(self) -> None:
        """
        The relay's backend transport is the TLS connection to the member:
        its verified chain is the member's certificate up to the root.
        """
        self.relay(None, 40000)
        relay = self.fixture.lastRelay
        chain = verifiedChainOf(relay.backendTransport())
        self.assertEqual(
            [link.serial for link in chain],
            [
                self.backend.member.certificate.serial_number,
                self.backend.inter.certificate.serial_number,
                self.backend.root.certificate.serial_number,
            ],
        )

    def test_revokedMemberClosed(self) -> None:
        """
        When a reloaded pool CRL revokes a member's certificate, the relay
        to that member is closed on both sides with C{revoked_live}, and a
        warning names the pool, the member, the serial and the client; the
        relay to another member goes on.
        """
        revoked, revokedClient, revokedRelay = self.relay(self.backend.member, 40000)
        other, otherClient, _ = self.relay(secondMember(), 40001)
        self.fixture.writeBackendCRLs(self.backend.member, crlNumber=2)
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertEqual(result.revoked, 1)
        self.assertTrue(revokedClient.disconnecting)
        revoked.pump.flush()
        # The member got the proxy's close_notify.
        self.assertIn("readConnectionLost", revoked.member.events)
        [event] = self.logged(REVOKED_MEMBER_FORMAT)
        self.assertEqual(event["reason"], REVOKED_LIVE)
        self.assertEqual(event["pool"], "app")
        self.assertEqual(event["member"], revokedRelay.describe().backend)
        self.assertEqual(event["serial"], f"{self.backend.member.certificate.serial_number:x}")
        self.assertEqual(event["memberSerial"], event["serial"])
        self.assertEqual(event["depth"], 0)
        self.assertEqual(event["peer"], "192.0.2.7:40000")
        self.assertEqual(event["listener"], "plain")
        self.assertEqual(event["connectionId"], revokedRelay.connectionId)
        self.assertEqual(revokedRelay.phase.value, "closing")
        revoked.member.transport.loseConnection()
        revoked.pump.flush()
        revokedRelay.connectionLost(Failure(ConnectionDone()))
        [access] = [e for e in self.events if e.get("close_reason") is not None]
        self.assertEqual(access["close_reason"], REVOKED_LIVE)
        self.assertRelays(other, otherClient)

    def test_revokedIntermediateClosed(self) -> None:
        """
        A reloaded root CRL that revokes the intermediate CA of the
        members' chain closes the relays through it (depth 1).
        """
        connection, client, _ = self.relay(None, 40000)
        self.fixture.write(
            "backend-crls.pem",
            pki.crlPEM(pki.buildCRL(self.backend.root, [self.backend.inter.certificate], crlNumber=2))
            + pki.crlPEM(pki.buildCRL(self.backend.inter, crlNumber=2)),
        )
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertEqual(result.revoked, 1)
        self.assertTrue(client.disconnecting)
        [event] = self.logged(REVOKED_MEMBER_FORMAT)
        self.assertEqual(event["depth"], 1)
        self.assertEqual(event["subject"], "CN=Backend Intermediate")

    def test_disabled(self) -> None:
        """
        With the pool's C{close_revoked_connections = false}, established
        relays are left alone; new connections are still refused.
        """
        connection, client, _ = self.relay(self.backend.member, 40000)
        self.fixture.closeRevoked = False
        self.fixture.writeConfig()
        self.fixture.writeBackendCRLs(self.backend.member, crlNumber=2)
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertEqual(result.revoked, 0)
        self.assertEqual(self.logged(REVOKED_MEMBER_FORMAT), [])
        self.assertRelays(connection, client)
        refused = self.fixture.relay(self.backend.member, clientPort=40002)
        self.assertEqual(refused.member.received, b"")

    def test_abortedIfStillOpen(self) -> None:
        """
        A relay closed for revocation that is still open 5 seconds later
        is aborted.
        """
        connection, client, relay = self.relay(self.backend.member, 40000)
        self.fixture.writeBackendCRLs(self.backend.member, crlNumber=2)
        self.assertEqual(self.fixture.reloader.reload().revoked, 1)
        backendTransport = relay.backendTransport()
        aborted: list[bool] = []
        backendTransport.abortConnection = lambda: aborted.append(True)
        self.fixture.reactor.advance(5.0)
        self.assertEqual(aborted, [True])

    def test_connectingLaterSwept(self) -> None:
        """
        A relay whose member connection was still being made at the reload
        (verified against the old CRLs) is checked again once connection
        attempts started then had to be over.
        """
        factory = self.proxy.listeners["plain"].factory
        client = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        protocol = factory.buildProtocol(client.getPeer())
        protocol.makeConnection(client)
        protocol.dataReceived(b"request")
        attempt = self.fixture.reactor.tcpClients[-1][2]
        self.fixture.writeBackendCRLs(self.backend.member, crlNumber=2)
        result = self.fixture.reloader.reload()
        self.assertEqual(result.revoked, 0)
        # The attempt made before the reload verifies with the old CRLs.
        connection = connectToMember(
            attempt, memberContext(version=BACKEND_TLS13), self.fixture.reactor
        )
        connection.pump.flush()
        self.assertEqual(connection.member.received, b"request")
        self.assertFalse(client.disconnecting)
        self.fixture.reactor.advance(2 * 5.0 + 1.0)
        self.assertTrue(client.disconnecting)
        [event] = self.logged(REVOKED_MEMBER_FORMAT)
        self.assertEqual(event["peer"], "192.0.2.7:40000")

    def test_otherPoolUntouched(self) -> None:
        """
        Only the connections made with the given pool's backend TLS are
        looked at.
        """
        self.relay(self.backend.member, 40000)
        crls = CRLIndex.fromCRLs(
            [pki.buildCRL(self.backend.inter, [self.backend.member.certificate])]
        )
        self.assertEqual(closeRevokedBackendConnections(self.proxy.connections, "other", crls), [])
        self.assertEqual(
            len(closeRevokedBackendConnections(self.proxy.connections, "app", crls)), 1
        )

    def test_idleHTTPSBackendsClosed(self) -> None:
        """
        The idle backend connections an C{https} listener keeps for reuse
        are closed too when the pool's CRLs revoke their member (without a
        client to name), and leave the cache so they are not reused;
        connections to other members stay.
        """
        from mtlsproxy.http import BackendConnectionCache

        cache = BackendConnectionCache(self.fixture.reactor)
        idle = []
        for leaf in (self.backend.member, secondMember()):
            attempt = AttemptFactory()
            connection = connectToMember(
                self.proxy.backendTLS["app"].wrapFactory(
                    Member("10.0.0.1"), attempt, self.fixture.reactor, 5.0
                ),
                memberContext(leaf, version=BACKEND_TLS13),
                self.fixture.reactor,
            )
            [protocol] = attempt.built
            backend = _IdleBackend(protocol.transport, leaf)
            cache.put(backend)
            idle.append((backend, connection))
        crls = CRLIndex.fromCRLs(
            [pki.buildCRL(self.backend.inter, [self.backend.member.certificate])]
        )
        closed = closeRevokedIdleBackends(cache, "web", "app", crls)
        (revoked, revokedConnection), (kept, _) = idle
        self.assertEqual(closed, [revoked])
        self.assertEqual(cache.idleConnections(), [kept])
        revokedConnection.pump.flush()
        self.assertIn("readConnectionLost", revokedConnection.member.events)
        [event] = self.logged(REVOKED_MEMBER_FORMAT)
        self.assertEqual(
            (event["listener"], event["pool"], event["member"], event["peer"]),
            ("web", "app", "10.0.0.1:8443", "none (idle)"),
        )
        self.assertIsNone(event["connectionId"])
        self.assertEqual(closeRevokedIdleBackends(cache, "web", "other", crls), [])

    def test_settingParsed(self) -> None:
        """
        C{close_revoked_connections} of C{[pools.tls]} defaults to true and
        changing it alone builds no new backend TLS.
        """
        [pool] = loadConfig(self.fixture.configPath).pools
        assert pool.tls is not None
        self.assertTrue(pool.tls.close_revoked_connections)
        self.fixture.closeRevoked = False
        self.fixture.writeConfig()
        [pool] = loadConfig(self.fixture.configPath).pools
        assert pool.tls is not None
        self.assertFalse(pool.tls.close_revoked_connections)
        holder = self.proxy.backendTLS["app"]
        before = holder.current
        result = self.fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertIs(holder.current, before)


class BackendTLSExpiryTests(_EventsMixin, SynchronousTestCase):
    """
    The expiry report, warnings, status and metrics with a pool's
    C{[pools.tls]} material.
    """

    def test_reportListsPoolMaterial(self) -> None:
        """
        The report lists our client certificate, the members' CA and CRLs,
        labelled with the pool and the file each came from.
        """
        fixture = BackendFixture(self)
        report = fixture.reloader.expiryReport()
        pool = sorted((i.kind, i.subject, i.file) for i in report if i.pool == "app")
        self.assertEqual(
            pool,
            [
                (CA_CERTIFICATE, "CN=Backend Intermediate", fixture.path("backend-ca.pem")),
                (CA_CERTIFICATE, "CN=Backend Root", fixture.path("backend-ca.pem")),
                (CLIENT_CERTIFICATE, "CN=mtlsproxy", fixture.path("proxy-client.pem")),
                (CRL, "CN=Backend Intermediate", fixture.path("backend-crls.pem")),
                (CRL, "CN=Backend Root", fixture.path("backend-crls.pem")),
            ],
        )
        self.assertEqual({i.listener for i in report if i.pool == "app"}, {"pool:app"})
        client = next(i for i in report if i.kind == CLIENT_CERTIFICATE)
        self.assertEqual(client.serial, f"{fixture.backend.proxyClient.certificate.serial_number:x}")
        self.assertEqual(client.asDict()["pool"], "app")
        self.assertEqual(client.owner, "pool app [pools.tls]")

    def test_statusAndMetrics(self) -> None:
        """
        /status's certificate and CRL lists and the expiry gauges include
        the pool's material.
        """
        from mtlsproxy import status

        fixture = BackendFixture(self)
        data = status.proxyStatus(fixture.proxy, fixture.reactor)
        client = [c for c in data["certificates"] if c["kind"] == CLIENT_CERTIFICATE]
        self.assertEqual(
            [(c["pool"], c["listener"], c["subject"], c["file"]) for c in client],
            [("app", "pool:app", "CN=mtlsproxy", fixture.path("proxy-client.pem"))],
        )
        self.assertEqual(
            sorted(c["subject"] for c in data["crls"] if c["pool"] == "app"),
            ["CN=Backend Intermediate", "CN=Backend Root"],
        )
        registry = fixture.proxy.metrics.registry
        self.assertIsNotNone(
            registry.get_sample_value(
                "mtlsproxy_certificate_expiry_seconds",
                {
                    "listener": "pool:app",
                    "kind": CLIENT_CERTIFICATE,
                    "subject": "CN=mtlsproxy",
                    "serial": f"{fixture.backend.proxyClient.certificate.serial_number:x}",
                },
            )
        )
        self.assertIsNotNone(
            registry.get_sample_value(
                "mtlsproxy_crl_next_update_seconds",
                {"listener": "pool:app", "issuer": "CN=Backend Intermediate"},
            )
        )

    def test_warningAfterReload(self) -> None:
        """
        When the reload brings a client certificate that expires within
        C{expiry_warning_days}, it is logged with its pool and file, and the
        report has the new certificate instead of the old one.
        """
        fixture = BackendFixture(self, days=1)
        fixture.proxy.startService()
        self.addCleanup(fixture.proxy.stopService)
        self.assertEqual(self.logged(EXPIRING_FORMAT), [])
        soon = pki.issueClientCertificate(
            fixture.backend.clientRoot,
            "mtlsproxy soon",
            notAfter=datetime.now(timezone.utc) + timedelta(hours=5),
        )
        fixture.writeClient(soon)
        self.assertTrue(fixture.reloader.reload().ok)
        [event] = self.logged(EXPIRING_FORMAT)
        self.assertEqual(
            (event["kind"], event["subject"], event["pool"], event["owner"], event["file"]),
            (
                CLIENT_CERTIFICATE,
                "CN=mtlsproxy soon",
                "app",
                "pool app [pools.tls]",
                fixture.path("proxy-client.pem"),
            ),
        )
        self.assertEqual(event["days_left"], 0)
        clients = [i.subject for i in fixture.reloader.expiryReport() if i.kind == CLIENT_CERTIFICATE]
        self.assertEqual(clients, ["CN=mtlsproxy soon"])


HEALTH_CHECK = """
[pools.health_check]
type = "tcp"
interval = {interval}
timeout = 0.5
jitter = 0.0
unhealthy_threshold = 2
healthy_threshold = 1
{extra}"""


class HealthFixture(ProxyFixture):
    """
    L{ProxyFixture} whose pool C{app} has the C{[pools.health_check]} of
    L{healthCheck} (nothing when empty) at the end of the file, and maybe
    more pools after it (L{morePools}).
    """

    def __init__(self, testCase: SynchronousTestCase, healthCheck: str) -> None:
        self.healthCheck = healthCheck
        self.morePools = ""
        super().__init__(testCase)

    def writeConfig(self) -> None:
        super().writeConfig()
        with open(self.configPath, "a") as f:
            f.write(self.healthCheck + self.morePools)

    def attempts(self, port: int) -> int:
        """
        How many connections (health checks: nothing else connects here)
        were started to a member on C{port} so far.
        """
        return sum(1 for client in self.reactor.tcpClients if client[1] == port)

    def run(self, seconds: float) -> None:
        """
        Let C{seconds} pass, a tenth at a time.
        """
        for _ in range(int(seconds * 10)):
            self.reactor.advance(0.1)

    def accept(self, port: int) -> None:
        """
        Let the latest connection attempt to C{port} succeed (the member
        accepted), and close it as the checker asks.
        """
        [attempt] = [c for c in self.reactor.tcpClients if c[1] == port][-1:]
        protocol = attempt[2].buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertClosing(transport)
        protocol.connectionLost(Failure(ConnectionDone()))

    def runAccepting(self, seconds: float, port: int) -> None:
        """
        Let C{seconds} pass, a tenth at a time, the member on C{port}
        accepting every check at once.
        """
        for _ in range(int(seconds * 10)):
            seen = self.attempts(port)
            self.reactor.advance(0.1)
            if self.attempts(port) > seen:
                self.accept(port)

    @staticmethod
    def assertClosing(transport: StringTransport) -> None:
        assert transport.disconnecting, "the tcp check did not close its connection"


class HealthCheckReloadTests(_EventsMixin, SynchronousTestCase):
    """
    A reload replaces a pool's active health checks: real L{ProxyService},
    real C{tcp} checker, connection attempts recorded by the
    L{MemoryReactorClock}.
    """

    def fixture(self, healthCheck: str, start: bool = True) -> HealthFixture:
        fixture = HealthFixture(self, healthCheck)
        if start:
            fixture.proxy.startService()
            self.addCleanup(fixture.proxy.stopService)
        return fixture

    def rewrite(self, fixture: HealthFixture, healthCheck: str) -> Any:
        fixture.healthCheck = healthCheck
        fixture.writeConfig()
        result = fixture.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertEqual(result.restartNeeded, ())
        return result

    def test_intervalChange(self) -> None:
        """
        When a reload changes a pool's check interval, the old monitor
        stops and a new one checks every member at the new interval; the
        summary lists it as applied.
        """
        fixture = self.fixture(HEALTH_CHECK.format(interval=5.0, extra=""))
        old = fixture.proxy.healthMonitors["app"]
        fixture.run(10)
        self.assertIn(fixture.attempts(9001), (2, 3))
        result = self.rewrite(fixture, HEALTH_CHECK.format(interval=1.0, extra=""))
        self.assertIn("pool 'app': health checks (interval 5.0 -> 1.0)", result.changes)
        new = fixture.proxy.healthMonitors["app"]
        self.assertIsNot(new, old)
        self.assertFalse(old.running)
        self.assertEqual(old.watching(), [])
        self.assertTrue(new.running)
        self.assertEqual(new.config.interval, 1.0)
        self.assertIs(new.parent, fixture.proxy)
        before = {port: fixture.attempts(port) for port in (9001, 9002)}
        fixture.run(10)
        for port in (9001, 9002):
            self.assertIn(fixture.attempts(port) - before[port], (9, 10, 11))
        [event] = self.logged(RELOADED_FORMAT)
        self.assertIn("pool 'app': health checks (interval 5.0 -> 1.0)", event["summary"])
        self.assertEqual(self.logged(RESTART_NEEDED_FORMAT), [])

    def test_optionChangeDescribed(self) -> None:
        """
        When a reload changes a checker option and a threshold, the summary
        names both, with their old and new values.
        """
        fixture = self.fixture(
            HEALTH_CHECK.format(interval=1.0, extra="").replace('"tcp"', '"http"')
            + 'path = "/wrong"\n'
        )
        result = self.rewrite(
            fixture,
            HEALTH_CHECK.format(interval=1.0, extra="").replace('"tcp"', '"http"').replace(
                "unhealthy_threshold = 2", "unhealthy_threshold = 4"
            )
            + 'path = "/healthz"\n',
        )
        self.assertIn(
            "pool 'app': health checks (unhealthy_threshold 2 -> 4, path \"/wrong\" -> \"/healthz\")",
            result.changes,
        )
        self.assertEqual(fixture.proxy.healthMonitors["app"].checker.path, b"/healthz")

    def test_healthKeptAcrossSwap(self) -> None:
        """
        When the checks are replaced, each member keeps its health and last
        check: one that checks took out stays out, one that passed stays
        in (even with C{initial_state = "unhealthy"} now), and the new
        monitor goes on from there: the next pass brings the first one
        back.
        """
        fixture = self.fixture(HEALTH_CHECK.format(interval=1.0, extra=""))
        down, up = fixture.proxy.pools["app"].members
        fixture.runAccepting(3, 9002)
        self.assertFalse(down.healthy)
        self.assertTrue(up.healthy)
        lastDown, lastUp = down.lastCheck, up.lastCheck
        assert lastDown is not None and lastUp is not None
        self.assertFalse(lastDown[0].healthy)
        old = fixture.proxy.healthMonitors["app"]
        self.rewrite(fixture, HEALTH_CHECK.format(interval=2.0, extra='initial_state = "unhealthy"\n'))
        self.assertIsNot(fixture.proxy.healthMonitors["app"], old)
        self.assertEqual(fixture.proxy.healthMonitors["app"].config.initial_state, "unhealthy")
        self.assertEqual((down.healthy, up.healthy), (False, True))
        self.assertEqual((down.lastCheck, up.lastCheck), (lastDown, lastUp))
        self.assertEqual(
            set(map(id, fixture.proxy.healthMonitors["app"].watching())), {id(down), id(up)}
        )
        before = fixture.attempts(9001)
        while fixture.attempts(9001) == before:
            fixture.reactor.advance(0.1)
        fixture.accept(9001)
        self.assertTrue(down.healthy)

    def test_removedMakesMembersHealthy(self) -> None:
        """
        When a reload removes a pool's health_check, its monitor stops, no
        check runs any more, and every member is healthy again, logged once
        with the pool and the count.
        """
        fixture = self.fixture(HEALTH_CHECK.format(interval=1.0, extra=""))
        fixture.run(3)
        members = fixture.proxy.pools["app"].members
        self.assertEqual([m.healthy for m in members], [False, False])
        old = fixture.proxy.healthMonitors["app"]
        result = self.rewrite(fixture, "")
        self.assertIn("pool 'app': health checks removed (2 member(s) made healthy)", result.changes)
        self.assertEqual(fixture.proxy.healthMonitors, {})
        self.assertFalse(old.running)
        self.assertNotIn(old, list(fixture.proxy))
        self.assertEqual([m.healthy for m in members], [True, True])
        [event] = self.logged(HEALTH_CHECKS_REMOVED_FORMAT)
        self.assertEqual(
            (event["pool"], event["count"], event["members"]),
            ("app", 2, ["127.0.0.1:9001", "127.0.0.1:9002"]),
        )
        attempts = len(fixture.reactor.tcpClients)
        fixture.run(10)
        self.assertEqual(len(fixture.reactor.tcpClients), attempts)
        self.assertEqual([m.healthy for m in members], [True, True])

    def test_addedStartsChecks(self) -> None:
        """
        When a reload gives a pool without checks a health_check table,
        its members are checked from then on, at its interval.
        """
        fixture = self.fixture("")
        fixture.run(10)
        self.assertEqual(fixture.reactor.tcpClients, [])
        self.assertEqual(fixture.proxy.healthMonitors, {})
        result = self.rewrite(fixture, HEALTH_CHECK.format(interval=1.0, extra=""))
        self.assertIn("pool 'app': health checks added (type \"tcp\")", result.changes)
        fixture.run(5)
        self.assertIn(fixture.attempts(9001), (4, 5))
        self.assertIn(fixture.attempts(9002), (4, 5))
        self.assertEqual([m.healthy for m in fixture.proxy.pools["app"].members], [False, False])

    def test_newPoolChecked(self) -> None:
        """
        When a reload adds a pool with a health_check table, its members
        are checked, and nothing needs a restart.
        """
        fixture = self.fixture("")
        fixture.morePools = (
            '\n[[pools]]\nname = "other"\n[[pools.members]]\naddress = "127.0.0.1"\nport = 9100\n'
            + HEALTH_CHECK.format(interval=1.0, extra="")
        )
        result = self.rewrite(fixture, "")
        self.assertIn("new pool 'other'", result.changes)
        self.assertIn("pool 'other': health checks added (type \"tcp\")", result.changes)
        monitor = fixture.proxy.healthMonitors["other"]
        self.assertTrue(monitor.running)
        self.assertIs(monitor.pool, fixture.proxy.pools["other"])
        fixture.run(3)
        self.assertIn(fixture.attempts(9100), (2, 3))
        self.assertEqual(fixture.attempts(9001), 0)

    def test_removedPoolForgotten(self) -> None:
        """
        When a reload removes a pool, its health checks stop (no more
        connections to its members), it leaves the proxy's pools (so
        C{/status} and the metrics), and the summary says so.
        """
        from mtlsproxy.status import proxyStatus

        fixture = self.fixture("")
        fixture.morePools = (
            '\n[[pools]]\nname = "other"\n[[pools.members]]\naddress = "127.0.0.1"\nport = 9100\n'
            + HEALTH_CHECK.format(interval=1.0, extra="")
        )
        self.rewrite(fixture, "")
        monitor = fixture.proxy.healthMonitors["other"]
        fixture.run(3)
        self.assertGreater(fixture.attempts(9100), 0)

        fixture.morePools = ""
        result = self.rewrite(fixture, "")
        self.assertIn("pool 'other' removed", result.changes)
        self.assertNotIn("other", fixture.proxy.pools)
        self.assertNotIn("other", fixture.proxy.healthMonitors)
        self.assertFalse(monitor.running)
        before = fixture.attempts(9100)
        fixture.run(5)
        self.assertEqual(fixture.attempts(9100), before)
        names = [p["name"] for p in proxyStatus(fixture.proxy, fixture.reactor)["pools"]]
        self.assertEqual(names, ["app"])

    def test_newPoolCheckedBeforeStart(self) -> None:
        """
        When the proxy has not started yet, a reload's new monitor is not
        started either, and starts with the proxy.
        """
        fixture = self.fixture("", start=False)
        result = self.rewrite(fixture, HEALTH_CHECK.format(interval=1.0, extra=""))
        self.assertIn("pool 'app': health checks added (type \"tcp\")", result.changes)
        monitor = fixture.proxy.healthMonitors["app"]
        self.assertFalse(monitor.running)
        fixture.run(3)
        self.assertEqual(fixture.reactor.tcpClients, [])
        fixture.proxy.startService()
        self.addCleanup(fixture.proxy.stopService)
        self.assertTrue(monitor.running)
        fixture.run(3)
        self.assertIn(fixture.attempts(9001), (2, 3))

    def test_invalidOptionRefused(self) -> None:
        """
        When the new health_check has an invalid option, the reload is
        refused with an error naming the file, the key path and the
        problem, and the running monitor goes on checking as before.
        """
        http = HEALTH_CHECK.format(interval=1.0, extra="").replace('"tcp"', '"http"')
        fixture = self.fixture(http + 'path = "/healthz"\n')
        monitor = fixture.proxy.healthMonitors["app"]
        fixture.healthCheck = http.replace("interval = 1.0", "interval = 2.0") + 'path = "healthz"\n'
        fixture.writeConfig()
        result = fixture.reloader.reload()
        self.assertFalse(result.ok)
        self.assertEqual(
            result.error,
            f"{fixture.configPath}: pools[0].health_check.path: expected a path starting with"
            ' "/" such as "/healthz", got "healthz"',
        )
        [event] = self.logged(RELOAD_FAILED_FORMAT)
        self.assertEqual(event["key"], "pools[0].health_check.path")
        self.assertIs(fixture.proxy.healthMonitors["app"], monitor)
        self.assertTrue(monitor.running)
        self.assertEqual(monitor.config.interval, 1.0)
        fixture.run(5)
        self.assertIn(fixture.attempts(9001), (4, 5))


@implementer(IPlugin, IHealthCheckerFactory)
class _PlainOnly:
    """
    A health checker plugin that cannot speak TLS: it refuses a pool with
    backend TLS settings, which only the running proxy (not the
    configuration file alone) can tell.
    """

    name = "plain_only"
    description = "TCP connect, for pools without [pools.tls]."
    options = {"port_offset": "Added to the member's port."}

    def newChecker(self, reactor: Any, options: Any, tls: Any) -> Any:
        if tls is not None:
            raise OptionError("port_offset", f"cannot check pool {tls.poolName!r} over TLS")
        from mtlsproxy.checkers import TCPChecker

        return TCPChecker(reactor)


class HealthCheckerRefusedTests(_EventsMixin, SynchronousTestCase):
    """
    A checker that can be built only from the running proxy's state (its
    backend TLS) and refuses it: the reload is refused before anything
    is applied.
    """

    def test_refusedKeepsMonitor(self) -> None:
        """
        When the new checker refuses the pool's backend TLS, the reload is
        refused naming the file, the key path, the pool and the problem;
        the old monitor keeps running and nothing else of the reload
        (here a new member) is applied.
        """
        from mtlsproxy import plugins

        installed = plugins.healthCheckerFactoriesByName
        self.patch(plugins, "healthCheckerFactoriesByName", lambda: {**installed(), "plain_only": _PlainOnly()})
        fixture = BackendFixture(self, healthCheck=True)
        fixture.proxy.startService()
        self.addCleanup(fixture.proxy.stopService)
        monitor = fixture.proxy.healthMonitors["app"]
        fixture.members.append(("127.0.0.1", 9003, 1))
        fixture.writeConfig()
        with open(fixture.configPath) as f:
            text = f.read()
        with open(fixture.configPath, "w") as f:
            f.write(text.replace('type = "tls"', 'type = "plain_only"\nport_offset = 1'))
        result = fixture.reloader.reload()
        self.assertFalse(result.ok)
        self.assertEqual(
            result.error,
            f"{fixture.configPath}: pools[0].health_check.port_offset: pool 'app':"
            " cannot check pool 'app' over TLS",
        )
        [event] = self.logged(RELOAD_FAILED_FORMAT)
        self.assertEqual((event["file"], event["key"]), (fixture.configPath, "pools[0].health_check.port_offset"))
        self.assertIs(fixture.proxy.healthMonitors["app"], monitor)
        self.assertTrue(monitor.running)
        self.assertEqual(len(fixture.proxy.pools["app"].members), 2)
