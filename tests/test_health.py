# -*- test-case-name: tests.test_health -*-
"""
Tests for L{mtlsproxy.health} (configuration, thresholds, timing) and the
health-related run-time state in L{mtlsproxy.pool} (passive ejection,
C{all_unhealthy}).

Everything here runs on a L{MemoryReactorClock} with a scripted checker; the
built-in checkers against real servers are in L{tests.test_checkers}.
"""

from __future__ import annotations

from random import Random
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.plugin import IPlugin
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mtlsproxy.errors import ConfigurationError
from mtlsproxy.health import (
    COMMON_KEYS,
    CheckResult,
    FrozenOptions,
    HealthCheckConfig,
    HealthCheckerPlugin,
    HealthMonitor,
    OptionError,
    PassiveEjectionConfig,
    checkOnce,
    makeChecker,
    parseHealthCheck,
)
from mtlsproxy.interfaces import IHealthChecker, IHealthCheckerFactory
from mtlsproxy.pool import (
    MEMBERS_EXHAUSTED,
    NO_HEALTHY_MEMBER,
    ConnectionFacts,
    Member,
    Pool,
)
from mtlsproxy.selectors import SmoothWeightedRoundRobin


@attrs.frozen
class _MemberConfig:
    address: str
    port: int
    weight: int = 1


def _member(port: int, weight: int = 1) -> Member:
    return Member(_MemberConfig("127.0.0.1", port, weight))


FACTS = ConnectionFacts(listener="l", peerHost="127.0.0.1", peerPort=5555)
PASS = CheckResult(True, "ok")
FAIL = CheckResult(False, "down")
HANG = object()
INCONCLUSIVE = CheckResult(False, "the proxy is out of resources (EMFILE)", inconclusive=True)
"""
A scripted outcome: a Deferred that never fires by itself.
"""


def _builtins() -> dict[str, IHealthCheckerFactory]:
    """
    The built-in checker plugins, as declared in the plugin module.
    """
    from twisted.plugins import mtlsproxy_plugin

    found = [
        v for v in vars(mtlsproxy_plugin).values() if IHealthCheckerFactory.providedBy(v)
    ]
    return {f.name: f for f in found}


@implementer(IHealthChecker)
class ScriptedChecker:
    """
    Answers the checks of each member with scripted outcomes, then with
    C{default}.

    An outcome is a L{CheckResult}, an exception (a failed Deferred), or
    L{HANG} (a Deferred that fires only when cancelled).

    @ivar calls: C{(port, time)} of every check, in order.
    @ivar cancelled: The ports whose hanging checks were cancelled.
    """

    def __init__(self, clock: Any, default: object = PASS) -> None:
        self.clock = clock
        self.default = default
        self.scripts: dict[int, list[object]] = {}
        self.calls: list[tuple[int, float]] = []
        self.cancelled: list[int] = []

    def script(self, member: Member, *outcomes: object) -> None:
        self.scripts.setdefault(member.port, []).extend(outcomes)

    def check(self, member: Any) -> "Deferred[Any]":
        self.calls.append((member.port, self.clock.seconds()))
        outcomes = self.scripts.get(member.port)
        outcome = outcomes.pop(0) if outcomes else self.default
        if outcome is HANG:
            return Deferred(lambda d: self.cancelled.append(member.port))
        if isinstance(outcome, Exception):
            return fail(outcome)
        return succeed(outcome)

    def callsOf(self, member: Member) -> list[float]:
        return [t for port, t in self.calls if port == member.port]


def _config(**kwargs: Any) -> HealthCheckConfig:
    values: dict[str, Any] = dict(
        type="scripted", interval=5.0, timeout=2.0, healthy_threshold=2,
        unhealthy_threshold=3, jitter=0.0,
    )
    values.update(kwargs)
    return HealthCheckConfig(**values)


def _monitored(
    count: int = 1, **kwargs: Any
) -> tuple[MemoryReactorClock, Pool, ScriptedChecker, HealthMonitor]:
    reactor = MemoryReactorClock()
    pool = Pool(
        "app",
        [_member(9000 + i) for i in range(count)],
        SmoothWeightedRoundRobin(),
        clock=reactor,
    )
    checker = ScriptedChecker(reactor)
    monitor = HealthMonitor(reactor, pool, checker, _config(**kwargs), random=Random(4))
    return reactor, pool, checker, monitor


def _nextCheck(reactor: MemoryReactorClock, checker: ScriptedChecker, checks: int = 1) -> None:
    """
    Advance the clock, due call by due call, until C{checks} more checks ran.
    """
    goal = len(checker.calls) + checks
    while len(checker.calls) < goal:
        due = min(call.getTime() for call in reactor.getDelayedCalls())
        reactor.advance(max(0.0, due - reactor.seconds()))


