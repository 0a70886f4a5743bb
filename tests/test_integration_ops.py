# -*- test-case-name: tests.test_integration_ops -*-
"""
Integration tests of the operators' side with the real C{twistd -n
mtlsproxy}: the status endpoint and its metrics after real connections,
member drain through the status API, graceful drain on SIGTERM, JSON logs,
and the admin console through OpenSSH's C{ssh}.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Optional

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from .harness import (
    BIN,
    DemoPKI,
    EchoBackend,
    ProxyProcess,
    clientContext,
    tlsConfig,
    tlsExchange,
    waitFor,
)
from OpenSSL import SSL


def http(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    """
    One HTTP request to the status endpoint on 127.0.0.1.
    """
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def metric(text: str, name: str, **labels: str) -> float:
    """
    The value of the sample C{name} with C{labels} in a Prometheus text
    page; 0 if absent.
    """
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def statusPort(proxy: ProxyProcess) -> int:
    match = proxy.waitForLog(r"Status endpoint \(http\) listening on 127\.0\.0\.1:(\d+)")
    if match is None:
        raise AssertionError(f"no status endpoint in log:\n{proxy.log()}")
    return int(match.group(1))


OPS = '[status]\nendpoint = "tcp:0:interface=127.0.0.1"\n'


class StatusEndpointTests(SynchronousTestCase):
    """
    A TLS listener with the status endpoint.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.pki = DemoPKI(os.path.join(self.dir, "pki"))
        self.backends = [EchoBackend("backend-1"), EchoBackend("backend-2")]
        for b in self.backends:
            self.addCleanup(b.stop)
        self.proxy = ProxyProcess(self.dir, OPS + tlsConfig(self.pki.directory, self.backends))
        self.addCleanup(self.proxy.stop)
        self.proxy.start()
        self.port = self.proxy.ports["mtls"]
        self.status = statusPort(self.proxy)

    def metrics(self) -> str:
        code, body = http(self.status, "/metrics")
        self.assertEqual(code, 200)
        return body.decode()

    def test_portProbeCountedApart(self) -> None:
        """
        When something connects and closes without sending a byte (a load
        balancer's TCP probe), /metrics counts it as reason C{no_data}, not
        as an C{aborted} handshake, and its access line says C{no_data}.
        """
        import socket

        for _ in range(3):
            socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
        text = waitFor(
            lambda: (lambda t: t if metric(t, "mtlsproxy_connections_closed_total", listener="mtls",
                                           reason="no_data") >= 3 else None)(self.metrics())
        )
        self.assertIsNotNone(text, self.metrics())
        self.assertEqual(
            metric(text, "mtlsproxy_handshakes_total", listener="mtls", outcome="failure", reason="no_data"), 3
        )
        self.assertEqual(
            metric(text, "mtlsproxy_handshakes_total", listener="mtls", outcome="failure", reason="aborted"), 0
        )
        self.assertIsNotNone(self.proxy.waitForLog(r"mtlsproxy\.access.* -> None no_data "))

    def test_metricsCountRealConnections(self) -> None:
        """
        When a valid client is relayed and a revoked one rejected, /metrics
        shows two accepted connections, one successful handshake, one
        failure with reason revoked, the bytes each way and one pick.
        """
        before = self.metrics()
        self.assertEqual(metric(before, "mtlsproxy_connections_total", listener="mtls"), 0)
        tlsExchange(self.port, clientContext(self.pki, "client"), b"hello")
        self.assertRaises(
            (SSL.Error, ConnectionError, TimeoutError),
            tlsExchange, self.port, clientContext(self.pki, "revoked"), b"x", 10.0,
        )
        self.assertIsNotNone(self.proxy.waitForLog(r"access.*client-ok|client-ok.*client_closed"))

        def counted() -> Optional[str]:
            text = self.metrics()
            done = metric(text, "mtlsproxy_connections_closed_total", listener="mtls", reason="client_closed")
            failed = metric(text, "mtlsproxy_handshakes_total", outcome="failure", reason="revoked")
            return text if done >= 1 and failed >= 1 else None

        text = waitFor(counted)
        self.assertIsNotNone(text, self.metrics())
        self.assertEqual(metric(text, "mtlsproxy_connections_total", listener="mtls"), 2)
        self.assertEqual(
            metric(text, "mtlsproxy_handshakes_total", listener="mtls", outcome="success"), 1
        )
        self.assertEqual(
            metric(text, "mtlsproxy_handshakes_total", listener="mtls", outcome="failure", reason="revoked"),
            1,
        )
        self.assertEqual(
            metric(text, "mtlsproxy_bytes_total", listener="mtls", direction="client_to_backend"), 5
        )
        self.assertGreater(
            metric(text, "mtlsproxy_bytes_total", listener="mtls", direction="backend_to_client"), 5
        )
        picks = sum(
            metric(text, "mtlsproxy_member_picks_total", pool="app", member=f"127.0.0.1:{b.port}")
            for b in self.backends
        )
        self.assertEqual(picks, 1)
        self.assertEqual(
            metric(text, "mtlsproxy_handshake_duration_seconds_count", listener="mtls", outcome="success"),
            1,
        )
        self.assertGreater(
            metric(
                text,
                "mtlsproxy_certificate_expiry_seconds",
                listener="mtls",
                kind="server_certificate",
                subject="CN=localhost",
            ),
            300 * 86400,
        )
        self.assertEqual(
            metric(text, "mtlsproxy_member_healthy", pool="app", member=f"127.0.0.1:{self.backends[0].port}"),
            1,
        )

    def test_statusShape(self) -> None:
        """
        When /status is fetched, it is JSON with the listener, the pool and
        both members, the connections and the expiry of the server
        certificate, the CAs and the CRLs; /healthz and /readyz answer 200.
        """
        code, body = http(self.status, "/status")
        self.assertEqual(code, 200)
        data = json.loads(body)
        self.assertEqual(
            sorted(data),
            sorted(
                ["version", "time", "state", "ready", "problems", "uptime_seconds", "listeners",
                 "pools", "connections", "certificates", "crls"]
            ),
        )
        self.assertEqual(data["state"], "running")
        self.assertEqual([l["name"] for l in data["listeners"]], ["mtls"])
        self.assertEqual(data["listeners"][0]["address"], f"127.0.0.1:{self.port}")
        [pool] = data["pools"]
        self.assertEqual(
            [m["member"] for m in pool["members"]], [f"127.0.0.1:{b.port}" for b in self.backends]
        )
        kinds = {entry["kind"] for entry in data["certificates"]}
        self.assertIn("server_certificate", kinds)
        self.assertIn("ca_certificate", kinds)
        self.assertEqual(len(data["crls"]), 3)
        self.assertEqual(http(self.status, "/healthz"), (200, b"ok\n"))
        self.assertEqual(http(self.status, "/readyz"), (200, b"ready\n"))

    def test_drainedMemberGetsNoNewConnections(self) -> None:
        """
        When a member is drained through the status API, the next clients
        all go to the other member; after enable, it is used again.
        """
        drained = self.backends[0]
        code, body = http(self.status, f"/members/app/127.0.0.1:{drained.port}/drain", "POST")
        self.assertEqual(code, 200, body)
        self.assertTrue(json.loads(body)["draining"])
        names = {
            tlsExchange(self.port, clientContext(self.pki, "client"), b"x").decode().split()[-2]
            for _ in range(4)
        }
        self.assertEqual(names, {"backend-2"})
        self.assertEqual(drained.accepted, 0)
        code, _ = http(self.status, f"/members/app/127.0.0.1:{drained.port}/enable", "POST")
        self.assertEqual(code, 200)
        names = {
            tlsExchange(self.port, clientContext(self.pki, "client"), b"x").decode().split()[-2]
            for _ in range(2)
        }
        self.assertEqual(names, {"backend-1", "backend-2"})


