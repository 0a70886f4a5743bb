# -*- test-case-name: tests.test_relay -*-
"""
The proxied connection: client side, backend side, flow control, half-close
and the access log.

One L{ProxyServerProtocol} per accepted client connection goes through
explicit phases (L{Phase}):

  - C{HANDSHAKING} (TLS listeners only): the TLS layer reads the handshake;
    no application byte arrives and no backend is contacted.  A connection
    that ends here is logged with C{close_reason="handshake_failed"}.
  - C{CONNECTING}: the client is ready (L{ProxyServerProtocol.handshakeCompleted}
    for TLS, C{connectionMade} for TCP).  The client transport is paused and
    whatever it already sent is kept in a bounded buffer; members chosen by
    C{pool.pick(facts, exclude)} are tried in turn, at most C{maxAttempts}
    times, skipping the ones that refused or timed out.
  - C{RELAYING}: bytes flow both ways.  Each transport is the other's
    streaming producer, so a side that stops reading pauses the other and
    memory stays bounded.  EOF is forwarded in each direction on its own
    (C{loseWriteConnection}: a TCP FIN or a TLS close_notify).
  - C{CLOSING}: one side is gone or both sent EOF; the other is closed after
    its pending data is flushed (C{loseConnection}).
  - C{CLOSED}: both sides are gone; the one access event has been emitted.

The listener's limits (L{mtlsproxy.limits}) bound each phase: a connection
over C{max_connections} is aborted before C{HANDSHAKING}
(C{close_reason="max_connections"}); C{HANDSHAKING} ends at the
C{handshake_timeout} deadline from accept (C{"handshake_timeout"});
C{RELAYING} ends after C{idle_timeout} without a byte either way
(C{"idle_timeout"}); and C{CLOSING} is aborted if it lasts C{idle_timeout}.

Access events go to the C{mtlsproxy.access} logger namespace and carry
C{log_category="access"} (see L{ACCESS_LOG_FORMAT} for the fields).
"""

from __future__ import annotations

import enum
from typing import Any, Optional

import attrs
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionDone, NotConnectingError
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .backendtls import logBackendTLSFailure
from .drain import ConnectionInfo, ConnectionRegistry
from .limits import ConnectionGate, IdleTimer, Timeouts
from .metrics import NO_METRICS, ListenerMetrics
from .pool import LOCAL_CONNECT_FAILED_FORMAT, ConnectionFacts, Member, Pool, localResourceError
from .routing import ConnectionRouter, RouteTarget
from .tlsproto import writeNow
from .verify import peerIdentity, rejectionReason

__all__ = [
    "ACCESS_LOG_FORMAT",
    "BackendProtocol",
    "CloseReason",
    "Phase",
    "ProxyServerFactory",
    "ProxyServerProtocol",
]


ACCESS_LOG_FORMAT = (
    "{listener} {peer} -> {backend} {close_reason}"
    " in={bytes_in} out={bytes_out} duration={duration:.3f}s"
    " tls={tls_version} cipher={cipher} sni={sni}"
    " subject={subject!r} issuer={issuer!r} serial={serial} fingerprint={fingerprint}"
)
"""
The C{log_format} of every access event.  Its fields:

  - C{listener}: the listener's configured name.
  - C{peer}: the client's address, C{"host:port"} (C{"[v6]:port"}).
  - C{sni}: the server name the client asked for, or L{None}.
  - C{tls_version}, C{cipher}: as OpenSSL names them, or L{None} on TCP and
    when a handshake failed before a version (or cipher) was agreed (a
    client speaking garbage or plain HTTP, or offering only versions the
    listener refuses).
  - C{subject}, C{issuer}: the client certificate's names (RFC 4514), or L{None}.
  - C{serial}: the client certificate's serial number in lowercase hex, or L{None}.
  - C{fingerprint}: SHA-256 of the client certificate (DER), lowercase hex, or L{None}.
  - C{backend}: C{"host:port"} of the member the connection was relayed to,
    or L{None} if none was connected.
  - C{bytes_in}: bytes relayed from the client to the backend.
  - C{bytes_out}: bytes relayed from the backend to the client.
  - C{duration}: seconds from accept to the end, by the reactor's clock.
  - C{close_reason}: a L{CloseReason} value.
"""


_accessLog = Logger(namespace="mtlsproxy.access")
"""
Where access events go.  (Module level: a L{Logger} in a class attribute
would take the class's name as its namespace.)
"""


