# -*- test-case-name: tests.test_integration_status_workers -*-
"""
Integration tests of the status endpoint served over HTTPS with client
certificates by the supervisor of a real C{twistd -n mtlsproxy} with
C{workers = 2}: the supervisor terminates TLS, verifies client certificates
(CRLs included) exactly like a listener, and fans each request in over the
workers' private sockets.

Real processes, real TLS (Python's C{ssl} module as the client), 127.0.0.1
only, every wait bounded.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import ssl
import tempfile
from typing import Any, Optional

from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from . import harness

STATUS_TLS = """
[status]
endpoint = "tcp:0:interface=127.0.0.1"
cert = "{pki}/server-chain.pem"
key = "{pki}/server.key"
client_auth = "required"
ca_certificates = ["{pki}/ca-bundle.pem"]
crls = ["{pki}/crls.pem"]
"""


class SupervisorHTTPSStatusTests(SynchronousTestCase):
    """
    C{workers = 2} with C{[status]} over HTTPS, client certificates
    required and a CRL: the supervisor serves it.
    """

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="mtlsproxy-status-workers-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.pki = harness.DemoPKI(os.path.join(self.directory, "pki"))
        self.backend = harness.EchoBackend("b")
        self.addCleanup(self.backend.stop)
        self.proxy = harness.ProxyProcess(
            self.directory,
            "workers = 2\n"
            + STATUS_TLS.format(pki=self.pki.directory)
            + harness.tlsConfig(self.pki.directory, [self.backend]),
        )
        # Cleanups run last first: this one after the proxy has stopped.
        self.addCleanup(self._removeStatusDirectories)
        self.addCleanup(self.proxy.stop)
        self.proxy.start(timeout=20)
        self.assertTrue(
            harness.waitFor(lambda: self.proxy.log().count("Listener mtls (tls) listening on") >= 2, timeout=20),
            self.proxy.log()[-3000:],
        )
        match = self.proxy.waitForLog(
            r"Status endpoint \(https\) listening on 127\.0\.0\.1:(\d+); member control (\w+)"
        )
        self.assertIsNotNone(match, self.proxy.log()[-3000:])
        assert match is not None
        self.port = int(match.group(1))
        self.control = match.group(2)
        # Both workers answer the supervisor (a worker's private socket may
        # come up a moment after its listener).
        self.assertTrue(
            harness.waitFor(lambda: self.request("/readyz")[0] == 200, timeout=15),
            self.request("/readyz"),
        )

    def _removeStatusDirectories(self) -> None:
        """
        Remove the directories of the workers' status sockets, should the
        supervisor have been unable to (killed outright).
        """
        for path in set(re.findall(r"Private status socket for the supervisor at (\S+)", self.proxy.log())):
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)

    def supervisorLog(self) -> str:
        """
        The supervisor's own log (not the workers'): it terminates TLS for
        the status endpoint, so it logs the rejected handshakes.
        """
        with open(self.proxy.logfile, errors="replace") as f:
            return f.read()

    def context(self, name: Optional[str], version: Optional[ssl.TLSVersion] = None) -> ssl.SSLContext:
        """
        A client context that verifies the endpoint against the test root and
        presents the client certificate C{name} (with its chain), if any.
        """
        ctx = ssl.create_default_context(cafile=self.pki.path("root.crt"))
        if version is not None:
            ctx.minimum_version = ctx.maximum_version = version
        if name is not None:
            ctx.load_cert_chain(self.pki.path(f"{name}-chain.pem"), self.pki.path(f"{name}.key"))
        return ctx

    def request(
        self,
        path: str,
        method: str = "GET",
        name: Optional[str] = "client",
        headers: Optional[dict[str, str]] = None,
        version: Optional[ssl.TLSVersion] = None,
    ) -> tuple[int, bytes]:
        """
        One HTTPS request to the supervisor's status endpoint.
        """
        # The server certificate names 127.0.0.1: hostname checking stays on.
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.context(name, version), timeout=10
        )
        try:
            conn.request(method, path, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def assertRefused(self, name: Optional[str], reason: str, version: ssl.TLSVersion) -> None:
        """
        A client presenting C{name} (or nothing) is refused during the
        handshake (TLS 1.2: the handshake itself fails; TLS 1.3: the
        server's alert arrives on the first read, and no HTTP answer ever
        does), and the supervisor logs the rejection on listener C{status}
        with C{reason}.
        """
        before = self.supervisorLog().count("on listener status: " + reason)
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        try:
            with self.assertRaises((ssl.SSLError, ConnectionError)):
                tls = self.context(name, version).wrap_socket(sock, server_hostname="127.0.0.1")
                tls.sendall(b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                data = tls.recv(65536)
                # A clean close with nothing read is a refusal too; any
                # HTTP answer is not.
                self.assertEqual(data, b"", "the endpoint answered a refused client")
                raise ConnectionResetError("closed without answering")
        finally:
            sock.close()
        self.assertTrue(
            harness.waitFor(
                lambda: self.supervisorLog().count("on listener status: " + reason) > before, timeout=10
            ),
            self.supervisorLog()[-3000:],
        )

    def status(self) -> dict[str, Any]:
        code, body = self.request("/status")
        self.assertEqual(code, 200, body)
        report: dict[str, Any] = json.loads(body)
        return report

    def test_clientCertificatesVerified(self) -> None:
        """
        A client with a valid certificate gets the merged C{/metrics} (both
        workers' samples, labelled C{worker="0"} and C{worker="1"}, each up)
        and C{/status} (two workers, each with its own report); a client
        without a certificate, one with a revoked certificate and one under
        a revoked intermediate are refused at the handshake (TLS 1.2 and
        1.3), each logged by the supervisor on listener C{status}.  The
        workers do not serve the configured endpoint themselves.
        """
        code, body = self.request("/healthz")
        self.assertEqual((code, body.strip()), (200, b"ok"))

        code, body = self.request("/metrics")
        self.assertEqual(code, 200, body)
        workersSeen: dict[str, set[str]] = {}
        up: dict[str, float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                worker = sample.labels.get("worker")
                if worker is not None:
                    workersSeen.setdefault(worker, set()).add(sample.name)
                if sample.name == "mtlsproxy_worker_up":
                    up[sample.labels["worker"]] = sample.value
        self.assertEqual(up, {"0": 1.0, "1": 1.0})
        self.assertIn("0", workersSeen)
        self.assertIn("1", workersSeen)
        for worker in ("0", "1"):
            # Each worker's own proxy metrics, not just the supervisor's
            # per-worker gauges.
            self.assertIn("mtlsproxy_connections_total", workersSeen[worker])
            self.assertIn("mtlsproxy_member_healthy", workersSeen[worker])
        self.assertIn("supervisor", workersSeen)
        # The status endpoint's own certificates and CRLs, once per worker
        # (each series once: a repeated one made the supervisor drop the
        # worker's whole scrape).
        series = [line.rsplit(" ", 1)[0] for line in body.decode().splitlines() if not line.startswith("#")]
        self.assertEqual(len(series), len(set(series)))
        self.assertIn('listener="status"', body.decode())

        # OpenMetrics, when the scraper asks for it: parses as such, with
        # both workers' samples.
        code, body = self.request(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"}
        )
        self.assertEqual(code, 200, body)
        self.assertTrue(body.endswith(b"# EOF\n"), body[-200:])
        openWorkers = {
            sample.labels.get("worker")
            for family in openmetrics_families(body.decode())
            for sample in family.samples
            if family.name == "mtlsproxy_connections"
        }
        self.assertEqual(openWorkers, {"0", "1"})

        report = self.status()
        self.assertTrue(report["ready"], report["problems"])
        self.assertEqual(len(report["workers"]), 2)
        self.assertEqual([entry["worker"] for entry in report["workers"]], [0, 1])
        pids = [entry["pid"] for entry in report["workers"]]
        self.assertEqual(len(set(pids)), 2)
        assert self.proxy.process is not None
        self.assertNotIn(self.proxy.process.pid, pids)
        for entry in report["workers"]:
            self.assertNotIn("error", entry)
            self.assertEqual(entry["status"]["listeners"][0]["name"], "mtls")
        self.assertEqual(report["supervisor"]["workers"], 2)
        # The status endpoint's own certificate is in the expiry lists, once.
        self.assertIn("status", {c["listener"] for c in report["certificates"]})
        for key in ("certificates", "crls"):
            entries = [json.dumps(e, sort_keys=True) for e in report[key]]
            self.assertEqual(len(entries), len(set(entries)), report[key])

        # Exactly one public status endpoint: the supervisor's.
        self.assertEqual(len(re.findall(r"Status endpoint \(https\) listening on", self.proxy.log())), 1)

        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            self.assertRefused(None, "no_certificate", version)
            self.assertRefused("revoked", "revoked", version)
        self.assertRefused("underRevoked", "revoked", ssl.TLSVersion.TLSv1_3)
        self.assertRefused("untrusted", "unknown_ca", ssl.TLSVersion.TLSv1_3)
        serial = format(self.pki.revoked.certificate.serial_number, "x")
        self.assertIn(serial.lower(), self.supervisorLog().lower())
        # The rejections were the supervisor's, and it still serves.
        self.assertEqual(self.request("/readyz")[0], 200)

    def test_memberControlWithClientCertificate(self) -> None:
        """
        Member control is enabled on this endpoint (loopback, and client
        certificates required): a drain POSTed with a valid client
        certificate reaches both workers, which both report the member
        draining in the merged C{/status}, and the supervisor remembers it;
        a POST with an C{Origin} header is refused with 403 and changes
        nothing; an C{enable} then puts the member back in both workers.
        """
        self.assertEqual(self.control, "enabled")
        member = f"127.0.0.1:{self.backend.port}"
        path = f"/members/app/{member}"

        code, body = self.request(path + "/drain", "POST")
        self.assertEqual(code, 200, body)
        answer = json.loads(body)
        self.assertTrue(answer["draining"], answer)
        self.assertEqual([(w["worker"], w["code"]) for w in answer["workers"]], [(0, 200), (1, 200)])

        def drainingIn(report: dict[str, Any]) -> list[bool]:
            return [entry["status"]["pools"][0]["members"][0]["draining"] for entry in report["workers"]]

        report = self.status()
        self.assertEqual(report["pools"][0]["members"][0]["member"], member)
        self.assertTrue(report["pools"][0]["members"][0]["draining"])
        self.assertEqual(drainingIn(report), [True, True])
        self.assertEqual(report["supervisor"]["drained_members"], [{"pool": "app", "member": member}])
        code, body = self.request("/readyz")
        self.assertEqual(code, 503, body)

        # A cross-origin POST is refused, even with a client certificate,
        # and does not reach the workers.
        code, body = self.request(path + "/enable", "POST", headers={"Origin": "https://evil.example"})
        self.assertEqual(code, 403, body)
        self.assertIn("cross-origin", json.loads(body)["error"])
        report = self.status()
        self.assertEqual(drainingIn(report), [True, True])
        self.assertEqual(report["supervisor"]["drained_members"], [{"pool": "app", "member": member}])

        # Without a client certificate a POST never gets past the handshake.
        self.assertRefused(None, "no_certificate", ssl.TLSVersion.TLSv1_3)

        code, body = self.request(path + "/enable", "POST")
        self.assertEqual(code, 200, body)
        report = self.status()
        self.assertEqual(drainingIn(report), [False, False])
        self.assertFalse(report["pools"][0]["members"][0]["draining"])
        self.assertEqual(report["supervisor"]["drained_members"], [])
        self.assertEqual(self.request("/readyz")[0], 200)