def tcpConfig(backends: list[EchoBackend], head: str = "") -> str:
    members = "".join(
        f'[[pools.members]]\naddress = "127.0.0.1"\nport = {b.port}\n' for b in backends
    )
    return (
        head
        + '[[listeners]]\nname = "plain"\nendpoint = "tcp:0:interface=127.0.0.1"\n'
        'protocol = "tcp"\npool = "app"\n\n[[pools]]\nname = "app"\n' + members
    )


class MemberControlOffTests(SynchronousTestCase):
    """
    C{member_control = false} under C{[status]}.
    """

    def test_loopbackRefusedWhenOff(self) -> None:
        """
        When member_control is false, a loopback status endpoint refuses
        drains with 403 and says why, the log says control is disabled and
        why, and the member keeps taking connections; the GETs still work.
        """
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        pki = DemoPKI(os.path.join(d, "pki"))
        backend = EchoBackend("backend-1")
        self.addCleanup(backend.stop)
        proxy = ProxyProcess(d, OPS + "member_control = false\n" + tlsConfig(pki.directory, [backend]))
        self.addCleanup(proxy.stop)
        proxy.start()
        status = statusPort(proxy)
        self.assertIn("member control disabled (member_control = false)", proxy.log())
        code, body = http(status, f"/members/app/127.0.0.1:{backend.port}/drain", "POST")
        self.assertEqual(code, 403)
        self.assertIn(b"member_control = false", body)
        report = json.loads(http(status, "/status")[1])
        self.assertFalse(report["pools"][0]["members"][0]["draining"])
        self.assertTrue(
            tlsExchange(proxy.ports["mtls"], clientContext(pki, "client"), b"hi").startswith(b"hi\nbackend-1")
        )


