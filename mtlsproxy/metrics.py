# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics: one L{ProxyMetrics} per proxy, with its own
L{prometheus_client.CollectorRegistry} (nothing is registered in
C{prometheus_client}'s global registry, so tests and several proxies in one
process do not see each other's numbers).

Two kinds of metric:

  - counters and the handshake histogram, incremented by the data path
    through a L{ListenerMetrics} that the relay's factory holds (one cheap
    method call per event; the label lookups are done once per listener
    or member and cached);
  - gauges of live state (active connections, member health, weights,
    draining, seconds until certificates and CRLs expire), read from the
    proxy only when C{/metrics} is scraped, by L{ProxyStateCollector}: no
    bookkeeping in the data path, and they cannot drift.

The metric names and labels are listed in C{docs/operations.md}.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest
from prometheus_client.process_collector import ProcessCollector

__all__ = [
    "CONTENT_TYPE_LATEST",
    "HANDSHAKE_BUCKETS",
    "ListenerMetrics",
    "NO_METRICS",
    "ProxyMetrics",
    "ProxyStateCollector",
    "render",
    "renderFor",
]

HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""
Bucket bounds, in seconds, of C{mtlsproxy_handshake_duration_seconds}: a
loopback handshake takes about a millisecond, a slow client seconds.
"""

CLIENT_TO_BACKEND = "client_to_backend"
BACKEND_TO_CLIENT = "backend_to_client"


class ListenerMetrics:
    """
    What the relay reports about the connections of one listener.

    Every method is a few attribute lookups and a counter increment, safe
    to call from the data path.  This base class records nothing: it is
    L{NO_METRICS}, the default of a factory built without metrics (unit
    tests, plugins); L{ProxyMetrics.forListener} returns the recording
    subclass.
    """

    def connectionOpened(self) -> None:
        """
        A client connection was accepted.
        """

    def handshakeSucceeded(self, seconds: float) -> None:
        """
        A TLS handshake completed, C{seconds} after the connection was
        accepted.
        """

    def handshakeFailed(self, reason: str, seconds: float) -> None:
        """
        A TLS handshake failed or was abandoned, C{seconds} after the
        connection was accepted.

        @param reason: The rejection reason from L{mtlsproxy.verify}
            (C{unknown_ca}, C{revoked}, ...), C{"no_data"} when the client
            closed without sending a byte (a TCP port probe), or
            C{"aborted"} when it went away later without a TLS error.
        """

    def fromClient(self, count: int) -> None:
        """
        C{count} bytes were relayed from the client to the backend.
        """

    def toClient(self, count: int) -> None:
        """
        C{count} bytes were relayed from the backend to the client.
        """

    def picked(self, pool: str, member: str) -> None:
        """
        The pool's selector chose C{member} (C{host:port}) for a connection.
        """

    def connectFailed(self, pool: str, member: str) -> None:
        """
        A connection attempt to C{member} (C{host:port}) failed.
        """

    def connectionClosed(self, reason: str) -> None:
        """
        A connection ended, for C{reason} (a
        L{mtlsproxy.relay.CloseReason} value).
        """


NO_METRICS = ListenerMetrics()
"""
Records nothing.
"""


class _RecordingListenerMetrics(ListenerMetrics):
    """
    L{ListenerMetrics} that increments the metrics of a L{ProxyMetrics}.
    """

    def __init__(self, metrics: ProxyMetrics, listener: str) -> None:
        self._metrics = metrics
        self._listener = listener
        self._accepted = metrics.connections.labels(listener)
        self._handshakeOK = metrics.handshakes.labels(listener, "success", "")
        self._handshakeSeconds = metrics.handshakeDuration.labels(listener, "success")
        self._handshakeFailedSeconds = metrics.handshakeDuration.labels(listener, "failure")
        self._in = metrics.bytes.labels(listener, CLIENT_TO_BACKEND)
        self._out = metrics.bytes.labels(listener, BACKEND_TO_CLIENT)

    def connectionOpened(self) -> None:
        self._accepted.inc()

    def handshakeSucceeded(self, seconds: float) -> None:
        self._handshakeOK.inc()
        self._handshakeSeconds.observe(seconds)

    def handshakeFailed(self, reason: str, seconds: float) -> None:
        self._metrics.handshakes.labels(self._listener, "failure", reason).inc()
        self._handshakeFailedSeconds.observe(seconds)

    def fromClient(self, count: int) -> None:
        self._in.inc(count)

    def toClient(self, count: int) -> None:
        self._out.inc(count)

    def picked(self, pool: str, member: str) -> None:
        self._metrics.picks.labels(pool, member).inc()

    def connectFailed(self, pool: str, member: str) -> None:
        self._metrics.connectFailures.labels(pool, member).inc()

    def connectionClosed(self, reason: str) -> None:
        self._metrics.closed.labels(self._listener, reason).inc()


class ProxyMetrics:
    """
    The metrics of one proxy, in their own registry.

    @ivar registry: Where everything is registered; C{/metrics} renders it
        with L{render}.
    """

    def __init__(
        self, registry: Optional[CollectorRegistry] = None, processMetrics: bool = True
    ) -> None:
        """
        @param registry: Default a new one.
        @param processMetrics: Also register C{prometheus_client}'s
            C{process_*} metrics (CPU, memory, open files) for this process.
        """
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connections = Counter(
            "mtlsproxy_connections", "Client connections accepted.", ["listener"], registry=r
        )
        self.handshakes = Counter(
            "mtlsproxy_handshakes",
            "TLS handshakes by outcome (success, failure) and failure reason.",
            ["listener", "outcome", "reason"],
            registry=r,
        )
        self.handshakeDuration = Histogram(
            "mtlsproxy_handshake_duration_seconds",
            "Seconds from accepting a connection to the end of its TLS handshake.",
            ["listener", "outcome"],
            buckets=HANDSHAKE_BUCKETS,
            registry=r,
        )
        self.bytes = Counter(
            "mtlsproxy_bytes",
            "Bytes relayed, by direction (client_to_backend, backend_to_client).",
            ["listener", "direction"],
            registry=r,
        )
        self.closed = Counter(
            "mtlsproxy_connections_closed",
            "Client connections ended, by close reason.",
            ["listener", "reason"],
            registry=r,
        )
        self.connectFailures = Counter(
            "mtlsproxy_backend_connect_failures",
            "Backend connection attempts that failed (refused, timed out).",
            ["pool", "member"],
            registry=r,
        )
        self.picks = Counter(
            "mtlsproxy_member_picks",
            "Times the pool's selector chose the member for a connection.",
            ["pool", "member"],
            registry=r,
        )
        if processMetrics:
            ProcessCollector(registry=r)
        self._listeners: dict[str, ListenerMetrics] = {}

    def forListener(self, listener: str) -> ListenerMetrics:
        """
        The L{ListenerMetrics} the relay factory of C{listener} reports to.
        """
        metrics = self._listeners.get(listener)
        if metrics is None:
            metrics = self._listeners[listener] = _RecordingListenerMetrics(self, listener)
        return metrics

    def render(self) -> bytes:
        """
        Everything in the registry in the Prometheus text format.
        """
        return render(self.registry)


def render(registry: CollectorRegistry) -> bytes:
    """
    The metrics of C{registry} in the Prometheus text exposition format
    (its content type is L{CONTENT_TYPE_LATEST}).
    """
    return generate_latest(registry)


def renderFor(registry: CollectorRegistry, accept: Optional[str]) -> tuple[bytes, str]:
    """
    The metrics of C{registry} in the format the scraper's C{Accept} header
    asks for (the Prometheus text format, or OpenMetrics), as
    C{prometheus_client}'s own HTTP handlers negotiate it.

    @return: The body and its content type.
    """
    encoder, contentType = choose_encoder(accept or "")
    return encoder(registry), contentType


def _seconds(clock: Any) -> float:
    return float(clock.seconds())


class ProxyStateCollector:
    """
    A C{prometheus_client} collector of the proxy's live state, read at
    scrape time.

    @ivar proxy: The L{mtlsproxy.service.ProxyService} (anything with
        C{pools}, C{listeners}, C{connections} and C{draining}).
    @ivar clock: Provides C{seconds()}; expiry gauges count from it.
    @ivar expiryReport: Returns the L{mtlsproxy.status.ExpiryEntry} list
        of the proxy at a given time.
    """

    def __init__(
        self,
        proxy: Any,
        clock: Any,
        expiryReport: Callable[[Any, datetime], Iterable[Any]],
    ) -> None:
        self.proxy = proxy
        self.clock = clock
        self.expiryReport = expiryReport

    def describe(self) -> list[Metric]:
        """
        Nothing: the families are known only at collection time (and
        describing them must not read the proxy at registration).
        """
        return []

    def collect(self) -> Iterator[Metric]:
        """
        Read the proxy's state into gauge families.
        """
        proxy = self.proxy
        now = _seconds(self.clock)

        listening = GaugeMetricFamily(
            "mtlsproxy_listener_up", "1 while the listener is listening.", labels=["listener"]
        )
        active = GaugeMetricFamily(
            "mtlsproxy_connections_active",
            "Client connections open now (from accept to the end of both sides).",
            labels=["listener"],
        )
        perListener: dict[str, int] = {name: 0 for name in proxy.listeners}
        for info in proxy.connections.snapshot():
            perListener[info.listener] = perListener.get(info.listener, 0) + 1
        atCapacity = GaugeMetricFamily(
            "mtlsproxy_listener_at_capacity",
            "1 while the listener has max_connections open and does not accept.",
            labels=["listener"],
        )
        for name, listener in proxy.listeners.items():
            listening.add_metric([name], 1.0 if getattr(listener, "port", None) else 0.0)
            atCapacity.add_metric([name], 1.0 if getattr(listener, "atCapacity", False) else 0.0)
        for name, count in perListener.items():
            active.add_metric([name], float(count))
        yield listening
        yield active
        yield atCapacity

        draining = GaugeMetricFamily(
            "mtlsproxy_draining", "1 while the proxy is shutting down gracefully."
        )
        draining.add_metric([], 1.0 if getattr(proxy, "draining", False) else 0.0)
        yield draining

        labels = ["pool", "member"]
        healthy = GaugeMetricFamily(
            "mtlsproxy_member_healthy", "1 unless health checks took the member out.", labels=labels
        )
        available = GaugeMetricFamily(
            "mtlsproxy_member_available",
            "1 if new connections may go to the member (healthy, not ejected,"
            " not draining, weight above 0).",
            labels=labels,
        )
        drainingMember = GaugeMetricFamily(
            "mtlsproxy_member_draining", "1 while an operator drains the member.", labels=labels
        )
        weight = GaugeMetricFamily(
            "mtlsproxy_member_weight", "The member's weight in force.", labels=labels
        )
        memberActive = GaugeMetricFamily(
            "mtlsproxy_member_active_connections",
            "Proxied connections open to the member now.",
            labels=labels,
        )
        for poolName, pool in proxy.pools.items():
            for member in pool.members:
                key = [poolName, member.hostPort]
                healthy.add_metric(key, 1.0 if member.healthy else 0.0)
                available.add_metric(key, 1.0 if member.available(now) else 0.0)
                drainingMember.add_metric(key, 1.0 if member.draining else 0.0)
                weight.add_metric(key, float(member.weight))
                memberActive.add_metric(key, float(member.activeConnections))
        yield from (healthy, available, drainingMember, weight, memberActive)

        certificates = GaugeMetricFamily(
            "mtlsproxy_certificate_expiry_seconds",
            "Seconds until the certificate's notAfter (negative once expired).",
            labels=["listener", "kind", "subject", "serial"],
        )
        crls = GaugeMetricFamily(
            "mtlsproxy_crl_next_update_seconds",
            "Seconds until the CRL's nextUpdate (negative once past).",
            labels=["listener", "issuer"],
        )
        moment = datetime.fromtimestamp(now, timezone.utc)
        for entry in self.expiryReport(proxy, moment):
            if entry.expires is None:
                continue
            left = (entry.expires - moment).total_seconds()
            if entry.kind == "crl":
                crls.add_metric([entry.listener, entry.subject], left)
            else:
                certificates.add_metric(
                    [entry.listener, entry.kind, entry.subject, entry.serial or ""], left
                )
        yield certificates
        yield crls