class CloseReason:
    """
    Values of the access event's C{close_reason}: what ended the connection
    first.
    """

    CLIENT_CLOSED = "client_closed"
    """The client ended its side first (EOF, close or reset)."""

    BACKEND_CLOSED = "backend_closed"
    """The backend ended its side first (EOF, close or reset)."""

    NO_BACKEND = "no_backend"
    """No member could be connected within C{maxAttempts}."""

    HANDSHAKE_FAILED = "handshake_failed"
    """The connection ended before its TLS handshake completed."""

    NO_DATA = "no_data"
    """The client closed its TLS connection without sending a byte: a TCP
    port probe (a load balancer's or a monitor's health check), so no
    handshake was attempted.  Counted apart from failed handshakes
    (C{mtlsproxy_handshakes_total} reason C{no_data}, not C{aborted})."""

    ERROR = "error"
    """The proxy gave up on the connection (e.g. too much data before the
    backend was connected)."""

    SHUTDOWN = "shutdown"
    """The proxy closed it at shutdown, when the drain timeout ran out."""

    OPERATOR = "closed_by_operator"
    """An operator closed it (the admin console's C{close(id)})."""

    HANDSHAKE_TIMEOUT = "handshake_timeout"
    """The TLS handshake was not complete C{handshake_timeout} seconds after
    accept."""

    IDLE_TIMEOUT = "idle_timeout"
    """No byte went either way for C{idle_timeout} seconds."""

    MAX_CONNECTIONS = "max_connections"
    """The listener already had C{max_connections} connections."""


class Phase(enum.Enum):
    """
    The lifecycle of one proxied connection; see the module docstring.
    """

    NEW = "new"
    HANDSHAKING = "handshaking"
    CONNECTING = "connecting"
    RELAYING = "relaying"
    CLOSING = "closing"
    CLOSED = "closed"


