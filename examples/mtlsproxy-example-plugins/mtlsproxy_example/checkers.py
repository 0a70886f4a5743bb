# -*- test-case-name: mtlsproxy_example.test.test_checkers -*-
"""
The C{banner} health checker: a member is healthy if the first line it
sends, after an optional request, starts with the expected text (an SMTP
server's C{220} greeting, Redis answering C{PING} with C{+PONG}).

    [pools.health_check]
    type = "banner"
    send = "PING\\r\\n"
    expect = "+PONG"

The plugin object that makes C{type = "banner"} work is declared in
C{twisted/plugins/mtlsproxy_example_plugin.py} by the dotted name of
L{BannerChecker.fromOptions}, so that Twisted's plugin scan does not import
this module.  This is the checker walked through in mtlsproxy's
C{docs/health-checks.md} ("Example: a banner checker").
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from mtlsproxy.checkers import describeFailure
from mtlsproxy.health import CheckResult, OptionError, describeValue
from mtlsproxy.interfaces import IHealthChecker

__all__ = ["BannerChecker"]


class _FirstLine(LineOnlyReceiver):
    """
    Sends the request once connected and closes the connection after the
    first line.  C{line} fires with that line once the connection is closed,
    or fails with the reason it closed before one came; cancelling it aborts
    the connection.
    """

    delimiter = b"\n"
    MAX_LENGTH = 4096

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._received: Optional[bytes] = None
        self.line: Deferred[bytes] = Deferred(self._abort)

    def _abort(self, line: Deferred[bytes]) -> None:
        # The pool's timeout cancelled the check: close the connection now.
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if self._request:
            transport.write(self._request)

    def lineReceived(self, line: bytes) -> None:
        transport: Any = self.transport
        if self._received is None:
            self._received = line.rstrip(b"\r")
            transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.line.called:
            return
        if self._received is not None:
            self.line.callback(self._received)
        else:
            self.line.errback(reason)


@implementer(IHealthChecker)
class BannerChecker:
    """
    Connects, sends C{request}, and passes if the first line of the answer
    starts with C{expect}.

    One connection per check, closed when the check ends (or aborted when the
    pool's C{timeout} cancels it); per-check state lives in the protocol, so
    one checker can check every member of a pool at once.
    """

    def __init__(self, reactor: Any, request: bytes, expect: bytes) -> None:
        """
        @param reactor: The reactor to connect with (never the global one).
        @param request: Bytes to send once connected; C{b""} to send nothing.
        @param expect: The bytes the first line must start with.
        """
        self._reactor = reactor
        self._request = request
        self._expect = expect

    @classmethod
    def fromOptions(
        cls, reactor: Any, options: Mapping[str, Any], tls: Any
    ) -> "BannerChecker":
        """
        Validate the options and make the checker; only builds an object
        (mtlsproxy calls this once with a fake reactor just to validate).

        @param options: C{expect} (required) and C{send} (default: nothing),
            strings.
        @param tls: The pool's backend TLS settings; ignored, this checker
            speaks plain TCP.

        @raise OptionError: If C{expect} is missing or not a non-empty
            string, or C{send} is not a string.
        """
        if "expect" not in options:
            raise OptionError("expect", 'required: the start of the answer, such as "220 "')
        expect = options["expect"]
        if not isinstance(expect, str) or not expect:
            raise OptionError("expect", f"expected a non-empty string, got {describeValue(expect)}")
        send = options.get("send", "")
        if not isinstance(send, str):
            raise OptionError("send", f"expected a string, got {describeValue(send)}")
        return cls(reactor, send.encode("utf-8"), expect.encode("utf-8"))

    def check(self, member: Any) -> Deferred[CheckResult]:
        """
        Connect to C{member}, send the request, read the first line and
        judge it; fires once the connection is closed.

        @see: L{IHealthChecker.check}
        """
        endpoint: Any = HostnameEndpoint(self._reactor, member.address, member.port)
        connecting: Deferred[Any] = endpoint.connect(Factory.forProtocol(lambda: _FirstLine(self._request)))
        connecting.addCallback(lambda protocol: protocol.line)
        connecting.addCallbacks(self._judge, self._failed)
        return connecting

    def _judge(self, line: bytes) -> CheckResult:
        """
        Does the first line start with the expected text?  The reason quotes
        (the start of) the answer either way.
        """
        answer = json.dumps(line[:60].decode("utf-8", "replace"))
        if line.startswith(self._expect):
            return CheckResult(True, f"answered {answer}")
        expected = json.dumps(self._expect.decode("utf-8"))
        return CheckResult(False, f"answered {answer}, expected {expected}")

    def _failed(self, failure: Failure) -> Any:
        """
        Turn a failed connection into an unhealthy result with a short
        reason, but let cancellation through.
        """
        if failure.check(CancelledError):
            return failure
        return CheckResult(False, describeFailure(failure))

    def __repr__(self) -> str:
        return f"<BannerChecker expect={self._expect!r}>"
