# -*- test-case-name: tests.test_proxyprotocol -*-
"""
The PROXY protocol (HAProxy's, versions 1 and 2), both ways.

Sending, to backends (C{proxy_protocol = "v1"} or C{"v2"} on a pool): the
first bytes of every backend connection describe the client connection
(L{headerForConnection}, L{headerV1}, L{headerV2}); version 2 carries the
TLS facts and the client certificate's identity as TLVs
(L{mtlsproxy.identity.sslTLVs}).

Receiving, from a load balancer in front of a listener
(C{accept_proxy_protocol = true}): L{ProxyProtocolAcceptor} wraps the
listener's factory.  Every connection must come from an address in
C{trusted_proxies} and start with a PROXY header, v1 or v2 (parsed by
Twisted's own L{twisted.protocols.haproxy} parsers); only then does the
listener's protocol (TLS included) see the connection, with C{getPeer()}
and C{getHost()} returning the addresses the header names, so that the
access log, C{X-Forwarded-For} and the hash selectors see the real client.
A connection from any other address is refused before a byte is read, one
without a valid header within L{ProxyProtocolAcceptor.headerTimeout}
seconds is closed.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any, Final, Iterable, Optional, Sequence, Union

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from .identity import sslTLVs, tlsInfoOf

__all__ = [
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "Network",
    "ProxyProtocolAcceptor",
    "headerForConnection",
    "headerV1",
    "headerV2",
    "isTrusted",
    "parseNetworks",
]

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
"""
The 12 bytes every version 2 header starts with.
"""

V1_PREFIX: Final = b"PROXY "

V1_MAX_LENGTH: Final = 107
"""
The longest version 1 header, CRLF included.
"""

_V2_VERSION_PROXY: Final = 0x21
_V2_VERSION_LOCAL: Final = 0x20
_V2_TCP4: Final = 0x11
_V2_TCP6: Final = 0x21
_V2_UNSPEC: Final = 0x00

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


# ---------------------------------------------------------------------------
# Sending
# ---------------------------------------------------------------------------


def _ip(address: Optional[IAddress]) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    """
    The IP address of a Twisted address, an IPv4-mapped IPv6 address as
    IPv4; L{None} for anything that is not IP.
    """
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def headerV1(source: Optional[IAddress], destination: Optional[IAddress]) -> bytes:
    """
    A version 1 header: C{PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n}, or
    C{PROXY UNKNOWN\\r\\n} when the two addresses are not both IPv4 or both
    IPv6.
    """
    src, dst = _ip(source), _ip(destination)
    if src is None or dst is None or src.version != dst.version:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP4" if src.version == 4 else "TCP6"
    line = (
        f"PROXY {family} {src.compressed} {dst.compressed}"
        f" {getattr(source, 'port')} {getattr(destination, 'port')}\r\n"
    )
    return line.encode("ascii")


def headerV2(
    source: Optional[IAddress], destination: Optional[IAddress], tlvs: bytes = b""
) -> bytes:
    """
    A version 2 header with the PROXY command over TCP, the two addresses
    and C{tlvs} (already encoded).  When the addresses are not both IPv4 or
    both IPv6 the family is C{AF_UNSPEC}, without addresses (the receiver
    then uses the connection's own).

    @raise ValueError: If the header would exceed 65535 bytes after the
        fixed part.
    """
    src, dst = _ip(source), _ip(destination)
    if src is None or dst is None or src.version != dst.version:
        family, addresses = _V2_UNSPEC, b""
    else:
        family = _V2_TCP4 if src.version == 4 else _V2_TCP6
        addresses = src.packed + dst.packed + struct.pack(
            "!HH", getattr(source, "port"), getattr(destination, "port")
        )
    body = addresses + tlvs
    if len(body) > 0xFFFF:
        raise ValueError(f"PROXY v2 header of {len(body)} bytes is too long")
    return V2_SIGNATURE + struct.pack("!BBH", _V2_VERSION_PROXY, family, len(body)) + body


def headerForConnection(version: str, clientTransport: Any, includeCertificate: bool = False) -> bytes:
    """
    The header describing a client connection, to write first to its
    backend.

    @param version: C{"v1"} or C{"v2"}.
    @param clientTransport: The client protocol's transport: its
        C{getPeer()} is the source, C{getHost()} the destination, and for
        TLS its C{getHandle()} gives the TLVs (v2 only).
    @param includeCertificate: Add the client certificate in TLV
        L{mtlsproxy.identity.PP2_TYPE_MTLSPROXY_CERTIFICATE} (v2 only).
    @raise ValueError: For another C{version}.
    """
    source, destination = clientTransport.getPeer(), clientTransport.getHost()
    if version == "v1":
        return headerV1(source, destination)
    if version != "v2":
        raise ValueError(f"unknown PROXY protocol version {version!r}")
    tlvs = sslTLVs(tlsInfoOf(clientTransport), includeCertificate)
    try:
        return headerV2(source, destination, tlvs)
    except ValueError:
        # A certificate too large for the header: send it without.
        return headerV2(source, destination, sslTLVs(tlsInfoOf(clientTransport), False))


# ---------------------------------------------------------------------------
# Receiving
# ---------------------------------------------------------------------------


def parseNetworks(networks: Iterable[str]) -> tuple[Network, ...]:
    """
    Parse C{trusted_proxies}: CIDR blocks (C{"10.0.0.0/8"}) or single
    addresses (C{"127.0.0.1"}, C{"::1"}).

    @raise ValueError: For anything else, or host bits set.
    """
    return tuple(ipaddress.ip_network(n.strip(), strict=True) for n in networks)


def isTrusted(address: Optional[IAddress], networks: Sequence[Network]) -> bool:
    """
    Is C{address} (a peer address) inside one of C{networks}?  An
    IPv4-mapped IPv6 address counts as IPv4.
    """
    ip = _ip(address)
    if ip is None:
        return False
    return any(ip.version == n.version and ip in n for n in networks)


def _normalized(address: Optional[IAddress]) -> Optional[IAddress]:
    """
    An address from a parsed header with its IP in canonical text
    (Twisted's v2 parser writes IPv6 without C{::} compression).
    """
    ip = _ip(address)
    if ip is None or not isinstance(address, (IPv4Address, IPv6Address)):
        return address
    if ip.version == 4:
        return IPv4Address(address.type, ip.compressed, address.port)
    return IPv6Address(address.type, ip.compressed, address.port)


@implementer(IHalfCloseableProtocol)
class _ProxyHeaderReader(ProtocolWrapper):
    """
    Reads the PROXY header of one connection, then connects the listener's
    protocol to it and gets out of the way.

    Until the header is complete the wrapped protocol is not connected at
    all (its C{connectionMade} has not run), so nothing reads the peer's
    address too early.

    @ivar _info: The parsed header, once complete.
    """

    factory: ProxyProtocolAcceptor
    transport: Any

    log = Logger()

    def __init__(self, factory: ProxyProtocolAcceptor, wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol)  # type: ignore[arg-type]
        self._buffer = b""
        self._parser: Union[V1Parser, V2Parser, None] = None
        self._info: Any = None
        self._source: Optional[IAddress] = None
        self._destination: Optional[IAddress] = None
        self._passing = False
        self._deadline: Optional[IDelayedCall] = None

    def makeConnection(self, transport: Any) -> None:
        """
        Keep the wrapped protocol unconnected until the header is read.
        """
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def connectionMade(self) -> None:
        """
        Refuse an untrusted peer at once; give a trusted one
        C{headerTimeout} seconds for its header.
        """
        peer = self.transport.getPeer()
        if not isTrusted(peer, self.factory.trusted):
            self._refuse("untrusted_proxy", "peer is not in trusted_proxies")
            return
        self._deadline = self.factory.clock.callLater(self.factory.headerTimeout, self._timedOut)

    def _timedOut(self) -> None:
        self._deadline = None
        self._refuse("proxy_header_timeout", f"no PROXY header within {self.factory.headerTimeout}s")

    def _refuse(self, reason: str, detail: str) -> None:
        """
        Close the connection without the listener ever seeing it.
        """
        self._cancelDeadline()
        self.log.warn(
            "Listener {listener}: refused connection from {peer}: {reason} ({detail})",
            listener=self.factory.listenerName,
            peer=_describe(self.transport.getPeer()),
            reason=reason,
            detail=detail,
        )
        self.transport.abortConnection()

    def _cancelDeadline(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def dataReceived(self, data: bytes) -> None:
        """
        Before the header is complete, parse; after, pass everything on.
        """
        if self._passing:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._info is not None or self.transport.disconnecting:
            return
        if self._parser is None:
            self._buffer += data
            head = self._buffer
            if head.startswith(V2_SIGNATURE):
                if len(head) < 16:
                    return
                self._parser = V2Parser()
            elif head.startswith(V1_PREFIX):
                self._parser = V1Parser()
            elif V2_SIGNATURE.startswith(head) or V1_PREFIX.startswith(head):
                # Too short to tell yet.
                return
            else:
                self._refuse(
                    "invalid_proxy_header", "the connection does not start with a PROXY header"
                )
                return
            data, self._buffer = head, b""
        try:
            info, remaining = self._parser.feed(data)
        except (InvalidProxyHeader, ValueError, UnicodeDecodeError, KeyError) as e:
            self._refuse("invalid_proxy_header", f"invalid PROXY header: {type(e).__name__}")
            return
        if info is None:
            return
        self._cancelDeadline()
        self._info = info
        self._source = _normalized(info.source)
        self._destination = _normalized(info.destination)
        self._passing = True
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]
        if remaining and self._passing and not self.transport.disconnecting:
            self.wrappedProtocol.dataReceived(remaining)

    def getPeer(self) -> IAddress:
        """
        The client's address as the header says (the load balancer's own
        for a C{LOCAL} or C{UNKNOWN} header).
        """
        if self._source is not None:
            return self._source
        return self.transport.getPeer()  # type: ignore[no-any-return]

    def getHost(self) -> IAddress:
        """
        The address the client connected to as the header says.
        """
        if self._destination is not None:
            return self._destination
        return self.transport.getHost()  # type: ignore[no-any-return]

    def readConnectionLost(self) -> None:
        """
        The peer sent EOF: pass it on if the wrapped protocol can be
        half-closed, else close.
        """
        if self._passing and IHalfCloseableProtocol.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """
        Our EOF went out: pass it on if the wrapped protocol wants to know.
        """
        if self._passing and IHalfCloseableProtocol.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        The connection is gone: tell the wrapped protocol if it ever saw it.
        """
        self._cancelDeadline()
        self.factory.unregisterProtocol(self)
        if self._passing:
            self._passing = False
            self.wrappedProtocol.connectionLost(reason)


def _describe(address: Any) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ProxyProtocolAcceptor(WrappingFactory["_ProxyHeaderReader"]):
    """
    Wraps a listener's factory (the TLS one for C{tls} and C{https}
    listeners) so that every connection must come from a trusted proxy and
    start with a PROXY header; see the module docstring.

    @ivar trusted: The networks connections are accepted from.
    @ivar clock: Provides C{callLater} for the header deadline.
    @ivar listenerName: For the log.
    @ivar headerTimeout: Seconds a trusted peer has to send its header.
    """

    protocol = _ProxyHeaderReader
    noisy = False

    headerTimeout = 10.0

    def __init__(
        self,
        wrappedFactory: Any,
        trusted: Sequence[Network],
        clock: Any,
        listenerName: str,
    ) -> None:
        super().__init__(wrappedFactory)
        self.trusted = tuple(trusted)
        self.clock = clock
        self.listenerName = listenerName

    def logPrefix(self) -> str:
        return f"{super().logPrefix()} (PROXY)"
