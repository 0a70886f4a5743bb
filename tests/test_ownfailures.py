# -*- test-case-name: tests.test_ownfailures -*-
"""
Tests for connection attempts that fail because the proxy itself is out of
resources (L{mtlsproxy.pool.localResourceError}): they are logged as the
proxy's problem and do not count towards a member's passive ejection, in
the layer-4 relay (L{mtlsproxy.relay}) and the HTTP proxy
(L{mtlsproxy.http}), while a refused connection still does.

The relay and HTTP tests run in memory (L{MemoryReactorClock}, the failure
delivered to the attempt's C{clientConnectionFailed} as the reactor would);
L{TwistedDeliveryTests} checks in a child process, with a real descriptor
limit, what Twisted actually delivers.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from typing import Any

from twisted.internet.error import (
    ConnectBindError,
    ConnectError,
    ConnectionRefusedError,
    TimeoutError,
    getConnectError,
)
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mtlsproxy.health import PassiveEjectionConfig
from mtlsproxy.pool import LOCAL_CONNECT_FAILED_FORMAT, localResourceError
from tests.test_http import HTTPHarness
from tests.test_relay import RelayHarness

EMFILE_TEXT = os.strerror(errno.EMFILE)


def _observe(testCase: SynchronousTestCase) -> EventLoggingObserver:
    return EventLoggingObserver.createWithCleanup(testCase, globalLogPublisher)  # type: ignore[arg-type]


def _ownErrors(observer: EventLoggingObserver) -> list[Any]:
    return [e for e in observer if e.get("log_format") == LOCAL_CONNECT_FAILED_FORMAT]


def _ejectAfterOne(members: list[Any]) -> None:
    """
    Eject a member on its first counted failure, so that a failure that
    counts shows at once.
    """
    for member in members:
        member.ejectionConfig = PassiveEjectionConfig(eject_after=1)


class LocalResourceErrorTests(SynchronousTestCase):
    """
    Tests for L{localResourceError}.
    """

    def test_ownErrors(self) -> None:
        """
        When a connection attempt failed with EMFILE or ENFILE (from
        C{socket()}: Twisted's C{ConnectBindError}), ENOBUFS, ENOMEM or
        EADDRNOTAVAIL (from C{connect()}: C{getConnectError}), or a bare
        OSError carrying one, the errno's name is returned.
        """
        cases = [
            (ConnectBindError(errno.EMFILE, EMFILE_TEXT), "EMFILE"),
            (ConnectBindError(errno.ENFILE, os.strerror(errno.ENFILE)), "ENFILE"),
            (getConnectError((errno.ENOBUFS, os.strerror(errno.ENOBUFS))), "ENOBUFS"),
            (getConnectError((errno.ENOMEM, os.strerror(errno.ENOMEM))), "ENOMEM"),
            (getConnectError((errno.EADDRNOTAVAIL, "x")), "EADDRNOTAVAIL"),
            (OSError(errno.EMFILE, EMFILE_TEXT), "EMFILE"),
        ]
        for error, name in cases:
            self.assertEqual(localResourceError(Failure(error)), name, error)

    def test_memberErrors(self) -> None:
        """
        When a connection attempt was refused, timed out, could not be
        routed, or failed in a way that carries no errno, it is not the
        proxy's own problem.
        """
        for error in [
            ConnectionRefusedError(),
            getConnectError((errno.ECONNREFUSED, "refused")),
            getConnectError((errno.EHOSTUNREACH, "unreachable")),
            TimeoutError(),
            ConnectError(string="odd"),
            ConnectBindError(errno.EADDRINUSE, "in use"),
            RuntimeError("unrelated"),
        ]:
            self.assertIsNone(localResourceError(Failure(error)), error)


class RelayTests(SynchronousTestCase):
    """
    The layer-4 relay (L{mtlsproxy.relay}) when a backend connection
    attempt fails.
    """

    def test_outOfDescriptorsNotCounted(self) -> None:
        """
        When an attempt fails because the proxy is out of file descriptors,
        the member's failure count and ejection are untouched, an error
        names the errno, no "backend failed" warning blames the member, and
        the next member is tried.
        """
        observer = _observe(self)
        h = RelayHarness()
        _ejectAfterOne(h.members)
        h.connectClient()
        h.failBackend(ConnectBindError(errno.EMFILE, EMFILE_TEXT))
        first = h.members[0]
        self.assertEqual((first.failedConnections, first.consecutiveConnectFailures), (0, 0))
        self.assertFalse(first.ejected())
        [event] = _ownErrors(observer)
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertEqual(
            {k: event[k] for k in ("listener", "pool", "backend", "peer", "errno")},
            {
                "listener": "web",
                "pool": "pool",
                "backend": "10.0.0.1:8001",
                "peer": "203.0.113.7:40000",
                "errno": "EMFILE",
            },
        )
        self.assertIn(EMFILE_TEXT, event["error"])
        self.assertEqual(
            [e for e in observer if "failed for" in e.get("log_format", "")], []
        )
        self.assertEqual(len(h.reactor.tcpClients), 2)

    def test_ephemeralPortsNotCounted(self) -> None:
        """
        When an attempt fails with EADDRNOTAVAIL (no ephemeral port left),
        the member is not charged with it.
        """
        observer = _observe(self)
        h = RelayHarness()
        _ejectAfterOne(h.members)
        h.connectClient()
        h.failBackend(getConnectError((errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))))
        self.assertEqual(h.members[0].failedConnections, 0)
        self.assertFalse(h.members[0].ejected())
        self.assertEqual([e["errno"] for e in _ownErrors(observer)], ["EADDRNOTAVAIL"])

    def test_refusedStillCounts(self) -> None:
        """
        When a member refuses the connection, it is counted against the
        member (and, with C{eject_after = 1}, ejects it) and logged as the
        backend's failure, not the proxy's.
        """
        observer = _observe(self)
        h = RelayHarness()
        _ejectAfterOne(h.members)
        h.connectClient()
        h.failBackend(getConnectError((errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))))
        self.assertEqual(h.members[0].failedConnections, 1)
        self.assertTrue(h.members[0].ejected())
        self.assertEqual(_ownErrors(observer), [])
        self.assertEqual(
            len([e for e in observer if "failed for" in e.get("log_format", "")]), 1
        )


class HTTPTests(SynchronousTestCase):
    """
    The HTTP proxy (L{mtlsproxy.http}) when a backend connection attempt
    fails.
    """

    def failAttempt(self, h: HTTPHarness, error: Exception) -> None:
        """
        Let the last connection attempt fail with C{error}.
        """
        factory = h.reactor.tcpClients[-1][2]
        factory.clientConnectionFailed(h.reactor.connectors[-1], Failure(error))

    def test_outOfDescriptorsNotCounted(self) -> None:
        """
        When an attempt fails because the proxy is out of file descriptors,
        the member is not charged with it, an error names the errno, and the
        request goes to the next member.
        """
        observer = _observe(self)
        h = HTTPHarness()
        _ejectAfterOne(h.members)
        h.request()
        self.assertEqual(h.attempts(), 1)
        self.failAttempt(h, ConnectBindError(errno.EMFILE, EMFILE_TEXT))
        self.assertEqual(h.members[0].failedConnections, 0)
        self.assertFalse(h.members[0].ejected())
        [event] = _ownErrors(observer)
        self.assertEqual(
            (event["listener"], event["pool"], event["backend"], event["errno"]),
            ("web", "app", "10.0.0.1:8001", "EMFILE"),
        )
        self.assertEqual(h.attempts(), 2)

    def test_refusedStillCounts(self) -> None:
        """
        When a member refuses the connection, it is counted against the
        member (and, with C{eject_after = 1}, ejects it).
        """
        observer = _observe(self)
        h = HTTPHarness()
        _ejectAfterOne(h.members)
        h.request()
        self.failAttempt(h, ConnectionRefusedError())
        self.assertEqual(h.members[0].failedConnections, 1)
        self.assertTrue(h.members[0].ejected())
        self.assertEqual(_ownErrors(observer), [])


_CHILD = textwrap.dedent(
    """
    import resource, socket, sys
    from twisted.internet import reactor
    from twisted.internet.protocol import ClientFactory, Protocol
    from mtlsproxy.pool import localResourceError

    held = []

    class Attempt(ClientFactory):
        protocol = Protocol

        def clientConnectionFailed(self, connector, reason):
            error = reason.value
            print(type(error).__name__, getattr(error, "osError", None), localResourceError(reason))
            reactor.stop()

    def go():
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(64, soft), hard))
        try:
            while True:
                held.append(socket.socket())
        except OSError:
            pass
        reactor.connectTCP("127.0.0.1", 9, Attempt(), timeout=5)
        reactor.callLater(10, reactor.stop)

    reactor.callWhenRunning(go)
    reactor.run()
    """
)


class TwistedDeliveryTests(SynchronousTestCase):
    """
    What Twisted's reactor really reports when the process is out of file
    descriptors.
    """

    if not sys.platform.startswith("linux"):
        skip = "needs Linux RLIMIT_NOFILE behaviour"

    def test_emfileOnConnect(self) -> None:
        """
        When C{connectTCP} cannot create its socket because the process has
        no descriptor left, Twisted reports a C{ConnectBindError} whose
        C{osError} is EMFILE, and L{localResourceError} recognises it.
        """
        output = subprocess.run(
            [sys.executable, "-c", _CHILD],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        self.assertEqual(
            output.stdout.split(),
            ["ConnectBindError", str(errno.EMFILE), "EMFILE"],
            output.stderr,
        )
