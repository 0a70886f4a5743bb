# -*- test-case-name: tests.test_service -*-
"""
Wiring: a checked configuration becomes listening endpoints.

L{ProxyService} owns the run-time pools and one L{ListenerService} per
configured listener.  Nothing here parses files or options; it receives a
L{mtlsproxy.checks.LoadedConfiguration}.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from .pool import Pool
from .plugins import selectorFactory


class ListenerService(Service):
    """
    Listens on one configured endpoint with the factory built for it.
    """

    log = Logger()

    def __init__(self, reactor: Any, listenerConfig: Any, factory: Any) -> None:
        self._reactor = reactor
        self.listenerConfig = listenerConfig
        self.factory = factory
        self.setName(f"listener:{listenerConfig.name}")
        self.port: Optional[IListeningPort] = None
        self._listening: Optional[Deferred[Any]] = None

    def startService(self) -> None:
        Service.startService(self)
        endpoint = serverFromString(self._reactor, self.listenerConfig.endpoint)
        self._listening = endpoint.listen(self.factory)
        self._listening.addCallbacks(self._listened, self._failed)

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
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

    def __init__(self, reactor: Any, loaded: Any) -> None:
        MultiService.__init__(self)
        self._reactor = reactor
        self.loaded = loaded
        config = loaded.config
        self.pools: dict[str, Pool] = {
            p.name: Pool.fromConfig(p, selectorFactory(p.selector).newSelector(), clock=reactor)
            for p in config.pools
        }
        self.healthMonitors: dict[str, Any] = {}
        for index, poolConfig in enumerate(config.pools):
            if poolConfig.health_check is not None:
                self._startHealthChecks(index, poolConfig)
        self.listeners: dict[str, ListenerService] = {}
        for listenerConfig in config.listeners:
            factory = self._factoryFor(listenerConfig)
            listener = ListenerService(reactor, listenerConfig, factory)
            listener.setServiceParent(self)
            self.listeners[listenerConfig.name] = listener

    def _backendTLSFor(self, poolName: str) -> Any:
        """
        The pool's backend TLS settings (with C{clientConnectionCreator}),
        or L{None} when its members speak plain TCP.
        """
        return getattr(self, "backendTLS", {}).get(poolName)

    def _startHealthChecks(self, index: int, poolConfig: Any) -> None:
        """
        Attach a L{HealthMonitor} for one pool with a C{health_check} table.
        """
        from .health import HealthMonitor, makeChecker
        from .plugins import healthCheckerFactoriesByName

        checker = makeChecker(
            poolConfig.health_check,
            self._reactor,
            self._backendTLSFor(poolConfig.name),
            healthCheckerFactoriesByName(),
            f"pools[{index}].health_check",
        )
        monitor = HealthMonitor(
            self._reactor, self.pools[poolConfig.name], checker, poolConfig.health_check
        )
        monitor.setServiceParent(self)
        self.healthMonitors[poolConfig.name] = monitor

    def _factoryFor(self, listenerConfig: Any) -> Any:
        from .relay import ProxyServerFactory

        poolConfig = next(p for p in self.loaded.config.pools if p.name == listenerConfig.pool)
        tls = listenerConfig.protocol == "tls"
        factory = ProxyServerFactory(
            self._reactor,
            listenerConfig.name,
            self.pools[listenerConfig.pool],
            poolConfig.connect_timeout,
            poolConfig.max_connect_attempts,
            tls,
        )
        if not tls:
            return factory
        from .tlscontext import serverContextFactory
        from .tlsproto import HalfCloseTLSFactory
        from .verify import logHandshakeFailure

        material = self.loaded.listeners[listenerConfig.name]
        return HalfCloseTLSFactory(
            serverContextFactory(listenerConfig, material, clock=self._reactor),
            False,
            factory,
            clock=self._reactor,
            handshakeFailed=logHandshakeFailure,
        )

    def startService(self) -> None:
        for warning in self.loaded.warnings:
            self.log.warn("Configuration warning: {warning}", warning=warning)
        MultiService.startService(self)
