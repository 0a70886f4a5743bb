# -*- test-case-name: tests.test_reload,tests.test_integration_reload -*-
"""
Hot reload: new certificates, keys, CAs, CRLs, pool members and health
checks without dropping a connection.

A L{Reloader} belongs to the running L{mtlsproxy.service.ProxyService}.
It reloads on C{SIGHUP}, when the admin console's C{reload()} calls
L{Reloader.reload}, and when the content of a watched file changes: every
C{reload_poll_interval} seconds it hashes the configuration file and every
certificate, key, PKCS#12, password, CA and CRL file a TLS listener or a
pool's C{[pools.tls]} names, opening each path afresh, so that the atomic
C{..data} symlink swap of a Kubernetes secret volume is seen like any other
change.

A reload is all or nothing up to the point of applying it:

  1. the configuration file is read and checked exactly like at start-up
     (L{mtlsproxy.config.loadConfig}, L{mtlsproxy.checks.checkConfiguration});
  2. new TLS contexts are built for every TLS listener, and a new
     L{mtlsproxy.backendtls.BackendTLS} for every pool whose C{[pools.tls]}
     material or settings changed (contexts freeze once used, so they are
     never changed, only replaced), and a new health checker for every
     pool whose C{[pools.health_check]} changed or that is new with one;
  3. only if all of that worked: each listener's
     L{mtlsproxy.tlscontext.SwappableContextFactory} gets its new factory
     (new handshakes use the new material; established connections keep
     theirs), each such pool's L{mtlsproxy.backendtls.SwappableBackendTLS}
     its new L{BackendTLS<mtlsproxy.backendtls.BackendTLS>} (new backend
     connections and health checks use it; established ones keep theirs),
     pools get their new members and weights in place, a pool whose health
     checks changed gets a new L{mtlsproxy.health.HealthMonitor} in place
     of its old one (members keep their health; a pool whose checks were
     removed has every member made healthy), relay settings are
     updated, and established connections whose client certificate chain a
     new CRL revokes are closed (the listener's
     C{close_revoked_connections}), as are those relayed over TLS to a
     member whose certificate chain a pool's new CRL revokes (the pool's
     C{[pools.tls]} C{close_revoked_connections}).  Under the same
     settings, when a listener's (or an SNI site's) CA certificates or a
     pool's C{[pools.tls]} CAs changed, established connections whose
     chain the new CAs no longer verify are closed too (withdrawn trust,
     L{mtlsproxy.trust.closeUntrustedConnections}).

A broken file (bad PEM, a key that does not match, a CRL from an unknown
issuer or with a bad signature, a file that vanished) stops at step 1 or 2:
the running material stays in service and the error, naming the file and
the key path, is logged.  Changes that a running process cannot take (a
listener's endpoint or protocol, a new or removed listener, the admin
console, ...) are logged as needing a restart; everything else is applied.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Optional

import attrs
from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .backendtls import BackendTLS, BackendTLSMaterial, SwappableBackendTLS
from .errors import ConfigurationError
from .expiry import ExpiryItem, ExpiryMonitor
from .material import ListenerMaterial
from .revocation import (
    closeRevokedBackendConnections,
    closeRevokedConnections,
    closeRevokedIdleBackends,
)
from .trust import (
    ListenerTrust,
    TrustStore,
    closeUntrustedBackendConnections,
    closeUntrustedConnections,
    closeUntrustedIdleBackends,
    listenerTrustSets,
    trustSet,
)

__all__ = [
    "ABORT_REVOKED_AFTER",
    "HEALTH_CHECKS_REMOVED_FORMAT",
    "RELOAD_FAILED_FORMAT",
    "RELOADED_FORMAT",
    "RESTART_NEEDED_FORMAT",
    "ReloadResult",
    "Reloader",
    "watchedFiles",
]

RELOADED_FORMAT = (
    "Reloaded {path} ({trigger}): {applied} change(s) applied ({summary}), {restart} need a"
    " restart, {revoked} revoked connection(s) closed, {untrusted} no longer trusted"
    " connection(s) closed"
)
"""
The C{log_format} (level C{info}) of a reload that was applied.  Fields:
C{path}, C{trigger} (C{"SIGHUP"}, C{"file change"}, C{"admin"}, ...),
C{changes} (what was applied, one text each), C{summary} (the same joined
with C{"; "}), C{applied} (their number),
C{restartNeeded} (see L{RESTART_NEEDED_FORMAT}) and C{restart} (their
number), C{revoked} (connections closed because a new CRL revokes their
chain), C{untrusted} (connections closed because the new CA certificates no
longer verify their chain).
"""

RELOAD_FAILED_FORMAT = (
    "Reload of {path} ({trigger}) failed; the running configuration stays in service: {error}"
)
"""
The C{log_format} (level C{error}) of a reload that was not applied.
Fields: C{path}, C{trigger}, C{error} (one line naming the configuration
file, the key path and the file at fault), C{file} and C{key} (those parts
of a L{ConfigurationError}, or L{None}).
"""

HEALTH_CHECKS_REMOVED_FORMAT = (
    "Pool {pool}: health checks removed by a reload; {count} member(s) made healthy"
)
"""
The C{log_format} (level C{info}) when a reload takes a pool's
C{[pools.health_check]} away: with no active checks nothing could ever mark
a member healthy again, so every member is healthy from now on (passive
ejection still applies).  Fields: C{pool}, C{count} (the members that were
unhealthy), C{members} (those, as C{address:port}).
"""

RESTART_NEEDED_FORMAT = "Reload of {path}: {change}; this needs a restart"
"""
The C{log_format} (level C{warn}) of each change a reload cannot apply.
Fields: C{path}, C{change}.
"""

ABORT_REVOKED_AFTER = 5.0
"""
Seconds a connection closed for revocation (or withdrawn trust) gets to
flush before it is aborted.
"""

_LATE_SWEEP = 1.0
"""
Seconds added to a listener's handshake timeout before the connections
that were still handshaking at the reload (verified against the old CRLs)
are checked against the new ones.
"""

_APPLIED_LISTENER_FIELDS = frozenset(
    {
        "name",
        "pool",
        "client_auth",
        "ca_certificates",
        "crls",
        "certificates",
        "crl_missing",
        "crl_expired",
        "strict_sni",
        "tls_policy",
        "min_version",
        "max_version",
        "ciphers",
        "ciphersuites",
        "groups",
        "session_tickets",
        "alpn",
        "close_revoked_connections",
        "handshake_timeout",
        "idle_timeout",
        "max_connections",
    }
)
"""
The listener settings a reload applies (the TLS ones through the new
contexts); any other one that changes needs a restart.
"""

_APPLIED_POOL_FIELDS = frozenset(
    {
        "name",
        "selector",
        "members",
        "connect_timeout",
        "max_connect_attempts",
        "all_unhealthy",
        "eject_after",
        "eject_backoff",
        "eject_backoff_max",
        "tls",
        "health_check",
    }
)
"""
The pool settings a reload applies (C{tls} through a new
L{BackendTLS<mtlsproxy.backendtls.BackendTLS>}, unless the pool gains or
loses the table; C{health_check} through a new
L{HealthMonitor<mtlsproxy.health.HealthMonitor>}); any other one that
changes needs a restart.
"""

_SWEEP_ONLY_TLS_FIELDS = frozenset({"close_revoked_connections"})
"""
The C{[pools.tls]} settings that need no new
L{BackendTLS<mtlsproxy.backendtls.BackendTLS>}: they only decide what a
reload does to established connections.
"""

_APPLIED_TOP_FIELDS = frozenset(
    {"path", "listeners", "pools", "drain_timeout", "reload_poll_interval", "expiry_warning_days"}
)
"""
The top-level settings a reload applies.
"""


def watchedFiles(config: Any) -> list[str]:
    """
    The files whose content a reload depends on: the configuration file,
    every certificate, key, PKCS#12, password, CA and CRL file of the TLS
    listeners, and the CA, CRL, certificate and key files of each pool's
    C{[pools.tls]}, each once, in a stable order.
    """
    paths: list[str] = [config.path]
    for listener in config.listeners:
        if listener.protocol == "tcp":
            continue
        paths.extend(listener.ca_certificates)
        paths.extend(listener.crls)
        for entry in listener.certificates:
            for name in ("cert", "key", "pkcs12", "password_file"):
                value = getattr(entry, name, None)
                if value is not None:
                    paths.append(value)
            paths.extend(getattr(entry, "ca_certificates", None) or ())
            paths.extend(getattr(entry, "crls", None) or ())
    for pool in config.pools:
        tls = getattr(pool, "tls", None)
        if tls is not None:
            paths.extend(_backendTLSFiles(tls))
    return list(dict.fromkeys(paths))


def _backendTLSFiles(tls: Any) -> list[str]:
    """
    The files of a pool's C{[pools.tls]}: CAs, CRLs, certificate, key.
    """
    paths = [*tls.ca_certificates, *tls.crls]
    paths.extend(path for path in (tls.cert, tls.key) if path is not None)
    return paths


def _fingerprint(path: str) -> Optional[str]:
    """
    The SHA-256 of a file's content, reading it through the path as it
    resolves now (symbolic links followed afresh), or L{None} if it cannot
    be read.
    """
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


@attrs.frozen
class ReloadResult:
    """
    What a reload did.

    @ivar ok: Whether it was applied.
    @ivar error: Why not (one line), or L{None}.
    @ivar changes: What was applied.
    @ivar restartNeeded: What needs a restart.
    @ivar revoked: How many established connections were closed because a
        new CRL revokes their client's certificate chain or, for a pool
        with C{[pools.tls]}, their member's (idle backend connections of
        C{https} listeners included).
    @ivar untrusted: How many established connections were closed because
        the new CA certificates of their listener (or pool) no longer
        verify their client's (or member's) chain, idle ones included.
    """

    ok: bool
    error: Optional[str] = None
    changes: tuple[str, ...] = ()
    restartNeeded: tuple[str, ...] = ()
    revoked: int = 0
    untrusted: int = 0

    def __str__(self) -> str:
        if not self.ok:
            return f"reload failed, running configuration kept: {self.error}"
        lines = [f"reloaded: {len(self.changes)} change(s) applied"]
        lines += [f"  applied: {change}" for change in self.changes]
        lines += [f"  needs a restart: {change}" for change in self.restartNeeded]
        if self.revoked:
            lines.append(f"  closed {self.revoked} connection(s) with revoked certificates")
        if self.untrusted:
            lines.append(
                f"  closed {self.untrusted} connection(s) whose certificate chain is no longer trusted"
            )
        return "\n".join(lines)


class Reloader(Service):
    """
    Reloads a running proxy's configuration and material; see the module
    docstring.

    @ivar reactor: Provides C{callLater}, C{callFromThread} and C{seconds}.
    @ivar configPath: The configuration file.
    @ivar proxy: The running L{mtlsproxy.service.ProxyService}: its
        C{loaded}, C{listeners}, C{pools}, C{contextFactories},
        C{backendTLS}, C{healthMonitors} (through C{newHealthChecker},
        C{startHealthMonitor} and C{stopHealthMonitor}), C{healthShare}
        and C{connections} are what a reload reads and updates.
    @ivar inForce: The TLS material each listener serves now, by name.
    @ivar backendsInForce: The C{[pools.tls]} material each pool's
        backend connections use now, by pool name.
    @ivar expiry: Logs expiring certificates and CRLs of L{inForce}.
    @ivar pollInterval: C{reload_poll_interval}; 0 for no polling.
    @ivar reloads: How many reloads were applied.
    @ivar lastResult: The last reload's L{ReloadResult}, or L{None}.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        configPath: str,
        proxy: Any,
        now: Optional[Callable[[], datetime]] = None,
    ) -> None:
        """
        @param now: The current time for the checks and expiry reports;
            default the system clock.
        """
        self.reactor = reactor
        self.configPath = os.path.abspath(configPath)
        self.proxy = proxy
        self.now = now if now is not None else (lambda: datetime.now(timezone.utc))
        self.setName("reloader")
        config = proxy.loaded.config
        self.inForce: dict[str, ListenerMaterial] = dict(proxy.loaded.listeners)
        self.backendsInForce: dict[str, BackendTLSMaterial] = dict(
            getattr(proxy.loaded, "backends", {})
        )
        self.pollInterval = float(getattr(config, "reload_poll_interval", 5.0))
        self.expiry = ExpiryMonitor(
            reactor,
            self._materials,
            int(getattr(config, "expiry_warning_days", 30)),
            self.now,
            backends=lambda: self.backendsInForce,
        )
        self.reloads = 0
        self.lastResult: Optional[ReloadResult] = None
        self._watched = watchedFiles(config)
        self._fingerprints = {path: _fingerprint(path) for path in self._watched}
        self._poller: Optional[LoopingCall] = None
        self._timers: list[IDelayedCall] = []
        self._previousHandler: Any = None
        self._signalInstalled = False

    # -- service ----------------------------------------------------------

    def startService(self) -> None:
        """
        Install the C{SIGHUP} handler (only possible in the main thread),
        start polling and the daily expiry check (which checks now).
        """
        Service.startService(self)
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP"):
            self._previousHandler = signal.signal(signal.SIGHUP, self._onSIGHUP)
            self._signalInstalled = True
        self._startPolling()
        self.expiry.start()

    def stopService(self) -> None:
        """
        Restore the previous C{SIGHUP} handler, stop polling, the expiry
        check and pending timers.
        """
        Service.stopService(self)
        if self._signalInstalled:
            signal.signal(signal.SIGHUP, self._previousHandler or signal.SIG_DFL)
            self._signalInstalled = False
        self._stopPolling()
        self.expiry.stop()
        timers, self._timers = self._timers, []
        for timer in timers:
            if timer.active():
                timer.cancel()

    def _onSIGHUP(self, signum: int, frame: Any) -> None:
        """
        The signal handler: reload from the reactor thread.
        """
        self.reactor.callFromThread(self.reload, "SIGHUP")

    def _startPolling(self) -> None:
        """
        Poll every L{pollInterval} seconds, if that is above 0.
        """
        self._stopPolling()
        if self.pollInterval > 0 and self.running:
            poller = LoopingCall(self.poll)
            poller.clock = self.reactor
            poller.start(self.pollInterval, now=False).addErrback(
                lambda f: self.log.failure("Polling for changed files failed", f)
            )
            self._poller = poller

    def _stopPolling(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None and poller.running:
            poller.stop()

    # -- public -------------------------------------------------------------

    def poll(self) -> Optional[ReloadResult]:
        """
        Reload if the content of a watched file changed (or one appeared or
        vanished) since the last look.

        @return: The reload's result, or L{None} if nothing changed.
        """
        current = {path: _fingerprint(path) for path in self._watched}
        if current == self._fingerprints:
            return None
        changed = sorted(p for p in current if current[p] != self._fingerprints.get(p))
        # Remember what was seen, so a broken file is reported once, not on
        # every poll; the next change to it reloads again.
        self._fingerprints = current
        self.log.info("Changed: {files}; reloading", files=changed)
        return self.reload("file change")

    def expiryReport(self) -> list[ExpiryItem]:
        """
        The certificates and CRLs in force, soonest to expire first: a list
        of L{ExpiryItem} (C{listener}, C{kind}, C{file}, C{subject},
        C{serial}, C{not_after}, C{seconds_left}, C{pool}; C{asDict()} for
        JSON), the listeners' and the pools' C{[pools.tls]}.
        """
        return self.expiry.report()

    def reload(self, trigger: str = "admin") -> ReloadResult:
        """
        Re-read the configuration file and everything it names, and apply
        it if it is sound; see the module docstring.  Never raises.

        @param trigger: What asked for it, for the log.
        """
        try:
            result = self._reload(trigger)
        except Exception as e:
            self.log.failure("Reload of {path} ({trigger}) failed", path=self.configPath, trigger=trigger)
            result = ReloadResult(ok=False, error=f"internal error: {e!r}")
        self.lastResult = result
        return result

    # -- the reload -----------------------------------------------------------

    def _fail(self, trigger: str, error: str, file: Optional[str] = None, key: Optional[str] = None) -> ReloadResult:
        self.log.error(
            RELOAD_FAILED_FORMAT,
            path=self.configPath,
            trigger=trigger,
            error=error,
            file=file,
            key=key,
        )
        return ReloadResult(ok=False, error=error)

    def _reload(self, trigger: str) -> ReloadResult:
        from .checks import checkConfiguration
        from .config import loadConfig
        from .tlscontext import serverContextFactory

        try:
            config = loadConfig(self.configPath)
        except ConfigurationError as e:
            self._watch(self._watched)
            return self._fail(trigger, str(e), e.path, e.key)
        # Fingerprint before the files are read, so that a change made while
        # they are read is seen by the next poll; watch the new files too
        # (one that is missing now may appear).
        self._watch(list(dict.fromkeys(self._watched + watchedFiles(config))))
        try:
            loaded = checkConfiguration(config, self.now())
        except ConfigurationError as e:
            return self._fail(trigger, str(e), e.path, e.key)
        factories: dict[str, Any] = {}
        swappable = getattr(self.proxy, "contextFactories", {})
        for index, listener in enumerate(config.listeners):
            if listener.name not in swappable or listener.name not in loaded.listeners:
                continue
            running = self.proxy.listeners[listener.name].listenerConfig
            if running.protocol != listener.protocol:
                continue
            try:
                factories[listener.name] = serverContextFactory(
                    listener, loaded.listeners[listener.name], clock=self.reactor
                )
            except (ValueError, SSL.Error) as e:
                return self._fail(trigger, f"{config.path}: listeners[{index}]: {e}", config.path)
        backends: dict[str, tuple[BackendTLS, list[str]]] = {}
        for index, poolConfig in enumerate(config.pools):
            changed = self._backendTLSChanges(poolConfig, loaded)
            if not changed:
                continue
            where = f"pools[{index}].tls"
            assert poolConfig.tls is not None
            try:
                built = BackendTLS.fromConfig(
                    poolConfig.name, poolConfig.tls, loaded.backends[poolConfig.name]
                )
            except (ValueError, SSL.Error) as e:
                files = ", ".join(_backendTLSFiles(poolConfig.tls))
                return self._fail(
                    trigger,
                    f"{config.path}: {where}: pool {poolConfig.name!r}: cannot build the TLS"
                    f" context from {files}: {e}",
                    config.path,
                    where,
                )
            backends[poolConfig.name] = (built, changed)
        try:
            health, holders = self._prepareHealthChecks(config, backends)
        except ConfigurationError as e:
            return self._fail(trigger, str(e), e.path, e.key)
        return self._apply(trigger, loaded, factories, backends, health, holders)

    def _prepareHealthChecks(
        self, config: Any, backends: dict[str, tuple[BackendTLS, list[str]]]
    ) -> tuple[list[_HealthChange], dict[str, SwappableBackendTLS]]:
        """
        Find the pools whose C{[pools.health_check]} a reload changes (the
        parsed settings compared with those running; a new pool with the
        table too) and build their new checkers, before anything is
        applied.  Every process builds them, a worker that follows worker
        0's verdicts too (and throws them away), so that all workers accept
        or refuse the same reload.

        @return: The changes, and the backend TLS holders made for new pools
            with C{[pools.tls]} (their checkers connect through them; the
            reload installs them).

        @raise ConfigurationError: Naming the file, the key path
            (C{pools[1].health_check.path}), the pool and the problem, if a
            checker plugin is missing or refuses its options.
        """
        running = {p.name: p for p in self.proxy.loaded.config.pools}
        holders: dict[str, Any] = getattr(self.proxy, "backendTLS", {})
        made: dict[str, SwappableBackendTLS] = {}
        plan: list[_HealthChange] = []
        for index, poolConfig in enumerate(config.pools):
            name = poolConfig.name
            wanted = getattr(poolConfig, "health_check", None)
            newPool = name not in self.proxy.pools
            before = running.get(name)
            was = None if newPool or before is None else getattr(before, "health_check", None)
            if was == wanted:
                continue
            checker = None
            if wanted is not None:
                tls = holders.get(name)
                if tls is None and newPool and name in backends:
                    tls = made[name] = SwappableBackendTLS(backends[name][0])
                try:
                    checker = self.proxy.newHealthChecker(index, poolConfig, tls)
                except ConfigurationError as e:
                    raise ConfigurationError(
                        f"pool {name!r}: {e.problem}", config.path, e.key or f"pools[{index}].health_check"
                    ) from None
            plan.append(_HealthChange(name, was, wanted, checker, newPool))
        return plan, made

    def _backendTLSChanges(self, poolConfig: Any, loaded: Any) -> list[str]:
        """
        What changed in a pool's C{[pools.tls]} (settings and the content of
        its files) against what its connections use now: empty when there
        is nothing to swap, or when the pool gains or loses the table (that
        needs a restart, see L{_applyBackendTLS}).
        """
        tls = getattr(poolConfig, "tls", None)
        if tls is None:
            return []
        name = poolConfig.name
        holder = getattr(self.proxy, "backendTLS", {}).get(name)
        if holder is None:
            # A new pool gets its backend TLS; a running plain TCP pool
            # keeps connecting without until a restart.
            return [] if name in self.proxy.pools else ["new pool"]
        running = next((p.tls for p in self.proxy.loaded.config.pools if p.name == name), None)
        changed = [
            field.name
            for field in attrs.fields(type(tls))
            if field.name not in _SWEEP_ONLY_TLS_FIELDS
            and (running is None or getattr(running, field.name) != getattr(tls, field.name))
        ]
        inForce = self.backendsInForce.get(name)
        new = loaded.backends[name]
        changed += new.differences(inForce) if inForce is not None else ["material"]
        return list(dict.fromkeys(changed))

    def _apply(
        self,
        trigger: str,
        loaded: Any,
        factories: dict[str, Any],
        backends: Optional[dict[str, tuple[BackendTLS, list[str]]]] = None,
        health: Iterable[_HealthChange] = (),
        holders: Optional[dict[str, SwappableBackendTLS]] = None,
    ) -> ReloadResult:
        """
        Put a checked configuration, its new listener contexts, its new
        backend TLS settings and its new health checkers in service.
        """
        changes: list[str] = []
        restart: list[str] = []
        old = self.proxy.loaded.config
        new = loaded.config
        for warning in loaded.warnings:
            # ("warning" as a field name would look like a Python warning
            # to legacy log observers.)
            self.log.warn("Configuration warning: {text}", text=warning)
        _compareFields(old, new, _APPLIED_TOP_FIELDS, "", restart)
        backendsBefore = dict(self.backendsInForce)
        self._applyBackendTLS(new, loaded, backends or {}, changes, restart, holders or {})
        self._applyPools(old, new, changes, restart)
        self._applyHealthChecks(health, changes)
        revoked, untrusted = self._applyListeners(new, loaded, factories, changes, restart)
        poolsRevoked, poolsUntrusted = self._sweepPools(new, backendsBefore)
        revoked += poolsRevoked
        untrusted += poolsUntrusted
        if getattr(new, "drain_timeout", None) != getattr(old, "drain_timeout", None):
            drainer = getattr(self.proxy, "drainer", None)
            if drainer is not None:
                drainer.timeout = new.drain_timeout
                changes.append(f"drain_timeout = {new.drain_timeout}")
        self.expiry.warningDays = int(getattr(new, "expiry_warning_days", 30))
        interval = float(getattr(new, "reload_poll_interval", 5.0))
        if interval != self.pollInterval:
            self.pollInterval = interval
            self._startPolling()
            changes.append(f"reload_poll_interval = {interval}")
        self.proxy.loaded = attrs.evolve(
            loaded, listeners=dict(self.inForce), backends=dict(self.backendsInForce)
        )
        # Keep the fingerprints taken before the files were read.
        self._watched = watchedFiles(new)
        self._fingerprints = {p: self._fingerprints.get(p) for p in self._watched}
        self.reloads += 1
        for change in restart:
            self.log.warn(RESTART_NEEDED_FORMAT, path=self.configPath, change=change)
        self.log.info(
            RELOADED_FORMAT,
            path=self.configPath,
            trigger=trigger,
            changes=changes,
            summary="; ".join(changes) or "nothing changed",
            applied=len(changes),
            restartNeeded=restart,
            restart=len(restart),
            revoked=revoked,
            untrusted=untrusted,
        )
        self.expiry.check()
        return ReloadResult(
            ok=True,
            changes=tuple(changes),
            restartNeeded=tuple(restart),
            revoked=revoked,
            untrusted=untrusted,
        )

    def _applyBackendTLS(
        self,
        new: Any,
        loaded: Any,
        backends: dict[str, tuple[BackendTLS, list[str]]],
        changes: list[str],
        restart: list[str],
        made: Optional[dict[str, SwappableBackendTLS]] = None,
    ) -> None:
        """
        Put each pool's new backend TLS settings in service: the pool's
        L{SwappableBackendTLS} (what the relay, the routers and the health
        checkers hold) gets them in one assignment, so new connections and
        checks use them and established connections keep theirs.  A new
        pool gets one (from C{made}, the holders its new health checker was
        built with, if there).  A running pool that gains or loses
        C{[pools.tls]} needs a restart.
        """
        holders: dict[str, Any] = getattr(self.proxy, "backendTLS", {})
        wanted = {p.name for p in new.pools}
        for poolConfig in new.pools:
            name = poolConfig.name
            holder = holders.get(name)
            if name in backends:
                tls, changed = backends[name]
                if holder is None:
                    holder = (made or {}).get(name)
                    if holder is None or holder.current is not tls:
                        holder = SwappableBackendTLS(tls)
                    holders[name] = holder
                    changes.append(f"pool {name!r}: backend TLS")
                else:
                    holder.current = tls
                    changes.append(f"pool {name!r}: new backend TLS ({', '.join(changed)})")
                self.backendsInForce[name] = loaded.backends[name]
            elif name in self.proxy.pools and (holder is None) != (poolConfig.tls is None):
                change = "added" if holder is None else "removed"
                restart.append(f"pool {name!r}: [pools.tls] {change}")
        for name in list(self.backendsInForce):
            if name not in wanted:
                del self.backendsInForce[name]

    def _applyPools(self, old: Any, new: Any, changes: list[str], restart: list[str]) -> None:
        """
        Bring the run-time pools in line with C{new}: members added,
        removed and re-weighted in place, selector and ejection settings;
        new pools created, pools no longer configured removed.
        """
        from .plugins import selectorFactory
        from .pool import Pool

        pools = self.proxy.pools
        oldPools = {p.name: p for p in old.pools}
        for index, poolConfig in enumerate(new.pools):
            pool = pools.get(poolConfig.name)
            if pool is None:
                pools[poolConfig.name] = Pool.fromConfig(
                    poolConfig,
                    selectorFactory(poolConfig.selector).newSelector(),
                    clock=self.reactor,
                )
                changes.append(f"new pool {poolConfig.name!r}")
                continue
            before = oldPools.get(poolConfig.name)
            if before is not None:
                _compareFields(
                    before, poolConfig, _APPLIED_POOL_FIELDS, f"pool {poolConfig.name!r}", restart
                )
            _updateMembers(pool, poolConfig, changes)
            if before is None or before.selector != poolConfig.selector:
                pool.selector = selectorFactory(poolConfig.selector).newSelector()
                changes.append(f"pool {poolConfig.name!r}: selector {poolConfig.selector!r}")
            _updatePoolSettings(pool, poolConfig)
        self._removePools({p.name for p in new.pools}, changes)

    def _removePools(self, kept: set[str], changes: list[str]) -> None:
        """
        Forget the pools the file no longer has: their health checks stop
        (they would go on checking backends nobody configured any more),
        and they leave C{/status}, the metrics and the expiry report with
        their C{[pools.tls]} material.  The rebuilt router no longer offers
        them (a listener naming a missing pool is refused before this); the
        connections already relayed to their members go on.
        """
        proxy = self.proxy
        share = getattr(proxy, "healthShare", None)
        for name in [name for name in proxy.pools if name not in kept]:
            proxy.stopHealthMonitor(name)
            if share is not None:
                share.checksChanged(name, None)
            del proxy.pools[name]
            getattr(proxy, "backendTLS", {}).pop(name, None)
            changes.append(f"pool {name!r} removed")

    def _applyHealthChecks(self, health: Iterable[_HealthChange], changes: list[str]) -> None:
        """
        Replace the health checks of each pool in C{health} (after
        L{_applyPools}: new pools exist).  The old
        L{HealthMonitor<mtlsproxy.health.HealthMonitor>} stops (its timers
        and checks in flight cancelled) and, where this process checks, a
        new one starts with the new settings and the checker built
        beforehand; members keep their health and last check, and the new
        monitor continues from there.  A worker that follows worker 0
        starts none; its L{HealthShare<mtlsproxy.healthshare.HealthShare>}
        learns the pool's new settings.  A pool whose checks were removed
        has every member made healthy (nothing would ever check them
        again), logged once (L{HEALTH_CHECKS_REMOVED_FORMAT}).
        """
        proxy = self.proxy
        share = getattr(proxy, "healthShare", None)
        checking = bool(getattr(proxy, "checksHealth", True))
        for change in health:
            pool = proxy.pools[change.pool]
            proxy.stopHealthMonitor(change.pool)
            if share is not None:
                share.checksChanged(change.pool, change.now)
            if change.now is None:
                healed = [member for member in pool.members if not member.healthy]
                for member in healed:
                    member.healthy = True
                    if share is not None:
                        share.wasHealed(change.pool, member, "health checks removed")
                self.log.info(
                    HEALTH_CHECKS_REMOVED_FORMAT,
                    pool=change.pool,
                    count=len(healed),
                    members=[member.hostPort for member in healed],
                )
                changes.append(
                    f"pool {change.pool!r}: health checks removed"
                    f" ({len(healed)} member(s) made healthy)"
                )
                continue
            if checking:
                proxy.startHealthMonitor(change.pool, change.checker, change.now)
            changes.append(f"pool {change.pool!r}: {change.describe()}")

    def _applyListeners(
        self,
        new: Any,
        loaded: Any,
        factories: dict[str, Any],
        changes: list[str],
        restart: list[str],
    ) -> tuple[int, int]:
        """
        Swap the TLS contexts and update the relay settings of each running
        listener; close connections whose certificates are now revoked, or
        (when the listener's CA certificates changed) no longer trusted.

        @return: How many connections were closed for revocation, and for
            withdrawn trust.
        """
        running = self.proxy.listeners
        wanted = {listener.name: listener for listener in new.listeners}
        for name in wanted:
            if name not in running:
                restart.append(f"new listener {name!r}")
        for name in running:
            if name not in wanted:
                restart.append(f"listener {name!r} was removed; it keeps running until a restart")
        revoked = untrusted = 0
        for name, listenerConfig in wanted.items():
            service = running.get(name)
            if service is None:
                continue
            was = service.listenerConfig
            if listenerConfig.protocol != was.protocol:
                restart.append(
                    f"listener {name!r}: protocol {was.protocol!r} -> {listenerConfig.protocol!r}"
                )
                continue
            if listenerConfig.endpoint != was.endpoint:
                restart.append(
                    f"listener {name!r}: endpoint {was.endpoint!r} -> {listenerConfig.endpoint!r}"
                )
            _compareFields(
                was,
                listenerConfig,
                _APPLIED_LISTENER_FIELDS | {"endpoint", "protocol"},
                f"listener {name!r}",
                restart,
            )
            trustChanged = False
            if name in factories:
                before = self.inForce.get(name)
                trustChanged = before is not None and listenerTrustSets(
                    before
                ) != listenerTrustSets(loaded.listeners[name])
                self.proxy.contextFactories[name].current = factories[name]
                self.inForce[name] = loaded.listeners[name]
                changes.append(f"listener {name!r}: new TLS contexts")
            elif _tlsChanged(was, listenerConfig):
                restart.append(f"listener {name!r}: TLS settings")
            self._updateRelay(service, listenerConfig, new, changes, restart)
            service.listenerConfig = _running(was, listenerConfig)
            current = getattr(self.proxy, "contextFactories", {}).get(name)
            if current is not None and getattr(listenerConfig, "close_revoked_connections", True):
                closed = self._sweep(name, current.current.crls)
                revoked += len(closed)
                if trustChanged:
                    # Only when the CAs changed: an unrelated reload costs
                    # no verification.
                    untrusted += len(self._sweepUntrusted(name, closed))
                self._lateSweep(name, listenerConfig, trustChanged)
        return revoked, untrusted

    def _updateRelay(
        self,
        service: Any,
        listenerConfig: Any,
        new: Any,
        changes: list[str],
        restart: list[str],
    ) -> None:
        """
        Point a listener's relay at its (possibly new) pool and settings.
        """
        from .relay import ProxyServerFactory

        factory = service.factory
        while not isinstance(factory, ProxyServerFactory) and hasattr(factory, "wrappedFactory"):
            factory = factory.wrappedFactory
        pool = self.proxy.pools[listenerConfig.pool]
        if not isinstance(factory, ProxyServerFactory):
            if listenerConfig.pool != service.listenerConfig.pool:
                restart.append(f"listener {listenerConfig.name!r}: pool")
            return
        if factory.pool is not pool:
            factory.pool = pool
            changes.append(f"listener {listenerConfig.name!r}: pool {pool.name!r}")
        # The relay keeps its own dict of the pools' backend TLS: the
        # holders of running pools are swapped in place; a new pool's is
        # added so that a listener switched to it connects with TLS.
        relayTLS = getattr(factory, "backendTLS", None)
        if isinstance(relayTLS, dict):
            for name, holder in getattr(self.proxy, "backendTLS", {}).items():
                relayTLS.setdefault(name, holder)
        poolConfig = next((p for p in new.pools if p.name == pool.name), None)
        if poolConfig is not None:
            factory.connectTimeout = poolConfig.connect_timeout
            factory.maxAttempts = poolConfig.max_connect_attempts
        if getattr(factory, "router", None) is not None:
            # The relay asks its router (SNI routes, else the listener's
            # pool) where a connection goes, and the router's targets hold
            # the pool and its settings: rebuild it with the new ones (the
            # routes themselves stay those running: changing them needs a
            # restart).
            from .routing import Router

            try:
                router = Router.fromConfig(
                    _running(service.listenerConfig, listenerConfig),
                    new.pools,
                    self.proxy.pools,
                    getattr(self.proxy, "backendTLS", {}),
                )
            except KeyError as e:
                restart.append(f"listener {listenerConfig.name!r}: routes to pool {e}")
            else:
                factory.router = router.forConnection
        if hasattr(listenerConfig, "handshake_timeout") and hasattr(factory, "timeouts"):
            from .limits import Timeouts

            factory.timeouts = Timeouts.fromListener(listenerConfig)
        gateFor = getattr(self.proxy, "_gateFor", None)
        if gateFor is not None and hasattr(listenerConfig, "max_connections"):
            gateFor(listenerConfig)

    # -- live revocation ----------------------------------------------------

    def _sweep(self, listenerName: str, crls: Any) -> list[Any]:
        """
        Close the established connections of a listener that C{crls}
        revoke; abort them if they do not go within
        L{ABORT_REVOKED_AFTER} seconds.

        @return: The connections closed.
        """
        closed = closeRevokedConnections(self.proxy.connections, listenerName, crls)
        for connection in closed:
            self._later(ABORT_REVOKED_AFTER, _abortIfOpen, connection)
        return closed

    def _sweepUntrusted(self, listenerName: str, exclude: list[Any]) -> list[Any]:
        """
        Close the established connections of a listener whose client chain
        the CA certificates in force (of the site each connection's server
        name selects) no longer verify, except those in C{exclude};
        abort them if they do not go within L{ABORT_REVOKED_AFTER} seconds.

        @return: The connections closed.
        """
        swappable = self.proxy.contextFactories.get(listenerName)
        material = self.inForce.get(listenerName)
        if swappable is None or material is None:
            return []
        trust = ListenerTrust.fromFactory(swappable.current, material)
        closed = closeUntrustedConnections(self.proxy.connections, listenerName, trust, exclude)
        for connection in closed:
            self._later(ABORT_REVOKED_AFTER, _abortIfOpen, connection)
        return closed

    def _sweepPools(self, new: Any, before: dict[str, BackendTLSMaterial]) -> tuple[int, int]:
        """
        For each pool with C{[pools.tls]} and C{close_revoked_connections}:
        close the connections relayed to a member whose chain the pool's
        CRLs in force revoke or, if the pool's CA certificates changed
        (against C{before}, the material in force before the reload), its
        CAs no longer verify; now and again once the connection attempts
        under way at the reload are over.

        @return: How many connections were closed now for revocation, and
            for withdrawn trust.
        """
        holders = getattr(self.proxy, "backendTLS", {})
        revoked = untrusted = 0
        for poolConfig in new.pools:
            tls = getattr(poolConfig, "tls", None)
            if tls is None or not tls.close_revoked_connections:
                continue
            if poolConfig.name not in holders:
                continue
            was, now = before.get(poolConfig.name), self.backendsInForce.get(poolConfig.name)
            trustChanged = (
                was is not None and now is not None and trustSet(was.cas) != trustSet(now.cas)
            )
            closedRevoked, closedUntrusted = self._sweepPool(poolConfig.name, trustChanged)
            revoked += closedRevoked
            untrusted += closedUntrusted
            # Connection attempts under way verified their member against
            # the CRLs and CAs of their (old) context: TCP and TLS each get
            # up to connect_timeout.
            delay = 2 * float(poolConfig.connect_timeout) + _LATE_SWEEP
            self._later(delay, self._sweepPool, poolConfig.name, trustChanged)
        return revoked, untrusted

    def _sweepPool(self, poolName: str, trust: bool = False) -> tuple[int, int]:
        """
        Close the established connections (and the idle ones of C{https}
        listeners) to members of a pool that its backend CRLs in force
        revoke and, if C{trust}, those whose chain its CAs in force no
        longer verify; abort those that do not go within
        L{ABORT_REVOKED_AFTER} seconds.

        @return: How many were closed for revocation, and for withdrawn
            trust.
        """
        holder = getattr(self.proxy, "backendTLS", {}).get(poolName)
        if holder is None:
            return 0, 0
        revoked: list[Any] = []
        revokedIdle: list[Any] = []
        crls = holder.current.crls
        if len(crls):
            revoked = closeRevokedBackendConnections(self.proxy.connections, poolName, crls)
            for name, cache in self._idleBackendCaches():
                revokedIdle += closeRevokedIdleBackends(cache, name, poolName, crls)
        untrusted: list[Any] = []
        untrustedIdle: list[Any] = []
        material = self.backendsInForce.get(poolName)
        if trust and material is not None:
            store = TrustStore(material.cas, "server")
            untrusted = closeUntrustedBackendConnections(
                self.proxy.connections, poolName, store, revoked
            )
            # (Idle connections closed for revocation have left the cache.)
            for name, cache in self._idleBackendCaches():
                untrustedIdle += closeUntrustedIdleBackends(cache, name, poolName, store)
        for connection in revoked + untrusted:
            self._later(ABORT_REVOKED_AFTER, _abortIfOpen, connection)
        for backend in revokedIdle + untrustedIdle:
            self._later(ABORT_REVOKED_AFTER, _abortIdleIfOpen, backend)
        return len(revoked) + len(revokedIdle), len(untrusted) + len(untrustedIdle)

    def _idleBackendCaches(self) -> list[tuple[str, Any]]:
        """
        The idle backend connections of each C{https} listener, by name.
        """
        caches = []
        for name, service in self.proxy.listeners.items():
            factory = getattr(service, "factory", None)
            while factory is not None and not hasattr(factory, "backends"):
                factory = getattr(factory, "wrappedFactory", None)
            cache = getattr(factory, "backends", None)
            if cache is not None and hasattr(cache, "idleConnections"):
                caches.append((name, cache))
        return caches

    def _lateSweep(self, listenerName: str, listenerConfig: Any, trust: bool = False) -> None:
        """
        Check again once the handshakes under way at the reload are over:
        OpenSSL verified them against the CRLs (and CAs) of their (old)
        context.  The CAs are checked only if C{trust} (they changed).
        """
        delay = float(getattr(listenerConfig, "handshake_timeout", 10.0)) + _LATE_SWEEP

        def sweep() -> None:
            current = self.proxy.contextFactories.get(listenerName)
            if current is not None:
                closed = self._sweep(listenerName, current.current.crls)
                if trust:
                    self._sweepUntrusted(listenerName, closed)

        self._later(delay, sweep)

    def _watch(self, paths: list[str]) -> None:
        """
        Watch C{paths} from now on, taking their fingerprints now.
        """
        self._watched = paths
        self._fingerprints = {path: _fingerprint(path) for path in paths}

    def _later(self, delay: float, f: Callable[..., object], *args: Any) -> None:
        """
        Call C{f} later, unless the service stops first.
        """
        self._timers = [t for t in self._timers if t.active()]
        self._timers.append(self.reactor.callLater(delay, f, *args))

    def _materials(self) -> dict[str, ListenerMaterial]:
        """
        The material in force, with the status endpoint's own (not
        reloaded) when it has one.
        """
        materials = dict(self.inForce)
        status = getattr(self.proxy, "statusMaterial", None)
        if status is not None and "status" not in materials:
            materials["status"] = status
        return materials


_UNSET = object()


def _showSetting(value: object) -> str:
    """
    A C{[pools.health_check]} value as it reads in TOML (C{5.0},
    C{"/healthz"}, C{true}), or C{(unset)}.
    """
    if value is _UNSET:
        return "(unset)"
    try:
        return json.dumps(value, default=dict)
    except (TypeError, ValueError):
        return repr(value)


@attrs.frozen
class _HealthChange:
    """
    A change a reload makes to one pool's active health checks.

    @ivar pool: The pool's name.
    @ivar was: The running L{HealthCheckConfig<mtlsproxy.health.
        HealthCheckConfig>}, or L{None} (none, or a new pool).
    @ivar now: The new one, or L{None} (checks removed).
    @ivar checker: The checker built for C{now}, or L{None}.
    @ivar newPool: Whether the reload adds the pool.
    """

    pool: str
    was: Any
    now: Any
    checker: Any
    newPool: bool = False

    def describe(self) -> str:
        """
        The change for the reload's summary: C{health checks (interval 5.0
        -> 1.0)}, C{health checks added (type "tcp")}.
        """
        if self.now is None:
            return "health checks removed"
        if self.was is None:
            return f"health checks added (type {_showSetting(self.now.type)})"
        differences = []
        for field in attrs.fields(type(self.now)):
            if field.name == "options":
                continue
            before, after = getattr(self.was, field.name), getattr(self.now, field.name)
            if before != after:
                differences.append(f"{field.name} {_showSetting(before)} -> {_showSetting(after)}")
        options = dict.fromkeys([*self.was.options, *self.now.options])
        for key in options:
            before, after = self.was.options.get(key, _UNSET), self.now.options.get(key, _UNSET)
            if before != after:
                differences.append(f"{key} {_showSetting(before)} -> {_showSetting(after)}")
        if not differences:
            return "health checks replaced"
        return f"health checks ({', '.join(differences)})"


def _abortIfOpen(connection: Any) -> None:
    """
    Abort a connection closed earlier that is still not gone.
    """
    if getattr(getattr(connection, "phase", None), "value", None) != "closed":
        connection.abort()


def _abortIdleIfOpen(backend: Any) -> None:
    """
    Abort an idle backend connection closed earlier that is still not gone.
    """
    if not getattr(backend, "gone", True):
        backend.abort()


def _running(was: Any, wanted: Any) -> Any:
    """
    The configuration a listener runs with after a reload: the settings a
    reload applies from C{wanted}, the others (endpoint, protocol, ...)
    still from C{was}.
    """
    kept = {
        field.name: getattr(was, field.name)
        for field in attrs.fields(type(wanted))
        if field.name not in _APPLIED_LISTENER_FIELDS and field.init
    }
    try:
        return attrs.evolve(wanted, **kept)
    except (ConfigurationError, ValueError, TypeError):
        return attrs.evolve(wanted, endpoint=was.endpoint)


def _compareFields(
    old: Any, new: Any, applied: frozenset[str], where: str, restart: list[str]
) -> None:
    """
    Note each setting of C{new} that differs from C{old} and is not in
    C{applied} as needing a restart.
    """
    if type(old) is not type(new):
        return
    for field in attrs.fields(type(new)):
        if field.name in applied:
            continue
        if getattr(old, field.name) != getattr(new, field.name):
            restart.append(f"{where + ': ' if where else ''}{field.name} changed")


def _tlsChanged(old: Any, new: Any) -> bool:
    """
    Do two listener configurations differ in a TLS setting?
    """
    for name in _APPLIED_LISTENER_FIELDS - {"name", "pool", "handshake_timeout", "idle_timeout", "max_connections"}:
        if getattr(old, name, None) != getattr(new, name, None):
            return True
    return False


def _updateMembers(pool: Any, poolConfig: Any, changes: list[str]) -> None:
    """
    Add, remove and re-weight a pool's members in place: kept members keep
    their state (connection counts, health); removed ones leave the pool
    while their established connections finish.
    """
    from .pool import Member

    byKey = {member.key: member for member in pool.members}
    wanted = [(m.address, m.port) for m in poolConfig.members]
    for memberConfig in poolConfig.members:
        key = (memberConfig.address, memberConfig.port)
        member = byKey.get(key)
        if member is None:
            pool.addMember(Member(memberConfig))
            changes.append(f"pool {pool.name!r}: member {key[0]}:{key[1]} added")
            continue
        if member.weight != memberConfig.weight:
            changes.append(
                f"pool {pool.name!r}: member {key[0]}:{key[1]} weight"
                f" {member.weight} -> {memberConfig.weight}"
            )
        member.config = memberConfig
        member.weight = memberConfig.weight
    for key, member in byKey.items():
        if key not in wanted:
            pool.removeMember(member)
            changes.append(
                f"pool {pool.name!r}: member {key[0]}:{key[1]} removed"
                f" ({member.activeConnections} connection(s) left to finish)"
            )
    order = {key: index for index, key in enumerate(wanted)}
    pool.members[:] = sorted(pool.members, key=lambda m: order.get(m.key, len(order)))


def _updatePoolSettings(pool: Any, poolConfig: Any) -> None:
    """
    Apply a pool's failure settings (C{all_unhealthy}, passive ejection).
    """
    if hasattr(poolConfig, "all_unhealthy"):
        pool.allUnhealthy = poolConfig.all_unhealthy
    if hasattr(poolConfig, "eject_after"):
        from .health import PassiveEjectionConfig

        ejection = PassiveEjectionConfig(
            eject_after=poolConfig.eject_after,
            eject_backoff=poolConfig.eject_backoff,
            eject_backoff_max=poolConfig.eject_backoff_max,
        )
        # (The attribute is called ejectionConfig, formerly ejection.)
        name = "ejectionConfig" if hasattr(pool, "ejectionConfig") else "ejection"
        if ejection != getattr(pool, name, None):
            setattr(pool, name, ejection)
            for member in pool.members:
                setattr(member, name, ejection)
