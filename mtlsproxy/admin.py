# -*- test-case-name: tests.test_admin -*-
"""
The admin console (C{[admin]}): a Python prompt inside the running proxy,
over SSH (Twisted's manhole), for operators.

Logging in takes a key listed in the C{authorized_keys} file (read at every
login, so adding or removing a key needs no restart); passwords only when a
C{password_file} of bcrypt hashes is configured.  The server's host key is
generated at the first start (Ed25519, mode 0600) when the file is missing.

The prompt's namespace (L{makeNamespace}) holds the live proxy and helpers:
C{status()}, C{connections()}, C{drain(pool, member)}, C{enable(pool,
member)}, C{weight(pool, member, n)}, C{close(id)}, C{reload()}, and
C{help()} listing them.  A command given on the C{ssh} command line is
evaluated once and its result printed (C{ssh -p 2222 admin@127.0.0.1
'status()'}), for scripts.

See C{docs/admin.md}.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Optional, Sequence

import bcrypt
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.application.service import Service
from twisted.conch import interfaces as iconch, manhole_ssh
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker, readAuthorizedKeyFile
from twisted.conch.insults import insults
from twisted.conch.manhole import ColoredManhole
from twisted.conch.ssh import keys
from twisted.cred import portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .errors import ConfigurationError

__all__ = [
    "AdminService",
    "AuthorizedKeysFile",
    "BcryptPasswordFile",
    "defaultHostKeyPath",
    "loadOrCreateHostKey",
    "makeNamespace",
]

log = Logger()


# ---------------------------------------------------------------------------
# Credentials
# ---------------------------------------------------------------------------


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """
    The public keys that may log in, from an OpenSSH C{authorized_keys}
    file, read at every login (a small file: adding or revoking a key takes
    effect at once).  Every user name gets the same keys; options before a
    key (C{from=...}) are not supported and make the line unparsable.

    @ivar path: The file.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def getAuthorizedKeys(self, avatarId: bytes) -> list[keys.Key]:
        """
        The keys in the file now; none (and an error logged) if it cannot
        be read.
        """
        try:
            with open(self.path, "rb") as f:
                return list(readAuthorizedKeyFile(f))
        except OSError as e:
            log.error(
                "Admin console: cannot read authorized_keys {path}: {error}",
                path=self.path,
                error=e.strerror or str(e),
            )
            return []


@implementer(ICredentialsChecker)
class BcryptPasswordFile:
    """
    Password logins from a file of C{user:hash} lines, the hash made by
    bcrypt (C{$2b$...}); blank lines and C{#} comments are ignored.  The
    file is read at every attempt and the (deliberately slow) hash is
    checked in the reactor's thread pool, not on the reactor thread.

    @ivar path: The file.
    @ivar reactor: Provides C{getThreadPool} and C{callFromThread}.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, path: str, reactor: Any) -> None:
        self.path = path
        self.reactor = reactor

    def _hashes(self) -> dict[bytes, bytes]:
        hashes: dict[bytes, bytes] = {}
        try:
            with open(self.path, "rb") as f:
                for line in f:
                    line = line.strip()
                    if not line or line.startswith(b"#") or b":" not in line:
                        continue
                    user, _, hashed = line.partition(b":")
                    hashes[user] = hashed
        except OSError as e:
            log.error(
                "Admin console: cannot read password_file {path}: {error}",
                path=self.path,
                error=e.strerror or str(e),
            )
        return hashes

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        """
        The user name if the password matches its hash, else
        L{UnauthorizedLogin}.
        """
        hashed = self._hashes().get(credentials.username)
        if hashed is None:
            return fail(UnauthorizedLogin("unknown user"))
        password = credentials.password

        def check() -> bool:
            try:
                return bcrypt.checkpw(password, hashed)
            except ValueError:
                return False

        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), check)

        def decide(ok: bool) -> bytes:
            if not ok:
                raise UnauthorizedLogin("wrong password")
            return credentials.username  # type: ignore[no-any-return]

        return d.addCallback(decide)


# ---------------------------------------------------------------------------
# Host key
# ---------------------------------------------------------------------------


def defaultHostKeyPath(configPath: str) -> str:
    """
    Where the host key is kept when C{host_key} is not set: next to the
    configuration file.
    """
    return os.path.join(os.path.dirname(os.path.abspath(configPath)), "admin_host_key")


def loadOrCreateHostKey(path: str) -> keys.Key:
    """
    Read the SSH host key at C{path}, or generate an Ed25519 key and write
    it there (OpenSSH format, created with mode 0600) if the file does not
    exist.

    @raise ConfigurationError: If the file exists but is not a private key,
        or cannot be written.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        key = keys.Key(ed25519.Ed25519PrivateKey.generate())
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key.toString("OPENSSH"))
        except OSError as e:
            raise ConfigurationError(
                f"cannot create the admin host key {path}: {e.strerror or e}", key="admin.host_key"
            ) from None
        log.info(
            "Admin console: generated host key {path} ({fingerprint})",
            path=path,
            fingerprint=key.fingerprint(keys.FingerprintFormats.SHA256_BASE64),
        )
        return key
    except OSError as e:
        raise ConfigurationError(
            f"cannot read the admin host key {path}: {e.strerror or e}", key="admin.host_key"
        ) from None
    try:
        key = keys.Key.fromString(data)
    except (keys.BadKeyError, ValueError) as e:
        raise ConfigurationError(
            f"not an SSH private key: {path}: {e}", key="admin.host_key"
        ) from None
    if key.isPublic():
        raise ConfigurationError(f"not an SSH private key: {path}", key="admin.host_key")
    if os.stat(path).st_mode & 0o077:
        log.warn(
            "Admin console: host key {path} is readable by other users; chmod 600 it",
            path=path,
        )
    return key


