# -*- test-case-name: tests.test_proxyprotocol -*-
"""
Tests for L{mtlsproxy.proxyprotocol}: the headers written to backends
(read back with Twisted's parsers and with the C{proxy-protocol} package),
and L{ProxyProtocolAcceptor} in front of a listener.
"""

from __future__ import annotations

from ipaddress import IPv4Address as IP4, IPv6Address as IP6
from typing import Any, Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from proxyprotocol.v2 import ProxyProtocolV2
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mtlsproxy.identity import PP2_TYPE_SSL
from mtlsproxy.proxyprotocol import (
    V2_SIGNATURE,
    ProxyProtocolAcceptor,
    headerForConnection,
    headerV1,
    headerV2,
    isTrusted,
    parseNetworks,
)

SRC4 = IPv4Address("TCP", "203.0.113.7", 40000)
DST4 = IPv4Address("TCP", "192.0.2.1", 443)
SRC6 = IPv6Address("TCP", "2001:db8::7", 40000)
DST6 = IPv6Address("TCP", "2001:db8::1", 443)


class SendingTests(SynchronousTestCase):
    """
    L{headerV1}, L{headerV2}, L{headerForConnection}.
    """

    def test_v1(self) -> None:
        """
        Version 1 is one text line; mixed or non-IP addresses are UNKNOWN.
        """
        self.assertEqual(headerV1(SRC4, DST4), b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 443\r\n")
        self.assertEqual(headerV1(SRC6, DST6), b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n")
        self.assertEqual(headerV1(SRC4, DST6), b"PROXY UNKNOWN\r\n")
        self.assertEqual(headerV1(UNIXAddress(b"/s"), DST4), b"PROXY UNKNOWN\r\n")
        info = V1Parser.parse(headerV1(SRC4, DST4)[:-2])
        self.assertEqual((info.source.host, info.source.port), ("203.0.113.7", 40000))

    def test_v2ParsedByTwisted(self) -> None:
        """
        Twisted's v2 parser reads our addresses, IPv4 and IPv6, and skips
        our TLVs.
        """
        header = headerV2(SRC4, DST4, b"\xe1\x00\x01x")
        info, rest = V2Parser().feed(header + b"payload")
        self.assertEqual(rest, b"payload")
        self.assertEqual((info.source.host, info.source.port), ("203.0.113.7", 40000))
        self.assertEqual((info.destination.host, info.destination.port), ("192.0.2.1", 443))
        info, _ = V2Parser().feed(headerV2(SRC6, DST6))
        self.assertEqual(IP6(info.source.host), IP6("2001:db8::7"))

    def test_v2ParsedByPackage(self) -> None:
        """
        The C{proxy-protocol} package reads our addresses and TLVs.
        """
        result = ProxyProtocolV2().unpack(headerV2(SRC4, DST4, b"\x02\x00\x03a.b"))
        self.assertEqual(result.source, (IP4("203.0.113.7"), 40000))
        self.assertEqual(result.dest, (IP4("192.0.2.1"), 443))
        self.assertEqual(result.tlv.authority, "a.b")

    def test_v2Unspec(self) -> None:
        """
        When the two addresses are of different families, the header is
        AF_UNSPEC without addresses; an IPv4-mapped IPv6 address counts as
        IPv4.
        """
        header = headerV2(SRC4, DST6)
        self.assertEqual(header[13], 0x00)
        self.assertEqual(header[14:16], b"\x00\x00")
        mapped = IPv6Address("TCP", "::ffff:203.0.113.7", 1)
        self.assertEqual(headerV2(mapped, DST4)[13], 0x11)

    def test_forTLSConnection(self) -> None:
        """
        For a client connection, the source is its peer and the destination
        its host; a plain TCP transport gives no TLVs.
        """
        transport = StringTransport(hostAddress=DST4, peerAddress=SRC4)
        self.assertEqual(headerForConnection("v2", transport), headerV2(SRC4, DST4))
        self.assertEqual(headerForConnection("v1", transport), headerV1(SRC4, DST4))
        self.assertRaises(ValueError, headerForConnection, "v3", transport)

    def test_tooLong(self) -> None:
        """
        A header longer than the 16-bit length allows is refused.
        """
        self.assertRaises(ValueError, headerV2, SRC4, DST4, b"x" * 70000)


class TrustTests(SynchronousTestCase):
    """
    L{parseNetworks}, L{isTrusted}.
    """

    def test_trusted(self) -> None:
        """
        Addresses inside a configured block are trusted, others are not;
        IPv4-mapped IPv6 counts as IPv4.
        """
        networks = parseNetworks(["127.0.0.1/32", "10.0.0.0/8", "::1"])
        self.assertTrue(isTrusted(IPv4Address("TCP", "127.0.0.1", 1), networks))
        self.assertTrue(isTrusted(IPv4Address("TCP", "10.2.3.4", 1), networks))
        self.assertTrue(isTrusted(IPv6Address("TCP", "::1", 1), networks))
        self.assertTrue(isTrusted(IPv6Address("TCP", "::ffff:10.0.0.1", 1), networks))
        self.assertFalse(isTrusted(IPv4Address("TCP", "127.0.0.2", 1), networks))
        self.assertFalse(isTrusted(UNIXAddress(b"/x"), networks))


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """
    The listener's protocol: records what it sees.
    """

    def __init__(self) -> None:
        self.data = b""
        self.peer: Any = None
        self.host: Any = None
        self.made = False
        self.lost = False
        self.readLost = False

    def connectionMade(self) -> None:
        self.made = True
        assert self.transport is not None
        self.peer = self.transport.getPeer()
        self.host = self.transport.getHost()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.readLost = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost = True


class AbortRecordingTransport(StringTransport):
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True


class AcceptorTests(SynchronousTestCase):
    """
    L{ProxyProtocolAcceptor}.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.recorders: list[Recorder] = []

        def build() -> Recorder:
            r = Recorder()
            self.recorders.append(r)
            return r

        self.factory = ProxyProtocolAcceptor(
            Factory.forProtocol(build), parseNetworks(["127.0.0.1/32"]), self.clock, "lb"
        )
        self.observer = EventLoggingObserver()
        globalLogPublisher.addObserver(self.observer)
        self.addCleanup(globalLogPublisher.removeObserver, self.observer)

    def connect(self, peer: str = "127.0.0.1") -> tuple[Any, AbortRecordingTransport, Recorder]:
        address = IPv4Address("TCP", peer, 5555)
        protocol = self.factory.buildProtocol(address)
        transport = AbortRecordingTransport(peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 8443))
        protocol.makeConnection(transport)
        return protocol, transport, self.recorders[-1]

    def refusals(self) -> list[str]:
        return [e["reason"] for e in self.observer if "refused connection" in e.get("log_format", "")]

    def test_v2(self) -> None:
        """
        After a v2 header from a trusted proxy, the listener's protocol is
        connected and sees the header's addresses, and the bytes after it.
        """
        protocol, transport, recorder = self.connect()
        self.assertFalse(recorder.made)
        protocol.dataReceived(headerV2(SRC4, DST4) + b"hello")
        self.assertTrue(recorder.made)
        self.assertEqual((recorder.peer.host, recorder.peer.port), ("203.0.113.7", 40000))
        self.assertEqual((recorder.host.host, recorder.host.port), ("192.0.2.1", 443))
        self.assertEqual(recorder.data, b"hello")
        protocol.dataReceived(b" world")
        self.assertEqual(recorder.data, b"hello world")

    def test_v2IPv6Canonical(self) -> None:
        """
        An IPv6 source from a v2 header is in canonical (compressed) form.
        """
        protocol, transport, recorder = self.connect()
        protocol.dataReceived(headerV2(SRC6, DST6))
        self.assertEqual(recorder.peer.host, "2001:db8::7")

    def test_v1(self) -> None:
        """
        A v1 header works the same.
        """
        protocol, transport, recorder = self.connect()
        protocol.dataReceived(b"PROXY TCP4 198.51.100.9 192.0.2.1 1234 443\r\nGET")
        self.assertEqual(recorder.peer.host, "198.51.100.9")
        self.assertEqual(recorder.data, b"GET")

    def test_localCommand(self) -> None:
        """
        A v2 LOCAL header (the balancer's own health check) leaves the real
        addresses.
        """
        protocol, transport, recorder = self.connect()
        local = V2_SIGNATURE + b"\x20\x00\x00\x00"
        protocol.dataReceived(local)
        self.assertEqual(recorder.peer.host, "127.0.0.1")

    def test_untrustedRefused(self) -> None:
        """
        A connection from outside C{trusted_proxies} is aborted before a
        byte is read, whatever it sends; the listener never sees it.
        """
        protocol, transport, recorder = self.connect("192.0.2.99")
        self.assertTrue(transport.aborted)
        protocol.dataReceived(headerV2(SRC4, DST4) + b"x")
        self.assertFalse(recorder.made)
        self.assertEqual(self.refusals(), ["untrusted_proxy"])

    def test_noHeaderRefused(self) -> None:
        """
        A trusted peer that does not start with a PROXY header is refused.
        """
        protocol, transport, recorder = self.connect()
        protocol.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        self.assertTrue(transport.aborted)
        self.assertFalse(recorder.made)
        self.assertEqual(self.refusals(), ["invalid_proxy_header"])

    def test_invalidHeaderRefused(self) -> None:
        """
        A header that does not parse is refused.
        """
        protocol, transport, recorder = self.connect()
        protocol.dataReceived(b"PROXY TCP4 nonsense\r\n")
        self.assertTrue(transport.aborted)
        self.assertFalse(recorder.made)

    def test_headerTimeout(self) -> None:
        """
        A trusted peer that sends no complete header within the timeout is
        refused.
        """
        protocol, transport, recorder = self.connect()
        protocol.dataReceived(b"PROXY TCP4 ")
        self.clock.advance(ProxyProtocolAcceptor.headerTimeout + 1)
        self.assertTrue(transport.aborted)
        self.assertEqual(self.refusals(), ["proxy_header_timeout"])

    def test_halfCloseForwarded(self) -> None:
        """
        After the header, the peer's EOF reaches a half-closeable listener
        protocol; before it, EOF closes.
        """
        protocol, transport, recorder = self.connect()
        protocol.dataReceived(headerV2(SRC4, DST4))
        protocol.readConnectionLost()
        self.assertTrue(recorder.readLost)
        protocol.connectionLost(Failure(Exception("gone")))
        self.assertTrue(recorder.lost)

    @given(st.binary(max_size=300), st.data(), st.booleans())
    @settings(max_examples=100, deadline=None)
    def test_anySplit(self, payload: bytes, data: st.DataObject, v2: bool) -> None:
        """
        However the header and the data after it are split into reads, the
        listener sees the same addresses and bytes.
        """
        self.recorders.clear()
        header = headerV2(SRC4, DST4, b"\xe0\x00\x04abcd") if v2 else headerV1(SRC4, DST4)
        stream = header + payload
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
        protocol, transport, recorder = self.connect()
        last = 0
        for cut in cuts + [len(stream)]:
            if cut > last:
                protocol.dataReceived(stream[last:cut])
            last = cut
        self.assertFalse(transport.aborted)
        self.assertEqual(recorder.peer.host, "203.0.113.7")
        self.assertEqual(recorder.data, payload)

    def test_tlvsFromTLSConnection(self) -> None:
        """
        For a TLS client connection, the v2 header carries the SSL TLV.
        """
        from proxyprotocol.tlv import ProxyProtocolTLV

        from tests.test_identity import _handshake

        serverTLS = _handshake("client", passthrough=False)
        header = headerForConnection("v2", serverTLS, includeCertificate=True)
        # iosim's addresses are not IP: AF_UNSPEC, TLVs right after the
        # fixed part.
        self.assertEqual(header[13], 0x00)
        tlvs = ProxyProtocolTLV(header[16:])
        self.assertTrue(tlvs.ssl.has_ssl)
        self.assertTrue(tlvs.ssl.verified)
        self.assertEqual(tlvs.ssl.cn, "svc-a")
        self.assertEqual(tlvs.authority, "localhost")
        self.assertIn(PP2_TYPE_SSL, tlvs)
        self.assertIn(0xE0, tlvs)
