# -*- test-case-name: tests.test_hostile -*-
"""
Hostile clients against the real C{twistd -n mtlsproxy}: bytes that are not
TLS, plain HTTP, truncated and oversized ClientHellos, a renegotiation
attempt and a crowd of connections that never finish their handshake.

Each is closed with a logged reason, and a valid mutual-TLS client is served
while it goes on and after it.  (The configuration loader's hostile input,
any TOML document at all, is the property test in C{tests.test_config}.)
"""

from __future__ import annotations

import os
import selectors
import socket
import struct
import threading
import time
from typing import Optional

from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from .robustness import (
    DemoPKI,
    EchoBackend,
    ProxyProcess,
    accessLines,
    clientContext,
    connectTLS,
    echoRoundTrip,
    fullLog,
    openDescriptors,
    rawClosed,
    readUntilClosed,
    residentKiB,
    quietDescriptors,
    settledDescriptors,
    tlsConfig,
    tlsExchange,
    waitUntil,
    withBacklog,
)

HANDSHAKE_TIMEOUT = 3.0
"""
The listener's C{handshake_timeout} in these tests (the default is 10 s).
"""

STALLED = 2000
"""
How many never-finishing handshakes L{HostileClientTests.test_manyStalledHandshakes}
opens at once.
"""


def clientHello(ctx: SSL.Context) -> bytes:
    """
    The records of a real ClientHello, as C{ctx} would send it.
    """
    conn = SSL.Connection(ctx, None)
    conn.set_tlsext_host_name(b"localhost")
    conn.set_connect_state()
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn.bio_read(65536)


def records(body: bytes) -> bytes:
    """
    C{body} as TLS handshake records of at most 16 KiB each.
    """
    out = []
    for offset in range(0, len(body), 16384):
        chunk = body[offset : offset + 16384]
        out.append(b"\x16\x03\x01" + struct.pack("!H", len(chunk)) + chunk)
    return b"".join(out)


