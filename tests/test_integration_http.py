# -*- test-case-name: tests.test_integration_http -*-
"""
Integration tests of issue 8: the real C{twistd -n mtlsproxy} with
C{https} listeners in front of real HTTP/1.1 backends (threaded
L{http.server}) on 127.0.0.1, real clients (Python's L{http.client} over
L{ssl}, curl), PROXY protocol both ways, SNI routing and passthrough.

Every socket is on 127.0.0.1 and every wait is bounded.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, Optional
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from proxyprotocol.v2 import ProxyProtocolV2
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.trial.unittest import SynchronousTestCase

from mtlsproxy.proxyprotocol import headerV1, headerV2
from twisted.internet.address import IPv4Address

from OpenSSL import SSL

from .harness import DemoPKI, EchoBackend, ProxyProcess, clientContext, waitFor

BLOCK = os.urandom(1 << 20)


def blocks(count: int) -> Iterator[bytes]:
    """
    C{count} MiB of data, each MiB numbered so that reordering shows.
    """
    for i in range(count):
        yield i.to_bytes(4, "big") + BLOCK[4:]


def digestOf(count: int) -> str:
    h = hashlib.sha256()
    for block in blocks(count):
        h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """
    A small HTTP/1.1 application: C{/echo} answers with the request's
    headers as JSON, C{/upload} with the length and SHA-256 of the body
    (plain or chunked), C{/download?mib=N} streams numbered MiB blocks
    (chunked unless C{&length=1}), C{/slow?seconds=S} answers late.
    """

    protocol_version = "HTTP/1.1"
    server: HTTPBackend

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def log_message(self, *args: object) -> None:
        pass

    def _body(self) -> Iterator[bytes]:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                left = size
                while left:
                    chunk = self.rfile.read(min(left, 1 << 20))
                    if not chunk:
                        raise ConnectionError("truncated chunk")
                    left -= len(chunk)
                    yield chunk
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    raise ConnectionError("truncated body")
                left -= len(chunk)
                yield chunk

    def _reply(self, status: int, body: bytes, contentType: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", contentType)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _echo(self, extra: Optional[dict[str, Any]] = None) -> None:
        document = {
            "backend": self.server.name,
            "method": self.command,
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
        }
        document.update(extra or {})
        self._reply(200, json.dumps(document).encode())

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.requests.append(self.path)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/download":
            count = int(query["mib"][0])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if "length" in query:
                self.send_header("Content-Length", str(count << 20))
                self.end_headers()
                for block in blocks(count):
                    self.wfile.write(block)
            else:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for block in blocks(count):
                    self.wfile.write(b"%x\r\n" % len(block) + block + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            return
        if url.path == "/slow":
            time.sleep(float(query["seconds"][0]))
        self._echo()

    def do_POST(self) -> None:
        h = hashlib.sha256()
        size = 0
        for chunk in self._body():
            h.update(chunk)
            size += len(chunk)
        self._echo({"length": size, "sha256": h.hexdigest()})

    do_PUT = do_POST


class HTTPBackend(ThreadingHTTPServer):
    """
    L{_Handler} on 127.0.0.1, in a thread.

    @ivar connections: TCP connections accepted.
    @ivar requests: The paths of the GET requests received, in order.
    """

    daemon_threads = True

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.name = name
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[str] = []
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """
        A reply the proxy no longer wants (it gave up on C{/slow}, or closed
        the connection) is expected here; print anything else.
        """
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


class ProxyV2Backend:
    """
    A TCP backend that reads the PROXY v2 header the proxy sends, then the
    client's bytes until EOF, and answers with JSON: the header as parsed
    by the C{proxy-protocol} package and by Twisted, and the payload's
    length.
    """

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self.headers: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _recvExactly(self, conn: socket.socket, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = conn.recv(count - len(data))
            if not chunk:
                raise ConnectionError("closed in the header")
            data += chunk
        return data

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            fixed = self._recvExactly(conn, 16)
            header = fixed + self._recvExactly(conn, struct.unpack("!H", fixed[14:16])[0])
            self.headers.append(header)
            payload = b""
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                payload += data
            result = ProxyProtocolV2().unpack(header)
            twisted = V2Parser.parse(header)
            ssl = result.tlv.ssl
            answer = {
                "source": [str(result.source[0]), result.source[1]],
                "dest": [str(result.dest[0]), result.dest[1]],
                "twistedSource": [twisted.source.host, twisted.source.port],
                "authority": result.tlv.authority,
                "has_ssl": ssl.has_ssl,
                "has_cert_conn": ssl.has_cert_conn,
                "verified": ssl.verified,
                "verify": ssl.verify,
                "version": ssl.version,
                "cipher": ssl.cipher,
                "cn": ssl.cn,
                "certificate": (result.tlv.get(0xE0) or b"").hex(),
                "payload": payload.decode("latin-1"),
            }
            conn.sendall(json.dumps(answer).encode())
        except Exception as e:
            conn.sendall(json.dumps({"error": repr(e)}).encode())
        finally:
            conn.close()

    def stop(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


# ---------------------------------------------------------------------------
# Configuration and clients
# ---------------------------------------------------------------------------


def tlsKeys(pkiDir: str, clientAuth: str = "required") -> str:
    return f"""client_auth = "{clientAuth}"
