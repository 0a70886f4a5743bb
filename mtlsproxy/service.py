# -*- test-case-name: tests.test_drain,tests.test_reload,tests.test_healthshare -*-
"""
Wiring: a checked configuration becomes listening endpoints.

L{ProxyService} owns the run-time pools and one L{ListenerService} per
configured listener.  Nothing here parses files or options; it receives a
L{mtlsproxy.checks.LoadedConfiguration}.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from .drain import ConnectionRegistry, Drainer
from .metrics import ProxyMetrics, ProxyStateCollector
from .pool import Pool
from .plugins import selectorFactory
from .limits import ConnectionGate, Timeouts, checkFileLimit


class ListenerService(Service):
    """
    Listens on one configured endpoint with the factory built for it.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        listenerConfig: Any,
        factory: Any,
        gate: Optional[ConnectionGate] = None,
        inherited: Any = None,
    ) -> None:
        """
        @param gate: The listener's C{max_connections} counter
            (L{mtlsproxy.limits.ConnectionGate}), given the port once
            listening so that it can pause accepting; or L{None}.
        @param inherited: In a worker process, the listening socket the
            supervisor opened (L{mtlsproxy.workers.InheritedListener}),
            adopted instead of listening on the endpoint; or L{None}.
        """
        self._reactor = reactor
        self.listenerConfig = listenerConfig
        self.factory = factory
        self.gate = gate
        self.inherited = inherited
        self.setName(f"listener:{listenerConfig.name}")
        self.port: Optional[IListeningPort] = None
        self._listening: Optional[Deferred[Any]] = None

    def startService(self) -> None:
        Service.startService(self)
        if self.inherited is not None:
            self._listening = maybeDeferred(self._adopt)
        else:
            endpoint = serverFromString(self._reactor, self.listenerConfig.endpoint)
            self._listening = endpoint.listen(self.factory)
        self._listening.addCallbacks(self._listened, self._failed)

    def _adopt(self) -> IListeningPort:
        """
        Accept on the socket inherited from the supervisor (Twisted adopts a
        duplicate of it; ours is closed).
        """
        assert self.inherited is not None
        port = self._reactor.adoptStreamPort(
            self.inherited.fd, self.inherited.addressFamily, self.factory
        )
        os.close(self.inherited.fd)
        return port  # type: ignore[no-any-return]

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        if self.gate is not None:
            self.gate.attach(port)
        self.log.info(
            "Listener {listener} ({protocol}) listening on {address}",
            listener=self.listenerConfig.name,
            protocol=self.listenerConfig.protocol,
            address=_describeAddress(port.getHost()),
        )
        return port

    def _failed(self, failure: Any) -> None:
        self.log.failure(
            "Listener {listener} could not listen on {endpoint}",
            failure,
            listener=self.listenerConfig.name,
            endpoint=self.listenerConfig.endpoint,
        )
        # A proxy that silently does not listen is worse than one that stops.
        if self._reactor.running:
            self._reactor.stop()

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening() or succeed(None)
        return succeed(None)

    @property
    def atCapacity(self) -> bool:
        """
        Is the listener at C{max_connections}, not accepting (for metrics)?
        """
        return self.gate is not None and self.gate.atCapacity

    @property
    def capacityEpisodes(self) -> int:
        """
        How many times the listener reached C{max_connections} (for metrics).
        """
        return self.gate.capacityEpisodes if self.gate is not None else 0

    @property
    def activeConnections(self) -> int:
        """
        Client connections open on this listener now (for metrics).
        """
        return self.gate.active if self.gate is not None else 0