class CheckResultTests(SynchronousTestCase):
    """
    Tests for L{CheckResult} and L{HealthCheckerPlugin}.
    """

    def test_frozen(self) -> None:
        """
        When a result is built, it compares by value and cannot be changed.
        """
        self.assertEqual(CheckResult(True, "ok"), PASS)
        self.assertFalse(PASS.inconclusive)
        self.assertNotEqual(CheckResult(False, "down", inconclusive=True), FAIL)
        with self.assertRaises(attrs.exceptions.FrozenInstanceError):
            PASS.healthy = False  # type: ignore[misc]

    def test_pluginsProvideInterfaces(self) -> None:
        """
        When the built-in declarations are checked with verifyObject, they
        provide IPlugin and IHealthCheckerFactory, and there are exactly the
        tcp, tls and http checkers.
        """
        builtins = _builtins()
        self.assertEqual(sorted(builtins), ["http", "tcp", "tls"])
        for factory in builtins.values():
            self.assertTrue(verifyObject(IPlugin, factory))
            self.assertTrue(verifyObject(IHealthCheckerFactory, factory))
        self.assertEqual(
            list(builtins["http"].options), ["path", "expected_status", "body_contains", "host"]
        )

    def test_pluginImportsLazily(self) -> None:
        """
        When a declared plugin makes a checker, it imports the checker by
        its dotted name and passes reactor, options and tls on.
        """
        plugin = HealthCheckerPlugin(
            name="x", description="d", options={}, checker="tests.test_health._recordArguments"
        )
        self.assertEqual(plugin.newChecker("R", {"a": 1}, "T"), ("R", {"a": 1}, "T"))


def _recordArguments(reactor: Any, options: Any, tls: Any) -> tuple[Any, Any, Any]:
    return (reactor, options, tls)


@implementer(IPlugin, IHealthCheckerFactory)
@attrs.frozen
class _PickyFactory:
    """
    A third-party factory that refuses its option with a plain ValueError.
    """

    name: str = "picky"
    description: str = "Refuses everything."
    options: Any = attrs.field(factory=lambda: {"port": "A port."})

    def newChecker(self, reactor: Any, options: Any, tls: Any) -> Any:
        if "port" in options:
            raise ValueError("port must be left out")
        return ScriptedChecker(reactor)


