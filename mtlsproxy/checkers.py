# -*- test-case-name: tests.test_checkers -*-
"""
The built-in health checkers: C{tcp}, C{tls} and C{http}.

Each checker class provides L{IHealthChecker}; its C{fromOptions(reactor,
options, tls)} class method validates the checker-specific keys of
C{[pools.health_check]} and is what the declarations in
C{twisted/plugins/mtlsproxy_plugin.py} name (by dotted name, so that a
plugin scan does not import the TLS and HTTP code below).

Every check opens a new connection to the member, decides, and closes it; the
Deferred it returns fires once the connection is closed.  Cancelling it (the
monitor does so when the pool's C{timeout} expires) aborts the connection at
whatever stage it is: connecting, handshaking, waiting for or reading the
response.

Checks never fail: network errors become C{CheckResult(False, reason)} with
a short reason (L{describeFailure}), except for cancellation, which
propagates.  A connection the proxy could not even make for want of its own
resources (C{EMFILE} and the like) gives an inconclusive result
(L{CheckResult.inconclusive<mtlsproxy.health.CheckResult.inconclusive>}),
which leaves the member's health alone.

Over TLS with a pool's backend TLS settings (a
L{BackendTLS<mtlsproxy.backendtls.BackendTLS>}) the C{tls} and C{http}
checkers connect the way the relay does, through
L{BackendTLS.wrapFactory<mtlsproxy.backendtls.BackendTLS.wrapFactory>}
(L{_AcceptedTLSEndpoint}): the connection counts as made only once the
member is verified I{and} has accepted the proxy's client certificate.  In
TLS 1.3 the client's handshake completes before the server has looked at
that certificate, so with the connection creator alone a member that
rejects it (an alert after its Finished) would pass the C{tls} check.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Mapping, Optional

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error as _error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from .backendtls import BackendTLSError
from .health import CheckResult, OptionError, describeValue
from .interfaces import IHealthChecker
from .pool import localResourceError

__all__ = [
    "BODY_LIMIT",
    "DEFAULT_CONNECT_TIMEOUT",
    "USER_AGENT",
    "TCPChecker",
    "TLSChecker",
    "HTTPChecker",
    "StatusCodes",
    "describeFailure",
]

BODY_LIMIT = 64 * 1024
"""
The most bytes of a response body the C{http} checker reads; C{body_contains}
is looked for in this much.
"""

DEFAULT_CONNECT_TIMEOUT = 30.0
"""
Seconds a checker waits for a TCP connection by itself.  Under a
L{mtlsproxy.health.HealthMonitor} the pool's C{timeout} (shorter) cancels the
check first; this only bounds a checker used on its own.
"""

USER_AGENT = b"mtlsproxy-health-check"
"""
The C{User-Agent} of the C{http} checker's requests, so that backends can
keep health checks out of their access logs.
"""


# ---------------------------------------------------------------------------
# Reasons
# ---------------------------------------------------------------------------


def _sslReasons(e: SSL.Error) -> str:
    """
    The reason strings of a pyOpenSSL error, C{"certificate verify failed"}.
    """
    reasons: list[str] = []
    details = e.args[0] if e.args else None
    if isinstance(details, list):
        for item in details:
            if isinstance(item, tuple) and item and item[-1]:
                reasons.append(str(item[-1]))
    return ", ".join(reasons) or str(e) or type(e).__name__


def _mismatches(e: VerificationError) -> str:
    """
    The names a certificate did not match, C{"127.0.0.2"}.
    """
    names: list[str] = []
    for mismatch in getattr(e, "errors", ()):
        identity = getattr(mismatch, "mismatched_id", None)
        for attribute in ("hostname", "ip", "uri"):
            value = getattr(identity, attribute, None)
            if value is not None:
                if isinstance(value, bytes):
                    value = value.decode("ascii", "replace")
                names.append(str(value))
                break
    return ", ".join(names) or "the expected name"


def describeFailure(failure: Failure) -> str:
    """
    A short reason for a failed connection, handshake or request, for a
    L{CheckResult}: C{"connection refused"}, C{"connect timeout"},
    C{"TLS handshake failed: certificate verify failed"},
    C{"TLS handshake failed: client_certificate_rejected: tlsv1 alert
    unknown ca"} (a L{BackendTLSError}),
    C{"connection closed before a response"}, C{"the proxy is out of
    resources (EMFILE): ..."}.
    """
    e = failure.value
    ownError = localResourceError(failure)
    if ownError is not None:
        return f"the proxy is out of resources ({ownError}): {failure.getErrorMessage()}"
    if isinstance(e, ResponseNeverReceived):
        return _innerReason(e.reasons, "connection closed before a response")
    if isinstance(e, ResponseFailed):
        return _innerReason(e.reasons, "connection closed while reading the response")
    if isinstance(e, (RequestTransmissionFailed, RequestGenerationFailed)):
        return _innerReason(e.reasons, "connection closed while sending the request")
    if isinstance(e, _error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, _error.TimeoutError):
        return "connect timeout"
    if isinstance(e, _error.DNSLookupError):
        return "DNS lookup failed"
    if isinstance(e, _error.NoRouteError):
        return "no route to host"
    if isinstance(e, SSL.Error):
        return f"TLS handshake failed: {_sslReasons(e)}"
    if isinstance(e, BackendTLSError):
        # "client_certificate_rejected: tlsv1 alert unknown ca"
        return f"TLS handshake failed: {e}"
    if isinstance(e, VerificationError):
        return f"TLS handshake failed: certificate does not match {_mismatches(e)}"
    if isinstance(e, (_error.ConnectionDone, _error.ConnectionLost)):
        return "connection closed"
    message = failure.getErrorMessage()
    name = type(e).__name__
    return message if message and message != name else name


def _innerReason(reasons: Any, fallback: str) -> str:
    """
    Describe the most telling of the failures an HTTP client error wraps:
    the first that is not a plain connection close, else C{fallback}.
    """
    for reason in reasons or ():
        if isinstance(reason, Failure) and not reason.check(
            _error.ConnectionDone, _error.ConnectionLost, PotentialDataLoss
        ):
            return describeFailure(reason)
    return fallback


def _quietFactory(protocol: Any) -> Factory:
    """
    A factory of C{protocol} that does not log "Starting factory" and
    "Stopping factory" (Twisted's default, at info): two lines per check,
    every C{interval}, for every member.
    """
    factory = Factory.forProtocol(protocol)
    factory.noisy = False
    return factory


def _notCancelled(failure: Failure) -> CheckResult:
    """
    Turn a failed check into an unhealthy result, but let cancellation
    through.
    """
    if failure.check(CancelledError):
        failure.raiseException()
    return CheckResult(
        False, describeFailure(failure), inconclusive=localResourceError(failure) is not None
    )


# ---------------------------------------------------------------------------
# Connecting
# ---------------------------------------------------------------------------


def _tcpEndpoint(reactor: Any, member: Any, timeout: float) -> Any:
    """
    An endpoint for a TCP connection to C{member}: straight to an IP
    address, through the reactor's (non-blocking) resolver for a name.
    """
    address = member.address
    if isIPAddress(address):
        return TCP4ClientEndpoint(reactor, address, member.port, timeout=timeout)
    if isIPv6Address(address):
        return TCP6ClientEndpoint(reactor, address, member.port, timeout=timeout)
    return HostnameEndpoint(reactor, address, member.port, timeout=timeout)


def _hostBytes(text: str) -> Optional[bytes]:
    """
    A host name as bytes for SNI or a URI: IDNA-encoded, or L{None} if it
    cannot be.
    """
    try:
        return text.encode("idna")
    except UnicodeError:
        return None


@implementer(IOpenSSLClientConnectionCreator)
class _ServerNameOnly:
    """
    A TLS client connection that verifies nothing and sends C{serverName}
    as SNI (if any).
    """

    def __init__(self, context: SSL.Context, serverName: Optional[bytes]) -> None:
        self._context = context
        self._serverName = serverName

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._serverName is not None:
            connection.set_tlsext_host_name(self._serverName)
        return connection


class _UnverifiedTLS:
    """
    Backend TLS settings that verify nothing, for the C{tls} checker of a
    pool without backend TLS settings (one that passes TLS through), where
    the point is only that the member speaks TLS.  The member's name is sent
    as SNI when it is a host name.  Has the C{clientConnectionCreator} method
    of real backend TLS settings.
    """

    def __init__(self) -> None:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_verify(SSL.VERIFY_NONE)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        self._context = context

    def clientConnectionCreator(self, member: Any) -> _ServerNameOnly:
        address = member.address
        isName = not (isIPAddress(address) or isIPv6Address(address))
        return _ServerNameOnly(self._context, _hostBytes(address) if isName else None)


class _ReportConnected(Protocol):
    """
    Stands between a L{BackendTLSProtocol<mtlsproxy.backendtls.BackendTLSProtocol>}
    and the protocol of an L{_AcceptedTLSEndpoint} connection: connects that
    protocol to the TLS transport, then reports it connected (as the
    endpoints of L{twisted.internet.endpoints} report theirs, after
    C{makeConnection}, so that the protocol can be used at once).
    """

    def __init__(self, wrapped: IProtocol, connected: Callable[[IProtocol], None]) -> None:
        self._wrapped = wrapped
        self._connected = connected

    def connectionMade(self) -> None:
        self._wrapped.makeConnection(self.transport)  # type: ignore[arg-type]
        self._connected(self._wrapped)

    def dataReceived(self, data: bytes) -> None:
        self._wrapped.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._wrapped.connectionLost(reason)


class _AcceptanceAttempt(ClientFactory):
    """
    The factory that L{BackendTLS.wrapFactory
    <mtlsproxy.backendtls.BackendTLS.wrapFactory>} wraps for one
    L{_AcceptedTLSEndpoint} connection: it hears that the member accepted
    the proxy (C{buildProtocol}) or why the TLS connection failed
    (C{clientConnectionFailed}, a L{BackendTLSError}).

    @ivar connected: Fires with the protocol of C{protocolFactory},
        connected, once the member accepted; fails with why the TCP
        connection or the TLS handshake failed.  Cancelling it stops the
        TCP connection attempt or aborts the connection.
    """

    noisy = False

    def __init__(self, protocolFactory: IProtocolFactory) -> None:
        self._protocolFactory = protocolFactory
        self._tcpConnecting: Optional[Deferred[Any]] = None
        self._tlsProtocol: Any = None
        self._cancelled = False
        self.connected: Deferred[IProtocol] = Deferred(self._cancel)

    def follow(self, tcpConnecting: "Deferred[Any]") -> None:
        """
        Watch the TCP connection attempt, which fires with the TLS protocol
        (handshaking) or fails.
        """
        self._tcpConnecting = tcpConnecting
        tcpConnecting.addCallbacks(self._tcpConnected, self._failed)

    def _tcpConnected(self, tlsProtocol: Any) -> None:
        self._tcpConnecting = None
        self._tlsProtocol = tlsProtocol

    def _failed(self, reason: Failure) -> None:
        self._tcpConnecting = None
        if not self._cancelled and not self.connected.called:
            self.connected.errback(reason)

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        """
        The member is verified and accepted the proxy: build the real
        protocol, to be reported once it is connected.
        """
        protocol = self._protocolFactory.buildProtocol(addr)
        if protocol is None:
            self._failed(Failure(_error.ConnectError(string="the protocol factory refused")))
            return None
        return _ReportConnected(protocol, self._accepted)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        """
        The TLS handshake failed or the member rejected the proxy's
        certificate (a L{BackendTLSError}).
        """
        self._failed(reason)

    def _accepted(self, protocol: IProtocol) -> None:
        if self._cancelled or self.connected.called:
            return
        self.connected.callback(protocol)

    def _cancel(self, connected: "Deferred[IProtocol]") -> None:
        self._cancelled = True
        if self._tcpConnecting is not None:
            self._tcpConnecting.cancel()
        elif self._tlsProtocol is not None:
            self._tlsProtocol.abortConnection()


@implementer(IStreamClientEndpoint)
class _AcceptedTLSEndpoint:
    """
    A TLS connection to a member made the way the relay makes it, through
    L{BackendTLS.wrapFactory<mtlsproxy.backendtls.BackendTLS.wrapFactory>}:
    C{connect} fires only once the member is verified and has accepted the
    proxy's client certificate (for a TLS 1.3 member that asked for one,
    once it has said so, see L{mtlsproxy.backendtls}), and fails with a
    L{BackendTLSError} if it did not.

    @ivar tls: The pool's backend TLS settings.
    @ivar member: The member (C{address}, C{port}).
    @ivar tcp: The endpoint of the TCP connection to it.
    @ivar clock: For the handshake timeout.
    @ivar timeout: Seconds the handshake may take once TCP is connected.
    """

    def __init__(self, tls: Any, member: Any, tcp: Any, clock: Any, timeout: float) -> None:
        self.tls = tls
        self.member = member
        self.tcp = tcp
        self.clock = clock
        self.timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> "Deferred[IProtocol]":
        """
        Connect a protocol of C{protocolFactory} to the member.

        @see: L{IStreamClientEndpoint.connect}
        """
        attempt = _AcceptanceAttempt(protocolFactory)
        wrapped = self.tls.wrapFactory(self.member, attempt, self.clock, self.timeout)
        attempt.follow(self.tcp.connect(wrapped))
        return attempt.connected


def _tlsEndpoint(reactor: Any, tls: Any, member: Any, timeout: float) -> tuple[Any, bool]:
    """
    An endpoint for a TLS connection to C{member} with the backend TLS
    settings C{tls}.

    Settings with a C{wrapFactory} method (L{BackendTLS
    <mtlsproxy.backendtls.BackendTLS>}) connect as the relay does
    (L{_AcceptedTLSEndpoint}); others (a third party's, or
    L{_UnverifiedTLS}, which presents no certificate) with their
    C{clientConnectionCreator} alone.

    @return: The endpoint, and whether its connections are made only once
        the member accepted the proxy (so after the handshake completed).
    """
    tcp = _tcpEndpoint(reactor, member, timeout)
    if getattr(tls, "wrapFactory", None) is None:
        return wrapClientTLS(tls.clientConnectionCreator(member), tcp), False
    return _AcceptedTLSEndpoint(tls, member, tcp, reactor, timeout), True


def _noOptions(options: Mapping[str, Any]) -> None:
    """
    Refuse any option, for checkers that take none.  (L{parseHealthCheck}
    refuses undeclared keys first; this guards direct use.)
    """
    for key in options:
        raise OptionError(key, "this health checker takes no options")


# ---------------------------------------------------------------------------
# tcp
# ---------------------------------------------------------------------------


class _CloseAtOnce(Protocol):
    """
    Closes the connection as soon as it is made.

    @ivar closed: Fires with L{None} once the connection is gone; cancelling
        it aborts the connection.
    """

    def __init__(self) -> None:
        self.closed: Deferred[None] = Deferred(self._abort)

    def _abort(self, closed: Deferred[None]) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.closed.called:
            self.closed.callback(None)


@implementer(IHealthChecker)
class TCPChecker:
    """
    The C{tcp} checker: a member is healthy if a TCP connection to it can be
    made.  The connection is closed at once, without sending anything.
    """

    def __init__(self, reactor: Any, connectTimeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        self._reactor = reactor
        self._connectTimeout = connectTimeout

    @classmethod
    def fromOptions(cls, reactor: Any, options: Mapping[str, Any], tls: Any) -> "TCPChecker":
        """
        Make the checker from C{[pools.health_check]}: it has no options, and
        ignores the pool's TLS settings (use C{tls} to check a handshake).

        @raise OptionError: For any option.
        """
        _noOptions(options)
        return cls(reactor)

    def check(self, member: Any) -> "Deferred[CheckResult]":
        """
        Connect to C{member} and close again.

        @see: L{IHealthChecker.check}
        """
        endpoint = _tcpEndpoint(self._reactor, member, self._connectTimeout)
        connecting = endpoint.connect(_quietFactory(_CloseAtOnce))
        connecting.addCallback(lambda probe: probe.closed)
        connecting.addCallback(lambda _: CheckResult(True, "connected"))
        return connecting.addErrback(_notCancelled)

    def __repr__(self) -> str:
        return "<TCPChecker>"


# ---------------------------------------------------------------------------
# tls
# ---------------------------------------------------------------------------


class _HandshakeInterrupted(Exception):
    """
    The peer closed the connection before the TLS handshake completed.
    """

    def __str__(self) -> str:
        return "connection closed during the TLS handshake"


@implementer(IHandshakeListener)
class _HandshakeProbe(Protocol):
    """
    Waits for the TLS handshake, then closes the connection.

    @ivar done: Fires with the negotiated protocol version (C{"TLSv1.3"})
        once the connection is closed after a completed handshake, or fails
        with the reason the connection was lost before one; cancelling it
        aborts the connection.
    """

    def __init__(self) -> None:
        self.done: Deferred[str] = Deferred(self._abort)
        self._version: Optional[str] = None

    def _abort(self, done: Deferred[str]) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def handshakeCompleted(self) -> None:
        transport: Any = self.transport
        self._version = transport.getHandle().get_protocol_version_name() or "TLS"
        # Send close_notify and close the TCP connection without waiting for
        # the peer's close_notify (RFC 8446 6.1 allows it), so that a peer
        # that never answers one cannot turn a good handshake into a
        # timeout.
        transport.loseConnection()
        lower = getattr(transport, "transport", None)
        if lower is not None:
            lower.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if self._version is not None:
            self.done.callback(self._version)
        elif reason.check(_error.ConnectionDone, _error.ConnectionLost):
            self.done.errback(Failure(_HandshakeInterrupted()))
        else:
            self.done.errback(reason)


class _AcceptedProbe(_HandshakeProbe):
    """
    A L{_HandshakeProbe} for an L{_AcceptedTLSEndpoint} connection: it is
    connected only after the handshake completed and the member accepted
    the proxy, so it closes at once.
    """

    def connectionMade(self) -> None:
        self.handshakeCompleted()


@implementer(IHealthChecker)
class TLSChecker:
    """
    The C{tls} checker: a member is healthy if a TCP connection can be made
    and a TLS handshake completes on it.

    With the pool's backend TLS settings the member's certificate is
    verified with them (trusted CAs, name, the client certificate the proxy
    presents) and, as the relay does, the member must accept the proxy's
    certificate: a TLS 1.3 member's verdict comes after the handshake
    (L{_AcceptedTLSEndpoint}).  Without (C{tls=None}, a pool that passes TLS
    through) the handshake is not verified: it only shows that the member
    speaks TLS.
    """

    def __init__(
        self,
        reactor: Any,
        tls: Any = None,
        connectTimeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._verified = tls is not None
        self._tls: Any = tls if tls is not None else _UnverifiedTLS()
        self._connectTimeout = connectTimeout

    @classmethod
    def fromOptions(cls, reactor: Any, options: Mapping[str, Any], tls: Any) -> "TLSChecker":
        """
        Make the checker from C{[pools.health_check]}: it has no options.

        @raise OptionError: For any option.
        """
        _noOptions(options)
        return cls(reactor, tls)

    def check(self, member: Any) -> "Deferred[CheckResult]":
        """
        Connect to C{member}, complete a TLS handshake and close again.

        @see: L{IHealthChecker.check}
        """
        endpoint, accepted = _tlsEndpoint(self._reactor, self._tls, member, self._connectTimeout)
        probe = _AcceptedProbe if accepted else _HandshakeProbe
        connecting = endpoint.connect(_quietFactory(probe))
        connecting.addCallback(lambda probe: probe.done)
        suffix = "" if self._verified else ", certificate not verified"
        connecting.addCallback(
            lambda version: CheckResult(True, f"TLS handshake completed ({version}{suffix})")
        )
        return connecting.addErrback(_notCancelled)

    def __repr__(self) -> str:
        return f"<TLSChecker verified={self._verified}>"


# ---------------------------------------------------------------------------
# http
# ---------------------------------------------------------------------------

_STATUS_PART = re.compile(r"\s*(\d{3})\s*(?:-\s*(\d{3})\s*)?")
_HEADER_SAFE = re.compile(r"[!-~]+")


class StatusCodes:
    """
    The HTTP status codes that pass, from C{expected_status}: C{"200-399"},
    C{"200,204"}, C{"200-299, 304"} or an integer.

    @ivar ranges: Inclusive C{(low, high)} pairs.
    """

    def __init__(self, ranges: tuple[tuple[int, int], ...]) -> None:
        self.ranges = ranges

    @classmethod
    def parse(cls, value: object) -> "StatusCodes":
        """
        Parse an C{expected_status} value.

        @raise OptionError: If it is not a list of codes and ranges from 100
            to 599.
        """
        problem = OptionError(
            "expected_status",
            'expected status codes from 100 to 599 such as "200-399" or "200,204",'
            f" got {describeValue(value)}",
        )
        if isinstance(value, int) and not isinstance(value, bool):
            text = str(value)
        elif isinstance(value, str):
            text = value
        else:
            raise problem
        ranges: list[tuple[int, int]] = []
        for part in text.split(","):
            match = _STATUS_PART.fullmatch(part)
            if match is None:
                raise problem
            low = int(match.group(1))
            high = int(match.group(2) or low)
            if not 100 <= low <= high <= 599:
                raise problem
            ranges.append((low, high))
        return cls(tuple(ranges))

    def __contains__(self, code: object) -> bool:
        return isinstance(code, int) and any(low <= code <= high for low, high in self.ranges)

    def __str__(self) -> str:
        return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in self.ranges)

    def __repr__(self) -> str:
        return f"StatusCodes({str(self)!r})"


class _BoundedBody(Protocol):
    """
    Collects at most C{limit} bytes of a response body.

    @ivar done: Fires with C{(body, truncated)} when the body ended or the
        limit was reached (the connection is then closed); fails if the
        connection was lost first.  Cancelling it closes the connection.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.done: Deferred[tuple[bytes, bool]] = Deferred(self._stop)

    def _stop(self, done: object) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        room = self._limit - self._size
        self._chunks.append(data[:room])
        self._size += min(len(data), room)
        if len(data) > room:
            self.done.callback((b"".join(self._chunks), True))
            transport: Any = self.transport
            transport.stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback((b"".join(self._chunks), False))
        else:
            self.done.errback(reason)


@implementer(IStreamClientEndpoint)
class _QuietEndpoint:
    """
    Connects through another endpoint with the given factory's C{noisy}
    turned off: the L{Agent}'s connection factory otherwise logs
    "Starting factory" and "Stopping factory" at every check.
    """

    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint

    def connect(self, protocolFactory: IProtocolFactory) -> "Deferred[IProtocol]":
        protocolFactory.noisy = False  # type: ignore[attr-defined]
        connecting: Deferred[IProtocol] = self._endpoint.connect(protocolFactory)
        return connecting


@implementer(IAgentEndpointFactory)
class _OneEndpoint:
    """
    Sends every request of an L{Agent} to one endpoint: the member's,
    whatever the URI (and the C{Host} header) say.
    """

    def __init__(self, endpoint: Any) -> None:
        self._endpoint = _QuietEndpoint(endpoint)

    def endpointForURI(self, uri: Any) -> Any:
        return self._endpoint


def _authority(member: Any) -> str:
    """
    C{host:port} with brackets around an IPv6 address.
    """
    address = member.address
    if isIPv6Address(address):
        address = f"[{address}]"
    return f"{address}:{member.port}"


@implementer(IHealthChecker)
class HTTPChecker:
    """
    The C{http} checker: a member is healthy if C{GET path} answers with an
    expected status and, if C{body_contains} is set, a body whose first
    L{BODY_LIMIT} bytes contain that text.

    HTTP/1.1 over plain TCP, or over TLS verified with the pool's backend TLS
    settings when it has them.  One connection per check (C{Connection:
    close}), closed when the check ends.

    @ivar path: The request path (with any query), bytes.
    @ivar statuses: The passing L{StatusCodes}.
    @ivar bodyContains: The text the body must contain, UTF-8, or L{None}.
    @ivar host: The C{Host} header, or L{None} for the member's address
        (with the port unless it is the scheme's default).
    """

    OPTIONS = ("path", "expected_status", "body_contains", "host")

    def __init__(
        self,
        reactor: Any,
        path: bytes = b"/",
        statuses: Optional[StatusCodes] = None,
        bodyContains: Optional[bytes] = None,
        host: Optional[bytes] = None,
        tls: Any = None,
        connectTimeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self.path = path
        self.statuses = statuses if statuses is not None else StatusCodes(((200, 399),))
        self.bodyContains = bodyContains
        self.host = host
        self._tls = tls
        self._connectTimeout = connectTimeout

    @classmethod
    def fromOptions(cls, reactor: Any, options: Mapping[str, Any], tls: Any) -> "HTTPChecker":
        """
        Make the checker from C{[pools.health_check]}: C{path} (default
        C{"/"}), C{expected_status} (default C{"200-399"}), C{body_contains}
        (default: not checked), C{host} (default: the member's address).

        @raise OptionError: For an unknown key or an invalid value.
        """
        for key in options:
            if key not in cls.OPTIONS:
                raise OptionError(key, f"unknown option; expected one of: {', '.join(cls.OPTIONS)}")
        path = options.get("path", "/")
        if (
            not isinstance(path, str)
            or not path.startswith("/")
            or not _HEADER_SAFE.fullmatch(path)
            or "#" in path
        ):
            raise OptionError(
                "path",
                f'expected a path starting with "/" such as "/healthz", got {describeValue(path)}',
            )
        statuses = StatusCodes.parse(options.get("expected_status", "200-399"))
        bodyContains = options.get("body_contains")
        if bodyContains is not None:
            if (
                not isinstance(bodyContains, str)
                or not bodyContains
                or len(bodyContains.encode("utf-8")) > BODY_LIMIT
            ):
                raise OptionError(
                    "body_contains",
                    f"expected a non-empty string of at most {BODY_LIMIT} bytes,"
                    f" got {describeValue(bodyContains)}",
                )
        host = options.get("host")
        if host is not None and (not isinstance(host, str) or not _HEADER_SAFE.fullmatch(host)):
            raise OptionError(
                "host",
                f'expected a host name such as "app.internal" or "app.internal:8080",'
                f" got {describeValue(host)}",
            )
        return cls(
            reactor,
            path=path.encode("ascii"),
            statuses=statuses,
            bodyContains=bodyContains.encode("utf-8") if bodyContains is not None else None,
            host=host.encode("ascii") if host is not None else None,
            tls=tls,
        )

    def check(self, member: Any) -> "Deferred[CheckResult]":
        """
        Send C{GET path} to C{member} and judge the response.

        @see: L{IHealthChecker.check}
        """
        if self._tls is not None:
            endpoint, _ = _tlsEndpoint(self._reactor, self._tls, member, self._connectTimeout)
            scheme = b"https"
        else:
            endpoint = _tcpEndpoint(self._reactor, member, self._connectTimeout)
            scheme = b"http"
        agent = Agent.usingEndpointFactory(self._reactor, _OneEndpoint(endpoint))
        authority = _authority(member)
        uri = scheme + b"://" + (_hostBytes(authority) or b"member") + self.path
        headers = Headers({b"User-Agent": [USER_AGENT]})
        if self.host is not None:
            headers.addRawHeader(b"Host", self.host)
        requesting = agent.request(b"GET", uri, headers)
        requesting.addCallback(self._response)
        return requesting.addErrback(_notCancelled)

    def _response(self, response: Any) -> "Deferred[CheckResult]":
        """
        Read at most L{BODY_LIMIT} bytes of the body, then judge.
        """
        reading = _BoundedBody(BODY_LIMIT)
        response.deliverBody(reading)
        code = response.code
        return reading.done.addCallback(lambda body: self._judge(code, *body))

    def _judge(self, code: int, body: bytes, truncated: bool) -> CheckResult:
        """
        Does status C{code} with C{body} pass?
        """
        if code not in self.statuses:
            return CheckResult(False, f"HTTP status {code}, expected {self.statuses}")
        if self.bodyContains is not None and self.bodyContains not in body:
            text = json.dumps(self.bodyContains.decode("utf-8"), ensure_ascii=False)
            if truncated:
                return CheckResult(
                    False,
                    f"HTTP {code}, but the first {BODY_LIMIT} bytes of the body"
                    f" do not contain {text}",
                )
            return CheckResult(False, f"HTTP {code}, but the body does not contain {text}")
        return CheckResult(True, f"HTTP {code}")

    def __repr__(self) -> str:
        return (
            f"<HTTPChecker path={self.path.decode('ascii')!r}"
            f" expected_status={str(self.statuses)!r}"
            f" tls={self._tls is not None}>"
        )