def _describeAddress(address: Any) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class ProxyService(MultiService):
    """
    The whole proxy: pools plus listeners, built from a checked configuration.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        loaded: Any,
        inherited: Optional[dict[str, Any]] = None,
        workerIndex: Optional[int] = None,
        statusSocket: Optional[str] = None,
        workerCount: int = 1,
        drained: Sequence[tuple[str, str]] = (),
        shareHealth: bool = False,
        healthStates: Sequence[Any] = (),
        connectSupervisor: Optional[Callable[[Any], Any]] = None,
    ) -> None:
        """
        @param inherited: In a worker process (L{mtlsproxy.workers}): the
            listening sockets from the supervisor by listener name.
        @param workerIndex: In a worker process, its index: only worker 0
            serves the admin console, and no worker the configured status
            endpoint (the supervisor does).
        @param statusSocket: In a worker process with C{[status]}, the path
            of the private UNIX socket where it serves its status site to
            the supervisor (L{mtlsproxy.fanin}).
        @param workerCount: In a worker process, how many workers share the
            listeners: each holds at most its share of a listener's
            C{max_connections} (rounded up), so that the listener's limit
            holds for all of them together.
        @param drained: In a worker process started by its supervisor, the
            (pool, member as C{address:port}) drains an operator made
            through the supervisor's status endpoint and not enabled since:
            drained in L{startService}, before the listeners accept.
        @param shareHealth: In a worker process, share active health checks
            with the other workers over the channel to the supervisor
            (L{mtlsproxy.healthshare}): worker 0 runs the checks and
            reports its verdicts, the others run none and apply them.
        @param healthStates: With C{shareHealth}, the verdicts the
            supervisor remembers (L{mtlsproxy.healthshare.HealthVerdict}s),
            applied in L{startService} before the listeners accept.
        @param connectSupervisor: With C{shareHealth}, connects a protocol
            to the supervisor (tests); the pipes of
            L{mtlsproxy.healthshare.connectToSupervisor} by default.
        """
        MultiService.__init__(self)
        self._reactor = reactor
        self.loaded = loaded
        self.inherited = dict(inherited or {})
        self.workerIndex = workerIndex
        self.statusSocket = statusSocket
        self.workerCount = max(1, workerCount)
        self.inheritedDrains = list(drained)
        config = loaded.config
        # Operations (docs/operations.md): metrics, live connections, drain.
        self.metrics = ProxyMetrics()
        self.connections = ConnectionRegistry()
        self.draining = False
        self.startedAt: float = reactor.seconds()
        self.pools: dict[str, Pool] = {
            p.name: Pool.fromConfig(p, selectorFactory(p.selector).newSelector(), clock=reactor)
            for p in config.pools
        }
        from .backendtls import BackendTLS, SwappableBackendTLS

        # Mutual TLS to the members of pools with [pools.tls]
        # (docs/backend-tls.md), for the relay and the health checkers;
        # each a holder whose current settings a reload swaps.
        self.backendTLS: dict[str, Any] = {
            p.name: SwappableBackendTLS(
                BackendTLS.fromConfig(p.name, p.tls, loaded.backends[p.name])
            )
            for p in config.pools
            if p.tls is not None
        }
        self.healthMonitors: dict[str, Any] = {}
        # With workers: one worker checks, the others follow (first child,
        # so that its channel is up before the monitors report).
        self.healthShare: Any = None
        if shareHealth and workerIndex is not None:
            from .healthshare import HealthShare

            self.healthShare = HealthShare(
                reactor,
                workerIndex,
                self.pools,
                {p.name: p.health_check for p in config.pools if p.health_check is not None},
                healthStates,
                connectSupervisor,
            )
            self.healthShare.setServiceParent(self)
        for index, poolConfig in enumerate(config.pools):
            if poolConfig.health_check is not None and self.checksHealth:
                self._startHealthChecks(index, poolConfig)
        self.gates: dict[str, ConnectionGate] = {}
        # The TLS connection creator of each TLS listener, swapped by reloads.
        self.contextFactories: dict[str, Any] = {}
        self.listeners: dict[str, ListenerService] = {}
        for listenerConfig in config.listeners:
            factory = self._factoryFor(listenerConfig)
            listener = ListenerService(
                reactor,
                listenerConfig,
                factory,
                gate=self._gateFor(listenerConfig),
                inherited=self.inherited.get(listenerConfig.name),
            )
            listener.setServiceParent(self)
            self.listeners[listenerConfig.name] = listener
        self._startOperations(config)
        from .reload import Reloader

        # SIGHUP, polling for changed files, expiry warnings (docs/reload.md).
        self.reloader = Reloader(reactor, config.path, self)
        self.reloader.setServiceParent(self)

    def _backendTLSFor(self, poolName: str) -> Any:
        """
        The pool's backend TLS settings (with C{clientConnectionCreator}),
        or L{None} when its members speak plain TCP.
        """
        return getattr(self, "backendTLS", {}).get(poolName)

    @property
    def checksHealth(self) -> bool:
        """
        Does this process run active health checks?  Yes, unless it is a
        worker that follows worker 0's verdicts (L{mtlsproxy.healthshare}).
        """
        return self.healthShare is None or bool(self.healthShare.checking)

    def _startHealthChecks(self, index: int, poolConfig: Any) -> None:
        """
        Attach a L{HealthMonitor} for one pool with a C{health_check} table.
        """
        checker = self.newHealthChecker(index, poolConfig, self._backendTLSFor(poolConfig.name))
        self.startHealthMonitor(poolConfig.name, checker, poolConfig.health_check)

    def newHealthChecker(self, index: int, poolConfig: Any, tls: Any) -> Any:
        """
        Build (only build: nothing connects yet) the checker of a pool's
        C{health_check} table.

        @param index: The pool's place in the file, for error messages.
        @param tls: The pool's backend TLS holder the checker connects with,
            or L{None}.

        @raise ConfigurationError: If the checker plugin is missing or
            refuses the options; the key path is set
            (C{pools[1].health_check.path}), the file is not.
        """
        from .health import makeChecker
        from .plugins import healthCheckerFactoriesByName

        return makeChecker(
            poolConfig.health_check,
            self._reactor,
            tls,
            healthCheckerFactoriesByName(),
            f"pools[{index}].health_check",
        )

    def startHealthMonitor(self, poolName: str, checker: Any, config: Any) -> Any:
        """
        Check the members of pool C{poolName} with C{checker} from now on (at
        once if the proxy is running, else when it starts): a new
        L{HealthMonitor} child service, reported through the health share in
        worker 0.  Members that carry a check result keep their health.

        @return: The monitor.
        """
        from .health import HealthMonitor

        monitor = HealthMonitor(self._reactor, self.pools[poolName], checker, config)
        if self.healthShare is not None:
            self.healthShare.observe(monitor)
        monitor.setServiceParent(self)
        self.healthMonitors[poolName] = monitor
        return monitor

    def stopHealthMonitor(self, poolName: str) -> Deferred[Any]:
        """
        Stop and detach the health monitor of pool C{poolName}, if it has
        one; members keep their health.

        @return: Fires once its checks in flight are cancelled.
        """
        monitor = self.healthMonitors.pop(poolName, None)
        if monitor is None:
            return succeed(None)
        # Stops it if running (cancelling its timers and checks in flight).
        return maybeDeferred(monitor.disownServiceParent)

    def _gateFor(self, listenerConfig: Any) -> ConnectionGate:
        """
        The C{max_connections} counter of a listener: one per listener name
        for the life of the service (a reload that changes
        C{max_connections} updates it).
        """
        share = -(-listenerConfig.max_connections // self.workerCount)
        gate = self.gates.get(listenerConfig.name)
        if gate is None:
            gate = ConnectionGate(listenerConfig.name, share, self._reactor)
            self.gates[listenerConfig.name] = gate
        elif gate.maxConnections != share:
            gate.maxConnections = share
        return gate

    def _factoryFor(self, listenerConfig: Any) -> Any:
        from .relay import ProxyServerFactory

        from .routing import Router

        poolConfig = next(p for p in self.loaded.config.pools if p.name == listenerConfig.pool)
        tls = listenerConfig.protocol in ("tls", "https")
        router = Router.fromConfig(
            listenerConfig, self.loaded.config.pools, self.pools, getattr(self, "backendTLS", {})
        )
        common: dict[str, Any] = dict(
            timeouts=Timeouts.fromListener(listenerConfig),
            gate=self._gateFor(listenerConfig),
            metrics=self.metrics.forListener(listenerConfig.name),
            connections=self.connections,
        )
        factory: Any
        if listenerConfig.protocol == "https":
            from .http import HTTPProxyFactory

            factory = HTTPProxyFactory.fromListener(self._reactor, listenerConfig, router, **common)
        else:
            factory = ProxyServerFactory(
                self._reactor,
                listenerConfig.name,
                self.pools[listenerConfig.pool],
                poolConfig.connect_timeout,
                poolConfig.max_connect_attempts,
                tls,
                router=router.forConnection,
                backendTLS=self.backendTLS,
                **common,
            )
        if tls:
            from .tlscontext import SwappableContextFactory, serverContextFactory
            from .tlsproto import HalfCloseTLSFactory
            from .verify import logHandshakeFailure

            material = self.loaded.listeners[listenerConfig.name]
            contextFactory = SwappableContextFactory(
                serverContextFactory(listenerConfig, material, clock=self._reactor)
            )
            self.contextFactories[listenerConfig.name] = contextFactory
            factory = HalfCloseTLSFactory(
                contextFactory,
                False,
                factory,
                clock=self._reactor,
                handshakeFailed=logHandshakeFailure,
            )
        if listenerConfig.accept_proxy_protocol:
            from .proxyprotocol import ProxyProtocolAcceptor, parseNetworks

            factory = ProxyProtocolAcceptor(
                factory,
                parseNetworks(listenerConfig.trusted_proxies),
                self._reactor,
                listenerConfig.name,
            )
        return factory

    def startService(self) -> None:
        for warning in self.loaded.warnings:
            self.log.warn("Configuration warning: {text}", text=warning)
        checkFileLimit(self.loaded.config.listeners, workers=self.workerCount)
        self._applyInheritedDrains()
        if self.healthShare is not None:
            # Before the listeners accept and the monitors start.
            self.healthShare.applyInherited()
        MultiService.startService(self)

    def _applyInheritedDrains(self) -> None:
        """
        Drain the members the supervisor passed on (C{drained}), before any
        listener accepts (and before the status socket answers); a pool or
        member this configuration lacks is warned about and ignored.
        """
        for poolName, where in self.inheritedDrains:
            pool = self.pools.get(poolName)
            member = None if pool is None else next((m for m in pool.members if m.hostPort == where), None)
            if member is None:
                self.log.warn(
                    "Cannot apply the supervisor's drain of pool {pool} member {member}:"
                    " {reason}; ignored",
                    pool=poolName,
                    member=where,
                    reason="no such pool" if pool is None else "no such member",
                )
                continue
            member.drain()

    def _startOperations(self, config: Any) -> None:
        """
        The operators' side: the live-state metrics, the drainer, the status
        endpoint and the admin console (C{docs/operations.md},
        C{docs/admin.md}).

        @raise ConfigurationError: For the status endpoint's TLS material or
            the admin console's key files.
        """
        from datetime import datetime, timezone

        from .status import StatusService, expiryReport, loadStatusMaterial

        self.metrics.registry.register(ProxyStateCollector(self, self._reactor, expiryReport))
        self.drainer = Drainer(self._reactor, self.connections, config.drain_timeout)
        self.statusMaterial, warnings = loadStatusMaterial(config, datetime.now(timezone.utc))
        for warning in warnings:
            self.log.warn("Configuration warning: {text}", text=warning)
        self.statusService: Optional[StatusService] = None
        if config.status is not None and self.workerIndex is None:
            self.statusService = StatusService(
                self._reactor, self, self.metrics.registry, config.status, self.statusMaterial
            )
            self.statusService.setServiceParent(self)
        elif config.status is not None and self.statusSocket is not None:
            from .status import privateEndpoint

            # A worker: its supervisor serves [status], asking every worker.
            self.statusService = StatusService(
                self._reactor,
                self,
                self.metrics.registry,
                config.status,
                endpoint=privateEndpoint(self.statusSocket),
            )
            self.statusService.setServiceParent(self)
        self.adminService: Any = None
        if config.admin is not None and not self.workerIndex:
            from .admin import AdminService

            self.adminService = AdminService(self._reactor, self, config.admin, config.path)
            self.adminService.setServiceParent(self)

    def stopService(self) -> Deferred[Any]:
        """
        Shut down gracefully (SIGTERM): stop accepting on every listener,
        give the established connections C{drain_timeout} seconds to finish
        and close the rest (L{mtlsproxy.drain.Drainer}), then stop
        everything else (health checks, status endpoint, admin console).

        @return: Fires when all of that is done; twistd exits then.
        """
        self.draining = True
        self.log.info(
            "Shutting down: listeners stop accepting; {count} connection(s) open",
            count=len(self.connections),
        )
        stopping = [listener.stopService() for listener in self.listeners.values()]
        d: Deferred[Any] = DeferredList(stopping, consumeErrors=True)
        d.addCallback(lambda _: self.drainer.drain())
        d.addCallback(lambda _: MultiService.stopService(self))
        return d
