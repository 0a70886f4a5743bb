# -*- test-case-name: tests.test_admin -*-
"""
Tests for L{mtlsproxy.admin}: the namespace helpers against a proxy in
memory, the host key and credential files, and real SSH sessions to an
L{AdminService} on 127.0.0.1 with twisted.conch's client (an interactive
shell on a pty, a command, a wrong key, a password).
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any, Optional

import bcrypt
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import channel, common, connection, keys, session, transport, userauth
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientFactory
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtlsproxy.admin import (
    AdminService,
    AuthorizedKeysFile,
    BcryptPasswordFile,
    defaultHostKeyPath,
    loadOrCreateHostKey,
    makeNamespace,
)
from mtlsproxy.config import AdminConfig, loadConfig
from mtlsproxy.errors import ConfigurationError
from tests.test_drain import CONFIG, makeProxy
from tests.test_relay import HalfCloseStringTransport

_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[78=>EM]")


def newKey() -> keys.Key:
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


class NamespaceTests(SynchronousTestCase):
    """
    The helpers an admin session starts with, on a proxy in memory.
    """

    def setUp(self) -> None:
        self.proxy, self.reactor = makeProxy(self)
        self.proxy.startService()
        self.addCleanup(self.proxy.stopService)
        self.ns = makeNamespace(self.proxy, self.reactor)
        self.member = self.proxy.pools["app"].members[0]

    def test_liveObjects(self) -> None:
        """
        When a session starts, proxy, pools and listeners are the live
        objects.
        """
        self.assertIs(self.ns["proxy"], self.proxy)
        self.assertIs(self.ns["pools"]["app"], self.proxy.pools["app"])
        self.assertEqual(list(self.ns["listeners"]), ["plain"])

    def test_status(self) -> None:
        """
        When status() is called, the text names the listener, the pool and
        the member with its health and weight.
        """
        text = repr(self.ns["status"]())
        self.assertIn("mtlsproxy 0.1.0, running, ready", text)
        self.assertIn("listener plain (tcp)", text)
        self.assertIn("pool app (round_robin)", text)
        self.assertIn("127.0.0.1:9  weight 1  healthy  active 0", text)

    def test_statusNamesOwnersOfCertificates(self) -> None:
        """
        When status() lists certificates and CRLs, each says whether it is a
        listener's or a pool's (C{[pools.tls]}), by name.
        """
        from tests.test_reload import BackendFixture

        fixture = BackendFixture(self)
        lines = repr(makeNamespace(fixture.proxy, fixture.reactor)["status"]()).splitlines()
        owners = {re.search(r"\((listener|pool) [^)]+\)", line).group(0)  # type: ignore[union-attr]
                  for line in lines if "days left" in line or "nextUpdate" in line}
        self.assertEqual(owners, {"(listener mtls)", "(pool app)"})

    def test_drainEnableWeight(self) -> None:
        """
        When drain, enable and weight are called with a pool and a member
        (by "host:port" or port), the member changes accordingly.
        """
        self.assertEqual(
            repr(self.ns["drain"]("app", "127.0.0.1:9")),
            "pool app member 127.0.0.1:9 draining (0 connection(s) open)",
        )
        self.assertTrue(self.member.draining)
        self.ns["enable"]("app", 9)
        self.assertFalse(self.member.draining)
        self.assertEqual(repr(self.ns["weight"]("app", "127.0.0.1:9", 5)), "pool app member 127.0.0.1:9 weight 5")
        self.assertEqual(self.member.weight, 5)
        self.assertRaises(ValueError, self.ns["weight"], "app", 9, 1001)

    def test_unknownPoolOrMember(self) -> None:
        """
        When the pool or member does not exist, the KeyError lists what
        does.
        """
        error = self.assertRaises(KeyError, self.ns["drain"], "nope", 9)
        self.assertIn("pools: app", str(error))
        error = self.assertRaises(KeyError, self.ns["drain"], "app", "10.0.0.1:1")
        self.assertIn("members: 127.0.0.1:9", str(error))

    def test_connectionsAndClose(self) -> None:
        """
        When a connection is open, connections() lists it with its peer,
        and close(id) closes it.
        """
        self.assertEqual(repr(self.ns["connections"]()), "no connections")
        factory = self.reactor.tcpServers[0][1]
        relay = factory.buildProtocol(None)
        clientTransport = HalfCloseStringTransport()
        relay.makeConnection(clientTransport)
        listing = self.ns["connections"]()
        [info] = listing
        self.assertEqual(info.listener, "plain")
        self.assertIn("192.168.1.1:54321", repr(listing))
        self.assertIn("connecting", repr(listing))
        self.assertEqual(
            repr(self.ns["close"](info.id)), f"closing connection {info.id} (192.168.1.1:54321 on plain)"
        )
        self.assertTrue(clientTransport.disconnecting)
        self.assertEqual(repr(self.ns["close"](999)), "no connection 999")

    def test_reload(self) -> None:
        """
        When the proxy has a reloader, reload() calls it and shows its
        result; without one, it says reload is not available.
        """

        class Reloader:
            def reload(self) -> str:
                return "reloaded: 0 change(s) applied"

        self.proxy.reloader = Reloader()  # type: ignore[assignment]
        self.assertEqual(repr(self.ns["reload"]()), "reloaded: 0 change(s) applied")
        self.proxy.reloader = None  # type: ignore[assignment]
        self.assertIn("not available", repr(self.ns["reload"]()))

    def test_help(self) -> None:
        """
        When help() is called, it lists the helpers (instead of Python's
        interactive help, which would read the daemon's standard input).
        """
        text = repr(self.ns["help"]())
        for name in ("status()", "connections()", "drain(pool, member)", "close(id)", "reload()"):
            self.assertIn(name, text)


class HostKeyTests(SynchronousTestCase):
    """
    L{loadOrCreateHostKey}.
    """

    def test_generatedOnce(self) -> None:
        """
        When the host key file is missing, an Ed25519 key is written with
        mode 0600; the next start reads the same key.
        """
        path = os.path.abspath(self.mktemp())
        key = loadOrCreateHostKey(path)
        self.assertEqual(key.sshType(), b"ssh-ed25519")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(loadOrCreateHostKey(path), key)

    def test_garbage(self) -> None:
        """
        When the host key file is not a private key, it is a configuration
        error naming admin.host_key.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(newKey().public().toString("OPENSSH"))
        error = self.assertRaises(ConfigurationError, loadOrCreateHostKey, path)
        self.assertEqual(error.key, "admin.host_key")

    def test_defaultPath(self) -> None:
        """
        When host_key is not set, the key lives next to the configuration
        file.
        """
        self.assertEqual(defaultHostKeyPath("/etc/mtlsproxy/proxy.toml"), "/etc/mtlsproxy/admin_host_key")


class CredentialFileTests(TestCase):
    """
    L{AuthorizedKeysFile} and L{BcryptPasswordFile}.
    """

    def test_authorizedKeysReadEachTime(self) -> None:
        """
        When the authorized_keys file changes, the next login sees the
        change; comments are skipped.
        """
        path = os.path.abspath(self.mktemp())
        first, second = newKey(), newKey()
        with open(path, "wb") as f:
            f.write(b"# admins\n" + first.public().toString("OPENSSH") + b" alice\n")
        db = AuthorizedKeysFile(path)
        self.assertEqual(db.getAuthorizedKeys(b"x"), [first.public()])
        with open(path, "wb") as f:
            f.write(second.public().toString("OPENSSH") + b"\n")
        self.assertEqual(db.getAuthorizedKeys(b"x"), [second.public()])

    def test_authorizedKeysMissing(self) -> None:
        """
        When the authorized_keys file cannot be read, no key is accepted
        and an error is logged.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertEqual(AuthorizedKeysFile("/nonexistent/keys").getAuthorizedKeys(b"x"), [])
        self.assertEqual(observer[0]["log_level"].name, "error")

    @defer.inlineCallbacks
    def test_passwordFile(self) -> Any:
        """
        When a user logs in with the password whose bcrypt hash is in the
        file, the login succeeds; a wrong password or unknown user fails.
        """
        path = os.path.abspath(self.mktemp())
        hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4))
        with open(path, "wb") as f:
            f.write(b"# operators\nops:" + hashed + b"\n")
        checker = BcryptPasswordFile(path, reactor)
        avatar = yield checker.requestAvatarId(UsernamePassword(b"ops", b"s3cret"))
        self.assertEqual(avatar, b"ops")
        yield self.assertFailure(
            checker.requestAvatarId(UsernamePassword(b"ops", b"wrong")), UnauthorizedLogin
        )
        yield self.assertFailure(
            checker.requestAvatarId(UsernamePassword(b"eve", b"s3cret")), UnauthorizedLogin
        )


# ---------------------------------------------------------------------------
# A small SSH client (twisted.conch) for the tests
# ---------------------------------------------------------------------------


class _Session(channel.SSHChannel):
    """
    A session channel: with C{command}, an exec request; without, a pty and
    a shell, to which C{typed} is sent once the prompt shows, and Ctrl-D
    once C{until} appears in the output.
    """

    name = b"session"

    def __init__(self, command: Optional[bytes], typed: bytes, until: bytes, **kw: Any) -> None:
        super().__init__(**kw)
        self.command = command
        self.typed = typed
        self.until = until
        self.output = b""
        self.exitStatus: Optional[int] = None
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self.isClosed = False
        self._sentInput = False
        self._sentEOF = False

    def channelOpen(self, specificData: bytes) -> None:
        if self.command is not None:
            self.conn.sendRequest(self, b"exec", common.NS(self.command))
            return
        self.conn.sendRequest(
            self, b"pty-req", session.packRequest_pty_req(b"xterm", (24, 80, 0, 0), b"")
        )
        self.conn.sendRequest(self, b"shell", b"")

    def dataReceived(self, data: bytes) -> None:
        self.output += data
        plain = _ANSI.sub(b"", self.output)
        if self.command is None and not self._sentInput and b">>> " in plain:
            self._sentInput = True
            self.write(self.typed)
        if self._sentInput and not self._sentEOF and self.until in plain.split(self.typed.strip(), 1)[-1]:
            self._sentEOF = True
            self.write(b"\x04")

    def request_exit_status(self, data: bytes) -> None:
        self.exitStatus = int.from_bytes(data[:4], "big")

    def closed(self) -> None:
        self.isClosed = True
        self.conn.transport.loseConnection()


class _Connection(connection.SSHConnection):
    def __init__(self, session: _Session) -> None:
        super().__init__()
        self.session = session

    def serviceStarted(self) -> None:
        self.openChannel(self.session)


class _Auth(userauth.SSHUserAuthClient):
    def __init__(self, user: bytes, conn: _Connection, key: Optional[keys.Key],
                 password: Optional[bytes]) -> None:
        super().__init__(user, conn)
        self.key = key
        self.password = password
        self._offered = False

    def getPublicKey(self) -> Optional[keys.Key]:
        if self.key is None or self._offered:
            return None
        self._offered = True
        return self.key.public()

    def getPrivateKey(self) -> defer.Deferred[keys.Key]:
        assert self.key is not None
        return defer.succeed(self.key)

    def getPassword(self, prompt: Optional[bytes] = None) -> defer.Deferred[bytes]:
        if self.password is None:
            return None  # type: ignore[return-value]
        password, self.password = self.password, None
        return defer.succeed(password)


class _Transport(transport.SSHClientTransport):
    factory: "_ClientFactory"

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> defer.Deferred[bool]:
        if hostKey != self.factory.hostKey.public().blob():
            return defer.fail(Exception("unexpected host key"))
        return defer.succeed(True)

    def connectionSecure(self) -> None:
        f = self.factory
        self.requestService(_Auth(f.user, _Connection(f.session), f.key, f.password))

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        super().connectionLost(reason)
        session = self.factory.session
        if session.isClosed:
            session.done.callback(session.output)
        else:
            session.done.errback(reason)


class _ClientFactory(ClientFactory):
    protocol = _Transport
    noisy = False

    def __init__(self, hostKey: keys.Key, session: _Session, key: Optional[keys.Key],
                 password: Optional[bytes] = None, user: bytes = b"admin") -> None:
        self.hostKey = hostKey
        self.session = session
        self.key = key
        self.password = password
        self.user = user


class SSHTests(TestCase):
    """
    Real SSH sessions to an L{AdminService} on 127.0.0.1.
    """

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.key = newKey()
        keysPath = os.path.join(directory, "authorized_keys")
        with open(keysPath, "wb") as f:
            f.write(self.key.public().toString("OPENSSH") + b" admin@test\n")
        self.passwordPath = os.path.join(directory, "passwords")
        with open(self.passwordPath, "wb") as f:
            f.write(b"ops:" + bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)) + b"\n")
        self.proxy, _ = makeProxy(self, CONFIG)
        self.config = AdminConfig(
            authorized_keys=keysPath,
            endpoint="tcp:0:interface=127.0.0.1",
            host_key=os.path.join(directory, "host_key"),
        )

    def startAdmin(self, config: Optional[AdminConfig] = None) -> AdminService:
        service = AdminService(reactor, self.proxy, config or self.config, self.proxy.loaded.config.path)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def login(self, service: AdminService, session: _Session, key: Optional[keys.Key],
              password: Optional[bytes] = None, user: bytes = b"admin") -> defer.Deferred[bytes]:
        assert service.port is not None
        factory = _ClientFactory(service.hostKey, session, key, password, user)
        reactor.connectTCP("127.0.0.1", service.port.getHost().port, factory, timeout=10)

        def settle(result: object) -> defer.Deferred[object]:
            # Let the server side see the disconnection too.
            return task.deferLater(reactor, 0.05, lambda: result)

        return session.done.addBoth(settle)

    @defer.inlineCallbacks
    def test_interactiveShell(self) -> Any:
        """
        When a client with an authorized key opens a shell on a pty and
        types len(pools), the console answers 1.
        """
        service = self.startAdmin()
        session = _Session(None, b"len(pools)\r", b"1")
        output = yield self.login(service, session, self.key)
        plain = _ANSI.sub(b"", output)
        self.assertIn(b"mtlsproxy admin console", plain)
        self.assertRegex(plain, rb"len\(pools\)\s*\r\n1\r\n")

    @defer.inlineCallbacks
    def test_command(self) -> Any:
        """
        When a client runs a command, the result is printed and the exit
        status is 0; an exception gives its message and status 1.
        """
        service = self.startAdmin()
        session = _Session(b'drain("app", 9)', b"", b"")
        output = yield self.login(service, session, self.key)
        self.assertEqual(output, b"pool app member 127.0.0.1:9 draining (0 connection(s) open)\n")
        self.assertEqual(session.exitStatus, 0)
        self.assertTrue(self.proxy.pools["app"].members[0].draining)
        session = _Session(b'drain("nope", 9)', b"", b"")
        output = yield self.login(service, session, self.key)
        self.assertIn(b"KeyError", output)
        self.assertEqual(session.exitStatus, 1)

    @defer.inlineCallbacks
    def test_wrongKeyRefused(self) -> Any:
        """
        When a client offers a key that is not in authorized_keys (and no
        password login is configured), it is refused and no session opens.
        """
        service = self.startAdmin()
        session = _Session(b"len(pools)", b"", b"")
        yield self.assertFailure(self.login(service, session, newKey()), Exception)
        self.assertEqual(session.output, b"")

    @defer.inlineCallbacks
    def test_passwordOnlyWhenConfigured(self) -> Any:
        """
        When password_file is configured, the right password logs in; by
        default passwords are refused.
        """
        service = self.startAdmin()
        session = _Session(b"1 + 1", b"", b"")
        yield self.assertFailure(self.login(service, session, None, b"s3cret", b"ops"), Exception)
        yield service.stopService()
        withPasswords = AdminConfig(
            authorized_keys=self.config.authorized_keys,
            endpoint=self.config.endpoint,
            host_key=self.config.host_key,
            password_file=self.passwordPath,
        )
        service = self.startAdmin(withPasswords)
        session = _Session(b"1 + 1", b"", b"")
        output = yield self.login(service, session, None, b"s3cret", b"ops")
        self.assertEqual(output, b"2\n")


class AdminConfigTests(SynchronousTestCase):
    """
    The C{[admin]} table.
    """

    def test_defaults(self) -> None:
        """
        When [admin] names only authorized_keys, the console listens on
        loopback port 2222, passwords are off, and the host key goes next to
        the configuration file; the keys path is resolved against it.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "proxy.toml")
        with open(path, "w") as f:
            f.write(CONFIG + '\n[admin]\nauthorized_keys = "keys"\n')
        admin = loadConfig(path).admin
        assert admin is not None
        self.assertEqual(admin.endpoint, "tcp:2222:interface=127.0.0.1")
        self.assertEqual(admin.authorized_keys, os.path.join(directory, "keys"))
        self.assertIsNone(admin.password_file)
        self.assertIsNone(admin.host_key)

    def test_missingAuthorizedKeys(self) -> None:
        """
        When [admin] has no authorized_keys, the error names the key.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "proxy.toml")
        with open(path, "w") as f:
            f.write(CONFIG + '\n[admin]\nendpoint = "tcp:2222"\n')
        error = self.assertRaises(ConfigurationError, loadConfig, path)
        self.assertIn("admin: missing required key 'authorized_keys'", str(error))

    def test_authorizedKeysFileMustExist(self) -> None:
        """
        When the authorized_keys file does not exist, building the service
        is a configuration error naming admin.authorized_keys.
        """
        proxy, memoryReactor = makeProxy(self)
        config = AdminConfig(authorized_keys="/nonexistent/keys", host_key=os.path.abspath(self.mktemp()))
        error = self.assertRaises(ConfigurationError, AdminService, memoryReactor, proxy, config, "/x.toml")
        self.assertEqual(error.key, "admin.authorized_keys")