class ParseHealthCheckTests(SynchronousTestCase):
    """
    Tests for L{parseHealthCheck}: values and exact error messages.
    """

    KEY = "pools[0].health_check"

    def parse(self, table: object) -> HealthCheckConfig:
        factories = dict(_builtins(), picky=_PickyFactory())
        return parseHealthCheck(table, self.KEY, factories)

    def assertProblem(self, table: object, message: str) -> ConfigurationError:
        with self.assertRaises(ConfigurationError) as caught:
            self.parse(table)
        self.assertEqual(str(caught.exception), message)
        return caught.exception

    def test_defaults(self) -> None:
        """
        When only the type is given, every other setting has its default.
        """
        config = self.parse({"type": "tcp"})
        self.assertEqual(
            config,
            HealthCheckConfig(
                type="tcp", interval=5.0, timeout=2.0, healthy_threshold=2,
                unhealthy_threshold=3, jitter=0.1, initial_state="healthy", options={},
            ),
        )

    def test_everything(self) -> None:
        """
        When every key is given, common keys become attributes (integers of
        seconds as floats) and the checker's keys a frozen, hashable mapping.
        """
        config = self.parse(
            {
                "type": "http", "interval": 10, "timeout": 1.5, "healthy_threshold": 1,
                "unhealthy_threshold": 5, "jitter": 0, "initial_state": "unhealthy",
                "path": "/healthz", "expected_status": "200-299,304",
                "body_contains": "ok", "host": "app.internal",
            }
        )
        self.assertEqual((config.interval, config.jitter), (10.0, 0.0))
        self.assertEqual(config.initial_state, "unhealthy")
        self.assertIsInstance(config.options, FrozenOptions)
        self.assertEqual(
            dict(config.options),
            {"path": "/healthz", "expected_status": "200-299,304", "body_contains": "ok",
             "host": "app.internal"},
        )
        self.assertEqual(hash(config), hash(self.parse(dict(
            type="http", interval=10, timeout=1.5, healthy_threshold=1, unhealthy_threshold=5,
            jitter=0, initial_state="unhealthy", path="/healthz",
            expected_status="200-299,304", body_contains="ok", host="app.internal"))))

    def test_frozenOptions(self) -> None:
        """
        When options hold arrays and tables, they are frozen too.
        """
        options = FrozenOptions({"a": [1, [2]], "b": {"c": [3]}})
        self.assertEqual(options["a"], (1, (2,)))
        self.assertIsInstance(options["b"], FrozenOptions)
        self.assertEqual(options["b"]["c"], (3,))
        hash(options)

    def test_notATable(self) -> None:
        """
        When health_check is not a table, the error says so.
        """
        self.assertProblem("tcp", 'pools[0].health_check: expected a table, got "tcp"')

    def test_missingType(self) -> None:
        """
        When the type is missing, the error names the key.
        """
        self.assertProblem({"interval": 5}, "pools[0].health_check: missing required key 'type'")

    def test_typeNotAString(self) -> None:
        """
        When the type is not a string, the error points at it.
        """
        self.assertProblem(
            {"type": 3},
            'pools[0].health_check.type: expected a health checker name such as "tcp",'
            " got integer 3",
        )

    def test_unknownType(self) -> None:
        """
        When the type names no installed plugin, the error lists the
        available ones.
        """
        error = self.assertProblem(
            {"type": "htp"},
            "pools[0].health_check.type: unknown health checker 'htp';"
            " available: http, picky, tcp, tls",
        )
        self.assertEqual(error.key, "pools[0].health_check.type")

    def test_unknownKey(self) -> None:
        """
        When a key is neither common nor the checker's, the error lists the
        keys this checker type accepts.
        """
        self.assertProblem(
            {"type": "http", "paht": "/"},
            "pools[0].health_check: unknown key 'paht' for health checker type \"http\";"
            " expected one of: type, interval, timeout, healthy_threshold,"
            " unhealthy_threshold, jitter, initial_state, path, expected_status,"
            " body_contains, host",
        )

    def test_keyOfAnotherChecker(self) -> None:
        """
        When a key belongs to another checker type, it is refused too.
        """
        self.assertProblem(
            {"type": "tcp", "path": "/"},
            "pools[0].health_check: unknown key 'path' for health checker type \"tcp\";"
            " expected one of: " + ", ".join(COMMON_KEYS),
        )

    def test_badCommonValues(self) -> None:
        """
        When a common value has the wrong type or range, the error names the
        key, what was expected and what was found.
        """
        seconds = "expected a number of seconds greater than 0"
        threshold = "expected an integer of at least 1"
        fraction = "expected a number from 0 up to (not including) 1"
        cases = [
            ({"interval": "5s"}, f'interval: {seconds}, got "5s"'),
            ({"interval": 0}, f"interval: {seconds}, got float 0.0"),
            ({"timeout": True}, f"timeout: {seconds}, got boolean true"),
            ({"timeout": 6}, "timeout: expected at most interval (5.0), got float 6.0"),
            ({"healthy_threshold": 0}, f"healthy_threshold: {threshold}, got integer 0"),
            ({"unhealthy_threshold": 2.0}, f"unhealthy_threshold: {threshold}, got float 2.0"),
            ({"jitter": 1}, f"jitter: {fraction}, got float 1.0"),
            ({"jitter": -0.1}, f"jitter: {fraction}, got float -0.1"),
            (
                {"initial_state": "up"},
                'initial_state: expected one of "healthy", "unhealthy", got "up"',
            ),
        ]
        for extra, message in cases:
            self.assertProblem(dict(type="tcp", **extra), f"pools[0].health_check.{message}")

    def test_badHTTPOptions(self) -> None:
        """
        When an http option is invalid, the checker's own validation refuses
        it and the error points at the option.
        """
        path = 'expected a path starting with "/" such as "/healthz"'
        status = 'expected status codes from 100 to 599 such as "200-399" or "200,204"'
        host = 'expected a host name such as "app.internal" or "app.internal:8080"'
        cases = [
            ({"path": "healthz"}, f'path: {path}, got "healthz"'),
            ({"path": "/a b"}, f'path: {path}, got "/a b"'),
            ({"expected_status": "2xx"}, f'expected_status: {status}, got "2xx"'),
            ({"expected_status": "399-200"}, f'expected_status: {status}, got "399-200"'),
            ({"expected_status": [200]}, f"expected_status: {status}, got an array"),
            (
                {"body_contains": 3},
                "body_contains: expected a non-empty string of at most 65536 bytes,"
                " got integer 3",
            ),
            ({"host": "a b"}, f'host: {host}, got "a b"'),
        ]
        for extra, message in cases:
            self.assertProblem(dict(type="http", **extra), f"pools[0].health_check.{message}")

    def test_statusAsInteger(self) -> None:
        """
        When expected_status is a TOML integer, it is one status code.
        """
        config = self.parse({"type": "http", "expected_status": 204})
        self.assertEqual(config.options["expected_status"], 204)

    def test_plainValueError(self) -> None:
        """
        When a third-party factory refuses its options with a plain
        ValueError, the message is kept and the error points at the table.
        """
        self.assertProblem(
            {"type": "picky", "port": 1}, "pools[0].health_check: port must be left out"
        )

    def test_makeChecker(self) -> None:
        """
        When the checker is made for the running proxy, it gets the reactor,
        the options and the TLS settings; an unknown type and invalid
        options are configuration errors there too.
        """
        reactor = MemoryReactorClock()
        config = self.parse({"type": "http", "path": "/x"})
        checker = makeChecker(config, reactor, None, _builtins(), self.KEY)
        self.assertTrue(verifyObject(IHealthChecker, checker))
        with self.assertRaises(ConfigurationError) as caught:
            makeChecker(config, reactor, None, {}, self.KEY)
        self.assertEqual(
            str(caught.exception),
            "pools[0].health_check.type: unknown health checker 'http';"
            " available: (none installed)",
        )
        bad = attrs.evolve(config, options={"path": "x"})
        with self.assertRaises(ConfigurationError) as caught:
            makeChecker(bad, reactor, None, _builtins(), self.KEY)
        self.assertEqual(caught.exception.key, "pools[0].health_check.path")

    def test_optionError(self) -> None:
        """
        When an OptionError is made, it is a ValueError naming the key.
        """
        error = OptionError("path", "bad")
        self.assertIsInstance(error, ValueError)
        self.assertEqual((str(error), error.key, error.problem), ("path: bad", "path", "bad"))


class PassiveEjectionConfigTests(SynchronousTestCase):
    """
    Tests for L{PassiveEjectionConfig}.
    """

    def test_defaults(self) -> None:
        """
        When nothing is given, ejection is on: 5 failures, 30 s doubling up
        to 300 s.
        """
        config = PassiveEjectionConfig()
        self.assertEqual(
            (config.eject_after, config.eject_backoff, config.eject_backoff_max), (5, 30.0, 300.0)
        )
        self.assertTrue(config.enabled)
        self.assertEqual(
            [config.duration(n) for n in range(6)], [30.0, 60.0, 120.0, 240.0, 300.0, 300.0]
        )
        self.assertEqual(config.duration(10_000), 300.0)

    def test_invalid(self) -> None:
        """
        When a value is out of range, the error names the pool-level key.
        """
        cases = [
            (
                dict(eject_after=-1),
                "eject_after: expected an integer of at least 0, got integer -1",
            ),
            (
                dict(eject_backoff=0),
                "eject_backoff: expected a number of seconds greater than 0, got float 0.0",
            ),
            (dict(eject_backoff=60, eject_backoff_max=30),
             "eject_backoff_max: expected at least eject_backoff (60.0), got float 30.0"),
        ]
        for kwargs, message in cases:
            with self.assertRaises(ConfigurationError) as caught:
                PassiveEjectionConfig(**kwargs)
            self.assertEqual(str(caught.exception), message)


