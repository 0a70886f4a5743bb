# -*- test-case-name: tests.test_integration -*-
"""
Integration tests: the real C{twistd -n mtlsproxy} process, real backends on
127.0.0.1 and real TLS clients (pyOpenSSL, curl, openssl s_client) with
certificates generated for each test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from .harness import (
    BIN,
    DemoPKI,
    EchoBackend,
    ProxyProcess,
    clientContext,
    sha256,
    tlsConfig,
    tlsExchange,
    waitFor,
)

TLS12 = SSL.TLS1_2_VERSION
TLS13 = SSL.TLS1_3_VERSION


class _ProxyTestMixin:
    """
    Starts a PKI, two echo backends and the proxy for each test.
    """

    clientAuth = "required"

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.pki = DemoPKI(os.path.join(self.dir, "pki"))
        self.backends = [EchoBackend("backend-1"), EchoBackend("backend-2")]
        for b in self.backends:
            self.addCleanup(b.stop)
        self.proxy = ProxyProcess(self.dir, self.configText())
        self.addCleanup(self.proxy.stop)
        self.proxy.start()
        self.port = self.proxy.ports["mtls"]

    def configText(self) -> str:
        return tlsConfig(self.pki.directory, self.backends, self.clientAuth)

    def accepted(self) -> int:
        return sum(b.accepted for b in self.backends)

    def assertRejected(self, certName: str | None, reason: str, version: int = TLS13) -> None:
        """
        The client presenting C{certName} fails, the proxy logs C{reason} for
        it, and no backend accepted a connection.
        """
        ctx = clientContext(self.pki, certName, version)
        self.assertRaises(
            (SSL.Error, ConnectionError, TimeoutError),
            tlsExchange, self.port, ctx, b"secret payload", 10.0,
        )
        match = self.proxy.waitForLog(rf"(?i)reject\S*.*\b{reason}\b")
        self.assertIsNotNone(match, f"no rejection with reason {reason} in log:\n{self.proxy.log()}")
        self.assertEqual(self.accepted(), 0)
        for b in self.backends:
            self.assertEqual(b.received, [])


class MutualTLSTests(_ProxyTestMixin, SynchronousTestCase):
    """
    A C{tls} listener with C{client_auth = "required"}, CA bundle and CRLs.
    """

    def test_validClientTLS13(self) -> None:
        """
        When a valid client certificate is presented over TLS 1.3, the bytes
        reach a backend and its answer comes back.
        """
        answer = tlsExchange(self.port, clientContext(self.pki, "client", TLS13), b"hello")
        self.assertRegex(answer.decode(), r"^hello\nbackend-[12] 5\n$")

    def test_validClientTLS12(self) -> None:
        """
        When a valid client certificate is presented over TLS 1.2, the bytes
        reach a backend and its answer comes back.  (A TLS 1.2 close_notify
        closes both directions, so the client reads the echo before closing.)
        """
        ctx = clientContext(self.pki, "client", TLS12)
        answer = tlsExchange(self.port, ctx, b"hello", halfClose=False, expectLength=5)
        self.assertEqual(answer, b"hello")
        self.assertEqual(self.accepted(), 1)

    def test_roundRobin(self) -> None:
        """
        When four clients connect in turn, the two members answer two each,
        alternating.
        """
        names = []
        for _ in range(4):
            answer = tlsExchange(self.port, clientContext(self.pki, "client"), b"x")
            names.append(answer.decode().split()[-2])
        self.assertEqual(sorted(names), ["backend-1", "backend-1", "backend-2", "backend-2"])
        self.assertNotEqual(names[0], names[1])
        self.assertNotEqual(names[1], names[2])

    def test_largeTransferIntact(self) -> None:
        """
        When 10 MiB go each way, every byte arrives intact.
        """
        payload = os.urandom(10 * 1024 * 1024)
        answer = tlsExchange(self.port, clientContext(self.pki, "client"), payload, timeout=60)
        body, _, trailer = answer.rpartition(b"\n")[0].rpartition(b"\n")
        self.assertEqual(trailer.split()[-1], str(len(payload)).encode())
        self.assertEqual(sha256(body), sha256(payload))

    def test_halfCloseTLS13(self) -> None:
        """
        When a TLS 1.3 client sends close_notify after its request, the
        backend sees EOF and its answer, written after that, still reaches the
        client.
        """
        answer = tlsExchange(self.port, clientContext(self.pki, "client", TLS13), b"ping")
        # The backend writes its trailer only after it has seen EOF.
        self.assertRegex(answer.decode(), r"^ping\nbackend-[12] 4\n$")

    def test_noCertificate(self) -> None:
        """
        When a client presents no certificate, it is rejected with
        no_certificate and no backend is contacted.
        """
        self.assertRejected(None, "no_certificate")

    def test_untrustedCA(self) -> None:
        """
        When the client certificate comes from an unknown CA, it is rejected
        with unknown_ca.
        """
        self.assertRejected("untrusted", "unknown_ca")

    def test_revokedLeaf(self) -> None:
        """
        When the client certificate is on its issuer's CRL, it is rejected
        with revoked, and the log names its serial.
        """
        self.assertRejected("revoked", "revoked")
        serial = format(self.pki.revoked.certificate.serial_number, "x")
        self.assertIn(serial.lower(), self.proxy.log().lower())

    def test_revokedLeafTLS12(self) -> None:
        """
        When the client certificate is on its issuer's CRL and TLS 1.2 is
        used, it is rejected with revoked.
        """
        self.assertRejected("revoked", "revoked", TLS12)

    def test_revokedIntermediate(self) -> None:
        """
        When the client's intermediate CA is on the root's CRL, the client is
        rejected with revoked.
        """
        self.assertRejected("underRevoked", "revoked")

    def test_expired(self) -> None:
        """
        When the client certificate has expired, it is rejected with expired.
        """
        self.assertRejected("expired", "expired")

    def test_notYetValid(self) -> None:
        """
        When the client certificate is not yet valid, it is rejected with
        not_yet_valid.
        """
        self.assertRejected("future", "not_yet_valid")

    def test_garbageHandshake(self) -> None:
        """
        When a client sends bytes that are not TLS, the connection is closed,
        no backend is contacted, and the proxy keeps serving valid clients.
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n" * 10)
            s.settimeout(10)
            try:
                while s.recv(4096):
                    pass
            except ConnectionError:
                pass
        self.assertEqual(self.accepted(), 0)
        answer = tlsExchange(self.port, clientContext(self.pki, "client"), b"still")
        self.assertTrue(answer.startswith(b"still\n"))

    def test_accessLog(self) -> None:
        """
        When a connection ends, one access event names the client
        certificate's subject, the backend and the bytes each way.
        """
        tlsExchange(self.port, clientContext(self.pki, "client"), b"hello")
        match = self.proxy.waitForLog(r".*client-ok.*")
        self.assertIsNotNone(match, self.proxy.log())
        self.assertIn("127.0.0.1", match.group(0))