# ---------------------------------------------------------------------------
# The namespace
# ---------------------------------------------------------------------------


class _Text(str):
    """
    A helper's answer: shown as it is at the prompt, not quoted.
    """

    def __repr__(self) -> str:
        return str(self)


class _Listing(list):  # type: ignore[type-arg]
    """
    A list shown as a table at the prompt; still a list for code.
    """

    def __init__(self, items: Iterable[Any], render: Callable[[list[Any]], str]) -> None:
        super().__init__(items)
        self._render = render

    def __repr__(self) -> str:
        return self._render(list(self))


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _connectionsTable(items: list[Any], now: float) -> str:
    if not items:
        return "no connections"
    rows = [("id", "listener", "peer", "subject", "backend", "phase", "age", "in", "out")]
    for info in items:
        rows.append(
            (
                str(info.id),
                info.listener,
                info.peer,
                info.subject or "-",
                info.backend or "-",
                info.phase,
                _age(now - info.started),
                str(info.bytesIn),
                str(info.bytesOut),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    )


HELP = """\
mtlsproxy admin console: a Python prompt inside the running proxy.

  status()                  listeners, pools, members, connections, expiry
  connections()             live connections (id, peer, client certificate, backend)
  drain(pool, member)       no new connections to member ("host:port"); open ones go on
  enable(pool, member)      put a drained member back into rotation
  weight(pool, member, n)   set a member's weight (0..1000) until restart or reload
  close(id)                 close connection id (flushes, then closes both sides)
  reload()                  reload configuration and certificates, if supported
  proxy, pools, listeners   the live objects (pools["app"].members, ...)

Ctrl-D or exit() leaves the console; the proxy keeps running."""


def makeNamespace(proxy: Any, clock: Any) -> dict[str, Any]:
    """
    The names an admin session starts with.

    @param proxy: The L{mtlsproxy.service.ProxyService}.
    @param clock: Provides C{seconds()}.
    """

    def findMember(pool: str, member: Any) -> Any:
        try:
            thePool = proxy.pools[pool]
        except KeyError:
            raise KeyError(f"no pool {pool!r}; pools: {', '.join(proxy.pools)}") from None
        for candidate in thePool.members:
            if candidate is member or candidate.hostPort == member:
                return candidate
        if isinstance(member, int):
            matches = [m for m in thePool.members if m.port == member]
            if len(matches) == 1:
                return matches[0]
        raise KeyError(
            f"pool {pool!r} has no member {member!r}; members: "
            + ", ".join(m.hostPort for m in thePool.members)
        )

    def status() -> _Text:
        """The proxy's state, as a text report."""
        from .status import proxyStatus

        data = proxyStatus(proxy, clock)
        lines = [
            f"mtlsproxy {data['version']}, {data['state']},"
            f" {'ready' if data['ready'] else 'NOT READY: ' + '; '.join(data['problems'])}"
        ]
        for listener in data["listeners"]:
            lines.append(
                f"listener {listener['name']} ({listener['protocol']})"
                f" {listener['address'] or 'not listening'} -> pool {listener['pool']},"
                f" {listener['active_connections']} connection(s)"
            )
        for pool in data["pools"]:
            lines.append(f"pool {pool['name']} ({pool['selector']})")
            for m in pool["members"]:
                state = "healthy" if m["healthy"] else "UNHEALTHY"
                if m["draining"]:
                    state += ", draining"
                if m["ejected"]:
                    state += ", ejected"
                check = m["last_check"]
                lines.append(
                    f"  {m['member']}  weight {m['weight']}  {state}"
                    f"  active {m['active_connections']}  total {m['total_connections']}"
                    + (f"  last check: {check['reason']}" if check else "")
                    + ("  (inconclusive)" if check and check.get("inconclusive") else "")
                )
        for entry in data["certificates"] + data["crls"]:
            days = None if entry["seconds_left"] is None else entry["seconds_left"] / 86400
            left = "no nextUpdate" if days is None else f"{days:.1f} days left"
            owner = (
                f"pool {entry['pool']}" if entry.get("pool") else f"listener {entry['listener']}"
            )
            lines.append(f"{entry['kind']} {entry['subject']} ({owner}): {entry['expires']}, {left}")
        return _Text("\n".join(lines))

    def connections() -> _Listing:
        """The live connections, oldest first."""
        now = clock.seconds()
        return _Listing(proxy.connections.snapshot(), lambda items: _connectionsTable(items, now))

    def drain(pool: str, member: Any) -> _Text:
        """Take a member out of rotation; its connections go on."""
        found = findMember(pool, member)
        found.drain()
        return _Text(
            f"pool {pool} member {found.hostPort} draining"
            f" ({found.activeConnections} connection(s) open)"
        )

    def enable(pool: str, member: Any) -> _Text:
        """Put a drained member back into rotation."""
        found = findMember(pool, member)
        found.enable()
        return _Text(f"pool {pool} member {found.hostPort} enabled")

    def weight(pool: str, member: Any, n: int) -> _Text:
        """Set a member's weight until restart or reload."""
        found = findMember(pool, member)
        found.setWeight(n)
        return _Text(f"pool {pool} member {found.hostPort} weight {found.weight}")

    def close(connectionId: int) -> _Text:
        """Close a connection (flushing pending data)."""
        from .relay import CloseReason

        connection = proxy.connections.get(connectionId)
        if connection is None:
            return _Text(f"no connection {connectionId}")
        info = connection.describe()
        connection.closeNow(CloseReason.OPERATOR)
        return _Text(f"closing connection {connectionId} ({info.peer} on {info.listener})")

    def reload() -> Any:
        """Reload configuration and certificates, if this proxy can."""
        reloader = getattr(proxy, "reloader", None)
        if reloader is None or not callable(getattr(reloader, "reload", None)):
            return _Text("reload is not available in this version of mtlsproxy")
        result = reloader.reload()
        if isinstance(result, Deferred):
            return result
        return _Text(str(result))

    def help(*args: Any) -> _Text:
        """This text (Python's interactive help would block the proxy)."""
        return _Text(HELP)

    return {
        "proxy": proxy,
        "listeners": proxy.listeners,
        "pools": proxy.pools,
        "status": status,
        "connections": connections,
        "drain": drain,
        "enable": enable,
        "weight": weight,
        "close": close,
        "reload": reload,
        "help": help,
    }


# ---------------------------------------------------------------------------
# SSH
# ---------------------------------------------------------------------------


class _AdminManhole(ColoredManhole):
    """
    The interactive prompt: Twisted's manhole, with C{exit()} leaving the
    session (rather than the process).
    """

    _greeted = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.interpreter.locals["exit"] = self.interpreter.locals["quit"] = self._exit

    def terminalSize(self, width: int, height: int) -> None:
        """
        The session started (or the window changed): clear the screen, greet
        once, draw the prompt.
        """
        self.terminal.eraseDisplay()
        self.terminal.cursorHome()
        self.width = width
        self.height = height
        if not self._greeted:
            self._greeted = True
            self.terminal.write(b"mtlsproxy admin console; help() lists the commands.\n")
        self.drawInputLine()

    def _exit(self, *args: Any) -> _Text:
        self.terminal.loseConnection()
        return _Text("bye")


class _AdminSession(manhole_ssh.TerminalSession):
    """
    A session: an interactive prompt (with or without a pty), or one
    command evaluated (C{ssh host 'status()'}).
    """

    width = 80
    height = 24
    namespaceFactory: Callable[[], dict[str, Any]]

    def windowChanged(self, newWindowSize: Sequence[int]) -> None:
        """
        The client's terminal was resized; nothing to redraw.
        """
        self.height, self.width = newWindowSize[:2]

    def eofReceived(self) -> None:
        """
        The client closed its input: nothing more will be typed.
        """

    def execCommand(self, proto: Any, command: bytes) -> None:
        """
        Evaluate C{command} (an expression, or statements), write the
        result's text and end with exit status 0, or 1 after an exception.
        """
        namespace = self.namespaceFactory()
        text = command.decode("utf-8", "replace")

        def evaluate() -> Any:
            try:
                code = compile(text, "<ssh>", "eval")
            except SyntaxError:
                exec(compile(text, "<ssh>", "exec"), namespace)
                return None
            return eval(code, namespace)

        def written(value: Any) -> None:
            if value is not None:
                # repr() as at the prompt (the helpers' answers show as text).
                proto.write(repr(value).encode("utf-8") + b"\n")
            proto.processEnded(Failure(ProcessDone(0)))

        def failed(failure: Failure) -> None:
            proto.write(
                f"{failure.type.__name__}: {failure.getErrorMessage()}\n".encode("utf-8")
            )
            proto.processEnded(Failure(ProcessTerminated(exitCode=1)))

        user = getattr(self.original.getComponent(iconch.IConchUser), "avatarId", b"")
        log.info(
            "Admin console: {user} runs {command!r}",
            user=user.decode("utf-8", "replace") if isinstance(user, bytes) else user,
            command=text,
        )
        maybeDeferred(evaluate).addCallbacks(written, failed)


class _AdminUser(manhole_ssh.TerminalUser):
    def __init__(self, original: Any, avatarId: bytes) -> None:
        super().__init__(original, avatarId)
        self.avatarId = avatarId


@implementer(portal.IRealm)
class AdminRealm(manhole_ssh.TerminalRealm):
    """
    Gives every logged-in user the admin prompt over a fresh copy of the
    namespace.
    """

    userFactory = _AdminUser
    sessionFactory = _AdminSession

    def __init__(self, namespaceFactory: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self.namespaceFactory = namespaceFactory
        self.chainedProtocolFactory = self._newTerminal  # type: ignore[assignment]

    def _newTerminal(self) -> insults.ServerProtocol:
        """
        The terminal of a new interactive session, over a fresh namespace.
        """
        return insults.ServerProtocol(_AdminManhole, self.namespaceFactory())

    def _getAvatar(self, avatarId: bytes) -> Any:
        user = super()._getAvatar(avatarId)
        sessionObject = user.original.getComponent(iconch.ISession)
        sessionObject.namespaceFactory = self.namespaceFactory
        return user

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        log.info(
            "Admin console: {user} logged in",
            user=avatarId.decode("utf-8", "replace") if isinstance(avatarId, bytes) else avatarId,
        )
        return super().requestAvatar(avatarId, mind, *interfaces)


class _AdminFactory(manhole_ssh.ConchFactory):
    """
    The SSH server factory, with its own host key (Twisted's
    C{ConchFactory} keeps keys in class attributes).
    """

    noisy = False

    def __init__(self, sshPortal: portal.Portal, hostKey: keys.Key) -> None:
        super().__init__(sshPortal)
        name = hostKey.sshType()
        # (Twisted annotates these as bytes; they hold Key objects.)
        self.publicKeys = {name: hostKey.public()}  # type: ignore[dict-item]
        self.privateKeys = {name: hostKey}  # type: ignore[dict-item]


class AdminService(Service):
    """
    Serves the admin console on the configured endpoint.

    @ivar port: The listening port once listening, else L{None}.
    @ivar hostKey: The server's host key (read or generated when the service
        is built, so that a bad key file is a configuration error).
    """

    log = Logger()

    def __init__(self, reactor: Any, proxy: Any, adminConfig: Any, configPath: str) -> None:
        self.setName("admin")
        self._reactor = reactor
        self.proxy = proxy
        self.config = adminConfig
        self.hostKeyPath = adminConfig.host_key or defaultHostKeyPath(configPath)
        self.port: Optional[IListeningPort] = None
        if not os.path.isfile(adminConfig.authorized_keys):
            raise ConfigurationError(
                f"file not found: {adminConfig.authorized_keys}", key="admin.authorized_keys"
            )
        # At construction, so that a bad key file is a configuration error.
        self.hostKey = loadOrCreateHostKey(self.hostKeyPath)
        checkers: list[Any] = [SSHPublicKeyChecker(AuthorizedKeysFile(adminConfig.authorized_keys))]
        if adminConfig.password_file is not None:
            checkers.append(BcryptPasswordFile(adminConfig.password_file, reactor))
        self.portal = portal.Portal(
            AdminRealm(lambda: makeNamespace(self.proxy, self._reactor)), checkers
        )

    def startService(self) -> None:
        Service.startService(self)
        factory = _AdminFactory(self.portal, self.hostKey)
        endpoint = serverFromString(self._reactor, self.config.endpoint)
        endpoint.listen(factory).addCallbacks(self._listened, self._failed)

    def _listened(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        host = getattr(address, "host", None)
        self.log.info(
            "Admin console (ssh) listening on {address}, host key {fingerprint}",
            address=str(address) if host is None else f"{host}:{getattr(address, 'port', '')}",
            fingerprint=self.hostKey.fingerprint(keys.FingerprintFormats.SHA256_BASE64),
        )

    def _failed(self, failure: Failure) -> None:
        self.log.failure(
            "Admin console could not listen on {endpoint}", failure, endpoint=self.config.endpoint
        )
        if self._reactor.running:
            self._reactor.stop()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        return port.stopListening() or succeed(None)  # type: ignore[return-value]
