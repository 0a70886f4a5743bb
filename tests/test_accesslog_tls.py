# -*- test-case-name: tests.test_accesslog_tls -*-
"""
Tests for the C{tls_version} and C{cipher} of the access event of a TLS
connection whose handshake failed (L{mtlsproxy.relay}): they name a version
only if client and server agreed on one, not the version OpenSSL reports
before negotiation (C{"TLSv1.3"}) or the one a refused client offered.

The relay listens on 127.0.0.1 behind its real TLS layer with the real
reactor; the clients are real and run in threads: raw bytes, plain HTTP, a
TLS 1.1-only client (Python's C{ssl}), and TLS clients without a
certificate.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, Callable, Generator, Optional

import attrs
from OpenSSL import SSL
from twisted.internet import reactor as _globalReactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from mtlsproxy.pool import Member, Pool
from mtlsproxy.relay import ACCESS_LOG_FORMAT, CloseReason, ProxyServerFactory
from mtlsproxy.selectors import SmoothWeightedRoundRobin
from mtlsproxy.tlsproto import HalfCloseTLSFactory
from tests.test_tlsproto import ServerCreator, serverContext

reactor: Any = _globalReactor


@attrs.frozen
class _MemberConfig:
    address: str
    port: int
    weight: int = 1


def _readUntilClosed(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass


def _sendRaw(port: int, data: bytes) -> None:
    """
    Connect, send C{data} and read until the proxy closes; with no data,
    close at once.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        if data:
            sock.sendall(data)
            _readUntilClosed(sock)


def _tlsClient(
    port: int,
    minimum: ssl.TLSVersion,
    maximum: ssl.TLSVersion,
    ciphers: Optional[str] = None,
) -> Optional[str]:
    """
    A TLS handshake without a client certificate, limited to versions
    C{minimum} to C{maximum}, then a read until the proxy closes.

    @return: L{None}, or why the client could not even offer these versions
        (the local OpenSSL refuses them).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if ciphers is not None:
        context.set_ciphers(ciphers)
    try:
        context.minimum_version = minimum
        context.maximum_version = maximum
    except (ValueError, ssl.SSLError) as e:
        return str(e)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            with context.wrap_socket(sock, server_hostname="localhost") as tls:
                _readUntilClosed(tls)
        except ssl.SSLError as e:
            if "NO_PROTOCOLS_AVAILABLE" in str(e) or "no protocols available" in str(e):
                return str(e)
        except OSError:
            pass
    return None


class HandshakeFailureAccessLogTests(TestCase):
    """
    The access event of TLS connections whose handshake failed.
    """

    timeout = 30

    def setUp(self) -> None:
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        # A member nothing listens on: no backend is ever contacted anyway.
        pool = Pool("app", [Member(_MemberConfig("127.0.0.1", 9))], SmoothWeightedRoundRobin())
        relay = ProxyServerFactory(reactor, "mtls", pool, 5.0, 1, True)
        context = serverContext()
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        factory = HalfCloseTLSFactory(ServerCreator(context), False, relay, clock=reactor)
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port

    @inlineCallbacks
    def accessEvent(
        self, client: Callable[[], object], reason: str = CloseReason.HANDSHAKE_FAILED
    ) -> Generator[Any, Any, dict[str, Any]]:
        """
        Run C{client} in a thread and return the one access event its
        connection produced, checking its C{close_reason} is C{reason}.
        """
        outcome = yield deferToThread(client)
        if isinstance(outcome, str):
            self.skipTest(f"the local OpenSSL will not offer these versions: {outcome}")
        for _ in range(500):
            events = [e for e in self.observer if e.get("log_category") == "access"]
            if events:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        [event] = events
        self.assertEqual(event["log_format"], ACCESS_LOG_FORMAT)
        self.assertEqual(event["close_reason"], reason)
        return event

    def assertNoVersion(self, event: dict[str, Any]) -> None:
        self.assertEqual((event["tls_version"], event["cipher"]), (None, None))
        self.assertIn(" tls=None cipher=None ", formatEvent(event))

    @inlineCallbacks
    def test_garbage(self) -> Generator[Any, Any, None]:
        """
        When a client sends bytes that are not TLS, the access event has no
        TLS version and no cipher.
        """
        event = yield self.accessEvent(lambda: _sendRaw(self.port, b"\x00\x01garbage" * 20))
        self.assertNoVersion(event)

    @inlineCallbacks
    def test_plainHTTP(self) -> Generator[Any, Any, None]:
        """
        When a client speaks plain HTTP to the TLS listener, the access
        event has no TLS version and no cipher.
        """
        event = yield self.accessEvent(
            lambda: _sendRaw(self.port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        )
        self.assertNoVersion(event)

    @inlineCallbacks
    def test_closedBeforeHello(self) -> Generator[Any, Any, None]:
        """
        When a client connects and closes without sending a byte (a TCP port
        probe), the access event says C{no_data}, not a failed handshake,
        and has no TLS version.
        """
        event = yield self.accessEvent(lambda: _sendRaw(self.port, b""), CloseReason.NO_DATA)
        self.assertNoVersion(event)

    @inlineCallbacks
    def test_oneByteThenClosed(self) -> Generator[Any, Any, None]:
        """
        When a client sends part of a ClientHello and closes, that is a
        failed handshake, not C{no_data}.
        """
        def partialHello() -> None:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                sock.sendall(b"\x16\x03\x01")

        event = yield self.accessEvent(partialHello)
        self.assertNoVersion(event)

    @inlineCallbacks
    def test_onlyTLS11Offered(self) -> Generator[Any, Any, None]:
        """
        When a client offers only TLS 1.1 to a listener that wants 1.2 or
        later, the access event has no TLS version (not the version the
        client offered).
        """
        event = yield self.accessEvent(
            lambda: _tlsClient(
                self.port, ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_1, "DEFAULT:@SECLEVEL=0"
            )
        )
        self.assertNoVersion(event)

    @inlineCallbacks
    def test_agreedTLS13(self) -> Generator[Any, Any, None]:
        """
        When a TLS 1.3 handshake fails after the version was agreed (no
        client certificate), the access event names TLS 1.3 and the cipher.
        """
        event = yield self.accessEvent(
            lambda: _tlsClient(self.port, ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3)
        )
        self.assertEqual(event["tls_version"], "TLSv1.3")
        self.assertTrue(event["cipher"])

    @inlineCallbacks
    def test_agreedTLS12(self) -> Generator[Any, Any, None]:
        """
        When a TLS 1.2 handshake fails after the version was agreed (no
        client certificate), the access event names TLS 1.2.
        """
        event = yield self.accessEvent(
            lambda: _tlsClient(self.port, ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)
        )
        self.assertEqual(event["tls_version"], "TLSv1.2")
