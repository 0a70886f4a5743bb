# -*- test-case-name: tests.test_http -*-
"""
The C{https} listener: TLS termination as for C{tls}, then HTTP/1.1
reverse proxying to the pools, request by request.

HTTP is parsed and framed by L{h11} (sans-IO), on both sides; this module
moves its events between the two and owns flow control, backend choice and
errors.

One L{HTTPProxyProtocol} per client connection goes through these phases
(L{ClientPhase}):

  - C{HANDSHAKING}: the TLS layer reads the handshake; nothing is parsed
    and no backend is contacted before C{handshakeCompleted}, i.e. before
    the client certificate was verified.
  - C{IDLE}: waiting for a request (keep-alive).  The listener's
    C{idle_timeout} applies.
  - C{ACTIVE}: one L{_Exchange} (request and response) is in progress.
    Its pool comes from the listener's routes (L{mtlsproxy.routing}); its
    member from the pool's selector, as for a new TCP connection; a backend
    connection is reused from L{BackendConnectionCache} or opened, with the
    pool's C{connect_timeout} and C{max_connect_attempts}.
  - C{CLOSING}, C{CLOSED}.

Flow control: the request body goes to the backend as it arrives and the
response body to the client as it arrives, never buffered whole.  A full
backend send buffer pauses reading from the client, a full client send
buffer pauses reading from the backend (each transport has a streaming
producer that does that), and the client is not read at all while a
backend is being connected or while a pipelined request waits for the
response before it.

Backend connections are kept alive and reused for later requests of any
client (up to L{BackendConnectionCache.maxIdlePerMember} idle ones per
member, closed after L{BackendConnectionCache.idleTimeout} seconds idle),
except for pools with C{proxy_protocol}: their connections start with a
header describing one client, so they are reused only for that client's
connection and closed with it.

Errors of the proxy itself are answered with a short C{text/plain}
response, and the client connection is then closed:

  - 400 (or h11's hint, e.g. 431) for a request h11 cannot parse;
  - 502 when no member could be connected, or the backend's response was
    not valid HTTP, or it closed before responding;
  - 503 when the pool has no healthy member;
  - 504 when the response did not start C{response_timeout} seconds after
    the request was completely forwarded.

Every request is logged as one access event (L{HTTP_ACCESS_LOG_FORMAT}).
"""

from __future__ import annotations

import enum
from http import HTTPStatus
from typing import Any, Final, Optional

import h11
from twisted.internet.error import ConnectionDone, NotConnectingError
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IPushProducer,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .headers import headerValue, requestHeaders, responseHeaders
from .identity import ClientTLSInfo, identityHeaders, tlsInfoOf
from .pool import (
    LOCAL_CONNECT_FAILED_FORMAT,
    NO_HEALTHY_MEMBER,
    ConnectionFacts,
    Member,
    localResourceError,
)
from .routing import Router, RouteTarget

__all__ = [
    "HTTP_ACCESS_LOG_FORMAT",
    "BackendConnectionCache",
    "BackendHTTPProtocol",
    "ClientPhase",
    "HTTPProxyFactory",
    "HTTPProxyProtocol",
    "Outcome",
]

HTTP_ACCESS_LOG_FORMAT: Final = (
    '{listener} {peer} "{method} {target} HTTP/{http_version}" {status}'
    " -> {backend} pool={pool} {close_reason}"
    " in={bytes_in} out={bytes_out} duration={duration:.3f}s"
    " tls={tls_version} sni={sni} host={host}"
    " subject={subject!r} serial={serial} fingerprint={fingerprint} verify={verify}"
)
"""
The C{log_format} of the access event of every request on an C{https}
listener (namespace C{mtlsproxy.access}, C{log_category="access"},
C{protocol="http"}).  Besides the fields of
L{mtlsproxy.relay.ACCESS_LOG_FORMAT} (C{listener}, C{peer}, C{sni},
C{tls_version}, C{cipher}, C{subject}, C{issuer}, C{serial},
C{fingerprint}, C{backend}, C{bytes_in} and C{bytes_out} counting body
bytes, C{duration}, C{close_reason}), it has:

  - C{method}, C{target}, C{http_version}, C{host}: from the request line
    and its C{Host};
  - C{status}: the status code sent to the client, or L{None} if none was;
  - C{pool}: the pool the request was routed to;
  - C{close_reason}: an L{Outcome} value;
  - C{verify}: C{SUCCESS}, C{NONE} or C{FAILED:<reason>}
    (C{client_auth = "passthrough"}).
"""

_accessLog = Logger(namespace="mtlsproxy.access")

_IDENTITY_VERIFY = "verify"


class Outcome:
    """
    The C{close_reason} of a request's access event: how it ended.
    """

    COMPLETED = "completed"
    """The response was sent completely."""

    CLIENT_CLOSED = "client_closed"
    """The client went away before the response was complete."""

    BACKEND_CLOSED = "backend_closed"
    """The backend closed or sent something invalid after the response
    began: the client connection was closed with the response cut short."""

    NO_BACKEND = "no_backend"
    """No member could be connected (502), or none was healthy (503)."""

    BAD_GATEWAY = "bad_gateway"
    """The backend closed before responding or responded with invalid
    HTTP (502)."""

    TIMEOUT = "response_timeout"
    """The response did not start in time (504)."""

    BAD_REQUEST = "bad_request"
    """The request was malformed (400)."""

    CLOSED = "closed"
    """The proxy closed the connection (shutdown, operator, idle
    timeout)."""

    REVOKED_LIVE = "revoked_live"
    """A reload's CRL revokes the client's (or the member's) certificate
    chain: the proxy closed the connection
    (L{mtlsproxy.revocation.REVOKED_LIVE})."""

    UNTRUSTED_LIVE = "untrusted_live"
    """A reload's CA certificates no longer verify the client's (or the
    member's) certificate chain: the proxy closed the connection
    (L{mtlsproxy.trust.UNTRUSTED_LIVE})."""


_OWN_OUTCOMES: Final = frozenset({Outcome.REVOKED_LIVE, Outcome.UNTRUSTED_LIVE})
"""
The close reasons of L{HTTPProxyProtocol.closeNow} that a request under way
reports as its own outcome; any other is L{Outcome.CLOSED}.
"""


