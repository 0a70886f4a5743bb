# -*- test-case-name: tests.test_metrics -*-
"""
Tests for L{mtlsproxy.metrics}: the registry per proxy, the relay's counters
(in memory, with the relay tests' harness), and the live-state collector.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Optional

import attrs
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mtlsproxy.drain import ConnectionRegistry
from mtlsproxy.metrics import NO_METRICS, ProxyMetrics, ProxyStateCollector
from mtlsproxy.pool import Member, Pool
from mtlsproxy.relay import ProxyServerFactory, ProxyServerProtocol
from mtlsproxy.status import ExpiryEntry
from mtlsproxy.verify import logHandshakeFailure
from tests.test_relay import RelayHarness, RecordingSelector, _MemberConfig
from tests.test_tlsproto import HalfCloseRecorder, connectTLS


def sample(metrics: ProxyMetrics, name: str, **labels: str) -> Optional[float]:
    """
    The value of one sample of C{metrics}' registry, or L{None}.
    """
    return metrics.registry.get_sample_value(name, labels)


class RegistryTests(SynchronousTestCase):
    """
    L{ProxyMetrics} keeps its metrics to itself.
    """

    def test_separateRegistries(self) -> None:
        """
        When two L{ProxyMetrics} count, each sees only its own numbers: no
        global registry is shared.
        """
        one, two = ProxyMetrics(processMetrics=False), ProxyMetrics(processMetrics=False)
        one.forListener("web").connectionOpened()
        self.assertEqual(sample(one, "mtlsproxy_connections_total", listener="web"), 1.0)
        self.assertIsNone(sample(two, "mtlsproxy_connections_total", listener="web"))

    def test_renderTextFormat(self) -> None:
        """
        When rendered, the registry is in the Prometheus text format, with
        HELP and TYPE lines.
        """
        metrics = ProxyMetrics(processMetrics=False)
        metrics.forListener("web").fromClient(10)
        text = metrics.render().decode()
        self.assertIn("# TYPE mtlsproxy_bytes_total counter", text)
        self.assertIn(
            'mtlsproxy_bytes_total{direction="client_to_backend",listener="web"} 10.0', text
        )

    def test_forListenerCached(self) -> None:
        """
        When asked twice for a listener's metrics, the same object comes
        back (label lookups happen once).
        """
        metrics = ProxyMetrics(processMetrics=False)
        self.assertIs(metrics.forListener("a"), metrics.forListener("a"))

    def test_noMetricsRecordsNothing(self) -> None:
        """
        When the relay has no metrics, L{NO_METRICS} takes every call and
        does nothing.
        """
        NO_METRICS.connectionOpened()
        NO_METRICS.handshakeSucceeded(0.1)
        NO_METRICS.handshakeFailed("revoked", 0.1)
        NO_METRICS.fromClient(1)
        NO_METRICS.toClient(1)
        NO_METRICS.picked("p", "h:1")
        NO_METRICS.connectFailed("p", "h:1")
        NO_METRICS.connectionClosed("client_closed")


class RelayCountingTests(SynchronousTestCase):
    """
    The relay reports to its factory's L{ListenerMetrics}.
    """

    def setUp(self) -> None:
        self.metrics = ProxyMetrics(processMetrics=False)
        self.h = RelayHarness()
        self.h.factory.metrics = self.metrics.forListener("web")

    def test_relayedConnection(self) -> None:
        """
        When a TCP connection is relayed and ends, the accepted, picked,
        bytes and closed counters show it.
        """
        h = self.h.connectClient()
        backend = h.connectBackend()
        h.relay.dataReceived(b"hello")
        backend.dataReceived(b"hi!")
        h.relay.connectionLost(Failure(ConnectionDone()))
        backend.connectionLost(Failure(ConnectionDone()))
        m = self.metrics
        self.assertEqual(sample(m, "mtlsproxy_connections_total", listener="web"), 1.0)
        self.assertEqual(
            sample(m, "mtlsproxy_bytes_total", listener="web", direction="client_to_backend"), 5.0
        )
        self.assertEqual(
            sample(m, "mtlsproxy_bytes_total", listener="web", direction="backend_to_client"), 3.0
        )
        self.assertEqual(
            sample(m, "mtlsproxy_member_picks_total", pool="pool", member="10.0.0.1:8001"), 1.0
        )
        self.assertEqual(
            sample(m, "mtlsproxy_connections_closed_total", listener="web", reason="client_closed"),
            1.0,
        )

    def test_connectFailure(self) -> None:
        """
        When a backend refuses, its connect failures counter goes up and
        the next pick is counted too.
        """
        h = self.h.connectClient()
        h.failBackend(ConnectionRefusedError())
        m = self.metrics
        self.assertEqual(
            sample(
                m, "mtlsproxy_backend_connect_failures_total", pool="pool", member="10.0.0.1:8001"
            ),
            1.0,
        )
        self.assertEqual(
            sample(m, "mtlsproxy_member_picks_total", pool="pool", member="10.0.0.2:8002"), 1.0
        )


class HandshakeCountingTests(SynchronousTestCase):
    """
    Handshakes counted by outcome and reason, over TLS in memory.
    """

    def setUp(self) -> None:
        self.metrics = ProxyMetrics(processMetrics=False)
        self.h = RelayHarness(tls=True)
        self.h.factory.metrics = self.metrics.forListener("web")

    def test_handshakeSucceeded(self) -> None:
        """
        When a TLS client completes its handshake, success is counted and
        the duration observed.
        """
        connectTLS(self.h.factory, Factory.forProtocol(HalfCloseRecorder))
        m = self.metrics
        self.assertEqual(
            sample(m, "mtlsproxy_handshakes_total", listener="web", outcome="success", reason=""),
            1.0,
        )
        self.assertEqual(
            sample(
                m, "mtlsproxy_handshake_duration_seconds_count", listener="web", outcome="success"
            ),
            1.0,
        )

    def test_handshakeRejectedWithReason(self) -> None:
        """
        When a client without a certificate is rejected, a failure is
        counted with the reason verify logged: no_certificate.
        """
        connectTLS(
            self.h.factory,
            Factory.forProtocol(HalfCloseRecorder),
            clientCertificate=False,
            handshakeFailed=logHandshakeFailure,
        )
        self.assertEqual(
            sample(
                self.metrics,
                "mtlsproxy_handshakes_total",
                listener="web",
                outcome="failure",
                reason="no_certificate",
            ),
            1.0,
        )


@attrs.define
class _Listener:
    port: Any = None


class _FakeProxy:
    """
    What L{ProxyStateCollector} reads.
    """

    def __init__(self, clock: Any) -> None:
        self.members = [
            Member(_MemberConfig("10.0.0.1", 8001, 3)),
            Member(_MemberConfig("10.0.0.2", 8002)),
        ]
        self.pools = {"app": Pool("app", self.members, RecordingSelector(), clock=clock)}
        self.listeners = {"web": _Listener(port=object()), "down": _Listener()}
        self.connections = ConnectionRegistry()
        self.draining = False


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def seconds(self) -> float:
        return self.now


class StateCollectorTests(SynchronousTestCase):
    """
    L{ProxyStateCollector} reads live state at scrape time.
    """

    def setUp(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=timezone.utc)
        self.clock = _Clock(self.now.timestamp())
        self.proxy = _FakeProxy(self.clock)
        self.entries = [
            ExpiryEntry("web", "server_certificate", "CN=server", "ab", self.now + timedelta(days=2)),
            ExpiryEntry("web", "crl", "CN=CA", None, self.now + timedelta(hours=1)),
            ExpiryEntry("web", "crl", "CN=Other", None, None),
        ]
        self.metrics = ProxyMetrics(processMetrics=False)
        self.metrics.registry.register(
            ProxyStateCollector(self.proxy, self.clock, lambda proxy, now: self.entries)
        )

    def test_memberGauges(self) -> None:
        """
        When scraped, every member's health, availability, draining, weight
        and active connections are reported.
        """
        self.proxy.members[1].healthy = False
        self.proxy.members[0].drain()
        self.proxy.members[0].connectionOpened()
        m = self.metrics
        labels = {"pool": "app", "member": "10.0.0.1:8001"}
        self.assertEqual(sample(m, "mtlsproxy_member_healthy", **labels), 1.0)
        self.assertEqual(sample(m, "mtlsproxy_member_available", **labels), 0.0)
        self.assertEqual(sample(m, "mtlsproxy_member_draining", **labels), 1.0)
        self.assertEqual(sample(m, "mtlsproxy_member_weight", **labels), 3.0)
        self.assertEqual(sample(m, "mtlsproxy_member_active_connections", **labels), 1.0)
        self.assertEqual(
            sample(m, "mtlsproxy_member_healthy", pool="app", member="10.0.0.2:8002"), 0.0
        )

    def test_listenerGauges(self) -> None:
        """
        When scraped, each listener's state and open connections are
        reported, and whether the proxy is draining.
        """

        class Connection:
            def describe(self) -> Any:
                return attrs.make_class("Info", ["listener"])("web")

        self.proxy.connections.add(Connection())  # type: ignore[arg-type]
        self.proxy.draining = True
        m = self.metrics
        self.assertEqual(sample(m, "mtlsproxy_listener_up", listener="web"), 1.0)
        self.assertEqual(sample(m, "mtlsproxy_listener_up", listener="down"), 0.0)
        self.assertEqual(sample(m, "mtlsproxy_connections_active", listener="web"), 1.0)
        self.assertEqual(sample(m, "mtlsproxy_connections_active", listener="down"), 0.0)
        self.assertEqual(sample(m, "mtlsproxy_draining"), 1.0)

    def test_expiryGauges(self) -> None:
        """
        When scraped, the seconds until each certificate's notAfter and
        each CRL's nextUpdate are reported; a CRL without nextUpdate is
        left out.
        """
        m = self.metrics
        self.assertEqual(
            sample(
                m,
                "mtlsproxy_certificate_expiry_seconds",
                listener="web",
                kind="server_certificate",
                subject="CN=server",
                serial="ab",
            ),
            2 * 86400.0,
        )
        self.assertEqual(
            sample(m, "mtlsproxy_crl_next_update_seconds", listener="web", issuer="CN=CA"), 3600.0
        )
        self.assertIsNone(
            sample(m, "mtlsproxy_crl_next_update_seconds", listener="web", issuer="CN=Other")
        )


class FactoryDefaultsTests(SynchronousTestCase):
    """
    A relay factory built without metrics or registry.
    """

    def test_defaults(self) -> None:
        """
        When a L{ProxyServerFactory} is built without metrics and registry,
        it records nothing and has a registry of its own.
        """
        pool = Pool("p", [], RecordingSelector())
        factory = ProxyServerFactory(object(), "web", pool, 1.0, 1, False)
        self.assertIs(factory.metrics, NO_METRICS)
        self.assertIsInstance(factory.connections, ConnectionRegistry)
        self.assertIsNot(
            factory.connections, ProxyServerFactory(object(), "w", pool, 1.0, 1, False).connections
        )
        self.assertIsInstance(factory.buildProtocol(None), ProxyServerProtocol)