class OpenSSLToolTests(_ProxyTestMixin, SynchronousTestCase):
    """
    The proxy seen through curl and openssl s_client, as users try it.
    """

    def configText(self) -> str:
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.addCleanup(self.http.server_close)
        self.addCleanup(self.http.shutdown)

        class _Port:
            port = self.http.server_address[1]

        return tlsConfig(self.pki.directory, [_Port()], self.clientAuth)  # type: ignore[list-item]

    def accepted(self) -> int:
        return _Hello.count

    def setUp(self) -> None:
        for tool in ("curl", "openssl"):
            if shutil.which(tool) is None:
                self.fail(f"{tool} is not installed (scripts/setup.sh installs it)")
        _Hello.count = 0
        super().setUp()

    def curl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["curl", "-sS", "--max-time", "10", "--cacert", self.pki.path("root.crt"), *args,
             f"https://127.0.0.1:{self.port}/"],
            capture_output=True, text=True, timeout=30,
        )

    def test_curlWithCertificate(self) -> None:
        """
        When curl presents a valid client certificate, it gets the page.
        """
        result = self.curl("--cert", self.pki.path("client-chain.pem"), "--key", self.pki.path("client.key"))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, "hello from backend\n")

    def test_curlWithoutCertificate(self) -> None:
        """
        When curl presents no certificate, the request fails and the backend
        sees nothing.
        """
        result = self.curl()
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(_Hello.count, 0)
        self.assertIsNotNone(self.proxy.waitForLog(r"(?i)reject\S*.*\bno_certificate\b"))

    def test_sClientRevokedAlert(self) -> None:
        """
        When openssl s_client presents a revoked certificate, it receives the
        certificate_revoked alert, not internal_error.
        """
        result = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{self.port}", "-tls1_3",
             "-cert", self.pki.path("revoked.crt"), "-key", self.pki.path("revoked.key"),
             "-cert_chain", self.pki.path("revoked-chain.pem"), "-CAfile", self.pki.path("root.crt"),
             "-ign_eof"],
            input="GET / HTTP/1.0\r\n\r\n", capture_output=True, text=True, timeout=30,
        )
        output = result.stdout + result.stderr
        self.assertIn("certificate revoked", output)
        self.assertNotIn("internal error", output)
        self.assertEqual(_Hello.count, 0)


