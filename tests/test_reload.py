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
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mtlsproxy import pki
from mtlsproxy.checks import checkConfiguration
from mtlsproxy.config import loadConfig
from mtlsproxy.drain import ConnectionInfo
from mtlsproxy.expiry import (
    CA_CERTIFICATE,
    CRL,
    DAY,
    EXPIRING_FORMAT,
    SERVER_CERTIFICATE,
    ExpiryMonitor,
    expiryReport,
)
from mtlsproxy.reload import (
    RELOAD_FAILED_FORMAT,
    RELOADED_FORMAT,
    RESTART_NEEDED_FORMAT,
    Reloader,
    watchedFiles,
)
from mtlsproxy.revocation import (
    REVOKED_LIVE,
    REVOKED_LIVE_FORMAT,
    CRLIndex,
    closeRevokedConnections,
    verifiedChainOf,
)
from mtlsproxy.service import ProxyService
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