ca_certificates = ["{pkiDir}/ca-bundle.pem"]
crls = ["{pkiDir}/crls.pem"]
"""


def certificates(pkiDir: str) -> str:
    return f"""
[[listeners.certificates]]
cert = "{pkiDir}/server-chain.pem"
key = "{pkiDir}/server.key"
"""


def pool(name: str, ports: list[int], extra: str = "", weight: int = 1) -> str:
    members = "".join(
        f'\n[[pools.members]]\naddress = "127.0.0.1"\nport = {p}\nweight = {weight}\n' for p in ports
    )
    return f'\n[[pools]]\nname = "{name}"\nconnect_timeout = 2.0\n{extra}\n{members}'


def listener(name: str, protocol: str, poolName: str, pkiDir: str, extra: str = "",
             clientAuth: str = "required", routes: str = "") -> str:
    text = f"""
[[listeners]]
name = "{name}"
endpoint = "tcp:0:interface=127.0.0.1"
protocol = "{protocol}"
pool = "{poolName}"
"""
    if protocol != "tcp":
        text += tlsKeys(pkiDir, clientAuth)
    text += extra + "\n"
    if protocol != "tcp":
        text += certificates(pkiDir)
    return text + routes


class _Base:
    """
    A PKI, a proxy process, and clients.
    """

    dir: str
    pki: DemoPKI
    proxy: ProxyProcess

    def setUpPKI(self) -> None:
        self.dir = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(self.dir)
        self.pki = DemoPKI(os.path.join(self.dir, "pki"))

    def startProxy(self, config: str, listeners: int) -> None:
        self.proxy = ProxyProcess(self.dir, config)
        self.addCleanup(self.proxy.stop)  # type: ignore[attr-defined]
        self.proxy.start(listeners=listeners)

    def sslContext(self, name: Optional[str] = "client") -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.pki.path("root.crt"))
        if name is not None:
            context.load_cert_chain(self.pki.path(f"{name}-chain.pem"), self.pki.path(f"{name}.key"))
        return context

    def connection(self, listenerName: str, name: Optional[str] = "client", timeout: float = 30.0) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            "127.0.0.1", self.proxy.ports[listenerName], context=self.sslContext(name), timeout=timeout
        )

    def get(self, listenerName: str, path: str = "/echo", headers: Optional[dict[str, str]] = None,
            name: Optional[str] = "client") -> tuple[int, Any]:
        conn = self.connection(listenerName, name)
        try:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        try:
            return response.status, json.loads(body)
        except ValueError:
            return response.status, body

    def rss(self) -> tuple[int, int]:
        """
        The proxy process's resident set size and its peak, in KiB.
        """
        assert self.proxy.process is not None
        with open(f"/proc/{self.proxy.process.pid}/status") as f:
            status = f.read()
        return (
            int(re.search(r"VmRSS:\s+(\d+)", status).group(1)),  # type: ignore[union-attr]
            int(re.search(r"VmHWM:\s+(\d+)", status).group(1)),  # type: ignore[union-attr]
        )


def headerValues(document: Any, name: str) -> list[str]:
    return [v for k, v in document["headers"] if k.lower() == name.lower()]


# ---------------------------------------------------------------------------
# HTTP proxying
# ---------------------------------------------------------------------------


class HTTPSProxyTests(_Base, SynchronousTestCase):
    """
    An C{https} listener with routes in front of three pools.
    """

    def setUp(self) -> None:
        self.setUpPKI()
        self.web = HTTPBackend("web")
        self.api = HTTPBackend("api")
        self.v1 = HTTPBackend("v1")
        for backend in (self.web, self.api, self.v1):
            self.addCleanup(backend.stop)
        routes = """
