# -*- test-case-name: tests.test_faults -*-
"""
Faults around the real C{twistd -n mtlsproxy}: backends that die, hang or
reset, files that vanish before a reload, the proxy killed and restarted,
and the process running out of file descriptors.

What each test checks from outside: how the client's connection ends, the
access log's C{close_reason}, the proxy's open descriptors
(C{/proc/PID/fd}) and, through the status endpoint, the members'
C{active_connections}.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from .robustness import (
    DemoPKI,
    EchoBackend,
    LimitedProxyProcess,
    ProxyProcess,
    ScriptedBackend,
    accessLines,
    clientContext,
    connectTLS,
    cpuSeconds,
    openDescriptors,
    readUntilClosed,
    reset,
    quietDescriptors,
    settledDescriptors,
    tlsConfig,
    tlsExchange,
    waitUntil,
)

_KILLABLE_ECHO = """
import socket, sys, threading
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(16)
print(server.getsockname()[1], flush=True)
def echo(conn):
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
    conn.close()
while True:
    conn, _ = server.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""
"""
An echo backend to run as a child process, so that it can be SIGKILLed.
"""


def _closeAll(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


class _Port:
    """
    Stands for a backend in L{tlsConfig}: only its port matters.
    """

    def __init__(self, port: int) -> None:
        self.port = port


def _reservedPort(port: int = 0) -> socket.socket:
    """
    A socket bound, not listening, to C{port} on 127.0.0.1 (a free one for
    0), with SO_REUSEADDR.  While it is open no other socket of any process
    takes the port (a port picked and released would be free for anyone
    until the proxy binds it), yet a listener with SO_REUSEADDR, as
    Twisted's, can bind and listen on it.
    """
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    return s


def _timeWaitOn(port: int) -> bool:
    """
    Is there a TCP connection in TIME_WAIT with local port C{port}?
    """
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == "06":
                return True
    return False


class _ProxyFixture:
    """
    A PKI, a proxy with a status endpoint, and helpers to read its state.
    """

    proxy: ProxyProcess
    pki: DemoPKI
    dir: str

    def makePKI(self) -> None:
        self.dir = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(self.dir)
        self.pki = DemoPKI(os.path.join(self.dir, "pki"))

    def startProxy(self, backendPorts: list[int], extraListener: str = "", top: str = "",
                   proxyClass: type[ProxyProcess] = ProxyProcess) -> ProxyProcess:
        config = tlsConfig(
            self.pki.directory, [_Port(p) for p in backendPorts],  # type: ignore[misc]
            extraListener=extraListener,
        )
        config = top + config + '\n[status]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
        proxy = proxyClass(self.dir, config)
        self.addCleanup(proxy.stop)  # type: ignore[attr-defined]
        proxy.start()
        self.proxy = proxy
        match = proxy.waitForLog(r"Status endpoint \(http\) listening on 127\.0\.0\.1:(\d+)")
        self.statusPort = int(match.group(1)) if match else None
        # Those lines are logged before twistd runs its reactor, which opens
        # descriptors of its own then (the SIGCHLD waker): an answer shows it
        # runs, so that a descriptor baseline taken next is complete.
        self.memberConnections()
        return proxy

    @property
    def pid(self) -> int:
        assert self.proxy.process is not None
        return self.proxy.process.pid

    def memberConnections(self) -> list[int]:
        """
        The members' C{active_connections}, from C{GET /status}.
        """
        if self.statusPort is None:
            raise AssertionError(f"no status endpoint in the log:\n{self.proxy.log()}")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.statusPort}/status", timeout=10) as r:
            status = json.load(r)
        return [m["active_connections"] for p in status["pools"] for m in p["members"]]

    def assertServes(self) -> None:
        answer = tlsExchange(self.proxy.ports["mtls"], clientContext(self.pki, "client"), b"still here", 15)
        self.assertTrue(answer.startswith(b"still here"), answer)  # type: ignore[attr-defined]


