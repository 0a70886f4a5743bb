"""
Tests for L{mtlsproxy_example.checkers}: the C{banner} checker in memory
(L{MemoryReactorClock} records the connection, a L{StringTransport} plays
the member) and against real servers on 127.0.0.1.
"""

from __future__ import annotations

from typing import Any, Generator

from twisted.internet import reactor as _globalReactor
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mtlsproxy.errors import ConfigurationError
from mtlsproxy.health import CheckResult, checkOnce, parseHealthCheck
from mtlsproxy.interfaces import IHealthChecker, IHealthCheckerFactory
from mtlsproxy.testing import FakeMember
from twisted.plugins.mtlsproxy_example_plugin import banner

from ..checkers import BannerChecker

reactor: Any = _globalReactor


class BannerCheckerTests(SynchronousTestCase):
    """
    Tests for L{BannerChecker} and its plugin, without sockets.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.checker = banner.newChecker(
            self.reactor, {"send": "PING\r\n", "expect": "+PONG"}, None
        )
        self.member = FakeMember("127.0.0.1", 6379)

    def connect(self, checker: Any = None) -> tuple[Deferred[CheckResult], Any, StringTransport]:
        """
        Start a check and let the member accept the connection: the check's
        Deferred, the protocol and the member's end of the transport.
        """
        checking = (checker or self.checker).check(self.member)
        self.reactor.advance(0)  # HostnameEndpoint starts its attempts
        host, port, factory, timeout, bindAddress = self.reactor.tcpClients[-1]
        self.assertEqual(port, 6379)
        protocol: Any = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return checking, protocol, transport

    def test_interfaces(self) -> None:
        """
        When checked with verifyObject, the plugin and its checker provide
        their interfaces.
        """
        self.assertTrue(verifyObject(IHealthCheckerFactory, banner))
        self.assertTrue(verifyObject(IHealthChecker, self.checker))
        self.assertIsInstance(self.checker, BannerChecker)
        self.assertEqual(banner.name, "banner")
        self.assertEqual(set(banner.options), {"send", "expect"})

    def test_expectedAnswer(self) -> None:
        """
        When the member answers the request with the expected text, it is
        healthy and the connection is closed.
        """
        checking, protocol, transport = self.connect()
        self.assertEqual(transport.value(), b"PING\r\n")
        protocol.dataReceived(b"+PONG\r\n")
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.successResultOf(checking), CheckResult(True, 'answered "+PONG"'))

    def test_firesOnlyOnceClosed(self) -> None:
        """
        When the first line has come but the connection is not closed yet,
        the check has not fired: nothing is left open when it does.
        """
        checking, protocol, transport = self.connect()
        protocol.dataReceived(b"+PONG\r\n")
        self.assertNoResult(checking)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.successResultOf(checking).healthy)

    def test_lineInPieces(self) -> None:
        """
        When the first line arrives in pieces, followed by more lines, only
        the first line is judged.
        """
        checking, protocol, transport = self.connect()
        for piece in [b"+PO", b"NG\r", b"\n-ERR later\r\n"]:
            protocol.dataReceived(piece)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.successResultOf(checking), CheckResult(True, 'answered "+PONG"'))

    def test_otherAnswer(self) -> None:
        """
        When the member answers something else, it is unhealthy and the
        reason shows the answer.
        """
        checking, protocol, transport = self.connect()
        protocol.dataReceived(b"-LOADING\r\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            self.successResultOf(checking),
            CheckResult(False, 'answered "-LOADING", expected "+PONG"'),
        )

    def test_longAnswerShortened(self) -> None:
        """
        When the answer is long, the reason quotes only its first 60 bytes.
        """
        checking, protocol, transport = self.connect()
        protocol.dataReceived(b"x" * 100 + b"\r\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            self.successResultOf(checking),
            CheckResult(False, f'answered "{"x" * 60}", expected "+PONG"'),
        )

    def test_nothingSent(self) -> None:
        """
        When C{send} is not set, nothing is sent and the member's greeting
        is judged: an SMTP server's C{220}.
        """
        checker = banner.newChecker(self.reactor, {"expect": "220 "}, None)
        checking, protocol, transport = self.connect(checker)
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(b"220 mail.example ESMTP\r\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            self.successResultOf(checking),
            CheckResult(True, 'answered "220 mail.example ESMTP"'),
        )

    def test_closedBeforeLine(self) -> None:
        """
        When the member closes the connection before a whole line, it is
        unhealthy: connection closed.
        """
        checking, protocol, transport = self.connect()
        protocol.dataReceived(b"+PON")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.successResultOf(checking), CheckResult(False, "connection closed"))

    def test_refused(self) -> None:
        """
        When the connection is refused, the member is unhealthy.
        """
        checking = self.checker.check(self.member)
        self.reactor.advance(0)
        factory = self.reactor.tcpClients[-1][2]
        factory.clientConnectionFailed(
            self.reactor.connectors[-1], Failure(ConnectionRefusedError())
        )
        self.reactor.advance(1)
        self.assertEqual(self.successResultOf(checking), CheckResult(False, "connection refused"))

    def test_cancelAbortsConnection(self) -> None:
        """
        When the check is cancelled (the pool's timeout), the connection is
        aborted.
        """
        checking, protocol, transport = self.connect()
        checking.cancel()
        self.assertTrue(transport.disconnected)
        self.failureResultOf(checking, CancelledError)

    def test_timeoutUnderCheckOnce(self) -> None:
        """
        When the member never answers and the pool's C{timeout} passes, the
        check fails with a timeout and its connection is aborted.
        """
        checking = checkOnce(self.reactor, self.checker, self.member, 2.0)
        self.reactor.advance(0)
        protocol: Any = self.reactor.tcpClients[-1][2].buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.reactor.advance(1.9)
        self.assertNoResult(checking)
        self.reactor.advance(0.1)
        self.assertTrue(transport.disconnected)
        self.assertEqual(
            self.successResultOf(checking), CheckResult(False, "timeout after 2.0s")
        )

    def test_options(self) -> None:
        """
        When the configuration leaves out expect, the error names the key.
        """
        with self.assertRaises(ConfigurationError) as caught:
            parseHealthCheck(
                {"type": "banner", "send": "PING\r\n"}, "pools[0].health_check",
                {"banner": banner},
            )
        self.assertEqual(
            str(caught.exception),
            'pools[0].health_check.expect: required: the start of the answer, such as "220 "',
        )

    def test_badOptionValues(self) -> None:
        """
        When C{expect} is empty or not a string, or C{send} is not a string,
        the error names the key and says what was expected and what it got.
        """
        cases: list[tuple[dict[str, object], str]] = [
            ({"expect": ""}, 'expect: expected a non-empty string, got ""'),
            ({"expect": 220}, "expect: expected a non-empty string, got integer 220"),
            ({"expect": "+PONG", "send": ["PING"]}, "send: expected a string, got an array"),
        ]
        for options, message in cases:
            with self.assertRaises(ConfigurationError) as caught:
                parseHealthCheck(
                    {"type": "banner", **options}, "pools[0].health_check", {"banner": banner}
                )
            self.assertEqual(str(caught.exception), f"pools[0].health_check.{message}")

    def test_unknownOption(self) -> None:
        """
        When the table has a key the checker does not declare, the proxy
        refuses it before the checker sees it, listing the keys it accepts.
        """
        with self.assertRaises(ConfigurationError) as caught:
            parseHealthCheck(
                {"type": "banner", "expect": "+PONG", "path": "/"},
                "pools[0].health_check",
                {"banner": banner},
            )
        self.assertIn("unknown key 'path'", str(caught.exception))
        self.assertIn("send, expect", str(caught.exception))

    def test_validConfiguration(self) -> None:
        """
        When the table is valid, the common keys and the checker's options
        are kept apart.
        """
        config = parseHealthCheck(
            {"type": "banner", "interval": 10, "send": "PING\r\n", "expect": "+PONG"},
            "pools[0].health_check",
            {"banner": banner},
        )
        self.assertEqual(config.interval, 10.0)
        self.assertEqual(dict(config.options), {"send": "PING\r\n", "expect": "+PONG"})


class _Tracker(WrappingFactory):
    """
    Wraps a server factory, counts the connections it accepts and can wait
    until all of them are closed.
    """

    def __init__(self, wrappedFactory: Any) -> None:
        super().__init__(wrappedFactory)
        self._waiting: list[Deferred[None]] = []
        self.accepted = 0

    def registerProtocol(self, p: Any) -> None:
        self.accepted += 1
        super().registerProtocol(p)

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def allClosed(self) -> Deferred[None]:
        """
        A Deferred that fires once no accepted connection is open.
        """
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d


class _Greeter(Protocol):
    """
    Greets like an SMTP server, then waits for the client to close.
    """

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(b"220 mail.example ESMTP\r\n")


class _Ponger(Protocol):
    """
    Answers C{PING} with C{+PONG}, like Redis.
    """

    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport
        if data.startswith(b"PING"):
            transport.write(b"+PONG\r\n")


class RealServerTests(TestCase):
    """
    Tests for L{BannerChecker} with the real reactor against servers on
    127.0.0.1.  Every test that connects waits until the server's side of
    the connection is closed too, so a check that leaves its connection open
    fails.
    """

    timeout = 30

    def listen(self, protocol: type[Protocol]) -> tuple[_Tracker, FakeMember]:
        """
        Start a server on 127.0.0.1 with C{protocol}, stopped (and its
        connections waited for) at the end: its tracker and a member for it.
        """
        tracker = _Tracker(Factory.forProtocol(protocol))
        port = reactor.listenTCP(0, tracker, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(tracker.allClosed)
        return tracker, FakeMember("127.0.0.1", port.getHost().port)

    @inlineCallbacks
    def test_greeting(self) -> Generator[Any, Any, None]:
        """
        When a real server greets with the expected text, the member is
        healthy and the connection is closed.
        """
        tracker, member = self.listen(_Greeter)
        checker = BannerChecker.fromOptions(reactor, {"expect": "220 "}, None)
        result = yield checker.check(member)
        self.assertEqual(result, CheckResult(True, 'answered "220 mail.example ESMTP"'))
        yield tracker.allClosed()
        self.assertEqual(tracker.accepted, 1)

    @inlineCallbacks
    def test_requestAndAnswer(self) -> Generator[Any, Any, None]:
        """
        When a real server answers the request, the answer is judged.
        """
        tracker, member = self.listen(_Ponger)
        checker = BannerChecker.fromOptions(reactor, {"send": "PING\r\n", "expect": "+PONG"}, None)
        result = yield checker.check(member)
        self.assertEqual(result, CheckResult(True, 'answered "+PONG"'))
        wrong = BannerChecker.fromOptions(reactor, {"send": "PING\r\n", "expect": "-ERR"}, None)
        result = yield wrong.check(member)
        self.assertEqual(result, CheckResult(False, 'answered "+PONG", expected "-ERR"'))
        yield tracker.allClosed()
        self.assertEqual(tracker.accepted, 2)

    @inlineCallbacks
    def test_refused(self) -> Generator[Any, Any, None]:
        """
        When nothing listens, the member is unhealthy: connection refused.
        """
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        checker = BannerChecker.fromOptions(reactor, {"expect": "220 "}, None)
        result = yield checker.check(FakeMember("127.0.0.1", number))
        self.assertEqual(result, CheckResult(False, "connection refused"))

    @inlineCallbacks
    def test_timeoutClosesConnection(self) -> Generator[Any, Any, None]:
        """
        When a real server accepts but never says anything, the check times
        out and the connection is closed.
        """
        tracker, member = self.listen(Protocol)
        checker = BannerChecker.fromOptions(reactor, {"expect": "220 "}, None)
        result = yield checkOnce(reactor, checker, member, 0.3)
        self.assertEqual(result, CheckResult(False, "timeout after 0.3s"))
        yield tracker.allClosed()
        self.assertEqual(tracker.accepted, 1)
