# -*- test-case-name: tests.test_http -*-
"""
Tests for L{mtlsproxy.headers} and L{mtlsproxy.http}.

Everything runs in memory: the client and every backend connection are
L{StringTransport}s, a L{MemoryReactorClock} records backend connection
attempts and runs the timers.  HTTP on the backend side is read back with
an independent h11 server, and the client's answers with an h11 client.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import h11
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mtlsproxy.headers import (
    HOP_BY_HOP,
    connectionTokens,
    forwardedElement,
    headerValue,
    isHopByHop,
    requestHeaders,
    responseHeaders,
)
from mtlsproxy.http import (
    HTTP_ACCESS_LOG_FORMAT,
    BackendConnectionCache,
    BackendHTTPProtocol,
    ClientPhase,
    HTTPProxyFactory,
    HTTPProxyProtocol,
    Outcome,
)
from mtlsproxy.pool import ConnectionFacts, Member, Pool
from mtlsproxy.routing import Route, Router, RouteTarget

CLIENT = IPv4Address("TCP", "203.0.113.7", 40000)
LISTENER = IPv4Address("TCP", "192.0.2.1", 443)

# ---------------------------------------------------------------------------
# Header rewriting
# ---------------------------------------------------------------------------


def _names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [name.lower() for name, _ in headers]


class HopByHopTests(SynchronousTestCase):
    """
    L{isHopByHop}, L{connectionTokens}.
    """

    def test_standardHopByHop(self) -> None:
        """
        When a header is one of RFC 9110's hop-by-hop headers or a
        C{Proxy-*} header, it is hop-by-hop; end-to-end headers are not.
        """
        for name in HOP_BY_HOP | {b"Proxy-Authorization", b"proxy-connection", b"Keep-Alive"}:
            self.assertTrue(isHopByHop(name), name)
        for name in (b"Host", b"Content-Length", b"Accept", b"Cookie"):
            self.assertFalse(isHopByHop(name), name)

    def test_connectionTokens(self) -> None:
        """
        When C{Connection} lists headers, they become hop-by-hop, whatever
        their case and spacing, over several C{Connection} lines.
        """
        headers = [(b"Connection", b"keep-alive, X-Foo"), (b"connection", b" x-BAR ,")]
        tokens = connectionTokens(headers)
        self.assertEqual(tokens, {b"keep-alive", b"x-foo", b"x-bar"})
        self.assertTrue(isHopByHop(b"X-Foo", tokens))
        self.assertTrue(isHopByHop(b"x-bar", tokens))

    def test_connectionCannotRemoveFraming(self) -> None:
        """
        When C{Connection} names C{Host} or C{Content-Length}, they are
        kept: dropping them would change the request's target or framing.
        """
        tokens = connectionTokens([(b"Connection", b"host, content-length")])
        self.assertFalse(isHopByHop(b"Host", tokens))
        self.assertFalse(isHopByHop(b"Content-Length", tokens))


class RequestHeadersTests(SynchronousTestCase):
    """
    L{requestHeaders}.
    """

    def test_hopByHopRemoved(self) -> None:
        """
        When a request has hop-by-hop headers, including those its
        C{Connection} names, none reaches the backend; the rest keeps its
        order and case.
        """
        headers = [
            (b"Host", b"api.example.com"),
            (b"Connection", b"keep-alive, X-Secret"),
            (b"Keep-Alive", b"timeout=5"),
            (b"TE", b"trailers"),
            (b"Trailer", b"X-Checksum"),
            (b"Upgrade", b"websocket"),
            (b"Proxy-Authorization", b"Basic eA=="),
            (b"X-Secret", b"hop"),
            (b"Accept", b"*/*"),
            (b"Content-Length", b"3"),
        ]
        out = requestHeaders(headers, "203.0.113.7")
        self.assertEqual(
            out[:3], [(b"Host", b"api.example.com"), (b"Accept", b"*/*"), (b"Content-Length", b"3")]
        )
        for name in (b"connection", b"keep-alive", b"te", b"trailer", b"upgrade",
                     b"proxy-authorization", b"x-secret", b"transfer-encoding"):
            self.assertNotIn(name, _names(out))

    def test_chunkedDropsContentLength(self) -> None:
        """
        When a request is chunked and also has C{Content-Length}, the
        backend gets C{Transfer-Encoding: chunked} only.
        """
        out = requestHeaders(
            [(b"Host", b"h"), (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"10")],
            "203.0.113.7",
        )
        self.assertEqual(headerValue(out, b"transfer-encoding"), b"chunked")
        self.assertIsNone(headerValue(out, b"content-length"))

    def test_forwardingHeaders(self) -> None:
        """
        When the client sent C{X-Forwarded-For}, C{Forwarded} and C{Via},
        the proxy appends to them; C{X-Forwarded-Proto} is replaced.
        """
        out = requestHeaders(
            [
                (b"Host", b"example.com:8443"),
                (b"X-Forwarded-For", b"198.51.100.1"),
                (b"X-Forwarded-For", b"198.51.100.2"),
                (b"X-Forwarded-Proto", b"gopher"),
                (b"Forwarded", b"for=198.51.100.1"),
                (b"Via", b"1.0 fred"),
            ],
            "203.0.113.7",
        )
        self.assertEqual(
            headerValue(out, b"x-forwarded-for"), b"198.51.100.1, 198.51.100.2, 203.0.113.7"
        )
        self.assertEqual(_names(out).count(b"x-forwarded-for"), 1)
        self.assertEqual(headerValue(out, b"x-forwarded-proto"), b"https")
        self.assertEqual(
            headerValue(out, b"forwarded"),
            b'for=198.51.100.1, for=203.0.113.7;proto=https;host="example.com:8443"',
        )
        self.assertEqual(headerValue(out, b"via"), b"1.0 fred, 1.1 mtlsproxy")

    def test_forwardedIPv6(self) -> None:
        """
        When the client's address is IPv6, C{Forwarded} quotes it in
        brackets (RFC 7239) and C{X-Forwarded-For} has it bare.
        """
        self.assertEqual(
            forwardedElement("2001:db8::7", "https", b"h"), b'for="[2001:db8::7]";proto=https;host=h'
        )
        out = requestHeaders([(b"Host", b"h")], "2001:db8::7")
        self.assertEqual(headerValue(out, b"x-forwarded-for"), b"2001:db8::7")

    def test_identityHeadersAlwaysStripped(self) -> None:
        """
        When a client sends identity headers of any format, in any case,
        none reaches the backend, and the proxy's own are added.
        """
        forged = [
            (b"X-Forwarded-Client-Cert", b"Hash=forged"),
            (b"x-forwarded-client-cert", b"Subject=\"CN=admin\""),
            (b"Client-Cert", b":Zm9yZ2Vk:"),
            (b"CLIENT-CERT-CHAIN", b":Zm9yZ2Vk:"),
            (b"X-SSL-Client-Subject", b"CN=admin"),
            (b"X-SSL-Client-Verify", b"SUCCESS"),
            (b"x-ssl-client-anything", b"x"),
        ]
        own = [(b"X-SSL-Client-Verify", b"NONE")]
        out = requestHeaders([(b"Host", b"h")] + forged, "203.0.113.7", identity=own)
        identity = [(n, v) for n, v in out if n.lower().startswith((b"x-ssl", b"client-cert", b"x-forwarded-client"))]
        self.assertEqual(identity, own)

    def test_missingHostAdded(self) -> None:
        """
        When an HTTP/1.0 request has no C{Host}, the default host is added
        for the HTTP/1.1 backend.
        """
        out = requestHeaders([(b"Accept", b"*/*")], "203.0.113.7", defaultHost=b"localhost")
        self.assertEqual(out[0], (b"Host", b"localhost"))

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(
                    [b"Host", b"Connection", b"X-A", b"x-b", b"TE", b"Client-Cert",
                     b"X-SSL-Client-CN", b"Proxy-Foo", b"Content-Length", b"Transfer-Encoding",
                     b"X-Forwarded-Client-Cert", b"Upgrade"]
                ),
                st.sampled_from([b"x-a", b"x-b, te", b"chunked", b"1", b"close", b"v"]),
            ),
            max_size=12,
        )
    )
    @settings(max_examples=200, deadline=None)
    def test_neverForwardsForgedIdentity(self, headers: list[tuple[bytes, bytes]]) -> None:
        """
        Whatever headers a client sends, no identity header and no
        hop-by-hop header it sent reaches the backend, and
        C{Transfer-Encoding} and C{Content-Length} never both.
        """
        out = requestHeaders(headers, "203.0.113.7")
        tokens = connectionTokens(headers)
        for name, value in out:
            lowered = name.lower()
            self.assertFalse(lowered.startswith(b"x-ssl-client-"))
            self.assertNotIn(lowered, (b"client-cert", b"x-forwarded-client-cert", b"connection"))
            if lowered != b"transfer-encoding":
                self.assertFalse(isHopByHop(lowered, tokens), lowered)
        names = _names(out)
        self.assertFalse(b"transfer-encoding" in names and b"content-length" in names)


class ResponseHeadersTests(SynchronousTestCase):
    """
    L{responseHeaders}.
    """

    def test_hopByHopRemoved(self) -> None:
        """
        When a response has hop-by-hop headers, the client gets none; a
        chunked response loses its C{Content-Length} too (h11 frames it
        again); C{Via} is appended.
        """
        out = responseHeaders(
            [
                (b"Content-Type", b"text/plain"),
                (b"Connection", b"close, X-Internal"),
                (b"X-Internal", b"1"),
                (b"Transfer-Encoding", b"chunked"),
                (b"Content-Length", b"5"),
                (b"Proxy-Authenticate", b"Basic"),
            ]
        )
        self.assertEqual(out, [(b"Content-Type", b"text/plain"), (b"Via", b"1.1 mtlsproxy")])


# ---------------------------------------------------------------------------
# The proxy, in memory
# ---------------------------------------------------------------------------


@attrs.frozen
class _MemberConfig:
    address: str
    port: int
    weight: int = 1


class FirstSelector:
    """
    Picks the first candidate; records the facts.
    """

    def __init__(self) -> None:
        self.facts: list[ConnectionFacts] = []

    def pick(self, candidates: list[Member], facts: ConnectionFacts) -> Optional[Member]:
        self.facts.append(facts)
        return candidates[0]


class Backend:
    """
    One backend connection of the harness: the proxy's protocol, its
    transport, and an h11 server reading what the proxy sent.
    """

    def __init__(self, protocol: BackendHTTPProtocol, transport: StringTransport) -> None:
        self.protocol = protocol
        self.transport = transport
        self.server = h11.Connection(h11.SERVER)
        self._seen = 0

    def events(self) -> list[Any]:
        """
        The h11 events of what the proxy wrote since the last call.
        """
        data = self.transport.value()
        if len(data) > self._seen:
            self.server.receive_data(data[self._seen:])
        self._seen = len(data)
        out = []
        while True:
            event = self.server.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return out
            out.append(event)

    def respond(self, status: int = 200, body: bytes = b"ok", headers: Optional[list[tuple[bytes, bytes]]] = None) -> None:
        """
        Send a complete response.
        """
        if headers is None:
            headers = [(b"Content-Length", str(len(body)).encode())]
        data = self.server.send(h11.Response(status_code=status, headers=headers))
        data += self.server.send(h11.Data(data=body)) if body else b""
        data += self.server.send(h11.EndOfMessage())
        self.server.start_next_cycle() if self.server.our_state is h11.DONE and self.server.their_state is h11.DONE else None
        self.protocol.dataReceived(data)


class HTTPHarness:
    """
    One client connection to an HTTP proxy factory in plain-HTTP mode,
    in memory.
    """

    def __init__(
        self,
        members: int = 2,
        maxAttempts: int = 3,
        identityMode: str = "none",
        proxyProtocol: str = "none",
        routes: tuple[Route, ...] = (),
        responseTimeout: float = 60.0,
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1000)
        self.selector = FirstSelector()
        self.members = [Member(_MemberConfig(f"10.0.0.{i}", 8000 + i)) for i in range(1, members + 1)]
        self.pool = Pool("app", self.members, self.selector, clock=self.reactor)
        self.target = RouteTarget(self.pool, 5.0, maxAttempts, proxyProtocol)
        self.router = Router(routes, self.target, "app")
        self.factory = HTTPProxyFactory(
            self.reactor,
            "web",
            self.router,
            tls=False,
            identityMode=identityMode,
            responseTimeout=responseTimeout,
        )
        self.client = self.connectClient()
        self.clientTransport: StringTransport = self.client.transport
        self.reader = h11.Connection(h11.CLIENT)
        self._read = 0
        self._pending: list[Any] = []

    def connectClient(self, peer: IPv4Address = CLIENT) -> HTTPProxyProtocol:
        client = self.factory.buildProtocol(peer)
        client.makeConnection(StringTransport(hostAddress=LISTENER, peerAddress=peer))
        return client

    def send(self, data: bytes) -> None:
        self.client.dataReceived(data)

    def attempts(self) -> int:
        return len(self.reactor.tcpClients)

    def connectBackend(self, index: int = -1) -> Backend:
        """
        Let connection attempt C{index} succeed.
        """
        host, port, factory, timeout, bindAddress = self.reactor.tcpClients[index]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "10.0.0.254", 50000 + index % 1000),
            peerAddress=IPv4Address("TCP", host, port),
        )
        protocol.makeConnection(transport)
        return Backend(protocol, transport)

    def failBackend(self, index: int = -1) -> None:
        host, port, factory, timeout, bindAddress = self.reactor.tcpClients[index]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))

    def responses(self) -> list[Any]:
        """
        The h11 events the client received since the last call.
        """
        out, self._pending = self._pending, []
        data = self.clientTransport.value()
        if len(data) > self._read:
            self.reader.receive_data(data[self._read:])
        self._read = len(data)
        while True:
            event = self.reader.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return out
            out.append(event)
            if isinstance(event, h11.EndOfMessage) and self.reader.our_state is h11.DONE:
                self.reader.start_next_cycle()

    def request(self, target: bytes = b"/", host: bytes = b"app.example", extra: bytes = b"") -> None:
        """
        Send a GET; the harness's h11 reader is told about it too.
        """
        self._pending = self.responses()
        self.reader.send(h11.Request(method="GET", target=target, headers=[("Host", host)]))
        self.reader.send(h11.EndOfMessage())
        self.send(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + b"\r\n")


def _statuses(events: list[Any]) -> list[int]:
    return [e.status_code for e in events if isinstance(e, h11.Response)]


def _body(events: list[Any]) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, h11.Data))


class ProxyTests(SynchronousTestCase):
    """
    Requests through L{HTTPProxyProtocol}.
    """

    def setUp(self) -> None:
        self.observer = EventLoggingObserver()
        globalLogPublisher.addObserver(self.observer)
        self.addCleanup(globalLogPublisher.removeObserver, self.observer)

    def access(self) -> list[dict[str, Any]]:
        return [e for e in self.observer if e.get("log_category") == "access"]

    def test_requestAndResponse(self) -> None:
        """
        When a client sends a request, one backend connection is opened, it
        receives the request with forwarding headers and C{Host} kept, and
        its response reaches the client; one access event describes it.
        """
        h = HTTPHarness()
        h.request(b"/hello?x=1", b"app.example")
        self.assertEqual(h.attempts(), 1)
        backend = h.connectBackend()
        events = backend.events()
        request = events[0]
        self.assertEqual((request.method, request.target), (b"GET", b"/hello?x=1"))
        self.assertEqual(headerValue(request.headers, b"host"), b"app.example")
        self.assertEqual(headerValue(request.headers, b"x-forwarded-for"), b"203.0.113.7")
        self.assertEqual(headerValue(request.headers, b"x-forwarded-proto"), b"http")
        self.assertIsInstance(events[1], h11.EndOfMessage)
        backend.respond(200, b"hello")
        events = h.responses()
        self.assertEqual(_statuses(events), [200])
        self.assertEqual(_body(events), b"hello")
        [event] = self.access()
        self.assertEqual(event["log_format"], HTTP_ACCESS_LOG_FORMAT)
        self.assertEqual(event["status"], 200)
        self.assertEqual(event["close_reason"], Outcome.COMPLETED)
        self.assertEqual(event["backend"], "10.0.0.1:8001")
        self.assertEqual(event["bytes_out"], 5)
        self.assertEqual(event["method"], "GET")
        self.assertEqual(event["pool"], "app")

    def test_keepAliveReusesBackend(self) -> None:
        """
        When a client sends two requests on one connection, both go over one
        backend connection, and the client connection stays open.
        """
        h = HTTPHarness()
        h.request(b"/1")
        backend = h.connectBackend()
        backend.events()
        backend.respond(200, b"one")
        h.request(b"/2")
        self.assertEqual(h.attempts(), 1)
        events = backend.events()
        self.assertEqual(events[0].target, b"/2")
        backend.respond(200, b"two")
        self.assertEqual(_body(h.responses()), b"onetwo")
        self.assertFalse(h.clientTransport.disconnecting)
        self.assertEqual(h.client.phase, ClientPhase.IDLE)
        self.assertEqual(h.members[0].activeConnections, 0)
        self.assertEqual(h.members[0].totalConnections, 2)

    def test_backendSharedAcrossClients(self) -> None:
        """
        When a request is complete, its backend connection is idle in the
        cache and serves the next client's request.
        """
        h = HTTPHarness()
        h.request(b"/1")
        backend = h.connectBackend()
        backend.events()
        backend.respond()
        self.assertEqual(len(h.factory.backends), 1)
        other = h.connectClient(IPv4Address("TCP", "203.0.113.8", 1))
        other.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(h.attempts(), 1)
        self.assertEqual(backend.events()[0].target, b"/x")

    def test_idleBackendExpires(self) -> None:
        """
        When an idle backend connection is not used for
        C{BackendConnectionCache.idleTimeout} seconds, it is closed.
        """
        h = HTTPHarness()
        h.request()
        backend = h.connectBackend()
        backend.events()
        backend.respond()
        h.reactor.advance(BackendConnectionCache.idleTimeout + 1)
        self.assertTrue(backend.transport.disconnecting)
        self.assertEqual(len(h.factory.backends), 0)

    def test_staleBackendRetried(self) -> None:
        """
        When a kept-alive backend connection turns out closed before any
        response to a request without body, the request is sent again on a
        new connection.
        """
        h = HTTPHarness()
        h.request(b"/1")
        first = h.connectBackend()
        first.events()
        first.respond()
        h.request(b"/2")
        first.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(h.attempts(), 2)
        second = h.connectBackend()
        self.assertEqual(second.events()[0].target, b"/2")
        second.respond(200, b"again")
        self.assertEqual(_body(h.responses()), b"okagain")

    def test_connectFailuresTryOtherMembers(self) -> None:
        """
        When the first member refuses, the next is tried; the request
        reaches it.
        """
        h = HTTPHarness()
        h.request()
        h.failBackend()
        self.assertEqual(h.attempts(), 2)
        self.assertEqual(h.reactor.tcpClients[1][:2], ("10.0.0.2", 8002))
        backend = h.connectBackend()
        self.assertEqual(backend.events()[0].target, b"/")

    def test_noMemberAnswers502(self) -> None:
        """
        When no member can be connected within C{max_connect_attempts}, the
        client gets a 502 and the connection is closed.
        """
        h = HTTPHarness(maxAttempts=2)
        h.request()
        h.failBackend()
        h.failBackend()
        events = h.responses()
        self.assertEqual(_statuses(events), [502])
        self.assertTrue(h.clientTransport.disconnecting)
        self.assertEqual(self.access()[0]["close_reason"], Outcome.NO_BACKEND)

    def test_noHealthyMember503(self) -> None:
        """
        When no member of the pool is healthy, the client gets a 503 and no
        connection is attempted.
        """
        h = HTTPHarness()
        for member in h.members:
            member.healthy = False
        h.request()
        self.assertEqual(_statuses(h.responses()), [503])
        self.assertEqual(h.attempts(), 0)

    def test_malformedRequest400(self) -> None:
        """
        When a client sends something that is not HTTP, it gets a 400, no
        backend is contacted, and the connection is closed.
        """
        h = HTTPHarness()
        h.send(b"NOT HTTP AT ALL\r\n\r\n")
        value = h.clientTransport.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 400 Bad Request\r\n"), value)
        self.assertEqual(h.attempts(), 0)
        self.assertTrue(h.clientTransport.disconnecting)
        self.assertEqual(self.access()[0]["close_reason"], Outcome.BAD_REQUEST)

    def test_invalidResponse502(self) -> None:
        """
        When the backend answers with something that is not HTTP, the client
        gets a 502.
        """
        h = HTTPHarness()
        h.request()
        backend = h.connectBackend()
        backend.protocol.dataReceived(b"garbage\r\n\r\n")
        self.assertEqual(_statuses(h.responses()), [502])
        self.assertTrue(backend.transport.disconnecting)

    def test_backendClosesBeforeResponse502(self) -> None:
        """
        When a new backend connection closes before responding, the client
        gets a 502.
        """
        h = HTTPHarness()
        h.request()
        backend = h.connectBackend()
        backend.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(_statuses(h.responses()), [502])

    def test_responseTimeout504(self) -> None:
        """
        When the response does not start within C{response_timeout} after
        the request was forwarded, the client gets a 504 and the backend
        connection is closed.
        """
        h = HTTPHarness(responseTimeout=10.0)
        h.request()
        backend = h.connectBackend()
        h.reactor.advance(9)
        self.assertEqual(h.responses(), [])
        h.reactor.advance(2)
        self.assertEqual(_statuses(h.responses()), [504])
        self.assertTrue(backend.transport.disconnecting)
        self.assertEqual(self.access()[0]["close_reason"], Outcome.TIMEOUT)

    def test_backendCutsResponseShort(self) -> None:
        """
        When the backend closes in the middle of a response, the client
        connection is closed (the client sees the response truncated).
        """
        h = HTTPHarness()
        h.request()
        backend = h.connectBackend()
        backend.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        backend.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(h.clientTransport.disconnecting)
        self.assertEqual(self.access()[0]["close_reason"], Outcome.BACKEND_CLOSED)

    def test_continueForwarded(self) -> None:
        """
        When the client expects C{100-continue}, the backend's
        C{100 Continue} reaches it before the final response.
        """
        h = HTTPHarness()
        h.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        backend = h.connectBackend()
        self.assertEqual(headerValue(backend.events()[0].headers, b"expect"), b"100-continue")
        backend.protocol.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertTrue(h.clientTransport.value().startswith(b"HTTP/1.1 100 Continue\r\n"))
        h.send(b"ok")
        self.assertEqual(_body(backend.events()), b"ok")
        backend.respond(201, b"")
        self.assertIn(b"HTTP/1.1 201 ", h.clientTransport.value())

    def test_upgradeResponseRefused(self) -> None:
        """
        When a backend switches protocols although the proxy removed
        C{Upgrade}, the client gets a 502.
        """
        h = HTTPHarness()
        h.request(extra=b"Upgrade: websocket\r\nConnection: Upgrade\r\n")
        backend = h.connectBackend()
        self.assertIsNone(headerValue(backend.events()[0].headers, b"upgrade"))
        backend.protocol.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
        self.assertEqual(_statuses(h.responses()), [502])

    def test_chunkedRequestStreamed(self) -> None:
        """
        When a client sends a chunked body, the backend receives each chunk
        as it arrives, chunked, before the body is complete.
        """
        h = HTTPHarness()
        h.send(b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        backend = h.connectBackend()
        h.send(b"5\r\nhello\r\n")
        events = backend.events()
        self.assertEqual(headerValue(events[0].headers, b"transfer-encoding"), b"chunked")
        self.assertEqual(_body(events), b"hello")
        h.send(b"6\r\n world\r\n0\r\n\r\n")
        events = backend.events()
        self.assertEqual(_body(events), b" world")
        self.assertIsInstance(events[-1], h11.EndOfMessage)

    def test_closeDelimitedResponseChunkedToClient(self) -> None:
        """
        When the backend's response ends with its connection (no length),
        the client gets it chunked on a connection that stays open.
        """
        h = HTTPHarness()
        h.request()
        backend = h.connectBackend()
        backend.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart1")
        backend.protocol.dataReceived(b"part2")
        backend.protocol.connectionLost(Failure(ConnectionDone()))
        value = h.clientTransport.value()
        self.assertIn(b"transfer-encoding: chunked", value.lower())
        self.assertEqual(_body(h.responses()), b"part1part2")
        self.assertFalse(h.clientTransport.disconnecting)

    def test_backendPausesClient(self) -> None:
        """
        When the backend connection's send buffer is full, the client is not
        read; when it drains, reading resumes.
        """
        h = HTTPHarness()
        h.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
        backend = h.connectBackend()
        self.assertEqual(h.clientTransport.producerState, "producing")
        backend.transport.producer.pauseProducing()
        self.assertEqual(h.clientTransport.producerState, "paused")
        backend.transport.producer.resumeProducing()
        self.assertEqual(h.clientTransport.producerState, "producing")

    def test_clientPausesBackend(self) -> None:
        """
        When the client's send buffer is full, the backend is not read; when
        it drains, reading resumes.
        """
        h = HTTPHarness()
        h.request()
        backend = h.connectBackend()
        backend.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nxx")
        h.clientTransport.producer.pauseProducing()
        self.assertEqual(backend.transport.producerState, "paused")
        h.clientTransport.producer.resumeProducing()
        self.assertEqual(backend.transport.producerState, "producing")

    def test_clientFullHoldsResponse(self) -> None:
        """
        While the client's transport asks to pause, response bytes already
        read from the backend are not written (a TLS transport would
        reorder them); they follow on resume, in order.
        """
        h = HTTPHarness()
        h.request()
        backend = h.connectBackend()
        h.clientTransport.producer.pauseProducing()
        backend.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabcdef")
        self.assertEqual(h.clientTransport.value(), b"")
        h.clientTransport.producer.resumeProducing()
        events = h.responses()
        self.assertEqual((_statuses(events), _body(events)), ([200], b"abcdef"))

    def test_backendFullHoldsRequest(self) -> None:
        """
        While the backend's transport asks to pause, request body bytes
        already read from the client are not written; they follow on
        resume.
        """
        h = HTTPHarness()
        h.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n")
        backend = h.connectBackend()
        backend.events()
        backend.transport.producer.pauseProducing()
        h.send(b"body")
        self.assertEqual(backend.events(), [])
        backend.transport.producer.resumeProducing()
        self.assertEqual(_body(backend.events()), b"body")

    def test_clientPausedWhileConnecting(self) -> None:
        """
        While a backend is being connected, the client is not read.
        """
        h = HTTPHarness()
        h.request()
        self.assertEqual(h.clientTransport.producerState, "paused")
        h.connectBackend()
        self.assertEqual(h.clientTransport.producerState, "producing")

    def test_pipelinedRequestsInOrder(self) -> None:
        """
        When a client sends two requests at once, the second is forwarded
        only after the response to the first, and the client is not read
        meanwhile.
        """
        h = HTTPHarness()
        h.send(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        backend = h.connectBackend()
        self.assertEqual([e.target for e in backend.events() if isinstance(e, h11.Request)], [b"/1"])
        self.assertEqual(h.clientTransport.producerState, "paused")
        backend.respond(200, b"1")
        self.assertEqual([e.target for e in backend.events() if isinstance(e, h11.Request)], [b"/2"])
        backend.respond(200, b"2")
        self.assertEqual(h.clientTransport.producerState, "producing")

    def test_hostAndPathRouting(self) -> None:
        """
        When routes match the request's host and path, the request goes to
        their pool; others go to the listener's.
        """
        h = HTTPHarness()
        apiMember = Member(_MemberConfig("10.1.0.1", 9001))
        apiPool = Pool("api", [apiMember], FirstSelector(), clock=h.reactor)
        api = RouteTarget(apiPool, 5.0, 3)
        h.factory.router = Router(
            (Route(api, "api", host="api.example.com", pathPrefix="/v1"),), h.target, "app"
        )
        h.request(b"/v1/users", b"API.example.com:443")
        self.assertEqual(h.reactor.tcpClients[-1][:2], ("10.1.0.1", 9001))
        backend = h.connectBackend()
        backend.respond()
        h.request(b"/v2/users", b"api.example.com")
        self.assertEqual(h.reactor.tcpClients[-1][:2], ("10.0.0.1", 8001))
        self.assertEqual([e["pool"] for e in self.access()], ["api"])

    def test_forgedIdentityStripped(self) -> None:
        """
        When a client sends identity headers on a listener without identity
        headers, the backend receives none of them.
        """
        h = HTTPHarness()
        h.request(extra=b"X-Forwarded-Client-Cert: Hash=x\r\nX-SSL-Client-Verify: SUCCESS\r\nClient-Cert: :eA==:\r\n")
        backend = h.connectBackend()
        names = [n for n, _ in backend.events()[0].headers]
        for name in (b"x-forwarded-client-cert", b"x-ssl-client-verify", b"client-cert"):
            self.assertNotIn(name, names)

    def test_simpleIdentityWithoutCertificate(self) -> None:
        """
        When the listener sends C{simple} identity headers and the client
        has no certificate, the backend gets C{X-SSL-Client-Verify: NONE}
        and nothing forged.
        """
        h = HTTPHarness(identityMode="simple")
        h.request(extra=b"X-SSL-Client-Verify: SUCCESS\r\nX-SSL-Client-Subject: CN=admin\r\n")
        backend = h.connectBackend()
        headers = backend.events()[0].headers
        self.assertEqual([v for n, v in headers if n == b"x-ssl-client-verify"], [b"NONE"])
        self.assertNotIn(b"x-ssl-client-subject", [n for n, _ in headers])

    def test_proxyProtocolBackendsPrivate(self) -> None:
        """
        When the pool has C{proxy_protocol = "v2"}, a backend connection
        starts with a header naming the client, and is reused only by that
        client's connection, and closed with it.
        """
        h = HTTPHarness(proxyProtocol="v2")
        h.request()
        backend = h.connectBackend()
        self.assertTrue(backend.transport.value().startswith(b"\r\n\r\n\x00\r\nQUIT\n"))
        self.assertIn(bytes([203, 0, 113, 7]), backend.transport.value()[:40])
        backend.transport.clear()
        backend.respond()
        other = h.connectClient(IPv4Address("TCP", "203.0.113.8", 1))
        other.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(h.attempts(), 2)
        h.request(b"/again")
        self.assertEqual(h.attempts(), 2)
        h.client.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(backend.transport.disconnecting)

    def test_clientGoneClosesBackend(self) -> None:
        """
        When the client goes away during a response, the backend connection
        is closed (not reused) and the access event says client_closed.
        """
        h = HTTPHarness()
        h.request()
        backend = h.connectBackend()
        backend.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        h.client.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(backend.transport.disconnecting)
        self.assertEqual(len(h.factory.backends), 0)
        self.assertEqual(self.access()[0]["close_reason"], Outcome.CLIENT_CLOSED)
        self.assertEqual(h.members[0].activeConnections, 0)

    def test_finishClosesIdleAndAfterResponse(self) -> None:
        """
        When the listener stops, an idle client connection is closed at
        once, a busy one after its response, which says
        C{Connection: close}.
        """
        h = HTTPHarness()
        idle = h.connectClient(IPv4Address("TCP", "203.0.113.9", 1))
        h.request()
        backend = h.connectBackend()
        h.factory.stopFactory()
        self.assertTrue(idle.transport.disconnecting)
        self.assertFalse(h.clientTransport.disconnecting)
        backend.respond()
        self.assertIn(b"connection: close", h.clientTransport.value().lower())
        self.assertTrue(h.clientTransport.disconnecting)

    def test_clientEOFBetweenRequests(self) -> None:
        """
        When the client half-closes between requests, the connection is
        closed.
        """
        h = HTTPHarness()
        h.client.readConnectionLost()
        self.assertTrue(h.clientTransport.disconnecting)

    def test_selectorSeesClient(self) -> None:
        """
        When a request is routed, the selector is told the listener and the
        client's address.
        """
        h = HTTPHarness()
        h.request()
        facts = h.selector.facts[0]
        self.assertEqual((facts.listener, facts.peerHost, facts.peerPort), ("web", "203.0.113.7", 40000))

    def test_registryAndDescribe(self) -> None:
        """
        A client connection is in the connection registry while open, and
        describes its request's backend.
        """
        h = HTTPHarness()
        h.request()
        h.connectBackend()
        [info] = h.factory.connections.snapshot()
        self.assertEqual(info.backend, "10.0.0.1:8001")
        self.assertEqual(info.peer, "203.0.113.7:40000")
        h.client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(h.factory.connections), 0)