class _Hello(BaseHTTPRequestHandler):
    count = 0

    def do_GET(self) -> None:
        type(self).count += 1
        body = b"hello from backend\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class TCPListenerTests(SynchronousTestCase):
    """
    A plain C{tcp} listener.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.backends = [EchoBackend("backend-1"), EchoBackend("backend-2")]
        for b in self.backends:
            self.addCleanup(b.stop)
        members = "".join(
            f'[[pools.members]]\naddress = "127.0.0.1"\nport = {b.port}\n' for b in self.backends
        )
        self.proxy = ProxyProcess(
            self.dir,
            '[[listeners]]\nname = "plain"\nendpoint = "tcp:0:interface=127.0.0.1"\n'
            'protocol = "tcp"\npool = "app"\n\n[[pools]]\nname = "app"\n' + members,
        )
        self.addCleanup(self.proxy.stop)
        self.proxy.start()
        self.port = self.proxy.ports["plain"]

    def exchange(self, payload: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
            sender.start()
            chunks = []
            while True:
                data = s.recv(262144)
                if not data:
                    break
                chunks.append(data)
            sender.join()
            return b"".join(chunks)

    def test_halfCloseAndRoundRobin(self) -> None:
        """
        When a client shuts its write side, the backend sees EOF and its
        later answer still arrives; consecutive clients alternate members.
        """
        first = self.exchange(b"abc").decode()
        second = self.exchange(b"defg").decode()
        self.assertRegex(first, r"^abc\nbackend-[12] 3\n$")
        self.assertRegex(second, r"^defg\nbackend-[12] 4\n$")
        self.assertNotEqual(first.split()[-2], second.split()[-2])

    def test_largeTransferIntact(self) -> None:
        """
        When 10 MiB go each way over the TCP listener, they arrive intact.
        """
        payload = os.urandom(10 * 1024 * 1024)
        answer = self.exchange(payload)
        self.assertEqual(sha256(answer[: len(payload)]), sha256(payload))

    def test_deadBackendSkipped(self) -> None:
        """
        When one member refuses connections, clients are served by the other.
        """
        self.backends[0].stop()
        names = {self.exchange(b"x").decode().split()[-2] for _ in range(3)}
        self.assertEqual(names, {"backend-2"})


class ConfigurationErrorTests(SynchronousTestCase):
    """
    C{twistd mtlsproxy} with a bad configuration.
    """

    def run_twistd(self, text: str) -> subprocess.CompletedProcess[str]:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "bad.toml")
        with open(path, "w") as f:
            f.write(text)
        return subprocess.run(
            [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "mtlsproxy", "--config", path],
            capture_output=True, text=True, timeout=60, cwd=directory,
        )

    def test_typoIsOneLineWithoutTraceback(self) -> None:
        """
        When the configuration has a misspelt key, twistd exits non-zero
        with one line naming the file and key path, and no traceback.
        """
        result = self.run_twistd(
            '[[listeners]]\nname = "a"\nendpoint = "tcp:0"\nprotocol = "tcp"\npool = "p"\n'
            'clint_auth = "required"\n[[pools]]\nname = "p"\n'
            '[[pools.members]]\naddress = "127.0.0.1"\nport = 1\n'
        )
        self.assertNotEqual(result.returncode, 0)
        output = result.stdout + result.stderr
        self.assertNotIn("Traceback", output)
        self.assertIn("bad.toml", output)
        self.assertIn("listeners[0]", output)
        self.assertIn("clint_auth", output)

    def test_missingFile(self) -> None:
        """
        When a certificate file does not exist, twistd names the key path.
        """
        result = self.run_twistd(
            '[[listeners]]\nname = "a"\nendpoint = "tcp:0"\nprotocol = "tls"\npool = "p"\n'
            '[[listeners.certificates]]\ncert = "nope.pem"\nkey = "nope.key"\n'
            '[[pools]]\nname = "p"\n[[pools.members]]\naddress = "127.0.0.1"\nport = 1\n'
        )
        self.assertNotEqual(result.returncode, 0)
        output = result.stdout + result.stderr
        self.assertNotIn("Traceback", output)
        self.assertIn("listeners[0].certificates[0].cert", output)
