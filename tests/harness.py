"""
Helpers for the integration tests: a generated PKI on disk, blocking echo
backends on 127.0.0.1, a real C{twistd -n mtlsproxy} child process, and real
TLS clients (pyOpenSSL and Python's C{ssl} over sockets).

Everything here talks only to 127.0.0.1 and every wait is bounded.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Optional

from OpenSSL import SSL

from mtlsproxy import pki

BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DemoPKI:
    """
    A complete test PKI written to C{directory}.

    Root CA C{root} with intermediate C{inter} (valid) and C{badinter}
    (revoked by the root's CRL); a server certificate for 127.0.0.1 and
    localhost; client certificates: C{client} (valid, under C{inter}),
    C{revoked} (revoked by C{inter}'s CRL), C{underRevoked} (under
    C{badinter}), C{expired}, C{future} (not yet valid) and C{untrusted}
    (under a root that is not configured).
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        now = datetime.now(timezone.utc)
        self.root = pki.createRootCA("Test Root")
        self.inter = pki.createIntermediateCA(self.root, "Test Intermediate")
        self.badinter = pki.createIntermediateCA(self.root, "Revoked Intermediate")
        self.other = pki.createRootCA("Untrusted Root")
        self.server = pki.issueServerCertificate(
            self.inter, "localhost", dnsNames=["localhost"], ipAddresses=["127.0.0.1", "::1"]
        )
        self.client = pki.issueClientCertificate(self.inter, "client-ok")
        self.revoked = pki.issueClientCertificate(self.inter, "client-revoked")
        self.underRevoked = pki.issueClientCertificate(self.badinter, "client-under-revoked")
        self.expired = pki.issueClientCertificate(
            self.inter, "client-expired", notBefore=now - timedelta(days=30), notAfter=now - timedelta(days=1)
        )
        self.future = pki.issueClientCertificate(
            self.inter, "client-future", notBefore=now + timedelta(days=1), notAfter=now + timedelta(days=30)
        )
        self.untrusted = pki.issueClientCertificate(self.other, "client-untrusted")
        self.write("root.crt", pki.certificatePEM(self.root.certificate))
        self.write(
            "ca-bundle.pem",
            pki.chainPEM([self.root.certificate, self.inter.certificate, self.badinter.certificate]),
        )
        self.write(
            "crls.pem",
            pki.crlPEM(pki.buildCRL(self.root, [self.badinter.certificate]))
            + pki.crlPEM(pki.buildCRL(self.inter, [self.revoked.certificate]))
            + pki.crlPEM(pki.buildCRL(self.badinter)),
        )
        self.write("server-chain.pem", pki.chainPEM([self.server.certificate, self.inter.certificate]))
        self.write("server.key", pki.keyPEM(self.server.key))
        for name in ("client", "revoked", "expired", "future"):
            self.writeClient(name, getattr(self, name), [self.inter])
        self.writeClient("underRevoked", self.underRevoked, [self.badinter])
        self.writeClient("untrusted", self.untrusted, [])

    def writeClient(self, name: str, issued: pki.Issued, intermediates: list[pki.Issued]) -> None:
        self.write(f"{name}.crt", pki.certificatePEM(issued.certificate))
        self.write(
            f"{name}-chain.pem",
            pki.chainPEM([issued.certificate] + [i.certificate for i in intermediates]),
        )
        self.write(f"{name}.key", pki.keyPEM(issued.key))

    def write(self, name: str, data: bytes) -> None:
        with open(self.path(name), "wb") as f:
            f.write(data)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)


class EchoBackend:
    """
    A threaded TCP backend on 127.0.0.1 that echoes what it receives and, at
    EOF from the proxy, appends C{"\\n<name> <byte count>\\n"} and closes: so
    a client sees half-close forwarded and which member answered.

    @ivar accepted: how many connections it has accepted.
    """

    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.accepted = 0
        self.received: list[bytes] = []
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(60)
        total = 0
        firstBytes = b""
        try:
            while True:
                data = conn.recv(262144)
                if not data:
                    break
                if len(firstBytes) < 64:
                    firstBytes += data[: 64 - len(firstBytes)]
                total += len(data)
                conn.sendall(data)
            conn.sendall(f"\n{self.name} {total}\n".encode())
        except OSError:
            pass
        finally:
            self.received.append(firstBytes)
            conn.close()

    def stop(self) -> None:
        self._stopped = True
        # close() alone does not wake a thread blocked in accept() on Linux,
        # and the socket would keep listening.
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def childSignals() -> Optional[Callable[[], None]]:
    """
    What a twistd child must run before C{exec} so that C{SIGINT} reaches
    its handler: L{None} usually.  A test run started in the background
    by a non-interactive shell (C{nohup}, C{cmd &}) inherits C{SIGINT}
    ignored, and so would twistd, which then never installs its handler
    (Twisted installs it only over Python's default one).
    """
    if signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        return None

    def restore() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return restore