_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.NEW: frozenset({Phase.HANDSHAKING, Phase.CONNECTING, Phase.CLOSING}),
    Phase.HANDSHAKING: frozenset({Phase.CONNECTING, Phase.CLOSING}),
    Phase.CONNECTING: frozenset({Phase.RELAYING, Phase.CLOSING}),
    Phase.RELAYING: frozenset({Phase.CLOSING}),
    Phase.CLOSING: frozenset({Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}


@attrs.frozen
class _TLSFacts:
    """
    What the TLS layer tells about a client connection.
    """

    version: Optional[str] = None
    cipher: Optional[str] = None
    sni: Optional[str] = None
    identity: Any = None


def _agreedVersion(handle: Any) -> Optional[str]:
    """
    The protocol version client and server agreed on, or L{None} if the
    handshake failed before they did.

    C{get_protocol_version_name()} alone cannot tell: before negotiation it
    names the highest version the context allows (C{"TLSv1.3"} for a client
    that sent garbage or plain HTTP), and after a refused ClientHello the
    client's offer (C{"TLSv1.1"}).  OpenSSL creates the server's session
    only once it has chosen a version, so a session means an agreed one
    (also when the handshake failed later, on the client certificate).
    """
    if handle.get_session() is None:
        return None
    version: Optional[str] = handle.get_protocol_version_name()
    return version


def _tlsFactsOf(transport: Any) -> _TLSFacts:
    """
    Read version, cipher, SNI and the client certificate from a TLS
    transport (a L{twisted.protocols.tls.TLSMemoryBIOProtocol}).
    """
    handle = transport.getHandle()
    if handle is None:
        return _TLSFacts()
    servername = handle.get_servername()
    # The identity that verification established, for selectors and the
    # access log (.subject, .issuer, .serial, .fingerprint).
    identity = peerIdentity(handle)
    return _TLSFacts(
        version=_agreedVersion(handle),
        cipher=handle.get_cipher_name(),
        sni=servername.decode("ascii", "replace") if servername else None,
        identity=identity,
    )


RELAY_BUFFER_SIZE = 2**18
"""
The C{bufferSize} of the TCP transports of a proxied connection: how much one
read takes from the socket, and how much may wait in a transport's send
buffer before its producer (the other side) is paused.  Twisted's default
(64 KiB) makes a relay read, encrypt and write in small pieces and pause and
resume the other side about once per write; memory stays bounded all the
same (at most this much per direction, plus the kernel's socket buffers).
"""


def _noDelay(transport: Any) -> None:
    """
    Tune the TCP transport of one side of a relay (or the one under its TLS
    transport): turn off Nagle's algorithm, since a relay writes what it
    read at once and a small write held back until the peer's delayed ACK
    (up to 40 ms) would stall TLS handshakes, session tickets and short
    replies; and move data in L{RELAY_BUFFER_SIZE} pieces.
    """
    setTcpNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setTcpNoDelay is not None:
        try:
            setTcpNoDelay(True)
        except OSError:
            pass
    tcp = transport
    while isinstance(getattr(tcp, "wrappedProtocol", None), Protocol):
        # A protocol wrapper (TLS): the TCP transport is underneath.
        tcp = tcp.transport
    if isinstance(tcp, FileDescriptor):
        tcp.bufferSize = RELAY_BUFFER_SIZE


def _hostPort(host: str, port: int) -> str:
    """
    C{host:port}, with brackets around an IPv6 address.
    """
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _describe(address: IAddress) -> tuple[str, int, str]:
    """
    Host, port and C{host:port} text of a transport's address.
    """
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:
        return (str(address), 0, str(address))
    return (host, port, _hostPort(host, port))


class ProxyServerFactory(Factory["ProxyServerProtocol"]):
    """
    Builds a L{ProxyServerProtocol} per accepted client connection.

    For a TLS listener, wrap this factory in
    L{mtlsproxy.tlsproto.HalfCloseTLSFactory}.

    @ivar reactor: Provides C{connectTCP} and C{seconds}.
    @ivar listenerName: Named in every log event.
    @ivar pool: Where backends are chosen: C{pick(facts, exclude)}.
    @ivar connectTimeout: Seconds allowed for one backend connection attempt.
    @ivar maxAttempts: Backend connection attempts per client connection.
    @ivar tls: C{True} if the protocols run over TLS: the backend is then
        contacted only from C{handshakeCompleted}.
    @ivar metrics: Where connections, handshakes, bytes, picks and connect
        failures are counted (L{mtlsproxy.metrics.NO_METRICS} by default).
    @ivar connections: The registry of live connections every protocol
        adds itself to (L{mtlsproxy.drain.ConnectionRegistry}; a new one
        per factory by default).
    @ivar timeouts: The handshake and idle timeouts
        (L{mtlsproxy.limits.Timeouts}; its defaults unless given).
    @ivar gate: Counts client connections against C{max_connections}
        (L{mtlsproxy.limits.ConnectionGate}), or L{None} for no limit.
    @ivar backendTLS: The L{mtlsproxy.backendtls.BackendTLS} of each pool
        whose members are connected with TLS, by pool name.
    """

    noisy = False

    noisy = False

    def __init__(
        self,
        reactor: Any,
        listenerName: str,
        pool: Pool,
        connectTimeout: float,
        maxAttempts: int,
        tls: bool,
        metrics: Optional[ListenerMetrics] = None,
        connections: Optional[ConnectionRegistry] = None,
        timeouts: Optional[Timeouts] = None,
        gate: Optional[ConnectionGate] = None,
        router: Optional[ConnectionRouter] = None,
        backendTLS: Optional[dict[str, Any]] = None,
    ) -> None:
        self.reactor = reactor
        self.backendTLS = dict(backendTLS or {})
        self.listenerName = listenerName
        self.pool = pool
        self.router = router
        self.connectTimeout = connectTimeout
        self.maxAttempts = maxAttempts
        self.tls = tls
        self.metrics = metrics if metrics is not None else NO_METRICS
        self.connections = connections if connections is not None else ConnectionRegistry()
        self.timeouts = timeouts if timeouts is not None else Timeouts()
        self.gate = gate

    def routeFor(self, facts: Optional[ConnectionFacts]) -> RouteTarget:
        """
        Where a connection goes: what C{router} (the listener's SNI routes,
        L{mtlsproxy.routing.Router.forConnection}) says, else C{pool} with
        C{connectTimeout} and C{maxAttempts}.
        """
        if self.router is not None and facts is not None:
            return self.router(facts)
        return RouteTarget(self.pool, self.connectTimeout, self.maxAttempts)

    def buildProtocol(self, addr: Optional[IAddress]) -> ProxyServerProtocol:
        """
        Create the protocol for one client connection.
        """
        protocol = ProxyServerProtocol()
        protocol.factory = self
        return protocol


class _BackendConnector(ClientFactory["BackendProtocol"]):
    """
    One connection attempt to one member, on behalf of one client connection.
    """

    noisy = False

    noisy = False

    def __init__(self, relay: ProxyServerProtocol, member: Member) -> None:
        self.relay = relay
        self.member = member
        self.connector: Any = None

    def buildProtocol(self, addr: Optional[IAddress]) -> BackendProtocol:
        """
        The attempt succeeded: at the TCP level, or for a pool with backend
        TLS once the member is verified and accepted the proxy.
        """
        protocol = BackendProtocol(self.relay, self.member)
        protocol.factory = self
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        """
        The member refused, timed out or could not be reached.
        """
        self.relay._backendFailed(self, reason)


@implementer(IHalfCloseableProtocol)
class BackendProtocol(Protocol):
    """
    The backend side of a proxied connection: reports to its
    L{ProxyServerProtocol} and keeps the member's connection count.

    @ivar member: The pool member this connection goes to.
    """

    factory: _BackendConnector
    transport: Any

    def __init__(self, relay: ProxyServerProtocol, member: Member) -> None:
        self._relay = relay
        self.member = member
        self._counted = False

    def connectionMade(self) -> None:
        """
        Report the successful attempt, count the connection on its member
        and hand it to the relay.
        """
        _noDelay(self.transport)
        self.member.connectSucceeded()
        self.member.connectionOpened()
        self._counted = True
        self._relay._backendConnected(self)

    def dataReceived(self, data: bytes) -> None:
        """
        Bytes from the backend, for the client.
        """
        self._relay._backendData(self, data)

    def readConnectionLost(self) -> None:
        """
        The backend sent EOF.
        """
        self._relay._backendEOF(self)

    def writeConnectionLost(self) -> None:
        """
        Our EOF to the backend has been sent; nothing to do.
        """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Uncount the connection (exactly once) and tell the relay.
        """
        if self._counted:
            self._counted = False
            self.member.connectionClosed()
        self._relay._backendLost(self, reason)


@implementer(IHandshakeListener, IHalfCloseableProtocol)
class ProxyServerProtocol(Protocol):
    """
    The client side of a proxied connection, and the owner of its lifecycle.

    @ivar phase: The current L{Phase}.
    @ivar preConnectBufferLimit: Most bytes kept from the client before a
        backend is connected.  The client is paused meanwhile, so only what
        one read delivered can arrive; more than this ends the connection.
    """

    factory: ProxyServerFactory
    transport: Any

    log = Logger()

    preConnectBufferLimit = 2**20

    # Limits (see the "limits" section below).
    _admitted = False
    _handshakeDeadline: Optional[IDelayedCall] = None
    _idle: Optional[IdleTimer] = None

    def __init__(self) -> None:
        self.phase = Phase.NEW
        self._started = 0.0
        self._peerHost = ""
        self._peerPort = 0
        self._peer = ""
        self._tlsFacts = _TLSFacts()
        self._facts: Optional[ConnectionFacts] = None
        self._pending: list[bytes] = []
        self._pendingSize = 0
        self._attempts = 0
        self._failedMembers: list[Member] = []
        self._attempt: Optional[_BackendConnector] = None
        self._backend: Optional[BackendProtocol] = None
        self._backendAddress: Optional[str] = None
        self._clientAtEOF = False
        self._backendAtEOF = False
        self._clientGone = False
        self._backendGone = False
        self._backendFeedsClient = False
        self._clientFeedsBackend = False
        self._closeReason: Optional[str] = None
        self._bytesIn = 0
        self._bytesOut = 0
        self.connectionId: Optional[int] = None

    def _enter(self, phase: Phase) -> None:
        """
        Move to C{phase}; anything but a transition in L{_TRANSITIONS} is a
        bug.
        """
        if phase is self.phase:
            return
        if phase not in _TRANSITIONS[self.phase]:
            raise RuntimeError(f"relay cannot go from {self.phase} to {phase}")
        self.phase = phase
        self._limitPhase(phase)

    def _noteClose(self, reason: str) -> None:
        """
        Remember what ended the connection, if nothing did before.
        """
        if self._closeReason is None:
            self._closeReason = reason

    # -- client events --------------------------------------------------------

    def connectionMade(self) -> None:
        """
        A client connected.  On TCP it is ready now; on TLS wait for
        L{handshakeCompleted} (the handshake needs the transport reading, so
        it is not paused yet; the TLS layer delivers no data before then).
        """
        self._started = self.factory.reactor.seconds()
        _noDelay(self.transport)
        self._peerHost, self._peerPort, self._peer = _describe(self.transport.getPeer())
        self.connectionId = self.factory.connections.add(self)
        self.factory.metrics.connectionOpened()
        if not self._admit():
            return
        if self.factory.tls:
            self._enter(Phase.HANDSHAKING)
            self._armHandshakeDeadline()
        else:
            self.transport.pauseProducing()
            self._startConnecting()

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake is complete and the client certificate verified:
        read what TLS tells about the client, then connect a backend.
        Renegotiations are ignored.
        """
        if self.phase is not Phase.HANDSHAKING:
            return
        self._cancelHandshakeDeadline()
        self.factory.metrics.handshakeSucceeded(self.factory.reactor.seconds() - self._started)
        self._tlsFacts = _tlsFactsOf(self.transport)
        self.transport.pauseProducing()
        self._startConnecting()

    def dataReceived(self, data: bytes) -> None:
        """
        Relay client bytes to the backend, or keep them until one is
        connected.  In TLS 1.3 the client may send data right after its
        Finished: it arrives here after L{handshakeCompleted}, while
        connecting, and is kept.
        """
        if self.phase is Phase.RELAYING:
            self._toBackend(data)
        elif self.phase in (Phase.HANDSHAKING, Phase.CONNECTING):
            self._pending.append(data)
            self._pendingSize += len(data)
            if self._pendingSize > self.preConnectBufferLimit:
                self._giveUp(
                    "client sent more than {limit} bytes before a backend was connected",
                    limit=self.preConnectBufferLimit,
                )
        # CLOSING: the other side is gone; drop.

    def readConnectionLost(self) -> None:
        """
        The client sent EOF (TCP FIN, TLS 1.3 close_notify): forward it to
        the backend once everything before it has been.
        """
        if self._clientAtEOF or self._clientGone:
            return
        self._clientAtEOF = True
        self._noteClose(CloseReason.CLIENT_CLOSED)
        if self.phase is Phase.RELAYING:
            assert self._backend is not None
            self._stopClientFeedingBackend()
            self._backend.transport.loseWriteConnection()
            self._closeIfBothEOF()
        # CONNECTING: forwarded in _backendConnected.  (TLS reports no EOF
        # before the handshake completed.)

    def writeConnectionLost(self) -> None:
        """
        Our EOF to the client has been sent; nothing to do.
        """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        The client connection is gone: stop connecting, close the backend
        after flushing it, and log once both are gone.
        """
        if self._clientGone:
            return
        self._clientGone = True
        self._releaseSlot()
        if self.phase is Phase.HANDSHAKING:
            noData = not getattr(self.transport, "receivedAny", True)
            self._noteClose(CloseReason.NO_DATA if noData else CloseReason.HANDSHAKE_FAILED)
            self._tlsFacts = _tlsFactsOf(self.transport)
            timedOut = self._closeReason == CloseReason.HANDSHAKE_TIMEOUT
            self.factory.metrics.handshakeFailed(
                rejectionReason(self.transport)
                or (CloseReason.HANDSHAKE_TIMEOUT if timedOut else "no_data" if noData else "aborted"),
                self.factory.reactor.seconds() - self._started,
            )
        else:
            self._noteClose(CloseReason.CLIENT_CLOSED)
        if not reason.check(ConnectionDone):
            self.log.debug(
                "Listener {listener}: client {peer} lost: {reason}",
                listener=self.factory.listenerName,
                peer=self._peer,
                reason=reason.getErrorMessage(),
            )
        self._enter(Phase.CLOSING)
        self._pending = []
        self._cancelAttempt()
        # Unregister both ways: the backend transport's close waits for its
        # producer (this transport) to be unregistered.
        self._stopBackendFeedingClient()
        self._stopClientFeedingBackend()
        self._closeBackend()
        self._finishIfDone()

    # -- limits ---------------------------------------------------------------

    def _admit(self) -> bool:
        """
        Take a slot of the listener's C{max_connections}; if there is none,
        abort the connection (C{close_reason="max_connections"}).
        """
        gate = self.factory.gate
        if gate is None or gate.admit():
            self._admitted = gate is not None
            return True
        self._noteClose(CloseReason.MAX_CONNECTIONS)
        self._enter(Phase.CLOSING)
        self.transport.abortConnection()
        return False

    def _releaseSlot(self) -> None:
        """
        Give back the slot taken by L{_admit}, once.
        """
        if self._admitted:
            self._admitted = False
            assert self.factory.gate is not None
            self.factory.gate.release()

    def _armHandshakeDeadline(self) -> None:
        """
        Give the TLS handshake C{handshake_timeout} seconds from now (from
        accept); bytes from the client do not move the deadline.
        """
        self._handshakeDeadline = self.factory.reactor.callLater(
            self.factory.timeouts.handshake, self._handshakeTimedOut
        )

    def _cancelHandshakeDeadline(self) -> None:
        deadline, self._handshakeDeadline = self._handshakeDeadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _handshakeTimedOut(self) -> None:
        """
        The handshake deadline passed: abort the client connection.
        """
        self._handshakeDeadline = None
        if self.phase is not Phase.HANDSHAKING:
            return
        self.log.info(
            "Listener {listener}: closing {peer}: {reason}"
            " (TLS handshake not complete after {timeout}s)",
            listener=self.factory.listenerName,
            peer=self._peer,
            reason=CloseReason.HANDSHAKE_TIMEOUT,
            timeout=self.factory.timeouts.handshake,
        )
        self._noteClose(CloseReason.HANDSHAKE_TIMEOUT)
        self.transport.abortConnection()

    def _limitPhase(self, phase: Phase) -> None:
        """
        Start and stop the timers that bound each phase: the idle timer
        runs from C{RELAYING} on, and is restarted on entering C{CLOSING},
        where it bounds how long closing may take.
        """
        if phase is Phase.RELAYING or phase is Phase.CLOSING:
            self._cancelHandshakeDeadline()
            if self._idle is None:
                self._idle = IdleTimer(
                    self.factory.reactor, self.factory.timeouts.idle, self._idleTimedOut
                )
            self._idle.start()
        elif phase is Phase.CLOSED:
            self._cancelHandshakeDeadline()
            if self._idle is not None:
                self._idle.stop()

    def _idleTimedOut(self) -> None:
        """
        No byte either way for C{idle_timeout} seconds: close both sides,
        or, if they were already being closed, abort them.
        """
        fields = dict(
            listener=self.factory.listenerName,
            peer=self._peer,
            timeout=self.factory.timeouts.idle,
        )
        if self.phase is Phase.RELAYING:
            self.log.info(
                "Listener {listener}: closing {peer}: {reason}"
                " (no data either way for {timeout}s)",
                reason=CloseReason.IDLE_TIMEOUT,
                **fields,
            )
            self.closeNow(CloseReason.IDLE_TIMEOUT)
        elif self.phase is Phase.CLOSING:
            self.log.info(
                "Listener {listener}: aborting {peer}: not closed {timeout}s after closing began",
                reason="close_timeout",
                **fields,
            )
            self.abort()

    # -- backend selection ----------------------------------------------------

    def _startConnecting(self) -> None:
        """
        The client is ready: describe it for the selector and try members.
        """
        self._enter(Phase.CONNECTING)
        identity = self._tlsFacts.identity
        self._facts = ConnectionFacts(
            listener=self.factory.listenerName,
            peerHost=self._peerHost,
            peerPort=self._peerPort,
            sni=self._tlsFacts.sni,
            clientIdentity=identity,
        )
        self._route = self.factory.routeFor(self._facts)
        self._connectNext()

    _route: Optional[RouteTarget] = None

    @property
    def _target(self) -> RouteTarget:
        """
        The pool and its settings this connection uses: chosen by
        L{_startConnecting}; the listener's pool before.
        """
        if self._route is None:
            return self.factory.routeFor(None)
        return self._route

    def _connectNext(self) -> None:
        """
        Try the next member the pool offers, or give up with C{no_backend}.
        """
        assert self._facts is not None
        member = None
        if self._attempts < self._target.maxAttempts:
            member = self._target.pool.pick(self._facts, list(self._failedMembers))
        if member is None:
            self._noBackend()
            return
        self.factory.metrics.picked(self._target.pool.name, _hostPort(member.address, member.port))
        self._attempts += 1
        attempt = _BackendConnector(self, member)
        self._attempt = attempt
        connecting: Any = attempt
        backendTLS = self.factory.backendTLS.get(self._target.pool.name)
        if backendTLS is not None:
            # The handshake is part of connecting: a member that fails it
            # fails the attempt (clientConnectionFailed) like a refusal.
            connecting = backendTLS.wrapFactory(
                member, attempt, self.factory.reactor, self._target.connectTimeout
            )
        attempt.connector = self.factory.reactor.connectTCP(
            member.address,
            member.port,
            connecting,
            timeout=self._target.connectTimeout,
        )

    def _backendFailed(self, attempt: _BackendConnector, reason: Failure) -> None:
        """
        A connection attempt failed: exclude that member and try another.
        """
        if attempt is not self._attempt:
            # Cancelled because the client went away.
            return
        self._attempt = None
        member = attempt.member
        self._failedMembers.append(member)
        ownError = localResourceError(reason)
        if ownError is not None:
            # Out of descriptors or ports: the proxy's problem, not the
            # member's; it must not count towards passive ejection.
            self.log.error(
                LOCAL_CONNECT_FAILED_FORMAT,
                listener=self.factory.listenerName,
                pool=self._target.pool.name,
                backend=_hostPort(member.address, member.port),
                peer=self._peer,
                errno=ownError,
                error=reason.getErrorMessage(),
            )
        else:
            member.connectFailed()
            self.factory.metrics.connectFailed(
                self._target.pool.name, _hostPort(member.address, member.port)
            )
            logBackendTLSFailure(reason, listener=self.factory.listenerName, peer=self._peer)
            self.log.warn(
                "Listener {listener}: backend {backend} failed for {peer}"
                " (attempt {attempt} of {maxAttempts}): {reason}",
                listener=self.factory.listenerName,
                backend=_hostPort(member.address, member.port),
                peer=self._peer,
                attempt=self._attempts,
                maxAttempts=self._target.maxAttempts,
                reason=reason.getErrorMessage(),
            )
        if self.phase is Phase.CONNECTING:
            self._connectNext()
        else:
            self._finishIfDone()

    def _noBackend(self) -> None:
        """
        No member could be connected: close the client.  The operational
        event says why: C{max_attempts}, the pool's
        L{noCandidateReason<mtlsproxy.pool.Pool.noCandidateReason>}
        (C{no_healthy_member}, C{members_exhausted}), or C{selector_refused}.
        """
        if self._attempts >= self._target.maxAttempts:
            why: Optional[str] = "max_attempts"
        else:
            why = self._target.pool.noCandidateReason(self._failedMembers)
        self.log.warn(
            "Listener {listener}: no backend for {peer} after {attempts}"
            " attempt(s): {why}",
            listener=self.factory.listenerName,
            peer=self._peer,
            attempts=self._attempts,
            why=why or "selector_refused",
        )
        self._noteClose(CloseReason.NO_BACKEND)
        self._enter(Phase.CLOSING)
        self._pending = []
        self._closeClient()
        self._finishIfDone()

    def _cancelAttempt(self) -> None:
        """
        Abandon a connection attempt in progress, if any.
        """
        attempt, self._attempt = self._attempt, None
        if attempt is None or attempt.connector is None:
            return
        try:
            attempt.connector.stopConnecting()
        except NotConnectingError:
            # Connected, with the backend TLS handshake still going on.
            attempt.connector.disconnect()

    def _giveUp(self, message: str, **fields: Any) -> None:
        """
        End the connection because the proxy cannot go on with it.
        """
        self.log.warn(
            "Listener {listener}: closing {peer}: " + message,
            listener=self.factory.listenerName,
            peer=self._peer,
            **fields,
        )
        self._noteClose(CloseReason.ERROR)
        self._closeBothSides()

    # -- backend events -------------------------------------------------------

    def _backendConnected(self, backend: BackendProtocol) -> None:
        """
        A backend connection is established: join the two with producers,
        send what the client sent meanwhile, and let the client go on.
        """
        if backend.factory is not self._attempt or self.phase is not Phase.CONNECTING:
            # A cancelled attempt that connected anyway.
            backend.transport.loseConnection()
            return
        member = backend.member
        self._attempt = None
        self._backend = backend
        self._backendAddress = _hostPort(member.address, member.port)
        self._enter(Phase.RELAYING)
        # The pool's PROXY protocol header comes before any client byte.
        preamble = self._target.preamble(self.transport)
        if preamble:
            backend.transport.write(preamble)
        # Each side is the other's producer: a full send buffer on one pauses
        # reading on the other.
        self.transport.registerProducer(backend.transport, True)
        self._backendFeedsClient = True
        if not self._clientAtEOF:
            backend.transport.registerProducer(self.transport, True)
            self._clientFeedsBackend = True
            # Resume before writing the buffered bytes: writing them may be
            # what pauses the client again.
            self.transport.resumeProducing()
        pending, self._pending, self._pendingSize = self._pending, [], 0
        if pending:
            self._toBackend(b"".join(pending))
        if self._clientAtEOF:
            backend.transport.loseWriteConnection()

    def _backendData(self, backend: BackendProtocol, data: bytes) -> None:
        """
        Relay backend bytes to the client.
        """
        if backend is not self._backend or self.phase is not Phase.RELAYING:
            return
        self._bytesOut += len(data)
        if self._idle is not None:
            self._idle.touch()
        self.factory.metrics.toClient(len(data))
        writeNow(self.transport, data)

    def _backendEOF(self, backend: BackendProtocol) -> None:
        """
        The backend sent EOF: forward it to the client.
        """
        if backend is not self._backend or self._backendAtEOF or self.phase is not Phase.RELAYING:
            return
        self._backendAtEOF = True
        self._noteClose(CloseReason.BACKEND_CLOSED)
        self._stopBackendFeedingClient()
        self.transport.loseWriteConnection()
        self._closeIfBothEOF()

    def _backendLost(self, backend: BackendProtocol, reason: Failure) -> None:
        """
        The backend connection is gone: close the client after flushing it.
        """
        if backend is not self._backend:
            return
        self._backendGone = True
        self._noteClose(CloseReason.BACKEND_CLOSED)
        if not reason.check(ConnectionDone):
            self.log.debug(
                "Listener {listener}: backend {backend} lost for {peer}: {reason}",
                listener=self.factory.listenerName,
                backend=self._backendAddress,
                peer=self._peer,
                reason=reason.getErrorMessage(),
            )
        self._enter(Phase.CLOSING)
        self._stopBackendFeedingClient()
        self._stopClientFeedingBackend()
        self._closeClient()
        self._finishIfDone()

    # -- data path and closing ------------------------------------------------

    def _toBackend(self, data: bytes) -> None:
        """
        Write client bytes to the backend.
        """
        assert self._backend is not None
        self._bytesIn += len(data)
        if self._idle is not None:
            self._idle.touch()
        self.factory.metrics.fromClient(len(data))
        writeNow(self._backend.transport, data)

    def _stopBackendFeedingClient(self) -> None:
        """
        Unregister the backend transport as the client transport's producer.
        """
        if self._backendFeedsClient:
            self._backendFeedsClient = False
            self.transport.unregisterProducer()

    def _stopClientFeedingBackend(self) -> None:
        """
        Unregister the client transport as the backend transport's producer
        (a transport at EOF must not be resumed: it would report EOF again,
        and a half-close waits for its producer to go).
        """
        if self._clientFeedsBackend:
            self._clientFeedsBackend = False
            assert self._backend is not None
            self._backend.transport.unregisterProducer()

    def _closeIfBothEOF(self) -> None:
        """
        Once both sides sent EOF, close both.
        """
        if self._clientAtEOF and self._backendAtEOF:
            self._enter(Phase.CLOSING)
            self._closeClient()
            self._closeBackend()

    def _closeClient(self) -> None:
        """
        Close the client connection once its pending data is sent.
        """
        if not self._clientGone:
            self.transport.loseConnection()

    def _closeBackend(self) -> None:
        """
        Close the backend connection once its pending data is sent.
        """
        if self._backend is not None and not self._backendGone:
            self._backend.transport.loseConnection()

    def _finishIfDone(self) -> None:
        """
        When both sides are gone and no attempt is pending, emit the access
        event.
        """
        if self.phase is not Phase.CLOSING or not self._clientGone:
            return
        if self._attempt is not None:
            return
        if self._backend is not None and not self._backendGone:
            return
        self._enter(Phase.CLOSED)
        self._logAccess()
        self.factory.metrics.connectionClosed(self._closeReason or CloseReason.CLIENT_CLOSED)
        if self.connectionId is not None:
            self.factory.connections.remove(self.connectionId)

    # -- operator and shutdown ------------------------------------------------

    def describe(self) -> ConnectionInfo:
        """
        A snapshot of this connection for the admin console and the status
        endpoint (L{mtlsproxy.drain.RegisteredConnection}).
        """
        identity = self._tlsFacts.identity
        return ConnectionInfo(
            id=self.connectionId or 0,
            listener=self.factory.listenerName,
            peer=self._peer,
            phase=self.phase.value,
            started=self._started,
            subject=getattr(identity, "subject", None),
            serial=getattr(identity, "serial", None),
            fingerprint=getattr(identity, "fingerprint", None),
            backend=self._backendAddress,
            pool=self._target.pool.name,
            bytesIn=self._bytesIn,
            bytesOut=self._bytesOut,
        )

    def backendTransport(self) -> Any:
        """
        The transport of the established backend connection (a
        L{BackendTLSProtocol<mtlsproxy.backendtls.BackendTLSProtocol>} for a
        pool with C{[pools.tls]}), or L{None}; what a reload checks against
        a pool's new CRLs.
        """
        if self._backend is None or self._backendGone:
            return None
        return self._backend.transport

    def closeNow(self, reason: str = CloseReason.OPERATOR) -> None:
        """
        Close both sides, each after its pending data is flushed (TLS sends
        close_notify), whatever the phase; C{reason} becomes the access
        event's C{close_reason}.  Nothing happens once closed.
        """
        if self.phase in (Phase.NEW, Phase.CLOSED):
            return
        self._noteClose(reason)
        self._closeBothSides()

    def _closeBothSides(self) -> None:
        """
        Enter C{CLOSING}: drop what was kept for a backend, abandon a
        connection attempt, unregister the producers both ways and close
        both transports after their pending data.
        """
        self._enter(Phase.CLOSING)
        self._pending = []
        self._cancelAttempt()
        self._stopBackendFeedingClient()
        self._stopClientFeedingBackend()
        self._closeClient()
        self._closeBackend()
        self._finishIfDone()

    def abort(self) -> None:
        """
        Drop both connections now, without flushing (after L{closeNow} did
        not end them: a peer that does not read).
        """
        if not self._clientGone:
            self.transport.abortConnection()
        if self._backend is not None and not self._backendGone:
            self._backend.transport.abortConnection()

    def _logAccess(self) -> None:
        """
        Emit the connection's one access event.
        """
        identity = self._tlsFacts.identity
        _accessLog.info(
            ACCESS_LOG_FORMAT,
            log_category="access",
            listener=self.factory.listenerName,
            peer=self._peer,
            sni=self._tlsFacts.sni,
            tls_version=self._tlsFacts.version,
            cipher=self._tlsFacts.cipher,
            subject=getattr(identity, "subject", None),
            issuer=getattr(identity, "issuer", None),
            serial=getattr(identity, "serial", None),
            fingerprint=getattr(identity, "fingerprint", None),
            backend=self._backendAddress,
            bytes_in=self._bytesIn,
            bytes_out=self._bytesOut,
            duration=self.factory.reactor.seconds() - self._started,
            close_reason=self._closeReason,
        )