[[listeners.routes]]
host = "api.example.com"
path_prefix = "/v1/"
pool = "v1"

[[listeners.routes]]
host = "*.example.com"
pool = "api"
"""
        # Bound but not listening, for the whole test: connections to it
        # are refused, and no other process can take the port meanwhile.
        dead = socket.socket()
        self.addCleanup(dead.close)
        dead.bind(("127.0.0.1", 0))
        deadPort = dead.getsockname()[1]
        config = (
            listener("web", "https", "web", self.pki.directory, 'client_identity_headers = "xfcc"\nresponse_timeout = 1.5', routes=routes)
            + listener("dead", "https", "dead", self.pki.directory)
            + listener("drained", "https", "drained", self.pki.directory)
            + pool("web", [self.web.port])
            + pool("api", [self.api.port])
            + pool("v1", [self.v1.port])
            + pool("dead", [deadPort], "max_connect_attempts = 1")
            + pool("drained", [self.web.port], weight=0)
        )
        self.startProxy(config, 3)

    def test_keepAliveOneConnection(self) -> None:
        """
        When a client sends two requests on one connection, both are
        answered over it, and the backend sees one connection.
        """
        conn = self.connection("web")
        self.addCleanup(conn.close)
        for path in ("/echo?1", "/echo?2"):
            conn.request("GET", path)
            response = conn.getresponse()
            self.assertEqual(response.status, 200)
            self.assertEqual(json.loads(response.read())["path"], path)
        self.assertEqual(self.web.connections, 1)
        # The response can reach us before the proxy has written its access
        # line (it sends before it logs): wait for both lines.
        pattern = r'web 127\.0\.0\.1:(\d+) "GET /echo\?\d HTTP/1\.1" 200'
        waitFor(lambda: len(re.findall(pattern, self.proxy.log())) >= 2)
        ports = re.findall(pattern, self.proxy.log())
        self.assertEqual(len(ports), 2)
        self.assertEqual(ports[0], ports[1])

    def test_curlKeepAlive(self) -> None:
        """
        When curl fetches two URLs, it reuses its connection.
        """
        port = self.proxy.ports["web"]
        result = subprocess.run(
            ["curl", "-sS", "-v", "--max-time", "20", "--cacert", self.pki.path("root.crt"),
             "--cert", self.pki.path("client-chain.pem"), "--key", self.pki.path("client.key"),
             f"https://127.0.0.1:{port}/echo?a", f"https://127.0.0.1:{port}/echo?b"],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Re-using existing connection", result.stderr)
        self.assertEqual(result.stdout.count('"backend": "web"'), 2)

    def test_forwardingHeaders(self) -> None:
        """
        The backend sees C{Host} as the client sent it, C{X-Forwarded-For}
        appended, C{X-Forwarded-Proto: https}, C{Forwarded}, and no
        hop-by-hop header.
        """
        status, document = self.get(
            "web", headers={"X-Forwarded-For": "198.51.100.1", "Connection": "X-Hop", "X-Hop": "1",
                            "Host": "shop.internal:8443"}
        )
        self.assertEqual(status, 200)
        self.assertEqual(headerValues(document, "Host"), ["shop.internal:8443"])
        self.assertEqual(headerValues(document, "X-Forwarded-For"), ["198.51.100.1, 127.0.0.1"])
        self.assertEqual(headerValues(document, "X-Forwarded-Proto"), ["https"])
        self.assertEqual(
            headerValues(document, "Forwarded"), ['for=127.0.0.1;proto=https;host="shop.internal:8443"']
        )
        self.assertEqual(headerValues(document, "X-Hop"), [])
        self.assertEqual(headerValues(document, "Connection"), [])

    def test_hostAndPathRouting(self) -> None:
        """
        Requests go to the pool of the first matching route, else to the
        listener's.
        """
        cases = [
            ("api.example.com", "/v1/users", "v1"),
            ("api.example.com", "/v10", "api"),
            ("www.example.com", "/v1/users", "api"),
            ("example.com", "/v1/users", "web"),
            ("other.org", "/", "web"),
        ]
        for host, path, expected in cases:
            status, document = self.get("web", "/echo" if path == "/" else path, {"Host": host})
            self.assertEqual((status, document["backend"]), (200, expected), (host, path))

    def test_xfccAndForgedStripped(self) -> None:
        """
        The backend gets XFCC with the client certificate's hash and
        subject; identity headers the client sent never arrive.
        """
        status, document = self.get(
            "web",
            headers={
                "X-Forwarded-Client-Cert": "Hash=0000;Subject=\"CN=admin\"",
                "X-SSL-Client-Verify": "SUCCESS",
                "X-SSL-Client-Subject": "CN=admin",
                "Client-Cert": ":Zm9yZ2Vk:",
            },
        )
        self.assertEqual(status, 200)
        fingerprint = self.pki.client.certificate.fingerprint(hashes.SHA256()).hex()
        [xfcc] = headerValues(document, "X-Forwarded-Client-Cert")
        self.assertEqual(xfcc, f'Hash={fingerprint};Subject="CN=client-ok";DNS=client-ok')
        self.assertEqual(headerValues(document, "X-SSL-Client-Verify"), [])
        self.assertEqual(headerValues(document, "X-SSL-Client-Subject"), [])
        self.assertEqual(headerValues(document, "Client-Cert"), [])

    def test_chunkedUpload(self) -> None:
        """
        When a client uploads a chunked body, the backend receives it
        intact.
        """
        conn = self.connection("web")
        self.addCleanup(conn.close)
        conn.request("POST", "/upload", body=blocks(3), encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked"})
        document = json.loads(conn.getresponse().read())
        self.assertEqual((document["length"], document["sha256"]), (3 << 20, digestOf(3)))
        self.assertEqual(headerValues(document, "Transfer-Encoding"), ["chunked"])

    def test_curlChunkedUpload(self) -> None:
        """
        curl's chunked upload from standard input arrives intact.
        """
        port = self.proxy.ports["web"]
        data = b"".join(blocks(2))
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "30", "--cacert", self.pki.path("root.crt"),
             "--cert", self.pki.path("client-chain.pem"), "--key", self.pki.path("client.key"),
             "-H", "Transfer-Encoding: chunked", "-T", "-", f"https://127.0.0.1:{port}/upload"],
            input=data, capture_output=True, timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        document = json.loads(result.stdout)
        self.assertEqual((document["length"], document["sha256"]), (2 << 20, digestOf(2)))

    def test_chunkedDownload(self) -> None:
        """
        A chunked response reaches the client intact (curl and
        http.client).
        """
        conn = self.connection("web")
        self.addCleanup(conn.close)
        conn.request("GET", "/download?mib=3")
        response = conn.getresponse()
        self.assertEqual(response.getheader("Transfer-Encoding"), "chunked")
        self.assertEqual(hashlib.sha256(response.read()).hexdigest(), digestOf(3))
        port = self.proxy.ports["web"]
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "30", "--cacert", self.pki.path("root.crt"),
             "--cert", self.pki.path("client-chain.pem"), "--key", self.pki.path("client.key"),
             f"https://127.0.0.1:{port}/download?mib=2"],
            capture_output=True, timeout=60,
        )
        self.assertEqual(hashlib.sha256(result.stdout).hexdigest(), digestOf(2))

    def test_largeStreamsBoundedMemory(self) -> None:
        """
        When 200 MiB go up and 200 MiB come down through one connection,
        they arrive intact, in bounded time, and the proxy's peak memory
        grows by far less than the body: bodies are streamed with
        backpressure, never buffered whole.
        """
        mib = 200
        conn = self.connection("web", timeout=120)
        self.addCleanup(conn.close)
        conn.request("GET", "/echo")
        conn.getresponse().read()
        rssBefore, peakBefore = self.rss()
        started = time.monotonic()
        conn.request("PUT", "/upload", body=blocks(mib), headers={"Content-Length": str(mib << 20)})
        document = json.loads(conn.getresponse().read())
        self.assertEqual((document["length"], document["sha256"]), (mib << 20, digestOf(mib)))
        conn.request("GET", f"/download?mib={mib}&length=1")
        response = conn.getresponse()
        h = hashlib.sha256()
        while True:
            chunk = response.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
        self.assertEqual(h.hexdigest(), digestOf(mib))
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, 240)
        rssAfter, peakAfter = self.rss()
        self.assertLess(peakAfter - peakBefore, 48 * 1024, (rssBefore, peakBefore, rssAfter, peakAfter))

    def test_noMemberAnswers502(self) -> None:
        """
        When no member accepts connections, the client gets a 502.
        """
        status, body = self.get("dead")
        self.assertEqual(status, 502)
        self.assertIn(b"502 Bad Gateway", body)

    def test_noHealthyMember503(self) -> None:
        """
        When the pool has no member that may take requests, the client gets
        a 503.
        """
        status, body = self.get("drained")
        self.assertEqual(status, 503)

    def test_malformedRequest400(self) -> None:
        """
        When a client sends something that is not HTTP over TLS, it gets a
        400 and no backend is contacted.
        """
        with socket.create_connection(("127.0.0.1", self.proxy.ports["web"]), timeout=10) as raw:
            with self.sslContext().wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"THIS IS NOT HTTP\r\n\r\n")
                answer = b""
                while True:
                    data = tls.recv(4096)
                    if not data:
                        break
                    answer += data
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
        self.assertEqual(self.web.connections, 0)

    def test_responseTimeout504(self) -> None:
        """
        When the backend does not answer within C{response_timeout}, the
        client gets a 504.
        """
        status, body = self.get("web", "/slow?seconds=4")
        self.assertEqual(status, 504)

    def test_noCertificateNoBackend(self) -> None:
        """
        A client without certificate on a C{required} listener fails the
        handshake, and no backend is contacted.
        """
        self.assertRaises((ssl.SSLError, ConnectionError, OSError), self.get, "web", "/echo", None, None)
        self.assertEqual(self.web.connections, 0)



class PortProbeTests(_Base, SynchronousTestCase):
    """
    TCP port probes (connect, close, no byte) on an C{https} listener.
    """

    def setUp(self) -> None:
        from .test_integration_ops import OPS, statusPort

        self.setUpPKI()
        self.backend = HTTPBackend("app")
        self.addCleanup(self.backend.stop)
        self.startProxy(OPS + listener("web", "https", "app", self.pki.directory)
                        + pool("app", [self.backend.port]), 1)
        self.status = statusPort(self.proxy)

    def test_probeIsNoData(self) -> None:
        """
        A connection closed without a byte is counted as C{no_data}, not as
        an C{aborted} handshake, and reaches no backend.
        """
        from .test_integration_ops import http as get
        from .test_integration_ops import metric

        for _ in range(3):
            socket.create_connection(("127.0.0.1", self.proxy.ports["web"]), timeout=5).close()

        def counted() -> Optional[str]:
            text = get(self.status, "/metrics")[1].decode()
            return text if metric(text, "mtlsproxy_connections_closed_total", listener="web",
                                  reason="no_data") >= 3 else None

        text = waitFor(counted)
        self.assertIsNotNone(text)
        assert text is not None
        self.assertEqual(metric(text, "mtlsproxy_handshakes_total", listener="web", outcome="failure",
                                reason="no_data"), 3)
        self.assertEqual(metric(text, "mtlsproxy_handshakes_total", listener="web", outcome="failure",
                                reason="aborted"), 0)
        self.assertEqual(self.backend.connections, 0)


class IdentityHeaderTests(_Base, SynchronousTestCase):
    """
    The identity header formats, and passthrough.
    """

    def setUp(self) -> None:
        self.setUpPKI()
        self.backend = HTTPBackend("app")
        self.addCleanup(self.backend.stop)
        config = (
            listener("simple", "https", "app", self.pki.directory, 'client_identity_headers = "simple"')
            + listener("rfc", "https", "app", self.pki.directory,
                       'client_identity_headers = "rfc9440"', clientAuth="optional")
            + listener("pass", "https", "app", self.pki.directory,
                       'client_identity_headers = "simple"', clientAuth="passthrough")
            + pool("app", [self.backend.port])
        )
        self.startProxy(config, 3)

    def test_simple(self) -> None:
        """
        C{simple} sends the verified certificate's fields and C{SUCCESS}.
        """
        status, document = self.get("simple", headers={"X-SSL-Client-Verify": "FAILED:forged"})
        self.assertEqual(status, 200)
        cert = self.pki.client.certificate
        self.assertEqual(headerValues(document, "X-SSL-Client-Subject"), ["CN=client-ok"])
        self.assertEqual(headerValues(document, "X-SSL-Client-Issuer"), [cert.issuer.rfc4514_string()])
        self.assertEqual(headerValues(document, "X-SSL-Client-Serial"), [f"{cert.serial_number:x}"])
        self.assertEqual(headerValues(document, "X-SSL-Client-Verify"), ["SUCCESS"])
        [pem] = headerValues(document, "X-SSL-Client-Cert")
        self.assertEqual(x509.load_pem_x509_certificate(unquote(pem).encode()), cert)

    def test_rfc9440(self) -> None:
        """
        C{rfc9440} sends the certificate and the intermediate as byte
        sequences; without a client certificate (optional), none.
        """
        import base64

        status, document = self.get("rfc")
        [value] = headerValues(document, "Client-Cert")
        self.assertEqual(
            base64.b64decode(value.strip(":")), self.pki.client.certificate.public_bytes(Encoding.DER)
        )
        [chain] = headerValues(document, "Client-Cert-Chain")
        self.assertEqual(
            base64.b64decode(chain.strip(":")), self.pki.inter.certificate.public_bytes(Encoding.DER)
        )
        status, document = self.get("rfc", headers={"Client-Cert": ":Zm9yZ2Vk:"}, name=None)
        self.assertEqual(status, 200)
        self.assertEqual(headerValues(document, "Client-Cert"), [])

    def test_passthroughUntrusted(self) -> None:
        """
        On a passthrough listener, a certificate from an unknown CA is let
        through and the backend is told C{FAILED:unknown_ca}, with the
        certificate; a valid one gives C{SUCCESS}; none gives C{NONE}.
        """
        status, document = self.get("pass", name="untrusted")
        self.assertEqual(status, 200)
        self.assertEqual(headerValues(document, "X-SSL-Client-Verify"), ["FAILED:unknown_ca"])
        self.assertEqual(headerValues(document, "X-SSL-Client-Subject"), ["CN=client-untrusted"])
        [pem] = headerValues(document, "X-SSL-Client-Cert")
        self.assertEqual(
            x509.load_pem_x509_certificate(unquote(pem).encode()), self.pki.untrusted.certificate
        )
        self.assertEqual(headerValues(self.get("pass", name="revoked")[1], "X-SSL-Client-Verify"), ["FAILED:revoked"])
        self.assertEqual(headerValues(self.get("pass")[1], "X-SSL-Client-Verify"), ["SUCCESS"])
        self.assertEqual(headerValues(self.get("pass", name=None)[1], "X-SSL-Client-Verify"), ["NONE"])
        self.assertIsNotNone(self.proxy.waitForLog(r"Passing TLS client .* through .*unknown_ca"))

    def test_passthroughOffElsewhere(self) -> None:
        """
        Without passthrough, the same untrusted certificate is rejected.
        """
        self.assertRaises((ssl.SSLError, ConnectionError, OSError), self.get, "simple", "/echo", None, "untrusted")
        self.assertEqual(self.backend.connections, 0)


# ---------------------------------------------------------------------------
# PROXY protocol and SNI routing
# ---------------------------------------------------------------------------


def tls13Exchange(pkiObj: DemoPKI, port: int, payload: bytes, serverName: bytes = b"localhost",
                 name: str = "client") -> tuple[bytes, int]:
    """
    Connect with TLS 1.3 (pyOpenSSL, asking for C{serverName}), send
    C{payload}, send close_notify (our direction only), read until the
    proxy closes.

    @return: What came back, and our local port.
    """
    context = clientContext(pkiObj, name, SSL.TLS1_3_VERSION)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        # pyOpenSSL wants a blocking socket; bound the waits in the kernel.
        sock.settimeout(None)
        timeout = struct.pack("ll", 20, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
        localPort = sock.getsockname()[1]
        conn = SSL.Connection(context, sock)
        conn.set_tlsext_host_name(serverName)
        conn.set_connect_state()
        conn.do_handshake()
        conn.sendall(payload)
        conn.shutdown()
        out = b""
        while True:
            try:
                data = conn.recv(65536)
            except (SSL.ZeroReturnError, SSL.SysCallError):
                break
            if not data:
                break
            out += data
        return out, localPort


class ProxyProtocolTests(_Base, SynchronousTestCase):
    """
    PROXY v2 to backends, PROXY v1/v2 from a trusted balancer, SNI routing.
    """

    def setUp(self) -> None:
        self.setUpPKI()
        self.v2 = ProxyV2Backend()
        self.addCleanup(self.v2.stop)
        self.echoA = EchoBackend("echo-a")
        self.echoDefault = EchoBackend("echo-default")
        self.http = HTTPBackend("app")
        for backend in (self.echoA, self.echoDefault, self.http):
            self.addCleanup(backend.stop)
        sniRoutes = '\n[[listeners.routes]]\nsni = "a.example.com"\npool = "a"\n'
        config = (
            listener("pp", "tls", "v2", self.pki.directory)
            + listener("pppass", "tls", "v2", self.pki.directory, clientAuth="passthrough")
            + listener("sni", "tls", "default", self.pki.directory, routes=sniRoutes)
            + listener("lb", "https", "app", self.pki.directory,
                       'accept_proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]')
            + listener("lbtcp", "tcp", "default", self.pki.directory,
                       'accept_proxy_protocol = true\ntrusted_proxies = ["127.0.0.0/8"]')
            + listener("strict", "tcp", "default", self.pki.directory,
                       'accept_proxy_protocol = true\ntrusted_proxies = ["10.0.0.0/8"]')
            + pool("v2", [self.v2.port], 'proxy_protocol = "v2"\nproxy_protocol_certificate = true')
            + pool("a", [self.echoA.port])
            + pool("default", [self.echoDefault.port])
            + pool("app", [self.http.port])
        )
        self.startProxy(config, 6)

    def test_proxyV2ToBackend(self) -> None:
        """
        A backend behind a C{proxy_protocol = "v2"} pool first receives a
        v2 header that two independent parsers read: the client's address,
        TLS 1.3, the verified client's CN, the certificate in TLV 0xE0;
        then the client's bytes.
        """
        answer, clientPort = tls13Exchange(self.pki, self.proxy.ports["pp"], b"hello backend")
        document = json.loads(answer)
        self.assertNotIn("error", document)
        self.assertEqual(document["source"], ["127.0.0.1", clientPort])
        self.assertEqual(document["twistedSource"], ["127.0.0.1", clientPort])
        self.assertEqual(document["dest"], ["127.0.0.1", self.proxy.ports["pp"]])
        self.assertTrue(document["has_ssl"])
        self.assertTrue(document["has_cert_conn"])
        self.assertTrue(document["verified"])
        self.assertEqual(document["verify"], 0)
        self.assertEqual(document["version"], "TLSv1.3")
        self.assertEqual(document["cn"], "client-ok")
        self.assertEqual(document["authority"], "localhost")
        self.assertEqual(
            bytes.fromhex(document["certificate"]),
            self.pki.client.certificate.public_bytes(Encoding.DER),
        )
        self.assertEqual(document["payload"], "hello backend")

    def test_passthroughVerifyField(self) -> None:
        """
        On a C{tls} listener with C{client_auth = "passthrough"}, a client
        certificate from an unknown CA is relayed, and the PROXY v2 header
        tells the backend: verify is OpenSSL's error number, the CN and the
        certificate are there.
        """
        answer, _ = tls13Exchange(self.pki, self.proxy.ports["pppass"], b"hi", name="untrusted")
        document = json.loads(answer)
        self.assertFalse(document["verified"])
        self.assertIn(document["verify"], (2, 18, 19, 20, 21))
        self.assertEqual(document["cn"], "client-untrusted")
        self.assertEqual(
            bytes.fromhex(document["certificate"]),
            self.pki.untrusted.certificate.public_bytes(Encoding.DER),
        )
        self.assertEqual(document["payload"], "hi")
        answer, _ = tls13Exchange(self.pki, self.proxy.ports["pppass"], b"hi")
        self.assertEqual(json.loads(answer)["verify"], 0)

    def test_sniRouting(self) -> None:
        """
        On a C{tls} listener, a client asking for C{a.example.com} is relayed
        to pool C{a}, others to the listener's pool.
        """
        def backendFor(serverName: bytes) -> str:
            return tls13Exchange(self.pki, self.proxy.ports["sni"], b"x", serverName)[0].decode()

        self.assertEqual(backendFor(b"a.example.com"), "x\necho-a 1\n")
        self.assertEqual(backendFor(b"b.example.com"), "x\necho-default 1\n")
        self.assertEqual(backendFor(b"localhost"), "x\necho-default 1\n")

    def test_acceptProxyV2OnHTTPS(self) -> None:
        """
        When a trusted balancer sends a v2 header before TLS, the backend's
        C{X-Forwarded-For} and the access log show the client it names.
        """
        source = IPv4Address("TCP", "198.51.100.23", 4242)
        destination = IPv4Address("TCP", "192.0.2.10", 443)
        header = headerV2(source, destination)
        with socket.create_connection(("127.0.0.1", self.proxy.ports["lb"]), timeout=20) as raw:
            raw.sendall(header)
            with self.sslContext().wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET /echo HTTP/1.1\r\nHost: lb.example\r\nConnection: close\r\n\r\n")
                answer = b""
                while True:
                    try:
                        data = tls.recv(65536)
                    except (ssl.SSLError, ConnectionError):
                        break
                    if not data:
                        break
                    answer += data
        document = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(headerValues(document, "X-Forwarded-For"), ["198.51.100.23"])
        self.assertIsNotNone(
            self.proxy.waitForLog(r'lb 198\.51\.100\.23:4242 "GET /echo HTTP/1\.1" 200')
        )

    def test_acceptProxyV1OnTCP(self) -> None:
        """
        When a trusted balancer sends a v1 header on a C{tcp} listener, the
        access log shows the client it names, and the bytes after it are
        relayed.
        """
        header = headerV1(IPv4Address("TCP", "203.0.113.50", 5050), IPv4Address("TCP", "192.0.2.10", 80))
        with socket.create_connection(("127.0.0.1", self.proxy.ports["lbtcp"]), timeout=20) as s:
            s.sendall(header + b"ping")
            s.shutdown(socket.SHUT_WR)
            answer = b""
            while True:
                data = s.recv(65536)
                if not data:
                    break
                answer += data
        self.assertEqual(answer, b"ping\necho-default 4\n")
        self.assertIsNotNone(self.proxy.waitForLog(r"lbtcp 203\.0\.113\.50:5050 -> "))

    def test_untrustedProxyRefused(self) -> None:
        """
        A connection with a PROXY header from an address outside
        C{trusted_proxies} is refused and nothing is relayed.
        """
        header = headerV1(IPv4Address("TCP", "203.0.113.66", 1), IPv4Address("TCP", "192.0.2.10", 80))
        with socket.create_connection(("127.0.0.1", self.proxy.ports["strict"]), timeout=20) as s:
            try:
                s.sendall(header + b"ping")
                s.shutdown(socket.SHUT_WR)
                answer = s.recv(65536)
            except ConnectionError:
                answer = b""
        self.assertEqual(answer, b"")
        self.assertEqual(self.echoDefault.accepted, 0)
        self.assertIsNotNone(
            self.proxy.waitForLog(r"Listener strict: refused connection from 127\.0\.0\.1:\d+: untrusted_proxy")
        )