class BackendFaultTests(_ProxyFixture, SynchronousTestCase):
    """
    Backends that die, hang or reset while a client is connected.
    """

    def setUp(self) -> None:
        self.makePKI()

    def test_backendKilledMidStream(self) -> None:
        """
        When the backend process is killed (SIGKILL) while data streams both
        ways, the client's connection ends cleanly (close_notify), the
        access event says backend_closed, the member's active_connections
        goes back to 0 and the proxy holds no descriptor for it.
        """
        backend = subprocess.Popen([sys.executable, "-c", _KILLABLE_ECHO], stdout=subprocess.PIPE)

        def stopBackend() -> None:
            if backend.poll() is None:
                backend.kill()
            backend.wait()

        self.addCleanup(stopBackend)
        assert backend.stdout is not None
        self.addCleanup(backend.stdout.close)
        backendPort = int(backend.stdout.readline())
        self.startProxy([backendPort])
        self.assertServes()
        baseline = quietDescriptors(self.pid)

        sock, conn = connectTLS(self.proxy.ports["mtls"], clientContext(self.pki, "client"))
        self.addCleanup(sock.close)
        chunk = os.urandom(16384)
        received = 0
        deadline = time.monotonic() + 20
        while received < 1024 * 1024 and time.monotonic() < deadline:
            try:
                conn.send(chunk)
            except SSL.WantWriteError:
                pass
            try:
                received += len(conn.recv(65536))
            except SSL.WantReadError:
                time.sleep(0.001)
        self.assertGreaterEqual(received, 1024 * 1024)
        self.assertEqual(self.memberConnections(), [1])
        # The client's and the backend's (once the status request is gone).
        self.assertTrue(waitUntil(lambda: openDescriptors(self.pid) == baseline + 2, 10))

        backend.send_signal(signal.SIGKILL)
        backend.wait()
        _, how = readUntilClosed(conn, 15)
        self.assertEqual(how, "close_notify")
        sock.close()

        self.assertEqual(settledDescriptors(self.pid, baseline), baseline)
        self.assertTrue(waitUntil(lambda: accessLines(self.proxy.log(), "backend_closed"), 10))
        self.assertEqual(self.memberConnections(), [0])

    def test_backendNeverAnswers(self) -> None:
        """
        When the backend accepts the connection and then neither reads nor
        answers, the client is closed after idle_timeout (logged as
        idle_timeout, not as a connect failure) and the backend connection
        is closed too.
        """
        release = threading.Event()
        self.addCleanup(release.set)

        def hold(conn: socket.socket) -> None:
            release.wait(30)

        backend = ScriptedBackend(hold)
        self.addCleanup(backend.stop)
        self.startProxy([backend.port], extraListener="idle_timeout = 1.5\n")
        baseline = quietDescriptors(self.pid)

        sock, conn = connectTLS(self.proxy.ports["mtls"], clientContext(self.pki, "client"))
        self.addCleanup(sock.close)
        started = time.monotonic()
        conn.sendall(b"hello?")
        _, how = readUntilClosed(conn, 15)
        elapsed = time.monotonic() - started
        self.assertEqual(how, "close_notify")
        self.assertGreater(elapsed, 1.3)
        self.assertLess(elapsed, 10)
        sock.close()

        self.assertTrue(waitUntil(lambda: accessLines(self.proxy.log(), "idle_timeout"), 10))
        self.assertNotIn("failed for", self.proxy.log())
        [held] = backend.connections
        held.settimeout(10)
        self.assertEqual(held.recv(100), b"hello?")
        self.assertEqual(held.recv(100), b"")
        self.assertEqual(settledDescriptors(self.pid, baseline), baseline)
        self.assertEqual(self.memberConnections(), [0])

    def test_backendResets(self) -> None:
        """
        When the backend resets the connection (RST) after reading the
        request, the client's connection ends cleanly, the access event says
        backend_closed, and nothing is left open.
        """

        def readThenReset(conn: socket.socket) -> None:
            conn.recv(100)
            reset(conn)

        backend = ScriptedBackend(readThenReset)
        self.addCleanup(backend.stop)
        self.startProxy([backend.port])
        baseline = quietDescriptors(self.pid)

        sock, conn = connectTLS(self.proxy.ports["mtls"], clientContext(self.pki, "client"))
        self.addCleanup(sock.close)
        conn.sendall(b"request")
        _, how = readUntilClosed(conn, 15)
        self.assertEqual(how, "close_notify")
        sock.close()
        self.assertTrue(waitUntil(lambda: accessLines(self.proxy.log(), "backend_closed"), 10))
        self.assertEqual(settledDescriptors(self.pid, baseline), baseline)
        self.assertEqual(self.memberConnections(), [0])