class GracefulDrainTests(SynchronousTestCase):
    """
    SIGTERM with a connection in progress.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.backend = EchoBackend("backend-1")
        self.addCleanup(self.backend.stop)

    def startProxy(self, drainTimeout: float) -> ProxyProcess:
        proxy = ProxyProcess(self.dir, tcpConfig([self.backend], f"drain_timeout = {drainTimeout}\n"))
        self.addCleanup(proxy.stop)
        proxy.start()
        return proxy

    def test_connectionCompletesThenExit(self) -> None:
        """
        When SIGTERM arrives during a connection, the proxy stops accepting
        at once, the connection goes on to its end, and then the process
        exits (by SIGTERM, as twistd does), well within drain_timeout.
        """
        proxy = self.startProxy(20)
        port = proxy.ports["plain"]
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(client.close)
        client.sendall(b"first ")
        self.assertEqual(client.recv(100), b"first ")
        assert proxy.process is not None
        started = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        self.assertIsNotNone(proxy.waitForLog(r"Draining: waiting up to 20\.0s for 1 connection"))

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                return False
            except OSError:
                return True

        self.assertTrue(waitFor(refused))
        client.sendall(b"second")
        self.assertEqual(client.recv(100), b"second")
        client.shutdown(socket.SHUT_WR)
        rest = b""
        while True:
            data = client.recv(100)
            if not data:
                break
            rest += data
        self.assertEqual(rest, b"\nbackend-1 12\n")
        # twistd ends itself with the signal that stopped it (systemd counts
        # that as a clean exit).
        self.assertIn(proxy.process.wait(timeout=15), (0, -signal.SIGTERM))
        self.assertLess(time.monotonic() - started, 15)
        self.assertIn("Drained: all connections finished", proxy.log())

    def test_secondSignalWhileDraining(self) -> None:
        """
        When a second SIGTERM (or a SIGINT) arrives while the proxy drains,
        it is logged, the drain goes on, and no traceback is written.
        """
        proxy = self.startProxy(20)
        client = socket.create_connection(("127.0.0.1", proxy.ports["plain"]), timeout=10)
        self.addCleanup(client.close)
        client.sendall(b"x")
        self.assertEqual(client.recv(10), b"x")
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGTERM)
        self.assertIsNotNone(proxy.waitForLog(r"Draining: waiting up to 20\.0s for 1 connection"))
        proxy.process.send_signal(signal.SIGTERM)
        proxy.process.send_signal(signal.SIGINT)
        self.assertIsNotNone(proxy.waitForLog(r"Received signal 2 while already stopping"))
        self.assertIsNotNone(proxy.waitForLog(r"Received signal 15 while already stopping"))
        client.sendall(b"y")
        self.assertEqual(client.recv(10), b"y")
        client.close()
        self.assertIn(proxy.process.wait(timeout=15), (0, -signal.SIGTERM))
        log = proxy.log()
        self.assertNotIn("Traceback", log)
        self.assertNotIn("ReactorNotRunning", log)
        self.assertIn("Drained: all connections finished", log)

    def test_drainTimeoutClosesTheRest(self) -> None:
        """
        When a connection is still open after drain_timeout, it is closed
        and the process exits.
        """
        proxy = self.startProxy(1)
        client = socket.create_connection(("127.0.0.1", proxy.ports["plain"]), timeout=10)
        self.addCleanup(client.close)
        client.sendall(b"x")
        self.assertEqual(client.recv(10), b"x")
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGTERM)
        self.assertIn(proxy.process.wait(timeout=15), (0, -signal.SIGTERM))
        self.assertEqual(client.recv(10), b"")
        log = proxy.log()
        self.assertIn("Drain timeout (1.0s) reached: closing 1 connection(s)", log)
        self.assertRegex(log, r"plain .* shutdown in=1 out=1")


class JSONLogTests(SynchronousTestCase):
    """
    JSON logs from the real process.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.backend = EchoBackend("backend-1")
        self.addCleanup(self.backend.stop)

    def exchange(self, port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"abc")
            s.shutdown(socket.SHUT_WR)
            while s.recv(100):
                pass

    def test_configJSONToLogfile(self) -> None:
        """
        When [logging] format = "json", twistd's --logfile gets one JSON
        object per line, access events with log_category "access" and the
        others "operational".
        """
        proxy = ProxyProcess(self.dir, tcpConfig([self.backend], '[logging]\nformat = "json"\n'))
        self.addCleanup(proxy.stop)
        proxy.start()
        self.exchange(proxy.ports["plain"])
        self.assertIsNotNone(proxy.waitForLog(r'"log_category": "access"'))
        events = [json.loads(line) for line in proxy.log().splitlines()]
        access = [e for e in events if e["log_category"] == "access"]
        self.assertEqual(len(access), 1)
        self.assertEqual((access[0]["listener"], access[0]["bytes_in"]), ("plain", 3))
        self.assertEqual(access[0]["close_reason"], "client_closed")
        operational = [e for e in events if e["log_category"] == "operational"]
        self.assertTrue(any(e["message"].startswith("Listener plain (tcp) listening") for e in operational))
        self.assertTrue(all({"timestamp", "level", "message"} <= set(e) for e in events))

    def test_twistdLoggerOption(self) -> None:
        """
        When twistd runs with --logger mtlsproxy.logs.jsonLogger, standard
        output carries JSON lines.
        """
        config = os.path.join(self.dir, "proxy.toml")
        with open(config, "w") as f:
            f.write(tcpConfig([self.backend]))
        process = subprocess.Popen(
            [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "--logger",
             "mtlsproxy.logs.jsonLogger", "mtlsproxy", "--config", config, "--workers", "1"],
            cwd=self.dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())
        assert process.stdout is not None
        lines: list[dict[str, Any]] = []
        deadline = time.monotonic() + 20
        timer = threading.Timer(25, process.kill)
        timer.start()
        try:
            for raw in process.stdout:
                lines.append(json.loads(raw))
                if "listening on" in lines[-1]["message"] or time.monotonic() > deadline:
                    break
        finally:
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=15)
            timer.cancel()
        self.assertTrue(lines)
        self.assertIn("listening on 127.0.0.1:", lines[-1]["message"])
        self.assertEqual(lines[-1]["log_category"], "operational")


