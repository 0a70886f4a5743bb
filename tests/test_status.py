# -*- test-case-name: tests.test_status -*-
"""
Tests for L{mtlsproxy.status}: the resources rendered with twisted.web's
L{DummyRequest} over a L{ProxyService} on a L{MemoryReactorClock}, the
readiness rule, the expiry report, the status configuration and the TLS
material loading.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from mtlsproxy.config import StatusConfig, loadConfig
from mtlsproxy.errors import ConfigurationError
from mtlsproxy.status import (
    ExpiryEntry,
    StatusService,
    expiryReport,
    isLocal,
    loadStatusMaterial,
    readiness,
)
from tests.harness import DemoPKI
from tests.test_drain import CONFIG, makeProxy

STATUS_CONFIG = CONFIG + '\n[status]\nendpoint = "tcp:0:interface=127.0.0.1"\n'


def render(
    root: Any, path: bytes, method: bytes = b"GET", headers: Optional[dict[bytes, bytes]] = None
) -> DummyRequest:
    """
    Render C{path} on the resource tree C{root} like twisted.web would,
    whether the page answers at once or later (C{NOT_DONE_YET}: the
    request is finished when it answers).
    """
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    request.method = method
    request.path = path  # type: ignore[attr-defined]
    for name, value in (headers or {}).items():
        request.requestHeaders.addRawHeader(name, value)
    resource = getChildForRequest(root, request)
    result = resource.render(request)
    if isinstance(result, bytes):
        request.write(result)
        request.finish()
    return request


def body(request: DummyRequest) -> bytes:
    return b"".join(request.written)


class StatusResourceTests(SynchronousTestCase):
    """
    The pages of the status site.
    """

    def setUp(self) -> None:
        self.proxy, self.reactor = makeProxy(self, STATUS_CONFIG)
        self.proxy.startService()
        self.addCleanup(self.proxy.stopService)
        status = self.proxy.statusService
        assert status is not None
        self.status = status
        self.root = status.resource
        self.member = self.proxy.pools["app"].members[0]

    def test_statusJSON(self) -> None:
        """
        When /status is fetched, the JSON names the listeners, the pools
        and their members with health and connection counts, the
        connections and the expiry lists.
        """
        request = render(self.root, b"/status")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"application/json"])
        data = json.loads(body(request))
        self.assertEqual(data["state"], "running")
        self.assertTrue(data["ready"])
        [listener] = data["listeners"]
        self.assertEqual(
            (listener["name"], listener["protocol"], listener["listening"], listener["pool"]),
            ("plain", "tcp", True, "app"),
        )
        [pool] = data["pools"]
        self.assertEqual((pool["name"], pool["selector"]), ("app", "round_robin"))
        [member] = pool["members"]
        self.assertEqual(
            {k: member[k] for k in ("member", "healthy", "draining", "weight", "active_connections")},
            {
                "member": "127.0.0.1:9",
                "healthy": True,
                "draining": False,
                "weight": 1,
                "active_connections": 0,
            },
        )
        self.assertIsNone(member["last_check"])
        self.assertEqual(data["connections"], {"active": 0, "by_listener": {"plain": 0}})
        self.assertEqual((data["certificates"], data["crls"]), ([], []))

    def test_lastCheckReported(self) -> None:
        """
        When a member has a health check result, /status shows its reason
        and whether it was inconclusive.
        """
        from mtlsproxy.health import CheckResult

        self.member.lastCheck = (CheckResult(False, "connection refused"), 1000.0)
        data = json.loads(body(render(self.root, b"/status")))
        check = data["pools"][0]["members"][0]["last_check"]
        self.assertEqual(
            check,
            {"healthy": False, "reason": "connection refused", "inconclusive": False,
             "time": "1970-01-01T00:16:40Z"},
        )
        self.member.lastCheck = (CheckResult(False, "out", inconclusive=True), 1000.0)
        data = json.loads(body(render(self.root, b"/status")))
        self.assertTrue(data["pools"][0]["members"][0]["last_check"]["inconclusive"])

    def test_metrics(self) -> None:
        """
        When /metrics is fetched, it is the Prometheus text format of the
        proxy's registry.
        """
        request = render(self.root, b"/metrics")
        [contentType] = request.responseHeaders.getRawHeaders(b"content-type")
        self.assertTrue(contentType.startswith(b"text/plain; version="), contentType)
        text = body(request).decode()
        self.assertIn('mtlsproxy_member_healthy{member="127.0.0.1:9",pool="app"} 1.0', text)
        self.assertIn('mtlsproxy_listener_up{listener="plain"} 1.0', text)

    def test_healthz(self) -> None:
        """
        When /healthz is fetched, the answer is 200 ok.
        """
        request = render(self.root, b"/healthz")
        self.assertEqual((request.responseCode or 200, body(request)), (200, b"ok\n"))

    def test_readyz(self) -> None:
        """
        When every listener listens and every pool has an available member,
        /readyz is 200; when the only member is unhealthy, 503 naming the
        pool.
        """
        request = render(self.root, b"/readyz")
        self.assertEqual((request.responseCode, body(request)), (200, b"ready\n"))
        self.member.healthy = False
        request = render(self.root, b"/readyz")
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(body(request), b"not ready: pool app has no available member\n")

    def test_readyzWhileDraining(self) -> None:
        """
        When the proxy is shutting down, /readyz is 503.
        """
        self.proxy.draining = True
        request = render(self.root, b"/readyz")
        self.assertEqual(request.responseCode, 503)
        self.assertIn(b"shutting down", body(request))

    def test_drainAndEnableMember(self) -> None:
        """
        When a member is drained through POST /members/<pool>/<member>/drain,
        it takes no new connections; /enable puts it back.
        """
        self.status.controlAllowed = True
        request = render(self.root, b"/members/app/127.0.0.1:9/drain", b"POST")
        self.assertEqual(request.responseCode, 200)
        self.assertTrue(json.loads(body(request))["draining"])
        self.assertTrue(self.member.draining)
        self.assertEqual(self.proxy.pools["app"].candidates(), [])
        request = render(self.root, b"/members/app/127.0.0.1:9/enable", b"POST")
        self.assertEqual(request.responseCode, 200)
        self.assertFalse(self.member.draining)

    def test_memberControlRefused(self) -> None:
        """
        When the status endpoint is neither loopback nor mTLS, or the
        request comes from a web page (Origin), drain is refused with 403
        and the member is untouched.
        """
        self.status.controlAllowed = False
        request = render(self.root, b"/members/app/127.0.0.1:9/drain", b"POST")
        self.assertEqual(request.responseCode, 403)
        self.status.controlAllowed = True
        request = render(
            self.root,
            b"/members/app/127.0.0.1:9/drain",
            b"POST",
            {b"origin": b"https://evil.example"},
        )
        self.assertEqual(request.responseCode, 403)
        self.assertFalse(self.member.draining)

    def test_memberControlErrors(self) -> None:
        """
        When the pool, member or action is unknown the answer is 404, and a
        GET is 405.
        """
        self.status.controlAllowed = True
        for path in (
            b"/members/nope/127.0.0.1:9/drain",
            b"/members/app/127.0.0.1:10/drain",
            b"/members/app/127.0.0.1:9/explode",
            b"/members/app",
        ):
            self.assertEqual(render(self.root, path, b"POST").responseCode, 404, path)
        self.assertEqual(render(self.root, b"/members/app/127.0.0.1:9/drain").responseCode, 405)

    def test_controlDecidedByAddress(self) -> None:
        """
        When listening on 0.0.0.0 without client certificates (as the
        memory reactor reports), member control is disabled.
        """
        self.assertFalse(self.status.controlAllowed)


class IsLocalTests(SynchronousTestCase):
    """
    L{isLocal}.
    """

    def test_addresses(self) -> None:
        """
        When the address is loopback (IPv4 or IPv6) or a UNIX socket, it is
        local; a wildcard or public address is not.
        """
        self.assertTrue(isLocal(IPv4Address("TCP", "127.0.0.1", 1)))
        self.assertTrue(isLocal(IPv4Address("TCP", "127.3.2.1", 1)))
        self.assertTrue(isLocal(IPv6Address("TCP", "::1", 1)))
        self.assertTrue(isLocal(UNIXAddress(b"/run/mtlsproxy.sock")))
        self.assertFalse(isLocal(IPv4Address("TCP", "0.0.0.0", 1)))
        self.assertFalse(isLocal(IPv4Address("TCP", "192.0.2.1", 1)))
        self.assertFalse(isLocal(IPv6Address("TCP", "::", 1)))


class _Proxy:
    def __init__(self, reloader: Any = None) -> None:
        self.reloader = reloader
        self.loaded = type("Loaded", (), {"listeners": {}})()
        self.listeners: dict[str, Any] = {}
        self.pools: dict[str, Any] = {}


class ExpiryReportTests(SynchronousTestCase):
    """
    L{expiryReport}.
    """

    def test_fromReloader(self) -> None:
        """
        When the proxy has a reloader with expiryReport(), its items (any
        object with listener, kind, subject, serial, file and not_after)
        are the report.
        """
        when = datetime(2031, 1, 1, tzinfo=timezone.utc)

        class Item:
            listener = "web"
            kind = "crl"
            file = "/etc/crl.pem"
            subject = "CN=CA"
            serial = None
            not_after = when

        class Reloader:
            def expiryReport(self) -> list[Any]:
                return [Item(), {"listener": "web", "kind": "ca_certificate", "subject": "CN=X",
                                 "serial": "1", "not_after": "2032-01-01T00:00:00+00:00"}]

        report = expiryReport(_Proxy(Reloader()), when)
        self.assertEqual(
            report,
            [
                ExpiryEntry("web", "crl", "CN=CA", None, when, "/etc/crl.pem"),
                ExpiryEntry(
                    "web", "ca_certificate", "CN=X", "1", datetime(2032, 1, 1, tzinfo=timezone.utc)
                ),
            ],
        )
        self.assertEqual(report[0].asDict(when - timedelta(seconds=5))["seconds_left"], 5)

    def test_fromMaterial(self) -> None:
        """
        When there is no reloader, the report is computed from the loaded
        material: server certificate, CAs, CRLs.
        """
        pki = DemoPKI(os.path.abspath(self.mktemp()))
        from mtlsproxy.material import loadCertificates, loadCRLs, loadPrivateKey
        from mtlsproxy.material import ListenerMaterial

        material = ListenerMaterial(
            loadCertificates(pki.path("server-chain.pem"), "k"),
            loadPrivateKey(pki.path("server.key"), "k"),
            loadCertificates(pki.path("root.crt"), "k"),
            loadCRLs(pki.path("crls.pem"), "k")[:1],
        )
        proxy = _Proxy()
        proxy.loaded.listeners = {"mtls": material}
        report = expiryReport(proxy, datetime.now(timezone.utc))
        self.assertEqual(
            [(e.listener, e.kind, e.subject) for e in report],
            [
                ("mtls", "server_certificate", "CN=localhost"),
                ("mtls", "ca_certificate", "CN=Test Root"),
                ("mtls", "crl", "CN=Test Root"),
            ],
        )


class ReadinessTests(SynchronousTestCase):
    """
    L{readiness}.
    """

    def test_notListening(self) -> None:
        """
        When a listener is not listening, the proxy is not ready.
        """
        proxy = _Proxy()
        proxy.listeners = {"web": type("L", (), {"port": None})()}
        self.assertEqual(readiness(proxy), (False, ["listener web is not listening"]))


class StatusConfigTests(SynchronousTestCase):
    """
    The C{[status]} table and its TLS material.
    """

    def writeConfig(self, status: str) -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.pki = DemoPKI(os.path.join(directory, "pki"))
        path = os.path.join(directory, "proxy.toml")
        with open(path, "w") as f:
            f.write(CONFIG + "\n[status]\n" + status)
        return path

    def test_defaults(self) -> None:
        """
        When [status] is empty, the endpoint is loopback port 9100, plain
        HTTP.
        """
        config = loadConfig(self.writeConfig(""))
        assert config.status is not None
        self.assertEqual(config.status.endpoint, "tcp:9100:interface=127.0.0.1")
        self.assertFalse(config.status.tls)

    def test_certWithoutKey(self) -> None:
        """
        When cert is set without key, the error names status.key.
        """
        path = self.writeConfig('cert = "pki/server-chain.pem"\n')
        error = self.assertRaises(ConfigurationError, loadConfig, path)
        self.assertEqual(error.key, "status.key")

    def test_clientAuthNeedsTLS(self) -> None:
        """
        When client_auth is set on a plain HTTP status endpoint, the error
        names status.client_auth.
        """
        path = self.writeConfig('client_auth = "required"\n')
        error = self.assertRaises(ConfigurationError, loadConfig, path)
        self.assertEqual(error.key, "status.client_auth")
        self.assertIn("only allowed with cert and key", str(error))

    def test_mutualTLSMaterial(self) -> None:
        """
        When the status endpoint has cert, key and CAs, its material is
        loaded with the listeners' checks and a TLS status service is
        built.
        """
        path = self.writeConfig(
            'cert = "pki/server-chain.pem"\nkey = "pki/server.key"\nclient_auth = "required"\n'
            'ca_certificates = ["pki/ca-bundle.pem"]\ncrls = ["pki/crls.pem"]\n'
        )
        config = loadConfig(path)
        material, warnings = loadStatusMaterial(config, datetime.now(timezone.utc))
        assert material is not None and config.status is not None
        self.assertEqual(material.chain[0].subject.rfc4514_string(), "CN=localhost")
        service = StatusService(object(), _Proxy(), None, config.status, material)
        self.assertEqual(type(service.factory).__name__, "HalfCloseTLSFactory")

    def test_missingCertificateFile(self) -> None:
        """
        When the status certificate file is missing, the error names the
        file and the key status.cert.
        """
        path = self.writeConfig('cert = "nope.pem"\nkey = "pki/server.key"\n')
        config = loadConfig(path)
        error = self.assertRaises(
            ConfigurationError, loadStatusMaterial, config, datetime.now(timezone.utc)
        )
        self.assertEqual((error.path, error.key), (path, "status.cert"))