class CheckOnceTests(SynchronousTestCase):
    """
    Tests for L{checkOnce}: whatever a checker does becomes a result.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.checker = ScriptedChecker(self.clock)
        self.member = _member(9000)

    def outcome(self, *script: object, timeout: float = 2.0) -> Deferred[Any]:
        self.checker.script(self.member, *script)
        return checkOnce(self.clock, self.checker, self.member, timeout)

    def test_result(self) -> None:
        """
        When the checker answers with a result, that is the result and no
        timer is left.
        """
        self.assertEqual(self.successResultOf(self.outcome(FAIL)), FAIL)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout(self) -> None:
        """
        When the check takes longer than the timeout, it is cancelled and the
        result says how long it waited.
        """
        checking = self.outcome(HANG, timeout=0.5)
        self.clock.advance(0.49)
        self.assertNoResult(checking)
        self.clock.advance(0.01)
        self.assertEqual(self.successResultOf(checking), CheckResult(False, "timeout after 0.5s"))
        self.assertEqual(self.checker.cancelled, [9000])

    def test_failure(self) -> None:
        """
        When the checker's Deferred fails, or check raises, the result is
        unhealthy with the exception's message (or its name).
        """
        self.assertEqual(
            self.successResultOf(self.outcome(RuntimeError("boom"))), CheckResult(False, "boom")
        )
        self.assertEqual(
            self.successResultOf(self.outcome(KeyError())), CheckResult(False, "KeyError")
        )

        class Raising:
            def check(self, member: Any) -> Any:
                raise ValueError("synchronous")

        self.assertEqual(
            self.successResultOf(checkOnce(self.clock, Raising(), self.member, 1.0)),
            CheckResult(False, "synchronous"),
        )

    def test_notAResult(self) -> None:
        """
        When the checker answers with something else, the result is
        unhealthy and the bug is logged.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertEqual(
            self.successResultOf(self.outcome(True)),
            CheckResult(False, "checker returned bool, not a CheckResult"),
        )
        self.assertEqual([e["log_level"] for e in observer], [LogLevel.error])

    def test_ownResourceFailureInconclusive(self) -> None:
        """
        When the checker's Deferred fails because the proxy itself is out of
        descriptors (EMFILE from socket(), ENFILE from connect()), the result
        is inconclusive, says it is the proxy's problem and names the errno;
        any other connect error stays a plain failure.
        """
        import errno

        from twisted.internet.error import ConnectBindError, ConnectError, ConnectionRefusedError

        result = self.successResultOf(
            self.outcome(ConnectBindError(errno.EMFILE, "Too many open files"))
        )
        self.assertEqual((result.healthy, result.inconclusive), (False, True))
        self.assertTrue(result.reason.startswith("the proxy is out of resources (EMFILE)"), result)
        result = self.successResultOf(self.outcome(ConnectError(errno.ENFILE, "table full")))
        self.assertEqual((result.healthy, result.inconclusive), (False, True))
        self.assertIn("(ENFILE)", result.reason)
        result = self.successResultOf(self.outcome(ConnectionRefusedError()))
        self.assertEqual((result.healthy, result.inconclusive), (False, False))

    def test_cancelledByCaller(self) -> None:
        """
        When the caller cancels, the check is cancelled and the Deferred
        fails with CancelledError.
        """
        from twisted.internet.defer import CancelledError

        checking = self.outcome(HANG)
        checking.cancel()
        self.failureResultOf(checking, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HealthMonitorTests(SynchronousTestCase):
    """
    Tests for L{HealthMonitor}: timing, thresholds, logging, lifecycle.
    """

    def test_firstChecksSpread(self) -> None:
        """
        When the monitor starts, each member's first check is at a random
        moment within one interval, and nothing is checked at once.
        """
        reactor, pool, checker, monitor = _monitored(20)
        monitor.startService()
        times = [call.getTime() for call in reactor.getDelayedCalls()]
        self.assertEqual(len(times), 20)
        self.assertTrue(all(0 <= t < 5.0 for t in times), times)
        self.assertGreater(len(set(times)), 15)
        self.assertEqual(checker.calls, [])

    def test_jitterBounds(self) -> None:
        """
        When jitter is 0.1, the gaps between checks of one member stay within
        interval ± 10% and are not all the same.
        """
        reactor, pool, checker, monitor = _monitored(1, jitter=0.1)
        monitor.startService()
        _nextCheck(reactor, checker, 200)
        times = checker.callsOf(pool.members[0])
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.assertTrue(all(4.5 <= gap <= 5.5 for gap in gaps), (min(gaps), max(gaps)))
        self.assertLess(min(gaps), 4.7)
        self.assertGreater(max(gaps), 5.3)

    def test_noJitter(self) -> None:
        """
        When jitter is 0, checks of one member are exactly one interval
        apart.
        """
        reactor, pool, checker, monitor = _monitored(1)
        monitor.startService()
        _nextCheck(reactor, checker, 4)
        times = checker.callsOf(pool.members[0])
        self.assertEqual([b - a for a, b in zip(times, times[1:])], [5.0, 5.0, 5.0])

    def test_unhealthyAfterThreshold(self) -> None:
        """
        When a healthy member fails fewer checks in a row than the threshold,
        it stays healthy; the threshold-th consecutive failure makes it
        unhealthy.
        """
        reactor, pool, checker, monitor = _monitored(1)
        member = pool.members[0]
        checker.script(member, FAIL, FAIL, PASS, FAIL, FAIL)
        monitor.startService()
        _nextCheck(reactor, checker, 5)
        self.assertTrue(member.healthy)
        checker.script(member, FAIL)
        _nextCheck(reactor, checker)
        self.assertFalse(member.healthy)

    def test_healthyAfterThreshold(self) -> None:
        """
        When an unhealthy member passes fewer checks in a row than the
        healthy threshold it stays unhealthy; the threshold-th consecutive
        pass makes it healthy.
        """
        reactor, pool, checker, monitor = _monitored(1)
        member = pool.members[0]
        checker.script(member, FAIL, FAIL, FAIL, PASS, FAIL, PASS)
        monitor.startService()
        _nextCheck(reactor, checker, 6)
        self.assertFalse(member.healthy)
        _nextCheck(reactor, checker)
        self.assertTrue(member.healthy)

    def test_transitionsLogged(self) -> None:
        """
        When a member changes state, one event is logged with the pool, the
        member as host:port, the new state and the reason; checks that
        change nothing log nothing.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        reactor, pool, checker, monitor = _monitored(1, unhealthy_threshold=1, healthy_threshold=1)
        member = pool.members[0]
        checker.script(member, PASS, CheckResult(False, "connection refused"), FAIL,
                       CheckResult(True, "HTTP 200"))
        monitor.startService()
        _nextCheck(reactor, checker, 4)
        events = [e for e in observer if "healthy" in e]
        self.assertEqual(len(events), 2)
        down, up = events
        self.assertEqual(down["log_format"], "Pool {pool} member {member} is now {state}: {reason}")
        self.assertEqual(
            {k: down[k] for k in ("pool", "member", "healthy", "state", "reason")},
            {"pool": "app", "member": "127.0.0.1:9000", "healthy": False,
             "state": "unhealthy", "reason": "connection refused"},
        )
        self.assertEqual(down["log_level"], LogLevel.warn)
        self.assertEqual((up["healthy"], up["state"], up["reason"]), (True, "healthy", "HTTP 200"))
        self.assertEqual(up["log_level"], LogLevel.info)

    def test_inconclusiveChangesNothing(self) -> None:
        """
        When checks are inconclusive (the proxy was out of descriptors), a
        healthy member stays healthy however many there are, and the
        consecutive failures before them still count: the next real failure
        is the threshold-th.  The same for passes towards healthy.
        """
        reactor, pool, checker, monitor = _monitored(1, unhealthy_threshold=3, healthy_threshold=2)
        member = pool.members[0]
        checker.script(member, FAIL, FAIL, *[INCONCLUSIVE] * 5)
        monitor.startService()
        _nextCheck(reactor, checker, 7)
        self.assertTrue(member.healthy)
        self.assertEqual(member.lastCheck, (INCONCLUSIVE, reactor.seconds()))
        checker.script(member, FAIL)
        _nextCheck(reactor, checker)
        self.assertFalse(member.healthy)

        checker.script(member, PASS, INCONCLUSIVE, INCONCLUSIVE)
        _nextCheck(reactor, checker, 3)
        self.assertFalse(member.healthy)
        checker.script(member, PASS)
        _nextCheck(reactor, checker)
        self.assertTrue(member.healthy)

    def test_inconclusiveLogged(self) -> None:
        """
        When a check is inconclusive, a warning names the pool, the member,
        the reason and the health it keeps.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        reactor, pool, checker, monitor = _monitored(1)
        checker.script(pool.members[0], INCONCLUSIVE)
        monitor.startService()
        _nextCheck(reactor, checker)
        [event] = [e for e in observer if "inconclusive" in e["log_format"]]
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(
            {k: event[k] for k in ("pool", "member", "reason", "state")},
            {"pool": "app", "member": "127.0.0.1:9000",
             "reason": "the proxy is out of resources (EMFILE)", "state": "healthy"},
        )

    def test_lastCheckRecorded(self) -> None:
        """
        When a check ends, the member's lastCheck is the result and the time.
        """
        reactor, pool, checker, monitor = _monitored(1)
        member = pool.members[0]
        self.assertIsNone(member.lastCheck)
        checker.script(member, FAIL)
        monitor.startService()
        _nextCheck(reactor, checker)
        self.assertEqual(member.lastCheck, (FAIL, reactor.seconds()))

    def test_timeoutIsAFailure(self) -> None:
        """
        When checks hang past the timeout, they are cancelled, count as
        failures with a "timeout after" reason, and the next check still
        starts one interval after the previous one started.
        """
        reactor, pool, checker, monitor = _monitored(1, unhealthy_threshold=2)
        member = pool.members[0]
        checker.script(member, HANG, HANG)
        monitor.startService()
        _nextCheck(reactor, checker)
        started = reactor.seconds()
        reactor.advance(1.9)
        self.assertIsNone(member.lastCheck)
        reactor.advance(0.1)
        self.assertEqual(
            member.lastCheck, (CheckResult(False, "timeout after 2.0s"), started + 2.0)
        )
        self.assertTrue(member.healthy)
        _nextCheck(reactor, checker)
        self.assertEqual(reactor.seconds(), started + 5.0)
        reactor.advance(2.0)
        self.assertFalse(member.healthy)
        self.assertEqual(checker.cancelled, [9000, 9000])

    def test_slowCheckDelaysNext(self) -> None:
        """
        When a check takes longer than the interval (timeout equal to it),
        the next one starts right after it ends: checks never overlap.
        """
        reactor, pool, checker, monitor = _monitored(1, interval=2.0, timeout=2.0)
        member = pool.members[0]
        checker.script(member, HANG)
        monitor.startService()
        _nextCheck(reactor, checker)
        first = reactor.seconds()
        reactor.advance(2.0)
        self.assertEqual(checker.callsOf(member), [first, first + 2.0])

    def test_stopCancelsEverything(self) -> None:
        """
        When the monitor stops, scheduled checks are cancelled, checks in
        flight are cancelled, the returned Deferred fires, health is left as
        it was and nothing runs any more.
        """
        reactor, pool, checker, monitor = _monitored(3)
        first, second, third = pool.members
        checker.script(first, HANG)
        checker.script(second, HANG)
        third.healthy = False
        monitor.startService()
        _nextCheck(reactor, checker, 2)
        self.assertEqual(sorted(port for port, _ in checker.calls), [9000, 9001])
        stopped = monitor.stopService()
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(sorted(checker.cancelled), [9000, 9001])
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertEqual([m.healthy for m in pool.members], [True, True, False])
        self.assertEqual([m.lastCheck for m in pool.members], [None, None, None])
        pool.addMember(_member(9100))
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertFalse(monitor.running)

    def test_restart(self) -> None:
        """
        When a stopped monitor starts again, it checks every member again.
        """
        reactor, pool, checker, monitor = _monitored(2)
        monitor.startService()
        self.successResultOf(monitor.stopService())
        monitor.startService()
        self.assertEqual(len(reactor.getDelayedCalls()), 2)

    def test_memberAdded(self) -> None:
        """
        When a member is added to the pool at run time, it is checked from
        then on, first within one interval.
        """
        reactor, pool, checker, monitor = _monitored(1)
        monitor.startService()
        reactor.advance(100)
        added = _member(9100)
        pool.addMember(added)
        self.assertEqual(added.poolName, "app")
        _nextCheck(reactor, checker, 3)
        self.assertIn(added, monitor.watching())
        self.assertTrue(100 <= checker.callsOf(added)[0] < 105)

    def test_memberRemoved(self) -> None:
        """
        When a member is removed at run time, its check in flight is
        cancelled and it is not checked again; the others go on.
        """
        reactor, pool, checker, monitor = _monitored(2)
        gone, kept = pool.members
        checker.script(gone, HANG)
        checker.script(kept, HANG)
        monitor.startService()
        _nextCheck(reactor, checker, 2)
        pool.removeMember(gone)
        self.assertEqual(checker.cancelled, [9000])
        self.assertEqual(monitor.watching(), [kept])
        self.assertEqual(len(reactor.getDelayedCalls()), 1)
        reactor.pump([1.0] * 60)
        self.assertEqual(len(checker.callsOf(gone)), 1)
        self.assertGreater(len(checker.callsOf(kept)), 5)

    def test_sync(self) -> None:
        """
        When pool.members is replaced directly, sync starts and stops checks
        to match it.
        """
        reactor, pool, checker, monitor = _monitored(2)
        monitor.startService()
        old, kept = pool.members
        new = _member(9200)
        pool.members = [kept, new]
        monitor.sync()
        self.assertEqual(sorted(m.port for m in monitor.watching()), [9001, 9200])
        self.assertEqual(len(reactor.getDelayedCalls()), 2)

    def test_initialStateUnhealthy(self) -> None:
        """
        When initial_state is "unhealthy", a member never checked starts
        unhealthy (logged) and its first passing check makes it healthy;
        from then on the thresholds apply.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        reactor, pool, checker, monitor = _monitored(1, initial_state="unhealthy")
        member = pool.members[0]
        checker.script(member, PASS, FAIL, FAIL, FAIL)
        monitor.startService()
        self.assertFalse(member.healthy)
        self.assertEqual(observer[0]["reason"], "not checked yet")
        _nextCheck(reactor, checker)
        self.assertTrue(member.healthy)
        _nextCheck(reactor, checker, 2)
        self.assertTrue(member.healthy)
        _nextCheck(reactor, checker)
        self.assertFalse(member.healthy)

    def test_initialStateUnhealthyFirstFailure(self) -> None:
        """
        When initial_state is "unhealthy" and the first check fails, the
        member needs healthy_threshold passes like any unhealthy member.
        """
        reactor, pool, checker, monitor = _monitored(1, initial_state="unhealthy")
        member = pool.members[0]
        checker.script(member, FAIL, PASS)
        monitor.startService()
        _nextCheck(reactor, checker, 2)
        self.assertFalse(member.healthy)
        _nextCheck(reactor, checker)
        self.assertTrue(member.healthy)

    def test_checkedMemberKeepsState(self) -> None:
        """
        When a new monitor (a reload) watches a member that was checked
        before, it keeps the member's state whatever initial_state says.
        """
        reactor, pool, checker, monitor = _monitored(1, initial_state="unhealthy")
        member = pool.members[0]
        member.lastCheck = (PASS, 0.0)
        monitor.startService()
        self.assertTrue(member.healthy)

    def test_healthyEndsEjection(self) -> None:
        """
        When an ejected member becomes healthy through checks, its ejection
        ends at once.
        """
        reactor, pool, checker, monitor = _monitored(1, healthy_threshold=1, unhealthy_threshold=1)
        member = pool.members[0]
        for _ in range(5):
            member.connectFailed()
        self.assertTrue(member.ejected())
        checker.script(member, FAIL, PASS)
        monitor.startService()
        _nextCheck(reactor, checker, 2)
        self.assertTrue(member.healthy)
        self.assertFalse(member.ejected())
        self.assertEqual(member.ejections, 1)

    def test_establishedConnectionsUntouched(self) -> None:
        """
        When a member carrying connections becomes unhealthy, its
        connections are left alone: only new ones avoid it.
        """
        reactor, pool, checker, monitor = _monitored(2, unhealthy_threshold=1)
        down, up = pool.members
        down.connectionOpened()
        checker.script(down, FAIL)
        monitor.startService()
        _nextCheck(reactor, checker, 2)
        self.assertFalse(down.healthy)
        self.assertEqual(down.activeConnections, 1)
        self.assertEqual({pool.pick(FACTS).port for _ in range(4)}, {9001})

    def test_serviceName(self) -> None:
        """
        When made, the monitor is a named service for its pool.
        """
        reactor, pool, checker, monitor = _monitored(1)
        self.assertEqual(monitor.name, "health:app")


class PassiveEjectionTests(SynchronousTestCase):
    """
    Tests for passive ejection on L{Member}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = Pool(
            "app", [_member(9000), _member(9001)], SmoothWeightedRoundRobin(), clock=self.clock
        )
        self.member = self.pool.members[0]
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def fail(self, times: int) -> None:  # type: ignore[override]
        for _ in range(times):
            self.member.connectFailed(self.clock.seconds())

    def test_ejectedAfterConsecutiveFailures(self) -> None:
        """
        When a member fails eject_after - 1 times it stays available; the
        next failure ejects it for eject_backoff seconds, logged.
        """
        self.fail(4)
        self.assertTrue(self.member.available())
        self.fail(1)
        self.assertFalse(self.member.available())
        self.assertEqual(self.member.ejectedUntil, 30.0)
        self.assertEqual({self.pool.pick(FACTS).port for _ in range(4)}, {9001})
        [event] = list(self.observer)
        self.assertEqual(
            event["log_format"],
            "Pool {pool} member {member} ejected for {duration}s after {failures}"
            " consecutive connect failures",
        )
        self.assertEqual(
            {k: event[k] for k in ("pool", "member", "duration", "failures", "until")},
            {"pool": "app", "member": "127.0.0.1:9000", "duration": 30.0, "failures": 5,
             "until": 30.0},
        )
        self.assertEqual(self.member.failedConnections, 5)

    def test_successResetsCount(self) -> None:
        """
        When a connection succeeds between failures (connectSucceeded, or
        connectionOpened for an established connection), the count starts
        over.
        """
        self.fail(4)
        self.member.connectSucceeded()
        self.fail(4)
        self.member.connectionOpened()
        self.fail(4)
        self.assertTrue(self.member.available())

    def test_returnsAfterBackoff(self) -> None:
        """
        When the ejection time is over, the member is available again and
        its return is logged.
        """
        self.fail(5)
        self.clock.advance(29.9)
        self.assertTrue(self.member.ejected())
        self.clock.advance(0.1)
        self.assertTrue(self.member.available())
        self.assertEqual(self.observer[-1]["log_format"],
                         "Pool {pool} member {member} returns from ejection: {reason}")
        self.assertEqual(self.observer[-1]["reason"], "ejection time over")

    def test_backoffDoubles(self) -> None:
        """
        When a member is ejected again without a success in between, each
        ejection lasts twice as long, up to eject_backoff_max; a success
        resets the back-off.
        """
        durations = []
        for _ in range(6):
            self.fail(5)
            durations.append(self.member.ejectedUntil - self.clock.seconds())
            self.clock.advance(durations[-1])
        self.assertEqual(durations, [30.0, 60.0, 120.0, 240.0, 300.0, 300.0])
        self.member.connectSucceeded()
        self.fail(5)
        self.assertEqual(self.member.ejectedUntil - self.clock.seconds(), 30.0)

    def test_failuresWhileEjected(self) -> None:
        """
        When failures are reported while the member is ejected (attempts
        that started before), they neither extend the ejection nor count
        towards the next one.
        """
        self.fail(5)
        self.fail(10)
        self.assertEqual(self.member.ejectedUntil, 30.0)
        self.clock.advance(30)
        self.fail(4)
        self.assertTrue(self.member.available())

    def test_disabled(self) -> None:
        """
        When eject_after is 0, members are never ejected.
        """
        pool = Pool("p", [_member(1)], SmoothWeightedRoundRobin(), clock=self.clock,
                    ejectionConfig=PassiveEjectionConfig(eject_after=0))
        for _ in range(100):
            pool.members[0].connectFailed()
        self.assertTrue(pool.members[0].available())
        self.assertEqual(pool.members[0].failedConnections, 100)

    def test_defaultNowIsPoolClock(self) -> None:
        """
        When connectFailed is called without a time, the pool's clock is
        read.
        """
        self.clock.advance(1000)
        for _ in range(5):
            self.member.connectFailed()
        self.assertEqual(self.member.ejectedUntil, 1030.0)

    def test_bareMember(self) -> None:
        """
        When a member is not in a pool, it uses the default settings and the
        wall clock.
        """
        member = _member(1)
        for _ in range(5):
            member.connectFailed()
        self.assertTrue(member.ejected())
        self.assertIn("ejected", repr(member))


class AllUnhealthyTests(SynchronousTestCase):
    """
    Tests for C{all_unhealthy} in L{Pool.candidates} and L{Pool.pick}.
    """

    def pool(self, mode: str) -> Pool:
        return Pool("app", [_member(9000), _member(9001), _member(9002, weight=0)],
                    SmoothWeightedRoundRobin(), clock=Clock(), allUnhealthy=mode)

    def test_reject(self) -> None:
        """
        When every member is unhealthy and the pool rejects, there is no
        candidate and the reason is no_healthy_member.
        """
        pool = self.pool("reject")
        for member in pool.members:
            member.healthy = False
        self.assertEqual(pool.candidates(), [])
        self.assertIsNone(pool.pick(FACTS))
        self.assertEqual(pool.noCandidateReason(), NO_HEALTHY_MEMBER)

    def test_useAllFailsOpen(self) -> None:
        """
        When every member is unhealthy or ejected and the pool uses all,
        every usable member (weight above zero, not draining) is a candidate
        and this is logged as an error once; when one recovers, health
        applies again and that is logged once.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        pool = self.pool("use_all")
        first, second, _ = pool.members
        first.healthy = False
        for _ in range(5):
            second.connectFailed()
        self.assertEqual({pool.pick(FACTS).port for _ in range(6)}, {9000, 9001})
        self.assertTrue(pool.failingOpen)
        self.assertEqual([e["log_level"] for e in observer if "failingOpen" in e], [LogLevel.error])
        first.healthy = True
        self.assertEqual({pool.pick(FACTS).port for _ in range(4)}, {9000})
        self.assertFalse(pool.failingOpen)
        self.assertEqual(
            [e["failingOpen"] for e in observer if "failingOpen" in e], [True, False]
        )
        self.assertEqual(observer[1]["count"], 2)

    def test_useAllRespectsDrainingAndExclusion(self) -> None:
        """
        When failing open, draining members and members already tried are
        still left out, and with all of them tried the reason is
        members_exhausted.
        """
        pool = self.pool("use_all")
        first, second, _ = pool.members
        first.healthy = second.healthy = False
        second.draining = True
        self.assertEqual(pool.candidates(), [first])
        self.assertEqual(pool.candidates([first]), [])
        self.assertEqual(pool.noCandidateReason([first]), MEMBERS_EXHAUSTED)

    def test_exhausted(self) -> None:
        """
        When healthy members exist but were all tried, the reason is
        members_exhausted; with candidates left there is no reason.
        """
        pool = self.pool("reject")
        self.assertIsNone(pool.noCandidateReason())
        self.assertEqual(pool.noCandidateReason(pool.members[:2]), MEMBERS_EXHAUSTED)

    def test_badMode(self) -> None:
        """
        When the mode is not reject or use_all, the pool refuses it.
        """
        self.assertRaises(ValueError, self.pool, "fail_open")


class PoolMembershipTests(SynchronousTestCase):
    """
    Tests for L{Pool.fromConfig}, L{Pool.addMember} and L{Pool.removeMember}.
    """

    def test_fromConfig(self) -> None:
        """
        When a pool is built from a configuration with the pool-level health
        keys, they are applied; without them the defaults are.
        """

        @attrs.frozen
        class PoolConfig:
            name: str
            members: tuple[_MemberConfig, ...]
            all_unhealthy: str = "use_all"
            eject_after: int = 2
            eject_backoff: float = 10.0
            eject_backoff_max: float = 15.0

        clock = Clock()
        members = (_MemberConfig("h", 1),)
        pool = Pool.fromConfig(PoolConfig("p", members), SmoothWeightedRoundRobin(), clock)
        self.assertEqual(pool.allUnhealthy, "use_all")
        self.assertEqual(pool.members[0].ejectionConfig, PassiveEjectionConfig(2, 10.0, 15.0))
        self.assertIs(pool.members[0].clock, clock)

        @attrs.frozen
        class OldPoolConfig:
            name: str
            members: tuple[_MemberConfig, ...]

        pool = Pool.fromConfig(OldPoolConfig("p", members), SmoothWeightedRoundRobin())
        self.assertEqual(
            (pool.allUnhealthy, pool.ejectionConfig), ("reject", PassiveEjectionConfig())
        )

    def test_addRemove(self) -> None:
        """
        When members are added and removed, watchers hear of it; adding one
        twice or removing an absent one is an error.
        """
        events: list[tuple[str, int]] = []

        class Watcher:
            def memberAdded(self, member: Member) -> None:
                events.append(("added", member.port))

            def memberRemoved(self, member: Member) -> None:
                events.append(("removed", member.port))

        pool = Pool("p", [], SmoothWeightedRoundRobin())
        watcher = Watcher()
        pool.addWatcher(watcher)
        pool.addWatcher(watcher)
        member = _member(1)
        pool.addMember(member)
        self.assertRaises(ValueError, pool.addMember, member)
        pool.removeMember(member)
        self.assertRaises(ValueError, pool.removeMember, member)
        pool.removeWatcher(watcher)
        pool.addMember(member)
        self.assertEqual(events, [("added", 1), ("removed", 1)])

    def test_hostPort(self) -> None:
        """
        When a member's address is IPv6, hostPort brackets it.
        """
        self.assertEqual(Member(_MemberConfig("::1", 8443)).hostPort, "[::1]:8443")
        self.assertEqual(Member(_MemberConfig("app", 8443)).hostPort, "app:8443")