class ReloadFaultTests(_ProxyFixture, SynchronousTestCase):
    """
    Files that vanish before a reload (C{SIGHUP}, L{mtlsproxy.reload}):
    the running material stays in service.
    """

    def setUp(self) -> None:
        self.makePKI()
        self.backend = EchoBackend("backend-1")
        self.addCleanup(self.backend.stop)
        # No polling: only the SIGHUP reloads.
        self.startProxy([self.backend.port], top="reload_poll_interval = 0\n")

    def reloadFails(self) -> None:
        """
        Send SIGHUP and wait for the failed reload to be logged; the process
        goes on.
        """
        assert self.proxy.process is not None
        self.proxy.process.send_signal(signal.SIGHUP)
        match = self.proxy.waitForLog(r"Reload of \S+ \(SIGHUP\) failed; the running configuration stays in service: (.*)")
        self.assertIsNotNone(match, self.proxy.log()[-3000:])
        self.assertIsNone(self.proxy.process.poll())

    def test_crlVanishes(self) -> None:
        """
        When the CRL file is deleted and SIGHUP asks for a reload, the reload
        fails naming the file, valid clients are still served, and a revoked
        client is still rejected as revoked: the old CRL stays in service.
        """
        os.remove(self.pki.path("crls.pem"))
        self.reloadFails()
        self.assertIn("crls.pem", self.proxy.log())
        self.assertServes()
        self.assertRaises(
            (SSL.Error, ConnectionError, TimeoutError),
            tlsExchange, self.proxy.ports["mtls"], clientContext(self.pki, "revoked"), b"x", 10.0,
        )
        self.assertIsNotNone(self.proxy.waitForLog(r"(?i)reject\S*.*\brevoked\b"))

    def test_certificateVanishes(self) -> None:
        """
        When the server certificate file is deleted and SIGHUP asks for a
        reload, the reload fails and clients still get the same certificate.
        """
        before = self.serverCertificate()
        os.remove(self.pki.path("server-chain.pem"))
        self.reloadFails()
        self.assertIn("server-chain.pem", self.proxy.log())
        self.assertEqual(self.serverCertificate(), before)
        self.assertServes()

    def serverCertificate(self) -> bytes:
        sock, conn = connectTLS(self.proxy.ports["mtls"], clientContext(self.pki, "client"))
        try:
            cert = conn.get_peer_certificate()
            assert cert is not None
            return cert.to_cryptography().fingerprint(hashes.SHA256())
        finally:
            sock.close()


