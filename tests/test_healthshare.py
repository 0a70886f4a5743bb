# -*- test-case-name: tests.test_healthshare -*-
"""
Tests for L{mtlsproxy.healthshare}: one set of active health checks for all
worker processes.  In memory: the message format, the supervisor's relay (a
fake C{spawnProcess} reactor), the checker and the followers (L{ProxyService}
on a L{MemoryReactorClock} with an in-memory channel).  With real
processes: a C{workers = 2} twistd whose members are checked by one process
and whose workers agree about their health.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import time
from datetime import datetime, timezone
from random import Random
from typing import Any, Optional

from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.internet.error import ProcessTerminated
from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase

from mtlsproxy.checks import checkConfiguration
from mtlsproxy.config import loadConfig
from mtlsproxy.health import CheckResult, HealthMonitor
from mtlsproxy.healthshare import (
    MAX_LINE,
    HealthShare,
    HealthVerdict,
    LineSplitter,
    decodeVerdict,
    decodeVerdicts,
    encodeVerdict,
    encodeVerdicts,
)
from mtlsproxy.pool import Member, Pool
from mtlsproxy.selectors import SmoothWeightedRoundRobin
from mtlsproxy.service import ProxyService
from mtlsproxy.workers import WorkerSupervisor, workerArguments

from . import harness
from .test_health import FAIL, PASS, ScriptedChecker, _config, _member, _nextCheck
from .test_integration_ops import OPS, http, statusPort
from .test_workers import _FakePort, _Reactor

DOWN = HealthVerdict("app", "127.0.0.1:9", False, "connection refused", 1700000000.5)
UP = HealthVerdict("app", "127.0.0.1:9", True, "connected", 1700000001.5)


class CodecTests(SynchronousTestCase):
    """
    The message lines and the C{--health-states} option.
    """

    def test_roundTrip(self) -> None:
        """
        When a verdict is encoded, it is one ASCII JSON line with the
        documented keys, and decodes to the same verdict (IPv6 member,
        non-ASCII pool, no time included).
        """
        line = encodeVerdict(DOWN)
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(line.count(b"\n"), 1)
        self.assertEqual(
            json.loads(line),
            {"type": "health", "pool": "app", "member": "127.0.0.1:9", "healthy": False,
             "reason": "connection refused", "time": 1700000000.5},
        )
        for verdict in (DOWN, HealthVerdict("p\u00e9 \n", "[::1]:443", True, "HTTP 200 \u2713")):
            self.assertEqual(decodeVerdict(encodeVerdict(verdict).rstrip(b"\n")), verdict)

    def test_invalid(self) -> None:
        """
        When a line is not a valid message, L{ValueError} says what is
        wrong.
        """
        good = json.loads(encodeVerdict(DOWN))
        cases = {
            b"not json": "not JSON",
            b"\xff\xfe": "not JSON",
            b"[1, 2]": "not a JSON object",
            b'{"type": "drain"}': "unknown message type 'drain'",
            json.dumps({**good, "extra": 1}).encode(): "unknown keys extra",
            json.dumps({**good, "pool": ""}).encode(): "pool",
            json.dumps({**good, "pool": 7}).encode(): "pool",
            json.dumps({**good, "member": "nohost"}).encode(): "member",
            json.dumps({**good, "member": "h:99999"}).encode(): "member",
            json.dumps({**good, "healthy": "false"}).encode(): "healthy",
            json.dumps({**good, "healthy": 0}).encode(): "healthy",
            json.dumps({**good, "reason": None}).encode(): "reason",
            json.dumps({**good, "time": "now"}).encode(): "time",
            json.dumps({**good, "time": True}).encode(): "time",
            json.dumps({**good, "time": float("nan")}).encode(): "time",
        }
        for line, problem in cases.items():
            with self.assertRaises(ValueError, msg=line) as raised:
                decodeVerdict(line)
            self.assertIn(problem, str(raised.exception), line)

    def test_longReasonCut(self) -> None:
        """
        When a verdict's reason is very long, it is cut to 1000 characters.
        """
        line = json.dumps({**json.loads(encodeVerdict(DOWN)), "reason": "x" * 5000}).encode()
        self.assertEqual(len(decodeVerdict(line).reason), 1000)

    def test_statesRoundTrip(self) -> None:
        """
        When the supervisor encodes its verdicts for a command line, the
        worker decodes the same; anything else is a L{ValueError} naming
        the option.
        """
        self.assertEqual(decodeVerdicts(encodeVerdicts([DOWN, UP])), [DOWN, UP])
        self.assertEqual(decodeVerdicts(encodeVerdicts([])), [])
        for text in ("", "{}", "[1]", '[{"type": "health"}]'):
            with self.assertRaises(ValueError) as raised:
                decodeVerdicts(text)
            self.assertIn("--health-states", str(raised.exception))

    def test_lineSplitter(self) -> None:
        """
        When bytes arrive in pieces, each complete non-blank line is
        delivered once; a line longer than the limit is dropped (and
        reported once), whether it arrives whole or in pieces, and the
        lines after it are still delivered.
        """
        lines: list[bytes] = []
        tooLong: list[int] = []
        splitter = LineSplitter(lines.append, tooLong.append, maxLength=10)
        splitter.feed(b"ab")
        splitter.feed(b"c\n\n  \nde")
        self.assertEqual(lines, [b"abc"])
        splitter.feed(b"f\n" + b"x" * 11 + b"\ng\n")
        self.assertEqual(lines, [b"abc", b"def", b"g"])
        self.assertEqual(tooLong, [11])
        splitter.feed(b"y" * 8)
        splitter.feed(b"y" * 8)
        splitter.feed(b"y" * 8 + b"\nh\n")
        self.assertEqual(lines, [b"abc", b"def", b"g", b"h"])
        self.assertEqual(tooLong, [11, 16])

    def test_arguments(self) -> None:
        """
        When the supervisor starts a worker, its command line has
        C{--health-channel}, and C{--health-states} only when there are
        verdicts, which the plugin's options read back; C{--health-states}
        or C{--health-channel} without a worker, or an invalid value, is a
        usage error naming the option.
        """
        from mtlsproxy.tap import Options

        plugin = {"config": "/etc/p.toml"}
        argv = workerArguments(None, plugin, 1, {}, 42, healthStates=[DOWN])
        self.assertEqual(argv[argv.index("--health-channel") + 1], "3")
        options = Options()
        options.parseOptions(argv[argv.index("mtlsproxy") + 1:])
        self.assertEqual(options["health-states"], [DOWN])
        self.assertEqual(options["health-channel"], 3)
        argv = workerArguments(None, plugin, 1, {}, 42)
        self.assertNotIn("--health-states", argv)
        options = Options()
        options.parseOptions(argv[argv.index("mtlsproxy") + 1:])
        self.assertIsNone(options["health-states"])
        worker = ["--worker", "1", "--supervisor", "42", "--inherit", "{}"]
        for extra, name in (
            ([*worker, "--health-channel", "3", "--health-states", "[1]"], "--health-states"),
            ([*worker, "--health-states", "[]"], "--health-states"),
            ([*worker, "--health-channel", "1"], "--health-channel"),
            ([*worker, "--health-channel", "x"], "--health-channel"),
            (["--health-channel", "3"], "--health-channel"),
        ):
            with self.assertRaises(usage.UsageError) as raised:
                Options().parseOptions(["--config", "x", *extra])
            self.assertIn(name, str(raised.exception))


    def test_channelDescriptor(self) -> None:
        """
        When a worker inherits a listening socket numbered 3 (or 3 and
        more), its channel to the supervisor takes the first free
        descriptor above, on its command line too; otherwise 3.
        """
        from mtlsproxy.healthshare import channelDescriptor
        from mtlsproxy.workers import InheritedListener

        self.assertEqual(channelDescriptor([]), 3)
        self.assertEqual(channelDescriptor([5, 7]), 3)
        self.assertEqual(channelDescriptor([3, 4, 6]), 5)
        inherited = {"a": InheritedListener(3, "INET"), "b": InheritedListener(4, "INET")}
        argv = workerArguments(None, {"config": "/etc/p.toml"}, 1, inherited, 42)
        self.assertEqual(argv[argv.index("--health-channel") + 1], "5")

    def test_makeService(self) -> None:
        """
        When a worker is started with C{--health-channel} and
        C{--health-states}, its L{ProxyService} shares health with those
        states (worker 1: a follower, no monitor); without them, it does
        not.
        """
        from mtlsproxy import workers
        from mtlsproxy.tap import Options, makeService

        self.patch(workers, "exitWithParent", lambda: True)
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "p.toml")
        with open(path, "w") as f:
            f.write(CONFIG.format(extra=""))
        worker = ["--config", path, "--worker", "1", "--supervisor", "42", "--inherit", "{}"]
        options = Options()
        options.parseOptions([*worker, "--health-channel", "3", "--health-states", encodeVerdicts([DOWN])])
        service = makeService(options, _Reactor())
        assert isinstance(service, ProxyService)
        self.assertIsNotNone(service.healthShare)
        self.assertFalse(service.healthShare.checking)
        self.assertEqual(service.healthShare.heard, {("app", "127.0.0.1:9"): DOWN})
        self.assertEqual(service.healthMonitors, {})
        options = Options()
        options.parseOptions(worker)
        service = makeService(options, _Reactor())
        assert isinstance(service, ProxyService)
        self.assertIsNone(service.healthShare)
        self.assertEqual(set(service.healthMonitors), {"app"})


class RelayTests(SynchronousTestCase):
    """
    The supervisor's side (L{WorkerSupervisor.healthRelay}) with a fake
    C{spawnProcess}: what worker 0 says reaches the others.
    """

    def setUp(self) -> None:
        self.reactor = _Reactor()
        self.extras: list[tuple[int, dict[str, Any]]] = []

        def arguments(index: int, inherited: Any, pid: int, statusSocket: Any, **extra: Any) -> list[str]:
            self.extras.append((index, extra))
            return ["worker", str(index)]

        self.supervisor = WorkerSupervisor(
            self.reactor,
            [("a", "tcp:1")],
            3,
            arguments,
            drainTimeout=3.0,
            installSignalHandlers=False,
            listen=lambda description, factory: succeed(_FakePort(10)),
        )
        self.supervisor.startService()
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def current(self, index: int) -> tuple[Any, Any]:
        """
        The protocol and process of worker C{index}'s current process.
        """
        protocol, process, _, _ = [s for s in self.reactor.spawned if s[0].index == index][-1]
        return protocol, process

    def written(self, index: int) -> list[bytes]:
        """
        What the supervisor wrote to worker C{index}'s current process.
        """
        _, process = self.current(index)
        self.assertEqual({fd for fd, _ in process.written} - {0}, set())
        return [data for _, data in process.written]

    def test_channelDescriptors(self) -> None:
        """
        When a worker is spawned, its standard input is a pipe from the
        supervisor and its descriptor 3 a pipe to it, beside the listening
        sockets.
        """
        for _, _, _, childFDs in self.reactor.spawned:
            self.assertEqual(childFDs[0], "w")
            self.assertEqual(childFDs[3], "r")
            self.assertEqual(childFDs[10], 10)

    def test_channelBesideListenerThree(self) -> None:
        """
        When a listening socket is descriptor 3 in the supervisor (and so in
        the worker), the channel takes descriptor 4, and what the worker
        writes there is read as messages.
        """
        supervisor = WorkerSupervisor(
            self.reactor, [("a", "tcp:1")], 2, lambda index, *args, **extra: ["worker", str(index)],
            drainTimeout=3.0, installSignalHandlers=False,
            listen=lambda description, factory: succeed(_FakePort(3)),
        )
        supervisor.startService()
        protocol, _, _, childFDs = self.reactor.spawned[-2]
        self.assertEqual((childFDs[3], childFDs[4]), (3, "r"))
        protocol.childDataReceived(3, encodeVerdict(DOWN))
        self.assertEqual(supervisor.healthRelay.current(), [])
        protocol.childDataReceived(4, encodeVerdict(DOWN))
        self.assertEqual(supervisor.healthRelay.current(), [DOWN])

    def test_forwardsToOthers(self) -> None:
        """
        When worker 0 writes a verdict (even in pieces), the supervisor
        remembers it and writes it to every other running worker, not back
        to worker 0.
        """
        protocol, _ = self.current(0)
        line = encodeVerdict(DOWN)
        protocol.childDataReceived(3, line[:10])
        self.assertEqual(self.written(1), [])
        protocol.childDataReceived(3, line[10:])
        self.assertEqual(self.written(0), [])
        self.assertEqual(self.written(1), [line])
        self.assertEqual(self.written(2), [line])
        self.assertEqual(self.supervisor.healthRelay.current(), [DOWN])
        # What a worker writes on its standard output is not read as a message.
        protocol.childDataReceived(1, encodeVerdict(UP))
        self.assertEqual(self.written(1), [line])

    def test_garbageIgnoredAndLogged(self) -> None:
        """
        When a worker writes invalid lines, each is logged as a warning
        naming the worker and the problem, nothing is forwarded or
        remembered, and the next valid line is.
        """
        protocol, _ = self.current(0)
        protocol.childDataReceived(3, b"garbage\n" + b'{"type": "health"}\n' + b"z" * (MAX_LINE + 1) + b"\n")
        self.assertEqual(self.written(1), [])
        self.assertEqual(self.supervisor.healthRelay.current(), [])
        warnings = [e for e in self.observer if e["log_level"] == LogLevel.warn]
        self.assertEqual(
            [e["log_format"] for e in warnings],
            ["Worker {index}: ignored an invalid message ({problem}): {line}"] * 2
            + ["Worker {index}: ignored a message of {length} bytes from it (at most {limit})"],
        )
        self.assertEqual(warnings[0]["index"], 0)
        self.assertIn("not JSON", warnings[0]["problem"])
        protocol.childDataReceived(3, encodeVerdict(DOWN))
        self.assertEqual(self.written(1), [encodeVerdict(DOWN)])

    def test_followerVerdictIgnored(self) -> None:
        """
        When a worker other than 0 writes a verdict, it is neither
        remembered nor forwarded, and a warning says only worker 0 checks.
        """
        protocol, _ = self.current(1)
        protocol.childDataReceived(3, encodeVerdict(DOWN))
        self.assertEqual(self.written(0) + self.written(2), [])
        self.assertEqual(self.supervisor.healthRelay.current(), [])
        [warning] = [e for e in self.observer if e["log_level"] == LogLevel.warn]
        self.assertEqual(warning["index"], 1)
        self.assertEqual(warning["checker"], 0)

    def test_restartedWorkerGetsStates(self) -> None:
        """
        When a worker dies and is started again (a follower or worker 0
        itself), it gets the latest verdict of every member on its command
        line (C{healthStates}); a dead worker is not written to.
        """
        self.assertEqual([extra for _, extra in self.extras], [{}, {}, {}])
        checker, _ = self.current(0)
        other = HealthVerdict("web", "[::1]:443", True, "HTTP 200", 5.0)
        checker.childDataReceived(3, encodeVerdict(DOWN) + encodeVerdict(other))
        follower, _ = self.current(1)
        follower.processEnded(Failure(ProcessTerminated(signal=9)))
        checker.childDataReceived(3, encodeVerdict(UP))
        self.assertEqual(len(self.written(1)), 2)  # the dead process's
        self.reactor.advance(self.supervisor._delay)
        self.assertEqual(self.extras[-1], (1, {"healthStates": [UP, other]}))
        self.assertEqual(self.written(1), [])
        checker.processEnded(Failure(ProcessTerminated(signal=9)))
        self.reactor.advance(self.supervisor._delay)
        self.assertEqual(self.extras[-1], (0, {"healthStates": [UP, other]}))
        # The new worker 0 reports: the others hear it.
        checker, _ = self.current(0)
        checker.childDataReceived(3, encodeVerdict(DOWN))
        self.assertEqual(self.written(1), [encodeVerdict(DOWN)])

    def test_tooManyForCommandLine(self) -> None:
        """
        When the verdicts would make too long a command line, a worker
        started gets none there but all over its channel at once, and a
        warning says so.
        """
        checker, _ = self.current(0)
        checker.childDataReceived(3, encodeVerdict(DOWN))
        self.supervisor.maxHealthArgument = 10
        follower, _ = self.current(2)
        follower.processEnded(Failure(ProcessTerminated(signal=9)))
        self.reactor.advance(self.supervisor._delay)
        self.assertEqual(self.extras[-1], (2, {}))
        self.assertEqual(self.written(2), [encodeVerdict(DOWN)])
        self.assertIn(
            "too many for its command line",
            [e for e in self.observer if e["log_level"] == LogLevel.warn][-1]["log_format"],
        )


CONFIG = """
[[listeners]]
name = "plain"
endpoint = "tcp:0:interface=127.0.0.1"
protocol = "tcp"
pool = "app"