class ClientPhase(enum.Enum):
    """
    The lifecycle of one client connection; see the module docstring.
    """

    NEW = "new"
    HANDSHAKING = "handshaking"
    IDLE = "idle"
    ACTIVE = "active"
    CLOSING = "closing"
    CLOSED = "closed"


def _hostPort(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _describe(address: IAddress) -> tuple[str, int, str]:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:
        return (str(address), 0, str(address))
    return (host, port, _hostPort(host, port))


def _noDelay(transport: Any) -> None:
    """
    Turn off Nagle's algorithm on a TCP transport (or the one under a TLS
    transport): requests and responses are written as soon as they are
    read, and a small write held back until a delayed ACK adds up to 40 ms.
    """
    setTcpNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setTcpNoDelay is not None:
        try:
            setTcpNoDelay(True)
        except OSError:
            pass


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


# ---------------------------------------------------------------------------
# Backend connections
# ---------------------------------------------------------------------------


class BackendConnectionCache:
    """
    Idle backend connections kept alive for reuse, per member (and, for
    pools with C{proxy_protocol}, per client connection: the C{owner}).

    @ivar maxIdlePerMember: Idle connections kept per member and owner;
        the oldest is closed to make room.
    @ivar idleTimeout: Seconds an idle connection is kept.
    """

    maxIdlePerMember = 8
    idleTimeout = 30.0

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._idle: dict[tuple[Member, object], list[BackendHTTPProtocol]] = {}
        self._timers: dict[BackendHTTPProtocol, IDelayedCall] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def take(self, member: Member, owner: object = None) -> Optional[BackendHTTPProtocol]:
        """
        The most recently used idle connection to C{member} for C{owner},
        removed from the cache, or L{None}.
        """
        idle = self._idle.get((member, owner))
        while idle:
            backend = idle.pop()
            self._cancel(backend)
            if not backend.gone:
                if not idle:
                    del self._idle[(member, owner)]
                return backend
        self._idle.pop((member, owner), None)
        return None

    def put(self, backend: BackendHTTPProtocol) -> None:
        """
        Keep an idle connection for reuse.
        """
        key = (backend.member, backend.owner)
        idle = self._idle.setdefault(key, [])
        while len(idle) >= self.maxIdlePerMember:
            oldest = idle.pop(0)
            self._cancel(oldest)
            oldest.close()
        idle.append(backend)
        self._timers[backend] = self._clock.callLater(self.idleTimeout, self._expire, backend)

    def _expire(self, backend: BackendHTTPProtocol) -> None:
        self._timers.pop(backend, None)
        self.discard(backend)
        backend.close()

    def _cancel(self, backend: BackendHTTPProtocol) -> None:
        timer = self._timers.pop(backend, None)
        if timer is not None and timer.active():
            timer.cancel()

    def discard(self, backend: BackendHTTPProtocol) -> None:
        """
        Forget a connection (it closed, or is being closed).
        """
        self._cancel(backend)
        key = (backend.member, backend.owner)
        idle = self._idle.get(key)
        if idle and backend in idle:
            idle.remove(backend)
            if not idle:
                del self._idle[key]

    def idleConnections(self) -> list[BackendHTTPProtocol]:
        """
        The idle connections now (a copy).
        """
        return [backend for idle in self._idle.values() for backend in idle]

    def closeOwnedBy(self, owner: object) -> None:
        """
        Close the idle connections that belong to one client connection.
        """
        for key in [k for k in self._idle if k[1] is owner]:
            for backend in self._idle.pop(key):
                self._cancel(backend)
                backend.close()

    def closeAll(self) -> None:
        """
        Close every idle connection (the listener stops).
        """
        idle, self._idle = self._idle, {}
        for backends in idle.values():
            for backend in backends:
                self._cancel(backend)
                backend.close()


@implementer(IPushProducer)
class _BackendWriteControl:
    """
    The producer registered on a backend transport: when the backend does
    not take the request body as fast as it comes, pause the client.
    """

    def __init__(self, backend: BackendHTTPProtocol) -> None:
        self._backend = backend

    def pauseProducing(self) -> None:
        self._backend.writePaused = True
        exchange = self._backend.exchange
        if exchange is not None:
            exchange.client._pauseReading("backend")

    def resumeProducing(self) -> None:
        self._backend.writePaused = False
        exchange = self._backend.exchange
        if exchange is not None:
            exchange.client._resumeReading("backend")
            # Request events h11 parsed while the backend was full.
            exchange.client._processEvents()

    def stopProducing(self) -> None:
        pass


class _BackendConnector(ClientFactory["BackendHTTPProtocol"]):
    """
    One connection attempt to one member, for one exchange.
    """

    noisy = False

    def __init__(self, exchange: _Exchange, member: Member, owner: object) -> None:
        self.exchange = exchange
        self.member = member
        self.owner = owner
        self.connector: Any = None

    def buildProtocol(self, addr: Optional[IAddress]) -> BackendHTTPProtocol:
        protocol = BackendHTTPProtocol(
            self.exchange.client.factory, self.member, self.exchange.target, self.owner
        )
        protocol.connector = self
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.exchange._connectFailed(self, reason)


class BackendHTTPProtocol(Protocol):
    """
    One HTTP/1.1 connection to a member: used by one L{_Exchange} at a
    time, kept in the L{BackendConnectionCache} between them.

    @ivar member: The member it goes to.
    @ivar owner: The client protocol it belongs to (pools with
        C{proxy_protocol}), or L{None} for a shared connection.
    @ivar exchange: The exchange using it, or L{None} while idle.
    @ivar gone: The connection is closed.
    @ivar writePaused: Its send buffer is full.
    """

    transport: Any

    def __init__(
        self, proxyFactory: HTTPProxyFactory, member: Member, target: RouteTarget, owner: object
    ) -> None:
        self.proxyFactory = proxyFactory
        self.member = member
        self.target = target
        self.owner = owner
        self.conn = h11.Connection(h11.CLIENT)
        self.exchange: Optional[_Exchange] = None
        self.connector: Optional[_BackendConnector] = None
        self.gone = False
        self.writePaused = False
        self._readPaused = False
        self._producing = False
        self.uses = 0

    @property
    def address(self) -> str:
        return _hostPort(self.member.address, self.member.port)

    def connectionMade(self) -> None:
        """
        Connected: write the PROXY header if the pool has one, and hand
        the connection to the exchange that asked for it.
        """
        self.member.connectSucceeded()
        _noDelay(self.transport)
        self.transport.registerProducer(_BackendWriteControl(self), True)
        self._producing = True
        if self.target.proxyProtocol != "none" and self.owner is not None:
            self.transport.write(self.target.preamble(getattr(self.owner, "transport")))
        connector, self.connector = self.connector, None
        if connector is not None:
            connector.exchange._connected(connector, self)

    def send(self, event: Any) -> None:
        """
        Frame an event with h11 and write it.
        """
        data = self.conn.send(event)
        if data:
            self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        """
        Response bytes for the exchange; bytes while idle end the
        connection (the backend broke the protocol, or closes).
        """
        if self.exchange is None:
            self.close()
            return
        self.conn.receive_data(data)
        self.exchange._backendEvents(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Gone: leave the cache, end a close-delimited response, tell the
        exchange.
        """
        self.gone = True
        self.proxyFactory.backends.discard(self)
        exchange = self.exchange
        if exchange is not None:
            if exchange.responseStarted:
                # The end of a response delimited by the connection's end.
                try:
                    self.conn.receive_data(b"")
                except RuntimeError:
                    pass
                exchange._backendEvents(self)
            if self.exchange is exchange:
                exchange._backendLost(self, reason)

    def pauseReading(self) -> None:
        if not self._readPaused and not self.gone:
            self._readPaused = True
            self.transport.pauseProducing()

    def resumeReading(self) -> None:
        if self._readPaused and not self.gone:
            self._readPaused = False
            self.transport.resumeProducing()

    def reusable(self) -> bool:
        """
        Can another request go over this connection?
        """
        return (
            not self.gone
            and self.conn.our_state is h11.DONE
            and self.conn.their_state is h11.DONE
            and not self.conn.trailing_data[0]
        )

    def close(self) -> None:
        if not self.gone:
            if self._producing:
                self._producing = False
                self.transport.unregisterProducer()
            self.transport.loseConnection()

    def abort(self) -> None:
        if not self.gone:
            self.transport.abortConnection()


# ---------------------------------------------------------------------------
# One request and its response
# ---------------------------------------------------------------------------


class _ExchangePhase(enum.Enum):
    CONNECTING = "connecting"
    FORWARDING = "forwarding"
    DONE = "done"


class _Exchange:
    """
    One request and its response: chooses the backend, forwards both
    ways, answers errors, logs the access event.
    """

    def __init__(self, client: HTTPProxyProtocol, request: h11.Request) -> None:
        self.client = client
        factory = client.factory
        self.reactor = factory.reactor
        self.request = request
        self.started = self.reactor.seconds()
        self.phase = _ExchangePhase.CONNECTING
        self.host = headerValue(request.headers.raw_items(), b"host")
        self.method = request.method.decode("ascii", "replace")
        self.targetText = request.target.decode("latin-1")
        self.poolName, self.target = factory.router.route(
            self.host.decode("latin-1") if self.host is not None else None,
            self.targetText,
            client._tls.sni,
        )
        self.facts = ConnectionFacts(
            listener=factory.listenerName,
            peerHost=client._peerHost,
            peerPort=client._peerPort,
            sni=client._tls.sni,
            clientIdentity=client._tls.identity if client._tls.verifyFailure is None else None,
        )
        self.owner: object = client if self.target.proxyProtocol != "none" else None
        self.attempts = 0
        self.failed: list[Member] = []
        self._attempt: Optional[_BackendConnector] = None
        self.backend: Optional[BackendHTTPProtocol] = None
        self.backendAddress: Optional[str] = None
        self.reused = False
        self.retried = False
        self.requestEnded = False
        self.bodySent = False
        self.responseStarted = False
        self.responseEnded = False
        self.status: Optional[int] = None
        self.outcome: Optional[str] = None
        self.bytesIn = 0
        self.bytesOut = 0
        self._responseTimer: Optional[IDelayedCall] = None
        self._forwarding = False
        self._forwardAgain = False

    # -- choosing and connecting a backend ------------------------------------

    def start(self) -> None:
        self.client._pauseReading("connecting")
        self._connectNext()

    def _connectNext(self, fresh: bool = False) -> None:
        """
        Offer the request to the next member: an idle connection to it if
        there is one (unless C{fresh}), else a new connection attempt.
        """
        factory = self.client.factory
        member = None
        if self.attempts < self.target.maxAttempts:
            member = self.target.pool.pick(self.facts, list(self.failed))
        if member is None:
            self._noBackend()
            return
        factory.metrics.picked(self.poolName, _hostPort(member.address, member.port))
        if not fresh:
            idle = factory.backends.take(member, self.owner)
            if idle is not None:
                self.reused = True
                self._attach(idle)
                return
        self.attempts += 1
        attempt = _BackendConnector(self, member, self.owner)
        self._attempt = attempt
        connectWith: Any = attempt
        if self.target.backendTLS is not None:
            connectWith = self.target.backendTLS.wrapFactory(
                member, attempt, self.reactor, self.target.connectTimeout
            )
        attempt.connector = self.reactor.connectTCP(
            member.address, member.port, connectWith, timeout=self.target.connectTimeout
        )

    def _connectFailed(self, attempt: _BackendConnector, reason: Failure) -> None:
        if attempt is not self._attempt:
            return
        self._attempt = None
        member = attempt.member
        self.failed.append(member)
        ownError = localResourceError(reason)
        if ownError is not None:
            # Out of descriptors or ports: the proxy's problem, not the
            # member's; it must not count towards passive ejection.
            self.client.log.error(
                LOCAL_CONNECT_FAILED_FORMAT,
                listener=self.client.factory.listenerName,
                pool=self.poolName,
                backend=_hostPort(member.address, member.port),
                peer=self.client._peer,
                errno=ownError,
                error=reason.getErrorMessage(),
            )
        else:
            member.connectFailed()
            self.client.factory.metrics.connectFailed(
                self.poolName, _hostPort(member.address, member.port)
            )
            self.client.log.warn(
                "Listener {listener}: backend {backend} failed for {peer}"
                " (attempt {attempt} of {maxAttempts}): {reason}",
                listener=self.client.factory.listenerName,
                backend=_hostPort(member.address, member.port),
                peer=self.client._peer,
                attempt=self.attempts,
                maxAttempts=self.target.maxAttempts,
                reason=reason.getErrorMessage(),
            )
        if self.phase is _ExchangePhase.CONNECTING:
            self._connectNext()

    def _connected(self, attempt: _BackendConnector, backend: BackendHTTPProtocol) -> None:
        if attempt is not self._attempt or self.phase is not _ExchangePhase.CONNECTING:
            # Cancelled; the connection is of no use to anyone else yet.
            backend.close()
            return
        self._attempt = None
        self.reused = False
        self._attach(backend)

    def _cancelAttempt(self) -> None:
        attempt, self._attempt = self._attempt, None
        if attempt is None or attempt.connector is None:
            return
        try:
            attempt.connector.stopConnecting()
        except NotConnectingError:
            pass

    def _noBackend(self) -> None:
        """
        No member could take the request: 503 if the pool has no healthy
        member, else 502.
        """
        why: Optional[str]
        if self.attempts >= self.target.maxAttempts:
            why = "max_attempts"
        else:
            why = self.target.pool.noCandidateReason(self.failed)
        self.client.log.warn(
            "Listener {listener}: no backend for {peer} after {attempts}"
            " attempt(s): {why}",
            listener=self.client.factory.listenerName,
            peer=self.client._peer,
            attempts=self.attempts,
            why=why or "selector_refused",
        )
        status = 503 if why == NO_HEALTHY_MEMBER else 502
        self._fail(status, Outcome.NO_BACKEND)

    def _attach(self, backend: BackendHTTPProtocol) -> None:
        """
        Send the request head over C{backend} and let the body follow.
        """
        self.phase = _ExchangePhase.FORWARDING
        self.backend = backend
        self.backendAddress = backend.address
        backend.exchange = self
        backend.uses += 1
        backend.member.connectionOpened()
        client = self.client
        headers = requestHeaders(
            self.request.headers.raw_items(),
            client._peerHost,
            "https" if client.factory.tls else "http",
            client._identityHeaders,
            defaultHost=self._defaultHost(),
        )
        try:
            backend.send(
                h11.Request(method=self.request.method, target=self.request.target, headers=headers)
            )
            if self.requestEnded:
                backend.send(h11.EndOfMessage())
        except h11.LocalProtocolError as e:
            self._detach(reusable=False)
            self._fail(400, Outcome.BAD_REQUEST, str(e))
            return
        if self.requestEnded:
            self._armResponseTimer()
        if backend.writePaused:
            client._pauseReading("backend")
        if client._writePaused:
            backend.pauseReading()
        client._resumeReading("connecting")
        client._processEvents()

    def _defaultHost(self) -> bytes:
        sni = self.client._tls.sni
        if sni:
            return sni.encode("idna") if not sni.isascii() else sni.encode("ascii")
        assert self.backend is not None
        return self.backend.address.encode("ascii")

    def _detach(self, reusable: bool) -> None:
        """
        Release the backend connection: back to the cache if C{reusable}
        and it allows another request, else closed.
        """
        backend, self.backend = self.backend, None
        if backend is None:
            return
        backend.exchange = None
        backend.member.connectionClosed()
        if backend.writePaused:
            self.client._resumeReading("backend")
        backend.resumeReading()
        ownerGone = self.owner is not None and self.client._clientGone
        if reusable and backend.reusable() and not ownerGone:
            backend.conn.start_next_cycle()
            self.client.factory.backends.put(backend)
        else:
            backend.close()

    # -- the request ----------------------------------------------------------

    def requestData(self, data: bytes) -> None:
        if self.backend is None:
            return
        self.bytesIn += len(data)
        self.bodySent = True
        self.client.factory.metrics.fromClient(len(data))
        self.backend.send(h11.Data(data=data))

    def requestEnd(self) -> None:
        self.requestEnded = True
        if self.backend is None:
            return
        self.backend.send(h11.EndOfMessage())
        self._armResponseTimer()
        self._finishIfDone()

    def _armResponseTimer(self) -> None:
        if self.responseStarted or self._responseTimer is not None:
            return
        self._responseTimer = self.reactor.callLater(
            self.client.factory.responseTimeout, self._responseTimedOut
        )

    def _cancelResponseTimer(self) -> None:
        timer, self._responseTimer = self._responseTimer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _responseTimedOut(self) -> None:
        self._responseTimer = None
        if self.responseStarted or self.phase is _ExchangePhase.DONE:
            return
        self.client.log.warn(
            "Listener {listener}: backend {backend} did not respond to {peer}"
            " within {timeout}s",
            listener=self.client.factory.listenerName,
            backend=self.backendAddress,
            peer=self.client._peer,
            timeout=self.client.factory.responseTimeout,
        )
        self._detach(reusable=False)
        self._fail(504, Outcome.TIMEOUT)

    # -- the response ---------------------------------------------------------

    def _backendEvents(self, backend: BackendHTTPProtocol) -> None:
        """
        Forward what the backend sent, as far as h11 can parse it.
        """
        if self._forwarding:
            self._forwardAgain = True
            return
        self._forwarding = True
        try:
            self._forwardAgain = True
            while self._forwardAgain:
                self._forwardAgain = False
                self._forwardResponse(backend)
        except h11.LocalProtocolError as e:
            # h11 refused to frame it for the client.
            self._badResponse(f"response cannot be forwarded: {e}")
        finally:
            self._forwarding = False

    def _forwardResponse(self, backend: BackendHTTPProtocol) -> None:
        client = self.client
        while backend is self.backend and self.phase is _ExchangePhase.FORWARDING:
            if client._writePaused:
                # A TLS transport that buffers asks us to stop writing;
                # writing on would reorder.  resumeProducing comes back.
                return
            try:
                event = backend.conn.next_event()
            except h11.RemoteProtocolError as e:
                self._badResponse(f"invalid response: {e}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    self._badResponse("101 Switching Protocols without an upgrade request")
                    return
                if self.request.http_version != b"1.0":
                    client._send(
                        h11.InformationalResponse(
                            status_code=event.status_code,
                            headers=responseHeaders(event.headers.raw_items()),
                            reason=event.reason,
                        )
                    )
            elif isinstance(event, h11.Response):
                self._cancelResponseTimer()
                self.responseStarted = True
                self.status = event.status_code
                headers = responseHeaders(event.headers.raw_items())
                if client._finishing:
                    headers.append((b"Connection", b"close"))
                client._send(
                    h11.Response(
                        status_code=event.status_code, headers=headers, reason=event.reason
                    )
                )
            elif isinstance(event, h11.Data):
                data = bytes(event.data)
                self.bytesOut += len(data)
                client.factory.metrics.toClient(len(data))
                client._send(h11.Data(data=data))
            elif isinstance(event, h11.EndOfMessage):
                self.responseEnded = True
                client._send(h11.EndOfMessage())
                self._finishIfDone()
                return
            else:  # h11.ConnectionClosed
                return

    def _badResponse(self, why: str) -> None:
        self.client.log.warn(
            "Listener {listener}: backend {backend} for {peer}: {why}",
            listener=self.client.factory.listenerName,
            backend=self.backendAddress,
            peer=self.client._peer,
            why=why,
        )
        self._detach(reusable=False)
        if self.responseStarted:
            self._cutShort(Outcome.BACKEND_CLOSED)
        else:
            self._fail(502, Outcome.BAD_GATEWAY)

    def _backendLost(self, backend: BackendHTTPProtocol, reason: Failure) -> None:
        """
        The backend connection closed during the exchange.
        """
        if backend is not self.backend:
            return
        if self.responseEnded:
            return
        if (
            not self.responseStarted
            and self.reused
            and not self.retried
            and not self.bodySent
        ):
            # A kept-alive connection the backend had closed meanwhile:
            # nothing of the request is lost, so try again on a new one.
            self.retried = True
            self._detach(reusable=False)
            self.phase = _ExchangePhase.CONNECTING
            self.client._pauseReading("connecting")
            self._connectNext(fresh=True)
            return
        self._badResponse(f"connection closed: {reason.getErrorMessage()}")

    # -- ending ---------------------------------------------------------------

    def _finishIfDone(self) -> None:
        """
        Once the response is complete: keep both connections for the next
        request if HTTP allows, else close them.
        """
        if not self.responseEnded or self.phase is _ExchangePhase.DONE:
            return
        if not self.requestEnded:
            # The backend answered before the request body was complete:
            # neither connection can carry another request.
            self._detach(reusable=False)
            self._end(Outcome.COMPLETED, closeClient=True)
            return
        self._detach(reusable=True)
        self._end(Outcome.COMPLETED, closeClient=False)

    def _fail(self, status: int, outcome: str, detail: Optional[str] = None) -> None:
        """
        Answer with an error of the proxy's own and close the client.
        """
        self._cancelAttempt()
        if self.client._canRespond():
            self.status = status
            self.client._sendError(status, detail)
        self._end(outcome, closeClient=True)

    def _cutShort(self, outcome: str) -> None:
        """
        The response began but cannot be completed: close the client, so
        that it sees a truncated response rather than a wrong one.
        """
        self._end(outcome, closeClient=True)

    def clientLost(self) -> None:
        """
        The client connection is gone.
        """
        if self.phase is _ExchangePhase.DONE:
            return
        self._cancelAttempt()
        self._detach(reusable=False)
        self._end(Outcome.CLIENT_CLOSED, closeClient=False)

    def closeNow(self, outcome: str) -> None:
        """
        The proxy ends the exchange (shutdown, operator, idle timeout).
        """
        if self.phase is _ExchangePhase.DONE:
            return
        self._cancelAttempt()
        self._detach(reusable=False)
        self._end(outcome, closeClient=True)

    def _end(self, outcome: str, closeClient: bool) -> None:
        if self.phase is _ExchangePhase.DONE:
            return
        self.phase = _ExchangePhase.DONE
        self.outcome = outcome
        self._cancelResponseTimer()
        self._logAccess()
        self.client._exchangeEnded(self, closeClient)

    def _logAccess(self) -> None:
        client = self.client
        tls = client._tls
        identity = tls.identity
        _accessLog.info(
            HTTP_ACCESS_LOG_FORMAT,
            log_category="access",
            protocol="http",
            listener=client.factory.listenerName,
            peer=client._peer,
            method=self.method,
            target=self.targetText,
            http_version=self.request.http_version.decode("ascii", "replace"),
            host=self.host.decode("latin-1") if self.host is not None else None,
            status=self.status,
            pool=self.poolName,
            backend=self.backendAddress,
            close_reason=self.outcome,
            bytes_in=self.bytesIn,
            bytes_out=self.bytesOut,
            duration=self.reactor.seconds() - self.started,
            sni=tls.sni,
            tls_version=tls.version,
            cipher=tls.cipher,
            subject=getattr(identity, "subject", None),
            issuer=getattr(identity, "issuer", None),
            serial=getattr(identity, "serial", None),
            fingerprint=getattr(identity, "fingerprint", None),
            verify=client._verifyStatus,
        )


# ---------------------------------------------------------------------------
# The client side
# ---------------------------------------------------------------------------


@implementer(IPushProducer)
class _ClientWriteControl:
    """
    The producer registered on the client transport: when the client does
    not read the response as fast as the backend sends it, pause the
    backend.
    """

    def __init__(self, client: HTTPProxyProtocol) -> None:
        self._client = client

    def pauseProducing(self) -> None:
        self._client._writePaused = True
        backend = self._client._currentBackend()
        if backend is not None:
            backend.pauseReading()

    def resumeProducing(self) -> None:
        self._client._writePaused = False
        backend = self._client._currentBackend()
        if backend is not None:
            backend.resumeReading()
            exchange = backend.exchange
            if exchange is not None:
                # Response events h11 parsed while the client was full.
                exchange._backendEvents(backend)

    def stopProducing(self) -> None:
        pass


class HTTPProxyFactory(Factory["HTTPProxyProtocol"]):
    """
    Builds an L{HTTPProxyProtocol} per client connection of an C{https}
    listener; wrap it in L{mtlsproxy.tlsproto.HalfCloseTLSFactory}.

    @ivar reactor: Provides C{connectTCP}, C{callLater} and C{seconds}.
    @ivar listenerName: For logs.
    @ivar router: Chooses the pool of each request.
    @ivar tls: The protocols run over TLS (C{https}); C{False} serves plain
        HTTP (used by tests).
    @ivar identityMode: C{client_identity_headers}.
    @ivar xfccIncludeCert: C{xfcc_include_cert}.
    @ivar passthrough: C{client_auth = "passthrough"}.
    @ivar responseTimeout: C{response_timeout}.
    @ivar backends: The idle backend connections.
    @ivar metrics, connections, timeouts, gate: As for
        L{mtlsproxy.relay.ProxyServerFactory}.
    """

    noisy = False

    def __init__(
        self,
        reactor: Any,
        listenerName: str,
        router: Router,
        tls: bool = True,
        identityMode: str = "none",
        xfccIncludeCert: bool = False,
        passthrough: bool = False,
        responseTimeout: float = 60.0,
        metrics: Any = None,
        connections: Any = None,
        timeouts: Any = None,
        gate: Any = None,
    ) -> None:
        from .drain import ConnectionRegistry
        from .limits import Timeouts
        from .metrics import NO_METRICS

        self.reactor = reactor
        self.listenerName = listenerName
        self.router = router
        self.tls = tls
        self.identityMode = identityMode
        self.xfccIncludeCert = xfccIncludeCert
        self.passthrough = passthrough
        self.responseTimeout = responseTimeout
        self.metrics = metrics if metrics is not None else NO_METRICS
        self.connections = connections if connections is not None else ConnectionRegistry()
        self.timeouts = timeouts if timeouts is not None else Timeouts()
        self.gate = gate
        self.backends = BackendConnectionCache(reactor)
        self.live: set[HTTPProxyProtocol] = set()

    @classmethod
    def fromListener(cls, reactor: Any, listener: Any, router: Router, **kwargs: Any) -> HTTPProxyFactory:
        """
        The factory of an C{https} L{mtlsproxy.config.ListenerConfig}.

        @param kwargs: C{metrics}, C{connections}, C{timeouts}, C{gate}.
        """
        return cls(
            reactor,
            listener.name,
            router,
            tls=True,
            identityMode=listener.client_identity_headers,
            xfccIncludeCert=listener.xfcc_include_cert,
            passthrough=listener.client_auth == "passthrough",
            responseTimeout=listener.response_timeout,
            **kwargs,
        )

    @property
    def pool(self) -> Any:
        """
        The listener's default pool.
        """
        return self.router.default.pool

    def buildProtocol(self, addr: Optional[IAddress]) -> HTTPProxyProtocol:
        protocol = HTTPProxyProtocol()
        protocol.factory = self
        return protocol

    def stopFactory(self) -> None:
        """
        The listener stopped (shutdown, reload): close the idle backend
        connections, and every client connection once its current response
        is complete (with C{Connection: close}), idle ones at once.
        """
        self.backends.closeAll()
        for protocol in list(self.live):
            protocol.finish()


@implementer(IHandshakeListener, IHalfCloseableProtocol)
class HTTPProxyProtocol(Protocol):
    """
    The client side of an C{https} listener connection; see the module
    docstring.

    @ivar phase: The current L{ClientPhase}.
    @ivar connectionId: Its number in the listener's connection registry.
    """

    factory: HTTPProxyFactory
    transport: Any

    log = Logger()

    def __init__(self) -> None:
        self.phase = ClientPhase.NEW
        self.conn = h11.Connection(h11.SERVER)
        self.connectionId: Optional[int] = None
        self._started = 0.0
        self._peerHost = ""
        self._peerPort = 0
        self._peer = ""
        self._tls = ClientTLSInfo()
        self._identityHeaders: list[tuple[bytes, bytes]] = []
        self._verifyStatus = "NONE"
        self._exchange: Optional[_Exchange] = None
        self._lastPool: Optional[str] = None
        self._lastBackend: Optional[str] = None
        self._readPauses: set[str] = set()
        self._writePaused = False
        self._clientGone = False
        self._processing = False
        self._processAgain = False
        self._admitted = False
        self._handshakeDeadline: Optional[IDelayedCall] = None
        self._idle: Any = None
        self._requests = 0
        self._bytesIn = 0
        self._bytesOut = 0
        self._closeReason: Optional[str] = None
        self._producing = False
        self._finishing = False

    # -- connection lifecycle -------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        self._started = factory.reactor.seconds()
        self._peerHost, self._peerPort, self._peer = _describe(self.transport.getPeer())
        self.connectionId = factory.connections.add(self)
        factory.live.add(self)
        factory.metrics.connectionOpened()
        gate = factory.gate
        if gate is not None:
            if not gate.admit():
                self._closeReason = "max_connections"
                self.phase = ClientPhase.CLOSING
                self.transport.abortConnection()
                return
            self._admitted = True
        if factory.tls:
            self.phase = ClientPhase.HANDSHAKING
            self._handshakeDeadline = factory.reactor.callLater(
                factory.timeouts.handshake, self._handshakeTimedOut
            )
        else:
            self._ready()

    def handshakeCompleted(self) -> None:
        """
        The client certificate is verified (or, with C{passthrough},
        its verification recorded): read the connection's identity once,
        then read requests.
        """
        if self.phase is not ClientPhase.HANDSHAKING:
            return
        self._cancelHandshakeDeadline()
        self.factory.metrics.handshakeSucceeded(self.factory.reactor.seconds() - self._started)
        self._tls = tlsInfoOf(self.transport)
        self._ready()

    def makeConnection(self, transport: Any) -> None:
        _noDelay(transport)
        super().makeConnection(transport)

    def _ready(self) -> None:
        from .identity import verifyStatus
        from .limits import IdleTimer

        factory = self.factory
        self._verifyStatus = verifyStatus(self._tls)
        self._identityHeaders = identityHeaders(
            factory.identityMode, self._tls, factory.xfccIncludeCert, factory.passthrough
        )
        self.phase = ClientPhase.IDLE
        self.transport.registerProducer(_ClientWriteControl(self), True)
        self._producing = True
        self._idle = IdleTimer(factory.reactor, factory.timeouts.idle, self._idleTimedOut)
        self._idle.start()
        if self._finishing:
            self._close()

    def _handshakeTimedOut(self) -> None:
        self._handshakeDeadline = None
        if self.phase is not ClientPhase.HANDSHAKING:
            return
        self.log.info(
            "Listener {listener}: closing {peer}: {reason}"
            " (TLS handshake not complete after {timeout}s)",
            listener=self.factory.listenerName,
            peer=self._peer,
            reason="handshake_timeout",
            timeout=self.factory.timeouts.handshake,
        )
        self._closeReason = "handshake_timeout"
        self.transport.abortConnection()

    def _cancelHandshakeDeadline(self) -> None:
        deadline, self._handshakeDeadline = self._handshakeDeadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _idleTimedOut(self) -> None:
        """
        Nothing either way for C{idle_timeout} seconds: between requests,
        close; waiting for a response, answer 504; otherwise close.
        """
        exchange = self._exchange
        if exchange is not None and exchange.phase is not _ExchangePhase.DONE:
            if exchange.requestEnded and not exchange.responseStarted:
                exchange._detach(reusable=False)
                exchange._fail(504, Outcome.TIMEOUT)
                return
            self.closeNow("idle_timeout")
            return
        if self.phase is ClientPhase.CLOSING:
            self.abort()
            return
        self._closeReason = self._closeReason or "idle_timeout"
        self._close()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._clientGone:
            return
        self._clientGone = True
        self.factory.live.discard(self)
        self._cancelHandshakeDeadline()
        if self._idle is not None:
            self._idle.stop()
        if self._admitted:
            self._admitted = False
            assert self.factory.gate is not None
            self.factory.gate.release()
        if self.phase is ClientPhase.HANDSHAKING:
            from .verify import rejectionReason

            # No byte at all: a TCP port probe, not a failed handshake.
            noData = not getattr(self.transport, "receivedAny", True)
            self.factory.metrics.handshakeFailed(
                rejectionReason(self.transport) or ("no_data" if noData else "aborted"),
                self.factory.reactor.seconds() - self._started,
            )
            self._closeReason = self._closeReason or ("no_data" if noData else "handshake_failed")
        if not reason.check(ConnectionDone):
            self.log.debug(
                "Listener {listener}: client {peer} lost: {reason}",
                listener=self.factory.listenerName,
                peer=self._peer,
                reason=reason.getErrorMessage(),
            )
        self.phase = ClientPhase.CLOSING
        if self._exchange is not None:
            self._exchange.clientLost()
        self.factory.backends.closeOwnedBy(self)
        self.phase = ClientPhase.CLOSED
        self.factory.metrics.connectionClosed(self._closeReason or "client_closed")
        if self.connectionId is not None:
            self.factory.connections.remove(self.connectionId)

    # -- reading requests -----------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.phase not in (ClientPhase.IDLE, ClientPhase.ACTIVE):
            return
        if self._idle is not None:
            self._idle.touch()
        try:
            self.conn.receive_data(data)
        except RuntimeError:
            # Bytes after EOF: impossible on TCP, ignored.
            return
        self._processEvents()

    def readConnectionLost(self) -> None:
        """
        The client sent EOF (it may still read the response).
        """
        if self.phase not in (ClientPhase.IDLE, ClientPhase.ACTIVE):
            return
        try:
            self.conn.receive_data(b"")
        except RuntimeError:
            pass
        self._processEvents()

    def writeConnectionLost(self) -> None:
        pass

    def _processEvents(self) -> None:
        """
        Act on every request event h11 can parse now, unless something
        (a backend being connected) has to happen first.
        """
        if self._processing:
            self._processAgain = True
            return
        self._processing = True
        try:
            self._processAgain = True
            while self._processAgain:
                self._processAgain = False
                self._processSome()
        finally:
            self._processing = False

    def _processSome(self) -> None:
        while self.phase in (ClientPhase.IDLE, ClientPhase.ACTIVE):
            exchange = self._exchange
            if exchange is not None and exchange.phase is _ExchangePhase.CONNECTING:
                return
            if exchange is not None and exchange.backend is not None and exchange.backend.writePaused:
                # The backend is full; its resumeProducing comes back here.
                return
            if self.conn.their_state is h11.ERROR:
                return
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as e:
                self._badRequest(e)
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                # A pipelined request: read no more until the response to
                # this one is complete.
                self._pauseReading("pipelined")
                return
            if isinstance(event, h11.Request):
                self._startExchange(event)
            elif isinstance(event, h11.Data):
                if exchange is not None:
                    exchange.requestData(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                if exchange is not None:
                    exchange.requestEnd()
            elif isinstance(event, h11.ConnectionClosed):
                if exchange is None or exchange.phase is _ExchangePhase.DONE:
                    self._close()
                return

    def _startExchange(self, request: h11.Request) -> None:
        self.phase = ClientPhase.ACTIVE
        self._requests += 1
        exchange = _Exchange(self, request)
        self._exchange = exchange
        self._lastPool = exchange.poolName
        exchange.start()

    def _badRequest(self, error: h11.RemoteProtocolError) -> None:
        """
        The client sent something h11 cannot parse.
        """
        status = error.error_status_hint or 400
        self.log.info(
            "Listener {listener}: bad request from {peer}: {error}",
            listener=self.factory.listenerName,
            peer=self._peer,
            error=str(error),
        )
        exchange = self._exchange
        if exchange is not None and exchange.phase is not _ExchangePhase.DONE:
            exchange._cancelAttempt()
            exchange._detach(reusable=False)
            if exchange.responseStarted:
                exchange._cutShort(Outcome.BAD_REQUEST)
            else:
                exchange._fail(status, Outcome.BAD_REQUEST, str(error))
            return
        if self._canRespond():
            self._sendError(status, str(error))
        _accessLog.info(
            HTTP_ACCESS_LOG_FORMAT,
            log_category="access",
            protocol="http",
            listener=self.factory.listenerName,
            peer=self._peer,
            method=None,
            target=None,
            http_version=None,
            host=None,
            status=status,
            pool=None,
            backend=None,
            close_reason=Outcome.BAD_REQUEST,
            bytes_in=0,
            bytes_out=0,
            duration=0.0,
            sni=self._tls.sni,
            tls_version=self._tls.version,
            cipher=self._tls.cipher,
            subject=getattr(self._tls.identity, "subject", None),
            issuer=getattr(self._tls.identity, "issuer", None),
            serial=getattr(self._tls.identity, "serial", None),
            fingerprint=getattr(self._tls.identity, "fingerprint", None),
            verify=self._verifyStatus,
        )
        self._close()

    # -- writing responses ----------------------------------------------------

    def _send(self, event: Any) -> None:
        """
        Frame an event with h11 and write it to the client.
        """
        if self._clientGone:
            return
        data = self.conn.send(event)
        if data:
            self._bytesOut += len(data)
            if self._idle is not None:
                self._idle.touch()
            self.transport.write(data)

    def _canRespond(self) -> bool:
        return not self._clientGone and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE)

    def _sendError(self, status: int, detail: Optional[str] = None) -> None:
        """
        A complete error response of the proxy's own; the connection is
        closed after it.
        """
        phrase = _reason(status)
        body = b"%d %s\n" % (status, phrase)
        try:
            self._send(
                h11.Response(
                    status_code=status,
                    reason=phrase,
                    headers=[
                        (b"Content-Type", b"text/plain; charset=utf-8"),
                        (b"Content-Length", str(len(body)).encode("ascii")),
                        (b"Connection", b"close"),
                        (b"Cache-Control", b"no-store"),
                    ],
                )
            )
            self._send(h11.Data(data=body))
            self._send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            pass

    # -- flow control ---------------------------------------------------------

    def _pauseReading(self, reason: str) -> None:
        if not self._readPauses and not self._clientGone:
            self.transport.pauseProducing()
        self._readPauses.add(reason)

    def _resumeReading(self, reason: str) -> None:
        if reason not in self._readPauses:
            return
        self._readPauses.discard(reason)
        if not self._readPauses and not self._clientGone and self.phase is not ClientPhase.CLOSING:
            self.transport.resumeProducing()

    def _currentBackend(self) -> Optional[BackendHTTPProtocol]:
        exchange = self._exchange
        return exchange.backend if exchange is not None else None

    # -- between requests -----------------------------------------------------

    def _exchangeEnded(self, exchange: _Exchange, closeClient: bool) -> None:
        """
        An exchange is over: start the next cycle, or close.
        """
        if exchange is not self._exchange:
            return
        self._exchange = None
        self._lastBackend = exchange.backendAddress
        self._bytesIn += exchange.bytesIn
        self._readPauses.discard("connecting")
        self._readPauses.discard("backend")
        if self._clientGone:
            return
        if (
            not closeClient
            and not self._finishing
            and self.conn.our_state is h11.DONE
            and self.conn.their_state is h11.DONE
        ):
            self.conn.start_next_cycle()
            self.phase = ClientPhase.IDLE
            self._resumeReading("pipelined")
            if not self._readPauses:
                self.transport.resumeProducing()
            self._processEvents()
            return
        self._close()

    def _close(self) -> None:
        """
        Close the client connection once what was written is sent.
        """
        if self.phase in (ClientPhase.CLOSING, ClientPhase.CLOSED) or self._clientGone:
            return
        self.phase = ClientPhase.CLOSING
        if self._idle is not None:
            # Bounds how long closing may take.
            self._idle.start()
        # A TLS transport closes only once its producer is gone.
        self._unregisterProducer()
        self.transport.loseConnection()

    def _unregisterProducer(self) -> None:
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()

    # -- operator and shutdown ------------------------------------------------

    def describe(self) -> Any:
        """
        A snapshot for the admin console and the status endpoint.
        """
        from .drain import ConnectionInfo

        identity = self._tls.identity
        exchange = self._exchange
        return ConnectionInfo(
            id=self.connectionId or 0,
            listener=self.factory.listenerName,
            peer=self._peer,
            phase=self.phase.value,
            started=self._started,
            subject=getattr(identity, "subject", None),
            serial=getattr(identity, "serial", None),
            fingerprint=getattr(identity, "fingerprint", None),
            backend=exchange.backendAddress if exchange is not None else self._lastBackend,
            pool=exchange.poolName if exchange is not None else (self._lastPool or self.factory.router.defaultPoolName),
            bytesIn=self._bytesIn + (exchange.bytesIn if exchange is not None else 0),
            bytesOut=self._bytesOut,
        )

    def backendTransport(self) -> Any:
        """
        The transport of the current request's backend connection, or
        L{None}; what a reload checks against a pool's new CRLs.
        """
        backend = self._currentBackend()
        if backend is None or backend.gone:
            return None
        return backend.transport

    def closeNow(self, reason: str = "closed_by_operator") -> None:
        """
        Close the connection (and its request's backend connection), after
        flushing what is pending.
        """
        if self.phase in (ClientPhase.NEW, ClientPhase.CLOSED) or self._clientGone:
            return
        self._closeReason = reason
        exchange = self._exchange
        if exchange is not None and exchange.phase is not _ExchangePhase.DONE:
            exchange.closeNow(reason if reason in _OWN_OUTCOMES else Outcome.CLOSED)
        else:
            self._close()

    def finish(self) -> None:
        """
        Close the connection gracefully: now if it is between requests,
        else after the current response, which tells the client with
        C{Connection: close}.
        """
        self._finishing = True
        if self.phase is ClientPhase.IDLE and self._exchange is None:
            self._closeReason = self._closeReason or "shutdown"
            self._close()
        elif self.phase is ClientPhase.HANDSHAKING:
            self._closeReason = self._closeReason or "shutdown"

    def abort(self) -> None:
        """
        Drop the connection and its request's backend connection now.
        """
        backend = self._currentBackend()
        if backend is not None:
            backend.abort()
        if not self._clientGone:
            self.transport.abortConnection()