class ProxyProcess:
    """
    C{twistd -n mtlsproxy --config FILE} as a child process, with its log
    captured to a file.
    """

    def __init__(self, directory: str, configText: str) -> None:
        self.directory = directory
        self.config = os.path.join(directory, "mtlsproxy.toml")
        self.logfile = os.path.join(directory, "mtlsproxy.log")
        with open(self.config, "w") as f:
            f.write(configText)
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.ports: dict[str, int] = {}

    def start(self, listeners: int = 1, timeout: float = 20.0,
              env: Optional[dict[str, str]] = None) -> "ProxyProcess":
        self.process = subprocess.Popen(
            self.command(),
            cwd=self.directory,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=childSignals(),
        )
        deadline = time.monotonic() + timeout
        pattern = re.compile(r"Listener (\S+) \(\w+\) listening on [\d.:\[\]a-f]*:(\d+)")
        while time.monotonic() < deadline:
            self.ports = {m.group(1): int(m.group(2)) for m in pattern.finditer(self.log())}
            if len(self.ports) >= listeners:
                return self
            if self.process.poll() is not None:
                out = self.process.stdout.read().decode() if self.process.stdout else ""
                raise RuntimeError(f"twistd exited {self.process.returncode}: {out}\n{self.log()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"proxy did not start listening:\n{self.log()}")

    def command(self) -> list[str]:
        """
        The twistd command line.  A configuration without a C{workers} line
        runs in one process (C{--workers 1}), whatever the machine's cores
        (the default, C{"auto"}, would start one worker per core): the
        tests of one feature expect one process's log, counts and choices.
        """
        with open(self.config) as f:
            text = f.read()
        single = [] if re.search(r"^\s*workers\s*=", text, re.MULTILINE) else ["--workers", "1"]
        return [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "--logfile", self.logfile,
                "mtlsproxy", "--config", self.config, *single]

    def log(self) -> str:
        """
        The proxy's log: one file, its workers' lines included when
        C{workers} > 1 (each marked C{[worker I]}).
        """
        try:
            with open(self.logfile, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def waitForLog(self, pattern: str, timeout: float = 10.0) -> Optional[re.Match[str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log())
            if m:
                return m
            time.sleep(0.05)
        return None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stdout:
            self.process.stdout.close()


def tlsConfig(pkiDir: str, backends: list[EchoBackend], clientAuth: str = "required",
              extraListener: str = "", extraPool: str = "") -> str:
    """
    A configuration with one C{tls} listener on an ephemeral port in front of
    C{backends}.
    """
    members = "".join(
        f'\n[[pools.members]]\naddress = "127.0.0.1"\nport = {b.port}\nweight = 1\n' for b in backends
    )
    return f"""
[[listeners]]
name = "mtls"
endpoint = "tcp:0:interface=127.0.0.1"
protocol = "tls"
pool = "app"
client_auth = "{clientAuth}"
ca_certificates = ["{pkiDir}/ca-bundle.pem"]
crls = ["{pkiDir}/crls.pem"]
{extraListener}
[[listeners.certificates]]
cert = "{pkiDir}/server-chain.pem"
key = "{pkiDir}/server.key"

[[pools]]
name = "app"
selector = "round_robin"
connect_timeout = 2.0
{extraPool}
{members}
"""


def clientContext(pkiObj: Optional[DemoPKI], name: Optional[str], version: Optional[int] = None) -> SSL.Context:
    """
    A pyOpenSSL client context that trusts the test root and presents the
    named client certificate (with its chain), pinned to C{version} if given.
    """
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if version is not None:
        ctx.set_min_proto_version(version)
        ctx.set_max_proto_version(version)
    if pkiObj is not None:
        ctx.load_verify_locations(pkiObj.path("root.crt"))
        ctx.set_verify(SSL.VERIFY_PEER, lambda *a: a[-1])
        if name is not None:
            ctx.use_certificate_chain_file(pkiObj.path(f"{name}-chain.pem"))
            ctx.use_privatekey_file(pkiObj.path(f"{name}.key"))
    return ctx


def tlsExchange(port: int, ctx: SSL.Context, payload: bytes, timeout: float = 30.0,
                halfClose: bool = True, expectLength: Optional[int] = None) -> bytes:
    """
    Connect with TLS, send C{payload} (from a thread, reading meanwhile),
    send close_notify (one direction only), and read until the peer closes.
    Raises L{SSL.Error} if the handshake or the exchange fails.

    @param halfClose: Send close_notify once C{payload} is written.
    @param expectLength: Stop reading once this many bytes have arrived.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn = SSL.Connection(ctx, sock)
    conn.set_tlsext_host_name(b"localhost")
    conn.set_connect_state()
    sock.setblocking(False)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn.do_handshake()
                break
            except SSL.WantReadError:
                if time.monotonic() > deadline:
                    raise TimeoutError("TLS handshake did not finish")
                select.select([sock], [], [], 0.05)
        # In TLS 1.3 the server's verdict on our certificate arrives after our
        # Finished: a rejected client learns it on its first read.
        lock = threading.Lock()
        errors: list[BaseException] = []

        def send() -> None:
            try:
                view = memoryview(payload)
                while view:
                    with lock:
                        try:
                            n = conn.send(view[:65536])
                        except (SSL.WantReadError, SSL.WantWriteError):
                            n = 0
                    view = view[n:]
                    if n == 0:
                        time.sleep(0.001)
                if halfClose:
                    while True:
                        with lock:
                            try:
                                conn.shutdown()
                                break
                            except (SSL.WantReadError, SSL.WantWriteError):
                                pass
                        time.sleep(0.001)
            except BaseException as e:
                errors.append(e)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with lock:
                    data = conn.recv(262144)
            except (SSL.WantReadError, SSL.WantWriteError):
                time.sleep(0.001)
                continue
            except SSL.ZeroReturnError:
                break
            except SSL.SysCallError as e:
                if e.args[0] in (-1, 0):
                    break
                raise
            if not data:
                break
            chunks.append(data)
            if expectLength is not None and sum(map(len, chunks)) >= expectLength:
                break
        else:
            raise TimeoutError("no end of stream from the proxy")
        sender.join(timeout)
        if errors:
            raise errors[0]
        return b"".join(chunks)
    finally:
        sock.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def waitFor(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()