[[pools]]
name = "app"
[[pools.members]]
address = "127.0.0.1"
port = 9
[[pools.members]]
address = "127.0.0.1"
port = 10

[pools.health_check]
type = "tcp"
interval = 1.0
timeout = 0.5
{extra}
"""


class _Channel:
    """
    An in-memory channel to the supervisor: the protocol connected to a
    L{StringTransport}.
    """

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.protocol: Any = None

    def connect(self, protocol: Any) -> StringTransport:
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        return self.transport

    def sent(self) -> list[HealthVerdict]:
        return [decodeVerdict(line) for line in self.transport.value().splitlines()]


def _worker(
    testCase: SynchronousTestCase, index: int, extra: str = "", states: Any = ()
) -> tuple[ProxyService, MemoryReactorClock, _Channel]:
    """
    A worker's L{ProxyService} sharing health (index 0: the checker) on a
    L{MemoryReactorClock}, with an in-memory channel, not started.
    """
    directory = testCase.mktemp()
    os.makedirs(directory)
    path = os.path.join(directory, "proxy.toml")
    with open(path, "w") as f:
        f.write(CONFIG.format(extra=extra))
    loaded = checkConfiguration(loadConfig(path), datetime.now(timezone.utc))
    reactor = MemoryReactorClock()
    channel = _Channel()
    proxy = ProxyService(
        reactor, loaded, workerIndex=index, workerCount=2, shareHealth=True, healthStates=states,
        connectSupervisor=channel.connect,
    )
    return proxy, reactor, channel


def _start(testCase: SynchronousTestCase, proxy: ProxyService) -> None:
    proxy.startService()
    testCase.addCleanup(proxy.stopService)


class WorkerTests(SynchronousTestCase):
    """
    A worker's side: worker 0 checks and reports, the others apply.
    """

    def setUp(self) -> None:
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def test_followerRunsNoChecks(self) -> None:
        """
        When a worker other than 0 shares health, it has no health monitor
        and makes no check connection however long it runs, while worker 0,
        from the same configuration, does.
        """
        follower, reactor, _ = _worker(self, 1)
        _start(self, follower)
        reactor.advance(30)
        self.assertEqual(follower.healthMonitors, {})
        self.assertEqual(reactor.tcpClients, [])
        checker, reactor, _ = _worker(self, 0)
        _start(self, checker)
        reactor.advance(30)
        self.assertEqual(set(checker.healthMonitors), {"app"})
        self.assertEqual({(host, port) for host, port, *_ in reactor.tcpClients}, {("127.0.0.1", 9), ("127.0.0.1", 10)})

    def test_singleProcessUnchanged(self) -> None:
        """
        When the proxy runs in one process (or a worker without the
        channel), it checks its members itself and shares nothing.
        """
        proxy, reactor, channel = _worker(self, 0)
        for single in (
            ProxyService(reactor, proxy.loaded),
            ProxyService(reactor, proxy.loaded, workerIndex=1, workerCount=2),
        ):
            self.assertIsNone(single.healthShare)
            self.assertEqual(set(single.healthMonitors), {"app"})

    def test_followerApplies(self) -> None:
        """
        When a follower receives verdicts, its member turns unhealthy then
        healthy, each logged once as the checker logs a transition (same
        fields) with "(from worker 0)"; its last check is worker 0's,
        marked so, at worker 0's time; becoming healthy ends a passive
        ejection; a verdict that changes nothing logs nothing.
        """
        proxy, reactor, channel = _worker(self, 1)
        _start(self, proxy)
        member = proxy.pools["app"].members[0]
        channel.protocol.dataReceived(encodeVerdict(DOWN))
        self.assertFalse(member.healthy)
        self.assertEqual(member.lastCheck, (CheckResult(False, "connection refused (from worker 0)"), DOWN.time))
        self.assertTrue(proxy.pools["app"].members[1].healthy)
        channel.protocol.dataReceived(encodeVerdict(DOWN))
        member.ejectedUntil = reactor.seconds() + 100
        channel.protocol.dataReceived(encodeVerdict(UP))
        self.assertTrue(member.healthy)
        self.assertIsNone(member.ejectedUntil)
        transitions = [e for e in self.observer if "is now" in e["log_format"]]
        self.assertEqual(
            [(e["log_level"], e["pool"], e["member"], e["healthy"], e["state"], e["reason"], e["source"])
             for e in transitions],
            [(LogLevel.warn, "app", "127.0.0.1:9", False, "unhealthy", "connection refused", "from worker 0"),
             (LogLevel.info, "app", "127.0.0.1:9", True, "healthy", "connected", "from worker 0")],
        )
        self.assertEqual(
            transitions[0]["log_format"], "Pool {pool} member {member} is now {state}: {reason} ({source})"
        )
        from twisted.logger import formatEvent

        self.assertEqual(
            formatEvent(transitions[0]),
            "Pool app member 127.0.0.1:9 is now unhealthy: connection refused (from worker 0)",
        )

    def test_garbageFromSupervisorIgnored(self) -> None:
        """
        When the supervisor's channel carries invalid lines, each is logged
        as a warning and ignored, and the valid ones around them apply.
        """
        proxy, reactor, channel = _worker(self, 1)
        _start(self, proxy)
        channel.protocol.dataReceived(b"{nope\n" + encodeVerdict(DOWN) + b'{"type": "health", "pool": 1}\n')
        self.assertFalse(proxy.pools["app"].members[0].healthy)
        warnings = [e for e in self.observer if e["log_level"] == LogLevel.warn and "supervisor" in e["log_format"]]
        self.assertEqual(len(warnings), 2)
        self.assertEqual(
            warnings[0]["log_format"], "Ignored an invalid message from the supervisor ({problem}): {line}"
        )

    def test_unknownMemberKeptQuietly(self) -> None:
        """
        When a follower receives a verdict for a pool or member it lacks,
        it logs no warning; a member added later (a reload) starts from
        that verdict.
        """
        proxy, reactor, channel = _worker(self, 1)
        _start(self, proxy)
        channel.protocol.dataReceived(
            encodeVerdict(HealthVerdict("gone", "127.0.0.1:9", False, "x", 1.0))
            + encodeVerdict(HealthVerdict("app", "127.0.0.1:11", False, "connection refused", 2.0))
        )
        self.assertEqual([e for e in self.observer if e["log_level"] >= LogLevel.warn], [])
        self.assertTrue(all(m.healthy for m in proxy.pools["app"].members))
        added = Member(proxy.pools["app"].members[0].config.__class__(address="127.0.0.1", port=11))
        proxy.pools["app"].addMember(added)
        self.assertFalse(added.healthy)

    def test_followerInitialState(self) -> None:
        """
        When the pool says C{initial_state = "unhealthy"}, a follower keeps
        a member it has no verdict for out before it accepts, as worker 0
        does until its first check, including one a reload adds; a verdict
        passed on its command line wins.
        """
        proxy, reactor, channel = _worker(self, 1, 'initial_state = "unhealthy"', states=[UP])
        [m9, m10] = proxy.pools["app"].members
        seen: list[tuple[bool, bool]] = []
        listener = proxy.listeners["plain"]
        start = listener.startService

        def recordingStart() -> None:
            seen.append((m9.healthy, m10.healthy))
            start()

        listener.startService = recordingStart  # type: ignore[method-assign]
        _start(self, proxy)
        self.assertEqual(seen, [(True, False)])
        added = Member(m9.config.__class__(address="127.0.0.1", port=12))
        proxy.pools["app"].addMember(added)
        self.assertFalse(added.healthy)

    def test_inheritedBeforeListening(self) -> None:
        """
        When a follower is started with verdicts (C{--health-states}), its
        members have them by the time its listener starts.
        """
        proxy, reactor, channel = _worker(self, 1, states=[DOWN])
        member = proxy.pools["app"].members[0]
        seen: list[bool] = []
        listener = proxy.listeners["plain"]
        start = listener.startService

        def recordingStart() -> None:
            seen.append(member.healthy)
            start()

        listener.startService = recordingStart  # type: ignore[method-assign]
        _start(self, proxy)
        self.assertEqual(seen, [False])

    def test_checkerAnnouncesAndIgnoresVerdicts(self) -> None:
        """
        When worker 0 starts, it sends the state of every member it checks
        (not checked yet); verdicts it receives change nothing.
        """
        proxy, reactor, channel = _worker(self, 0)
        _start(self, proxy)
        self.assertEqual(
            channel.sent(),
            [HealthVerdict("app", "127.0.0.1:9", True, "not checked yet"),
             HealthVerdict("app", "127.0.0.1:10", True, "not checked yet")],
        )
        channel.protocol.dataReceived(encodeVerdict(DOWN))
        self.assertTrue(proxy.pools["app"].members[0].healthy)

    def test_checkerReportsTransitions(self) -> None:
        """
        When the checker's monitor takes a member out or puts it back, the
        transition is sent with the reason and the time of the deciding
        check; checks that change nothing are not sent.
        """
        reactor = MemoryReactorClock()
        reactor.advance(1000)
        member = _member(9000)
        pool = Pool("app", [member], SmoothWeightedRoundRobin(), clock=reactor)
        checker = ScriptedChecker(reactor)
        monitor = HealthMonitor(reactor, pool, checker, _config(unhealthy_threshold=2, healthy_threshold=1),
                                random=Random(4))
        channel = _Channel()
        share = HealthShare(reactor, 0, {"app": pool}, {"app": monitor.config}, connect=channel.connect)
        share.observe(monitor)
        share.startService()
        monitor.startService()
        self.addCleanup(monitor.stopService)
        checker.script(member, FAIL, FAIL, FAIL, PASS, PASS)
        _nextCheck(reactor, checker, 1)
        self.assertEqual(len(channel.sent()), 1)  # the start
        _nextCheck(reactor, checker, 1)
        failedAt = reactor.seconds()
        _nextCheck(reactor, checker, 2)
        passedAt = reactor.seconds()
        _nextCheck(reactor, checker, 1)
        self.assertEqual(
            channel.sent(),
            [HealthVerdict("app", "127.0.0.1:9000", True, "not checked yet"),
             HealthVerdict("app", "127.0.0.1:9000", False, "down", failedAt),
             HealthVerdict("app", "127.0.0.1:9000", True, "ok", passedAt)],
        )

    def test_checkerContinuesFromInherited(self) -> None:
        """
        When worker 0 is started again with a member unhealthy on its
        command line, the member is unhealthy (with that check result)
        before its monitor starts, which continues from there: what it
        reports first is that state.
        """
        proxy, reactor, channel = _worker(self, 0, states=[DOWN])
        _start(self, proxy)
        member = proxy.pools["app"].members[0]
        self.assertFalse(member.healthy)
        self.assertEqual(channel.sent()[0], DOWN)
        self.assertEqual(member.lastCheck, (CheckResult(False, "connection refused"), DOWN.time))


class WorkerReloadTests(SynchronousTestCase):
    """
    A reload that changes, adds or removes a pool's health checks in a
    worker: worker 0 replaces its monitors and reports through the new
    ones; the others start none and update what they follow.
    """

    def setUp(self) -> None:
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def reload(self, proxy: ProxyService, text: str) -> Any:
        """
        Write C{text} as the worker's configuration and reload it.
        """
        with open(proxy.loaded.config.path, "w") as f:
            f.write(text)
        result = proxy.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertEqual(result.restartNeeded, ())
        return result

    def test_followerStartsNoMonitor(self) -> None:
        """
        When a follower reloads a changed interval and a new pool with
        checks, it starts no monitor and makes no check connection; what it
        keeps per pool is the new settings, and it follows the new pool's
        members.
        """
        proxy, reactor, channel = _worker(self, 1)
        _start(self, proxy)
        more = (
            '\n[[pools]]\nname = "more"\n[[pools.members]]\naddress = "127.0.0.1"\nport = 11\n'
            '[pools.health_check]\ntype = "tcp"\ninitial_state = "unhealthy"\n'
        )
        result = self.reload(proxy, CONFIG.format(extra="").replace("interval = 1.0", "interval = 2.0") + more)
        self.assertIn("pool 'app': health checks (interval 1.0 -> 2.0)", result.changes)
        self.assertIn("pool 'more': health checks added (type \"tcp\")", result.changes)
        reactor.advance(30)
        self.assertEqual(proxy.healthMonitors, {})
        self.assertEqual(reactor.tcpClients, [])
        self.assertEqual(proxy.healthShare.healthChecks["app"].interval, 2.0)
        self.assertEqual(proxy.healthShare.healthChecks["more"].initial_state, "unhealthy")
        [member] = proxy.pools["more"].members
        self.assertFalse(member.healthy)
        channel.protocol.dataReceived(encodeVerdict(HealthVerdict("more", "127.0.0.1:11", True, "connected", 5.0)))
        self.assertTrue(member.healthy)

    def test_followerChecksRemoved(self) -> None:
        """
        When a follower's reload removes a pool's checks, its members are
        made healthy (logged once), and a verdict worker 0 sends before its
        own reload is not applied.
        """
        from mtlsproxy.reload import HEALTH_CHECKS_REMOVED_FORMAT

        proxy, reactor, channel = _worker(self, 1)
        _start(self, proxy)
        [m9, m10] = proxy.pools["app"].members
        channel.protocol.dataReceived(encodeVerdict(DOWN))
        self.assertFalse(m9.healthy)
        result = self.reload(proxy, CONFIG.format(extra="").split("[pools.health_check]")[0])
        self.assertIn("pool 'app': health checks removed (1 member(s) made healthy)", result.changes)
        self.assertEqual((m9.healthy, m10.healthy), (True, True))
        [event] = [e for e in self.observer if e["log_format"] == HEALTH_CHECKS_REMOVED_FORMAT]
        self.assertEqual((event["pool"], event["count"], event["members"]), ("app", 1, ["127.0.0.1:9"]))
        self.assertEqual(proxy.healthShare.healthChecks, {})
        channel.protocol.dataReceived(encodeVerdict(DOWN))
        self.assertTrue(m9.healthy)
        self.assertEqual(proxy.healthMonitors, {})

    def test_followerChecksAdded(self) -> None:
        """
        When a follower's reload gives a pool checks, each member takes the
        verdict heard for it (worker 0 reloaded first) or, without one,
        its initial state, and later verdicts apply.
        """
        proxy, reactor, channel = _worker(self, 1)
        with open(proxy.loaded.config.path, "w") as f:
            f.write(CONFIG.format(extra="").split("[pools.health_check]")[0])
        proxy.reloader.reload()
        _start(self, proxy)
        [m9, m10] = proxy.pools["app"].members
        channel.protocol.dataReceived(encodeVerdict(DOWN))
        self.assertTrue(m9.healthy)
        self.reload(proxy, CONFIG.format(extra='initial_state = "unhealthy"'))
        self.assertEqual((m9.healthy, m10.healthy), (False, False))
        self.assertEqual(m9.lastCheck, (CheckResult(False, "connection refused (from worker 0)"), DOWN.time))
        self.assertIsNone(m10.lastCheck)
        channel.protocol.dataReceived(
            encodeVerdict(UP) + encodeVerdict(HealthVerdict("app", "127.0.0.1:10", True, "connected", 3.0))
        )
        self.assertEqual((m9.healthy, m10.healthy), (True, True))
        reactor.advance(30)
        self.assertEqual(proxy.healthMonitors, {})
        self.assertEqual(reactor.tcpClients, [])

    def test_checkerReplacesMonitor(self) -> None:
        """
        When worker 0 reloads a changed interval, its new monitor checks
        and reports through the health share (each member's state as it
        starts watching it); when the checks are removed, the members made
        healthy are reported too.
        """
        proxy, reactor, channel = _worker(self, 0)
        _start(self, proxy)
        old = proxy.healthMonitors["app"]
        for _ in range(100):
            reactor.advance(0.1)
        [m9, m10] = proxy.pools["app"].members
        self.assertEqual((m9.healthy, m10.healthy), (False, False))
        sent = len(channel.sent())
        self.reload(proxy, CONFIG.format(extra="").replace("interval = 1.0", "interval = 2.0"))
        new = proxy.healthMonitors["app"]
        self.assertIsNot(new, old)
        self.assertFalse(old.running)
        self.assertTrue(new.running)
        self.assertEqual(
            [(v.member, v.healthy) for v in channel.sent()[sent:]],
            [("127.0.0.1:9", False), ("127.0.0.1:10", False)],
        )
        attempts = len(reactor.tcpClients)
        for _ in range(100):
            reactor.advance(0.1)
        self.assertGreater(len(reactor.tcpClients), attempts)
        sent = len(channel.sent())
        self.reload(proxy, CONFIG.format(extra="").split("[pools.health_check]")[0])
        self.assertEqual(proxy.healthMonitors, {})
        self.assertEqual(
            [(v.member, v.healthy, v.reason) for v in channel.sent()[sent:]],
            [("127.0.0.1:9", True, "health checks removed"), ("127.0.0.1:10", True, "health checks removed")],
        )


class MonitorObserverTests(SynchronousTestCase):
    """
    L{HealthMonitor.observers}, the hook the checker reports through.
    """

    def test_observersTold(self) -> None:
        """
        When a monitor starts watching members and when it changes one's
        health, every observer is called with the member (its health
        already set) and the reason; an observer that raises is logged and
        the others are still called.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        reactor = MemoryReactorClock()
        member = _member(9000)
        pool = Pool("app", [member], SmoothWeightedRoundRobin(), clock=reactor)
        checker = ScriptedChecker(reactor)
        monitor = HealthMonitor(reactor, pool, checker, _config(initial_state="unhealthy"), random=Random(4))
        calls: list[tuple[Member, bool, str]] = []

        def broken(member: Member, reason: str) -> None:
            raise RuntimeError("observer bug")

        monitor.observers.append(broken)
        monitor.observers.append(lambda m, reason: calls.append((m, m.healthy, reason)))
        monitor.startService()
        self.addCleanup(monitor.stopService)
        _nextCheck(reactor, checker, 3)
        self.assertEqual(calls, [(member, False, "not checked yet"), (member, True, "ok")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertEqual(
            [e["log_format"] for e in observer if e.get("log_failure")], ["Health observer {observer} failed"] * 2
        )


class SharedHealthIntegrationTests(SynchronousTestCase):
    """
    A real C{twistd -n mtlsproxy} with C{workers = 2}, C{[status]} and a
    C{tcp} health check every 0.3 s.
    """

    INTERVAL = 0.3

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="mtlsproxy-healthshare-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.pki = harness.DemoPKI(os.path.join(self.directory, "pki"))
        self.backend: Optional[harness.EchoBackend] = harness.EchoBackend("b")
        self.port = self.backend.port
        self.addCleanup(lambda: self.backend is not None and self.backend.stop())
        check = (
            f'[pools.health_check]\ntype = "tcp"\ninterval = {self.INTERVAL}\ntimeout = {self.INTERVAL}\n'
            "healthy_threshold = 2\nunhealthy_threshold = 2\njitter = 0.0\n"
        )
        self.proxy = harness.ProxyProcess(
            self.directory, "workers = 2\n" + OPS + harness.tlsConfig(self.pki.directory, [self.backend]) + check
        )
        self.addCleanup(self._removeStatusDirectories)
        self.addCleanup(self.proxy.stop)

    def _removeStatusDirectories(self) -> None:
        for path in set(re.findall(r"Private status socket for the supervisor at (\S+)", self.proxy.log())):
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)

    def health(self, status: int) -> list[Any]:
        """
        The member's C{healthy} in the merged /status, then in each
        worker's own report (L{None} for a worker that did not answer).
        """
        code, body = http(status, "/status")
        self.assertEqual(code, 200)
        report = json.loads(body)
        return [report["pools"][0]["members"][0]["healthy"]] + [
            entry["status"]["pools"][0]["members"][0]["healthy"] if "status" in entry else None
            for entry in report["workers"]
        ]

    def test_oneCheckerEveryWorkerAgrees(self) -> None:
        """
        When C{workers = 2}, the member receives the checks of one process
        only (before this change, each worker checked: about twice as
        many); when it stops listening, the merged /status and both
        workers' reports say unhealthy (worker 1 logging the verdict as
        worker 0's); a worker 1 started again while it is down gets it on
        its command line and is unhealthy from its first answer; when the
        member listens again, every report says healthy.
        """
        self.proxy.start(timeout=30)
        self.assertTrue(
            harness.waitFor(lambda: self.proxy.log().count("Listener mtls (tls) listening on") >= 2, timeout=30),
            self.proxy.log()[-3000:],
        )
        status = statusPort(self.proxy)
        self.assertTrue(harness.waitFor(lambda: http(status, "/readyz")[0] == 200, timeout=30))

        # Checks over 3 s: one process makes about 3 / 0.3 = 10 of them,
        # two would make about 20.  Nothing else connects to the member.
        assert self.backend is not None
        before, started = self.backend.accepted, time.monotonic()
        time.sleep(3.0)
        checks = self.backend.accepted - before
        expected = (time.monotonic() - started) / self.INTERVAL
        self.assertTrue(0.3 * expected <= checks <= 1.4 * expected, (checks, expected))

        self.backend.stop()
        self.backend = None
        self.assertTrue(
            harness.waitFor(lambda: self.health(status) == [False, False, False], timeout=10), self.health(status)
        )
        self.assertIsNotNone(
            self.proxy.waitForLog(r"Pool app member 127\.0\.0\.1:\d+ is now unhealthy: connection refused"
                                  r" \(from worker 0\)"),
            self.proxy.log()[-3000:],
        )
        report = json.loads(http(status, "/status")[1])
        lastCheck = report["workers"][1]["status"]["pools"][0]["members"][0]["last_check"]
        self.assertEqual(lastCheck["reason"], "connection refused (from worker 0)")

        # Worker 1 started again while the member is down.
        old = report["workers"][1]["pid"]
        os.kill(old, signal.SIGKILL)
        answers: list[Any] = []

        def restartedAnswers() -> bool:
            entry = json.loads(http(status, "/status")[1])["workers"][1]
            if entry["pid"] in (None, old) or "status" not in entry:
                return False
            answers.append((entry["pid"], entry["status"]["pools"][0]["members"][0]["healthy"]))
            return True

        self.assertTrue(harness.waitFor(restartedAnswers, timeout=30))
        self.assertEqual(answers[0][1], False, answers)
        with open(f"/proc/{answers[0][0]}/cmdline", "rb") as f:
            argv = f.read().decode().split("\0")
        [state] = json.loads(argv[argv.index("--health-states") + 1])
        self.assertEqual((state["member"], state["healthy"]), (f"127.0.0.1:{self.port}", False))

        self.backend = harness.EchoBackend("b", port=self.port)
        self.assertTrue(
            harness.waitFor(lambda: self.health(status) == [True, True, True], timeout=10), self.health(status)
        )