class RestartTests(_ProxyFixture, SynchronousTestCase):
    """
    The proxy killed with SIGKILL and started again.
    """

    def setUp(self) -> None:
        self.makePKI()
        self.backend = EchoBackend("backend-1")
        self.addCleanup(self.backend.stop)

    def test_killedAndRestartedOnSamePort(self) -> None:
        """
        When the proxy is SIGKILLed with a connection open and started again
        at once on the same port, it listens again (the port has a
        connection in TIME_WAIT, which only SO_REUSEADDR allows binding
        over) and serves clients.
        """
        reserved = [_reservedPort()]
        self.addCleanup(_closeAll, reserved)
        port = int(reserved[0].getsockname()[1])
        config = tlsConfig(self.pki.directory, [self.backend]).replace(
            'endpoint = "tcp:0:interface=127.0.0.1"', f'endpoint = "tcp:{port}:interface=127.0.0.1"'
        )
        os.makedirs(os.path.join(self.dir, "first"))
        first = ProxyProcess(os.path.join(self.dir, "first"), config)
        self.addCleanup(first.stop)
        first.start()
        self.assertEqual(first.ports["mtls"], port)

        # A finished exchange leaves the proxy's side of the connection in
        # TIME_WAIT (the proxy closes first); one more is open at the kill.
        self.assertTrue(tlsExchange(port, clientContext(self.pki, "client"), b"x", 15).startswith(b"x"))
        sock, conn = connectTLS(port, clientContext(self.pki, "client"))
        conn.sendall(b"x")
        assert first.process is not None
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
        _, how = readUntilClosed(conn, 10)
        self.assertIn(how, ("eof", "reset"))
        sock.close()
        # Which side sends the first FIN (and whether the kernel answers the
        # killed process's unread bytes with a reset) depends on timing, so
        # a TIME_WAIT on the proxy's port is usual but not certain.  When
        # there is one, a plain bind must fail, which is what makes the
        # restart below prove SO_REUSEADDR.
        if waitUntil(lambda: _timeWaitOn(port), 5):
            # Without our reservation: the TIME_WAIT alone holds the port.
            reserved.pop().close()
            with socket.socket() as plain:
                error = self.assertRaises(OSError, plain.bind, ("127.0.0.1", port))
                self.assertEqual(error.errno, errno.EADDRINUSE)
            reserved.append(_reservedPort(port))

        os.makedirs(os.path.join(self.dir, "second"))
        second = ProxyProcess(os.path.join(self.dir, "second"), config)
        self.addCleanup(second.stop)
        second.start()
        self.assertEqual(second.ports["mtls"], port)
        answer = tlsExchange(port, clientContext(self.pki, "client"), b"again", 15)
        self.assertTrue(answer.startswith(b"again"))


class DescriptorExhaustionTests(_ProxyFixture, SynchronousTestCase):
    """
    The proxy at its open file limit (C{RLIMIT_NOFILE} of 64, set in the
    twistd child process only).
    """

    def test_emfileSurvived(self) -> None:
        """
        When clients hold more connections than the proxy has descriptors,
        Twisted's accept loop logs EMFILE and closes what it cannot take,
        the proxy does not spin (little CPU while at the limit with new
        clients knocking), it warned at start that the limit is too low,
        and once descriptors free up it serves clients again.
        """
        backend = EchoBackend("backend-1")
        self.addCleanup(backend.stop)
        self.makePKI()

        class Limited(LimitedProxyProcess):
            fileLimit = 64

        self.startProxy([backend.port], extraListener="handshake_timeout = 120\n", proxyClass=Limited)
        self.assertIn("open file limit (64, hard 64)", self.proxy.log())
        port = self.proxy.ports["mtls"]

        held: list[socket.socket] = []
        self.addCleanup(_closeAll, held)
        for _ in range(80):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        self.assertTrue(waitUntil(lambda: "EMFILE encountered" in self.proxy.log(), 10), self.proxy.log()[-3000:])
        self.assertTrue(waitUntil(lambda: openDescriptors(self.pid) >= 63, 10))

        cpu = cpuSeconds(self.pid)
        started = time.monotonic()
        refused = 0
        while time.monotonic() - started < 3:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as knock:
                knock.settimeout(10)
                try:
                    if knock.recv(10) == b"":
                        refused += 1
                except ConnectionResetError:
                    refused += 1
            time.sleep(0.1)
        used = cpuSeconds(self.pid) - cpu
        self.assertGreater(refused, 10)
        self.assertLess(used, 0.75, f"{used:.2f}s of CPU in 3s at the descriptor limit")
        self.assertIsNone(self.proxy.process.poll() if self.proxy.process else None)

        for s in held:
            s.close()
        held.clear()
        self.assertTrue(waitUntil(lambda: openDescriptors(self.pid) < 40, 10))
        self.assertServes()