def oversizedClientHello(size: int) -> bytes:
    """
    A ClientHello message of C{size} bytes, most of it unknown extensions
    (more than the 64 KiB an extensions block can hold), in records.
    """
    hello = b"\x03\x03" + os.urandom(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    extensions: list[bytes] = []
    kind = 0xFA00
    while len(hello) + 2 + sum(len(e) for e in extensions) < size:
        extensions.append(struct.pack("!HH", kind, 4000) + os.urandom(4000))
        kind += 1
    block = b"".join(extensions)
    hello += b"\xff\xff" + block
    hello = hello[:size]
    message = b"\x01" + struct.pack("!I", len(hello))[1:] + hello
    return records(message)


class HostileClientTests(SynchronousTestCase):
    """
    A C{tls} listener requiring client certificates, with
    C{handshake_timeout = 3}, in front of an echo backend.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.pki = DemoPKI(os.path.join(self.dir, "pki"))
        self.backend = EchoBackend("backend-1")
        self.addCleanup(self.backend.stop)
        config = tlsConfig(
            self.pki.directory,
            [self.backend],
            extraListener=f"handshake_timeout = {HANDSHAKE_TIMEOUT}\n",
        )
        self.proxy = ProxyProcess(self.dir, withBacklog(config))
        self.addCleanup(self.proxy.stop)
        self.proxy.start()
        self.port = self.proxy.ports["mtls"]
        assert self.proxy.process is not None
        self.pid = self.proxy.process.pid
        self.assertServes()
        self.baselineFDs = quietDescriptors(self.pid)

    def assertServes(self, timeout: float = 15.0) -> float:
        """
        A valid client's bytes make the round trip; return how long it took.
        """
        started = time.monotonic()
        payload = os.urandom(1000)
        answer = tlsExchange(self.port, clientContext(self.pki, "client"), payload, timeout)
        self.assertTrue(answer.startswith(payload), answer[:100])
        return time.monotonic() - started

    def rawConnect(self) -> tuple[socket.socket, int]:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.addCleanup(sock.close)
        return sock, sock.getsockname()[1]

    def assertClosedWithReason(self, sock: socket.socket, port: int, reasons: tuple[str, ...],
                               within: float) -> str:
        """
        The proxy closes C{sock} within C{within} seconds and logs one
        access event for it with one of C{reasons}; return that reason.
        """
        after = rawClosed(sock, within)
        self.assertIsNotNone(after, f"connection from port {port} still open after {within}s")
        found: list[str] = []

        def logged() -> bool:
            log = self.proxy.log()
            found[:] = [r for r in reasons if accessLines(log, r, port)]
            return bool(found)

        self.assertTrue(waitUntil(logged, 10), f"no access event for port {port}:\n{self.proxy.log()[-3000:]}")
        return found[0]

    def test_randomBytes(self) -> None:
        """
        When clients send random bytes, each is closed at once as a failed
        handshake (or, if the bytes happen to look like the start of a TLS
        record, at the handshake deadline), and a valid client is served
        meanwhile and after.
        """
        for _ in range(5):
            sock, port = self.rawConnect()
            sock.sendall(os.urandom(4096))
            self.assertServes()
            self.assertClosedWithReason(
                sock, port, ("handshake_failed", "handshake_timeout"), HANDSHAKE_TIMEOUT + 5
            )
        self.assertEqual(self.backend.accepted, 6)

    def test_plainHTTP(self) -> None:
        """
        When a client speaks plain HTTP to the TLS port, it is closed at once
        and logged as a failed handshake (OpenSSL's "http request").
        """
        sock, port = self.rawConnect()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reason = self.assertClosedWithReason(sock, port, ("handshake_failed",), 5)
        self.assertEqual(reason, "handshake_failed")
        self.assertIn("http request", self.proxy.log())
        self.assertServes()

    def test_truncatedClientHello(self) -> None:
        """
        When a client sends half a ClientHello and then nothing, it is
        closed at the handshake deadline (logged as handshake_timeout),
        while a valid client is served; one that sends half and closes is
        logged as a failed handshake.
        """
        hello = clientHello(clientContext(self.pki, "client"))
        sock, port = self.rawConnect()
        started = time.monotonic()
        sock.sendall(hello[: len(hello) // 2])
        self.assertServes()
        self.assertClosedWithReason(sock, port, ("handshake_timeout",), HANDSHAKE_TIMEOUT + 5)
        self.assertGreaterEqual(time.monotonic() - started, HANDSHAKE_TIMEOUT - 0.5)

        sock, port = self.rawConnect()
        sock.sendall(hello[: len(hello) // 2])
        sock.shutdown(socket.SHUT_WR)
        self.assertClosedWithReason(sock, port, ("handshake_failed",), 5)
        self.assertServes()

    def test_oversizedClientHello(self) -> None:
        """
        When clients send a 100 KiB ClientHello (unknown extensions beyond
        what an extensions block can hold) or announce a 1 MiB one, each is
        closed well before the handshake deadline as a failed handshake,
        the proxy's memory stays put, and a valid client is served meanwhile
        and after.
        """
        rss = residentKiB(self.pid)
        for size in (100 * 1024, 1024 * 1024):
            sock, port = self.rawConnect()
            data = oversizedClientHello(size)
            sender = threading.Thread(target=_sendIgnoringErrors, args=(sock, data), daemon=True)
            sender.start()
            self.assertServes()
            self.assertClosedWithReason(sock, port, ("handshake_failed",), HANDSHAKE_TIMEOUT - 0.5)
            sender.join(10)
        self.assertServes()
        self.assertLess(residentKiB(self.pid) - rss, 20 * 1024)

    def test_renegotiationRefused(self) -> None:
        """
        When a TLS 1.2 client asks to renegotiate after its handshake, the
        proxy refuses (no_renegotiation), the client cannot complete it, the
        connection ends and is logged, and valid clients are still served.
        """
        sock, conn = connectTLS(self.port, clientContext(self.pki, "client", SSL.TLS1_2_VERSION))
        self.addCleanup(sock.close)
        port = sock.getsockname()[1]
        conn.sendall(b"ping")
        echoed = b""
        deadline = time.monotonic() + 10
        while len(echoed) < 4 and time.monotonic() < deadline:
            try:
                echoed += conn.recv(4 - len(echoed))
            except SSL.WantReadError:
                time.sleep(0.01)
        self.assertEqual(echoed, b"ping")
        self.assertTrue(conn.renegotiate())
        with self.assertRaises(SSL.Error) as caught:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    conn.do_handshake()
                    conn.recv(100)
                except SSL.WantReadError:
                    time.sleep(0.01)
                    continue
        self.assertIn("no renegotiation", str(caught.exception))
        sock.close()
        self.assertTrue(
            waitUntil(lambda: accessLines(self.proxy.log(), port=port), 10),
            self.proxy.log()[-3000:],
        )
        self.assertServes()

    def test_manyStalledHandshakes(self) -> None:
        """
        When 2,000 clients connect and never finish a handshake (half of them
        send part of a ClientHello), a valid client is served promptly
        meanwhile, all 2,000 are closed by the handshake deadline and logged
        as handshake_timeout, and the proxy's descriptors come back to their
        baseline.
        """
        hello = clientHello(clientContext(self.pki, "client"))
        selector = selectors.DefaultSelector()
        self.addCleanup(selector.close)
        sockets: list[socket.socket] = []
        self.addCleanup(_closeAll, sockets)
        opening = time.monotonic()
        for index in range(STALLED):
            sock = socket.socket()
            sockets.append(sock)
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", self.port))
            selector.register(sock, selectors.EVENT_WRITE, index)
        connected = 0
        deadline = time.monotonic() + 30
        while connected < STALLED and time.monotonic() < deadline:
            for key, _ in selector.select(0.5):
                sock = key.fileobj  # type: ignore[assignment]
                assert isinstance(sock, socket.socket)
                selector.unregister(sock)
                self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), 0)
                if key.data % 2:
                    sock.send(hello[:100])
                selector.register(sock, selectors.EVENT_READ, key.data)
                connected += 1
        self.assertEqual(connected, STALLED)
        opened = time.monotonic() - opening

        # A valid client, while they hold their connections.
        started = time.monotonic()
        payload = os.urandom(1000)
        self.assertEqual(echoRoundTrip(self.port, clientContext(self.pki, "client"), payload), payload)
        self.assertLess(time.monotonic() - started, HANDSHAKE_TIMEOUT)
        self.assertGreater(openDescriptors(self.pid), self.baselineFDs + STALLED // 2)

        closed = 0
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT + 30
        while closed < STALLED and time.monotonic() < deadline:
            for key, _ in selector.select(0.5):
                sock = key.fileobj  # type: ignore[assignment]
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    selector.unregister(sock)
                    closed += 1
        elapsed = time.monotonic() - opening
        self.assertEqual(closed, STALLED, f"{STALLED - closed} still open after {elapsed:.1f}s")
        self.assertLess(elapsed, opened + HANDSHAKE_TIMEOUT + 20)

        self.assertEqual(settledDescriptors(self.pid, self.baselineFDs, 15), self.baselineFDs)
        self.assertTrue(
            waitUntil(lambda: len(accessLines(fullLog(self.proxy), "handshake_timeout")) >= STALLED, 15)
        )
        self.assertEqual(len(accessLines(fullLog(self.proxy), "handshake_timeout")), STALLED)
        for sock in sockets:
            sock.close()
        self.assertServes()


def _closeAll(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def _sendIgnoringErrors(sock: socket.socket, data: bytes) -> Optional[BaseException]:
    try:
        sock.sendall(data)
    except OSError as e:
        return e
    return None