class AdminConsoleTests(SynchronousTestCase):
    """
    The admin console through OpenSSH's ssh client.
    """

    def setUp(self) -> None:
        for tool in ("ssh", "ssh-keygen"):
            if shutil.which(tool) is None:
                self.fail(f"{tool} is not installed (Debian package openssh-client)")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.key = os.path.join(self.dir, "id_admin")
        self.otherKey = os.path.join(self.dir, "id_other")
        for path in (self.key, self.otherKey):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True)
        shutil.copy(self.key + ".pub", os.path.join(self.dir, "authorized_keys"))
        self.backend = EchoBackend("backend-1")
        self.addCleanup(self.backend.stop)
        head = '[admin]\nendpoint = "tcp:0:interface=127.0.0.1"\nauthorized_keys = "authorized_keys"\n'
        self.proxy = ProxyProcess(self.dir, tcpConfig([self.backend], head))
        self.addCleanup(self.proxy.stop)
        self.proxy.start()
        match = self.proxy.waitForLog(r"Admin console \(ssh\) listening on 127\.0\.0\.1:(\d+)")
        assert match is not None, self.proxy.log()
        self.port = int(match.group(1))

    def ssh(self, key: str, *args: str, tty: bool = False) -> list[str]:
        return [
            "ssh", "-i", key, "-p", str(self.port), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={self.dir}/known_hosts",
            "-o", "IdentitiesOnly=yes", *(["-tt"] if tty else []), "admin@127.0.0.1", *args,
        ]

    def test_interactive(self) -> None:
        """
        When an operator logs in with ssh and types len(pools) at the
        prompt, the console answers 1; Ctrl-D ends the session, and the
        host key is the one generated with mode 0600.
        """
        process = subprocess.Popen(
            self.ssh(self.key, tty=True), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert process.stdin is not None and process.stdout is not None
        received = bytearray()
        stdout = process.stdout

        def read() -> None:
            while chunk := stdout.read1(4096):
                received.extend(chunk)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()

        def plainText() -> bytes:
            return re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[c78=>EM]", b"", bytes(received))

        self.assertTrue(waitFor(lambda: b"help() lists the commands" in plainText(), 20), received)
        process.stdin.write(b"len(pools)\r")
        process.stdin.flush()
        self.assertTrue(waitFor(lambda: b"\r\n1\r\n" in plainText(), 20), received)
        process.stdin.write(b"\x04")
        process.stdin.flush()
        process.wait(timeout=20)
        reader.join(10)
        plain = plainText()
        self.assertIn(b"mtlsproxy admin console", plain)
        self.assertRegex(plain, rb"len\(pools\)\r\n1\r\n")
        hostKey = os.path.join(self.dir, "admin_host_key")
        self.assertEqual(os.stat(hostKey).st_mode & 0o777, 0o600)

    def test_command(self) -> None:
        """
        When ssh runs status(), the report names the listener and pool.
        """
        result = subprocess.run(self.ssh(self.key, "status()"), capture_output=True, timeout=30)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"listener plain (tcp)", result.stdout)
        self.assertIn(f"127.0.0.1:{self.backend.port}  weight 1  healthy".encode(), result.stdout)

    def test_wrongKeyRefused(self) -> None:
        """
        When the key is not in authorized_keys, ssh is refused.
        """
        result = subprocess.run(self.ssh(self.otherKey, "1"), capture_output=True, timeout=30)
        self.assertEqual(result.returncode, 255)
        self.assertIn(b"Permission denied", result.stderr)
