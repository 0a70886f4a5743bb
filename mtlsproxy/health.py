# -*- test-case-name: tests.test_health -*-
"""
Active health checking: the C{[pools.health_check]} settings, the result of
one check, and the service that checks every member of a pool on a timer.

What one check does is a plugin's business (L{IHealthCheckerFactory},
built-ins in L{mtlsproxy.checkers}); this module decides when to check, how
long to wait, and when a run of results changes a member's C{healthy} flag.
The selector never sees an unhealthy member (see L{mtlsproxy.pool.Pool}).
Established connections are never touched by a health change: only new
connections avoid an unhealthy member.

The module is imported by the plugin declarations in
C{twisted/plugins/mtlsproxy_plugin.py}, so it stays light: no reactor, no
TLS or HTTP code at import time.
"""

from __future__ import annotations

import json
import math
import random as _random
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Iterator,
    Literal,
    Mapping,
    Optional,
    Union,
)

import attrs
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from twisted.python.reflect import namedAny
from zope.interface import implementer

from .errors import ConfigurationError, describeValue, joinKey
from .interfaces import IHealthCheckerFactory

if TYPE_CHECKING:  # pragma: no cover
    from .pool import Member, Pool

__all__ = [
    "CheckResult",
    "OptionError",
    "FrozenOptions",
    "describeValue",
    "HealthCheckConfig",
    "PassiveEjectionConfig",
    "ALL_UNHEALTHY_CHOICES",
    "COMMON_KEYS",
    "parseHealthCheck",
    "makeChecker",
    "HealthCheckerPlugin",
    "checkOnce",
    "HealthMonitor",
]

_log = Logger()


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@attrs.frozen
class CheckResult:
    """
    The outcome of one check of one member.

    @ivar healthy: Did the check pass?
    @ivar reason: One line for humans and logs, for a pass as well as a
        failure: C{"HTTP 200"}, C{"connection refused"},
        C{"timeout after 2.0s"}.
    @ivar inconclusive: The check could not be made for a reason of the
        proxy's own, not the member's (the proxy ran out of file
        descriptors, socket buffers or ephemeral ports: see
        L{mtlsproxy.pool.LOCAL_RESOURCE_ERRNOS}).  Such a result is
        recorded and logged but changes neither the member's health nor
        the threshold counts: under descriptor exhaustion every check fails
        and would otherwise mark every healthy member down.  Give it with
        C{healthy=False}.
    """

    healthy: bool
    reason: str
    inconclusive: bool = attrs.field(default=False, kw_only=True)


class OptionError(ValueError):
    """
    A checker-specific option of C{[pools.health_check]} is invalid.

    Checker factories may raise it from C{newChecker} instead of a plain
    L{ValueError} so that the configuration error points at the key itself
    (C{pools[0].health_check.expected_status}) rather than at the table.

    @ivar key: The option's key, such as C{"expected_status"}.
    @ivar problem: What is wrong and what was expected.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def _freeze(value: object) -> object:
    """
    Make a TOML value immutable: arrays become tuples, tables
    L{FrozenOptions}.
    """
    if isinstance(value, FrozenOptions):
        return value
    if isinstance(value, Mapping):
        return FrozenOptions(value)
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


class FrozenOptions(Mapping[str, Any]):
    """
    An immutable, hashable mapping: the checker-specific keys of a
    C{[pools.health_check]} table.  Arrays in it are tuples and nested tables
    are L{FrozenOptions} too.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Union[Mapping[str, Any], None] = None) -> None:
        self._items: dict[str, Any] = {
            str(k): _freeze(v) for k, v in (items or {}).items()
        }

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenOptions({self._items!r})"


_Validator = Callable[[object, "attrs.Attribute[Any]", object], None]


def _refuse(attribute: "attrs.Attribute[Any]", expected: str, value: object) -> ConfigurationError:
    """
    The error for an attribute whose value is not what was C{expected}.
    """
    return ConfigurationError(
        f"expected {expected}, got {describeValue(value)}", key=attribute.name
    )


def _toFloat(value: object) -> object:
    """
    Convert a TOML integer (C{interval = 5}) to a float; leave anything else
    to the validator.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _nonEmptyString(instance: object, attribute: "attrs.Attribute[Any]", value: object) -> None:
    """
    Validate a non-empty string.
    """
    if not isinstance(value, str) or not value:
        raise _refuse(attribute, "a non-empty string", value)


def _positiveSeconds(instance: object, attribute: "attrs.Attribute[Any]", value: object) -> None:
    """
    Validate a finite number of seconds greater than zero.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise _refuse(attribute, "a number of seconds greater than 0", value)


def _atLeast(low: int) -> _Validator:
    """
    A validator for an integer (not a boolean) of at least C{low}.
    """

    def validate(instance: object, attribute: "attrs.Attribute[Any]", value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise _refuse(attribute, f"an integer of at least {low}", value)

    return validate


def _fraction(instance: object, attribute: "attrs.Attribute[Any]", value: object) -> None:
    """
    Validate a fraction from 0 up to, not including, 1.
    """
    if isinstance(value, bool) or not isinstance(value, float) or not 0 <= value < 1:
        raise _refuse(attribute, "a number from 0 up to (not including) 1", value)


def _oneOf(*choices: str) -> _Validator:
    """
    A validator for a string that must be one of C{choices}.
    """
    expected = "one of " + ", ".join(json.dumps(c) for c in choices)

    def validate(instance: object, attribute: "attrs.Attribute[Any]", value: object) -> None:
        if not isinstance(value, str) or value not in choices:
            raise _refuse(attribute, expected, value)

    return validate


def _toOptions(value: object) -> object:
    """
    Freeze a mapping of checker options; leave anything else to the
    validator.
    """
    if isinstance(value, Mapping):
        return FrozenOptions(value)
    return value


InitialState = Literal["healthy", "unhealthy"]


@attrs.frozen
class HealthCheckConfig:
    """
    A pool's C{[pools.health_check]} table.

    Attribute names are the TOML keys; validators raise
    L{ConfigurationError} with the attribute's own name as the key, and
    L{parseHealthCheck} prefixes the table's key path, the same convention
    as L{mtlsproxy.config}.

    @ivar type: The health checker plugin's name (C{"tcp"}, C{"tls"},
        C{"http"} or a third-party name).
    @ivar interval: Seconds between the starts of two checks of one member.
    @ivar timeout: Seconds after which a check is cancelled and counts as
        failed; at most C{interval}.
    @ivar healthy_threshold: Consecutive passes that make an unhealthy member
        healthy.
    @ivar unhealthy_threshold: Consecutive failures that make a healthy
        member unhealthy.
    @ivar jitter: Each interval is C{interval * (1 + jitter * u)} for a
        uniform C{u} in [-1, 1], so that checks of many members (and many
        proxies) do not synchronise.
    @ivar initial_state: The state of a member that has never been checked:
        C{"healthy"} (it gets connections at once and needs
        C{unhealthy_threshold} failures to leave) or C{"unhealthy"} (it gets
        no connections until its first check passes).
    @ivar options: The checker-specific keys, see the plugin's C{options}.
    """

    type: str = attrs.field(validator=_nonEmptyString)
    interval: float = attrs.field(default=5.0, converter=_toFloat, validator=_positiveSeconds)
    timeout: float = attrs.field(default=2.0, converter=_toFloat, validator=_positiveSeconds)
    healthy_threshold: int = attrs.field(default=2, validator=_atLeast(1))
    unhealthy_threshold: int = attrs.field(default=3, validator=_atLeast(1))
    jitter: float = attrs.field(default=0.1, converter=_toFloat, validator=_fraction)
    initial_state: InitialState = attrs.field(
        default="healthy", validator=_oneOf("healthy", "unhealthy")
    )
    options: FrozenOptions = attrs.field(
        factory=FrozenOptions,
        converter=_toOptions,
        validator=attrs.validators.instance_of(FrozenOptions),
    )

    def __attrs_post_init__(self) -> None:
        """
        Check the settings that depend on each other.
        """
        if self.timeout > self.interval:
            raise ConfigurationError(
                f"expected at most interval ({self.interval!r}), got {describeValue(self.timeout)}",
                key="timeout",
            )


COMMON_KEYS: tuple[str, ...] = tuple(
    f.name for f in attrs.fields(HealthCheckConfig) if f.name != "options"
)
"""
The keys of C{[pools.health_check]} that every checker type accepts, in
the order error messages list them.
"""

ALL_UNHEALTHY_CHOICES: tuple[str, ...] = ("reject", "use_all")
"""
The values of a pool's C{all_unhealthy}: C{"reject"} refuses clients when
no member is healthy, C{"use_all"} fails open and ignores health (and
ejection) until a member recovers.
"""


@attrs.frozen
class PassiveEjectionConfig:
    """
    A pool's passive ejection settings: members that keep refusing real
    connections are taken out for a while, without waiting for a health
    check.

    The attribute names are the pool-level TOML keys.

    @ivar eject_after: Consecutive connect failures that eject a member;
        C{0} disables passive ejection.
    @ivar eject_backoff: Seconds of the first ejection.
    @ivar eject_backoff_max: The longest ejection: each ejection that follows
        another without a successful connection in between lasts twice as
        long as the one before, up to this.
    """

    eject_after: int = attrs.field(default=5, validator=_atLeast(0))
    eject_backoff: float = attrs.field(
        default=30.0, converter=_toFloat, validator=_positiveSeconds
    )
    eject_backoff_max: float = attrs.field(
        default=300.0, converter=_toFloat, validator=_positiveSeconds
    )

    def __attrs_post_init__(self) -> None:
        """
        Check that the back-off limit is not below the first back-off.
        """
        if self.eject_backoff_max < self.eject_backoff:
            raise ConfigurationError(
                f"expected at least eject_backoff ({self.eject_backoff!r}),"
                f" got {describeValue(self.eject_backoff_max)}",
                key="eject_backoff_max",
            )

    @property
    def enabled(self) -> bool:
        """
        Is passive ejection on?
        """
        return self.eject_after > 0

    def duration(self, ejections: int) -> float:
        """
        How long the ejection that follows C{ejections} earlier back-to-back
        ejections lasts: C{eject_backoff * 2 ** ejections}, at most
        C{eject_backoff_max}.
        """
        # Bound the exponent: 2.0 ** 2000 overflows.
        return min(self.eject_backoff * 2.0 ** min(ejections, 64), self.eject_backoff_max)


def parseHealthCheck(
    table: object,
    key: str,
    factories: Mapping[str, Any],
) -> HealthCheckConfig:
    """
    Validate a C{[pools.health_check]} table and build its configuration.

    The checks, in order: the table is a table; C{type} is present, a
    string and the name of one of C{factories}; every key is one of
    L{COMMON_KEYS} or one of the chosen factory's C{options}; the common
    values are valid; and finally the checker-specific options are valid,
    which is decided by the factory itself: C{factory.newChecker} is called
    once with a L{twisted.internet.testing.MemoryReactorClock} and
    C{tls=None} and the checker is thrown away.  A L{ValueError} from it
    (an L{OptionError} to name the key) becomes the L{ConfigurationError}.

    @param table: The TOML value of the table.
    @param key: Its key path, such as C{"pools[0].health_check"}.
    @param factories: The available checker plugins by name (from
        L{mtlsproxy.plugins}).

    @raise ConfigurationError: For anything invalid; the key path is
        complete, the file is not set.
    """
    if not isinstance(table, Mapping):
        raise ConfigurationError(f"expected a table, got {describeValue(table)}", key=key)
    if "type" not in table:
        raise ConfigurationError("missing required key 'type'", key=key)
    typeName = table["type"]
    if not isinstance(typeName, str) or not typeName:
        raise ConfigurationError(
            f'expected a health checker name such as "tcp", got {describeValue(typeName)}',
            key=joinKey(key, "type"),
        )
    factory = factories.get(typeName)
    if factory is None:
        raise _unknownType(typeName, factories, key)
    specific = tuple(factory.options)
    allowed = COMMON_KEYS + tuple(k for k in specific if k not in COMMON_KEYS)
    for name in table:
        if name not in allowed:
            raise ConfigurationError(
                f"unknown key {name!r} for health checker type {json.dumps(typeName)};"
                f" expected one of: {', '.join(allowed)}",
                key=key,
            )
    common = {k: v for k, v in table.items() if k in COMMON_KEYS}
    options = {k: v for k, v in table.items() if k not in COMMON_KEYS}
    try:
        config = HealthCheckConfig(options=options, **common)
    except ConfigurationError as e:
        raise e.within(key) from None

    # Imported here: this module is imported by plugin scans and stays light.
    from twisted.internet.testing import MemoryReactorClock

    makeChecker(config, MemoryReactorClock(), None, {typeName: factory}, key)
    return config


def _unknownType(
    typeName: str, factories: Mapping[str, Any], key: Optional[str]
) -> ConfigurationError:
    """
    The error for a C{type} no plugin has, worded like
    L{mtlsproxy.plugins.UnknownPlugin} (which lists the installed names).
    """
    # Imported here: mtlsproxy.plugins imports the plugin package, which
    # imports this module.
    from .plugins import HEALTH_CHECKER, UnknownPlugin

    return ConfigurationError(
        str(UnknownPlugin(HEALTH_CHECKER, typeName, factories)), key=joinKey(key, "type")
    )


def makeChecker(
    config: HealthCheckConfig,
    reactor: Any,
    tls: Any,
    factories: Mapping[str, Any],
    key: Optional[str] = None,
) -> Any:
    """
    Make the checker for one pool from its configuration.

    @param reactor: The reactor the checker connects and schedules with.
    @param tls: The pool's backend TLS settings (an object with a
        C{clientConnectionCreator(member)} method) or L{None}.
    @param factories: The available checker plugins by name.
    @param key: The key path of the C{[pools.health_check]} table, for
        error messages.

    @raise ConfigurationError: If C{config.type} is not among C{factories}
        or the factory refuses the options with a L{ValueError}.
    """
    factory = factories.get(config.type)
    if factory is None:
        raise _unknownType(config.type, factories, key)
    try:
        return factory.newChecker(reactor, config.options, tls)
    except OptionError as e:
        raise ConfigurationError(e.problem, key=joinKey(key, e.key)) from None
    except ValueError as e:
        raise ConfigurationError(str(e) or type(e).__name__, key=key) from None


# ---------------------------------------------------------------------------
# Plugin declarations (discovery is L{mtlsproxy.plugins})
# ---------------------------------------------------------------------------


@implementer(IPlugin, IHealthCheckerFactory)
@attrs.frozen
class HealthCheckerPlugin:
    """
    A health checker plugin declared by name, without importing its code.

    Plugin modules in C{twisted/plugins/} are imported whenever Twisted
    scans for plugins, so they should not import TLS and HTTP machinery; like
    L{twisted.application.service.ServiceMaker}, this names the checker's
    constructor by its dotted name and imports it on first use.

    @ivar name: The C{type} used in the configuration.
    @ivar description: One line for humans.
    @ivar options: The checker-specific keys: key name to a one-line
        description.
    @ivar checker: The dotted name of a callable C{(reactor, options, tls)}
        returning an L{mtlsproxy.interfaces.IHealthChecker} provider and
        raising L{ValueError} (or L{OptionError}) for invalid options, such as
        C{"mtlsproxy.checkers.HTTPChecker.fromOptions"}.
    """

    name: str
    description: str
    options: FrozenOptions = attrs.field(converter=_toOptions)
    checker: str

    def newChecker(self, reactor: Any, options: Mapping[str, Any], tls: Any) -> Any:
        """
        Import the checker's constructor and call it.

        @see: L{IHealthCheckerFactory.newChecker}
        """
        make = namedAny(self.checker)
        return make(reactor, options, tls)


# ---------------------------------------------------------------------------
# Running checks
# ---------------------------------------------------------------------------


def _failureReason(failure: Failure) -> str:
    """
    The reason of a failed check Deferred: the exception's message, or its
    class name when it has none.
    """
    message = failure.getErrorMessage()
    name = failure.type.__name__ if failure.type is not None else "error"
    if not message or message == name:
        return name
    return message


def checkOnce(
    clock: Any,
    checker: Any,
    member: Any,
    timeout: float,
) -> "Deferred[CheckResult]":
    """
    Run one check with a time limit and turn whatever it produces into a
    L{CheckResult}.

    After C{timeout} seconds the check's Deferred is cancelled and the result
    is C{CheckResult(False, "timeout after 2.0s")}, whatever the cancelled
    Deferred fired with.  A failed Deferred (or an exception from C{check})
    is an unhealthy result whose reason is the exception's message, or an
    inconclusive one when the failure is the proxy's own lack of resources
    (L{mtlsproxy.pool.localResourceError}: C{EMFILE} and the like); a result
    that is not a L{CheckResult} is an unhealthy result too, and logged as a
    checker bug.

    @param clock: The L{IReactorTime} for the time limit.
    @param checker: The L{mtlsproxy.interfaces.IHealthChecker} provider.
    @param member: The L{mtlsproxy.interfaces.IMemberState} provider to check.
    @param timeout: Seconds before the check is cancelled.

    @return: A Deferred that never fails, except with L{CancelledError} when
        the caller cancels it (cancelling cancels the check).
    """
    timedOut = False
    checking: Deferred[Any] = maybeDeferred(checker.check, member)

    def expire() -> None:
        nonlocal timedOut
        timedOut = True
        checking.cancel()

    timer = clock.callLater(timeout, expire)

    def finish(result: object) -> object:
        if timer.active():
            timer.cancel()
        if timedOut:
            return CheckResult(False, f"timeout after {timeout!r}s")
        if isinstance(result, Failure):
            if result.check(CancelledError):
                return result
            # Imported here: mtlsproxy.pool imports this module.
            from .pool import localResourceError

            ownError = localResourceError(result)
            if ownError is not None:
                return CheckResult(
                    False,
                    f"the proxy is out of resources ({ownError}): {_failureReason(result)}",
                    inconclusive=True,
                )
            return CheckResult(False, _failureReason(result))
        if not isinstance(result, CheckResult):
            _log.error(
                "Health checker {checker!r} returned {result!r}, not a CheckResult",
                checker=checker,
                result=result,
            )
            return CheckResult(
                False, f"checker returned {type(result).__name__}, not a CheckResult"
            )
        return result

    return checking.addBoth(finish)


def _hostPort(member: Any) -> str:
    """
    C{host:port} for logs, with brackets around an IPv6 address.
    """
    address = member.address
    if ":" in address:
        return f"[{address}]:{member.port}"
    return f"{address}:{member.port}"


class _Watch:
    """
    The health-check state of one member while a L{HealthMonitor} watches
    it.

    @ivar member: The member.
    @ivar timer: The scheduled next check, or L{None} while one runs.
    @ivar checking: The running check, or L{None}.
    @ivar passes: Consecutive passing checks.
    @ivar failures: Consecutive failing checks.
    @ivar provisional: The member was put out by C{initial_state =
        "unhealthy"} and has not been checked yet: its first pass makes it
        healthy.
    @ivar stopped: The monitor no longer watches it; late results are
        ignored.
    """

    def __init__(self, member: "Member") -> None:
        self.member = member
        self.timer: Optional[Any] = None
        self.checking: Optional[Deferred[Any]] = None
        self.passes = 0
        self.failures = 0
        self.provisional = False
        self.stopped = False


class HealthMonitor(Service):
    """
    Checks every member of one pool, on a timer, and sets C{member.healthy}.

    On start it watches every member of C{pool}: the first check of each at
    a random moment within one interval, each next one C{interval} (with
    jitter) after the previous one started, or as soon as the previous one
    finished if it took longer.  Checks of one member never overlap.  A
    check that runs longer than C{timeout} is cancelled and fails.

    Thresholds: a healthy member becomes unhealthy after
    C{unhealthy_threshold} consecutive failures, an unhealthy one healthy
    after C{healthy_threshold} consecutive passes.  Every transition is
    logged with the fields C{pool}, C{member} (C{host:port}), C{healthy},
    C{state} and C{reason}; becoming healthy also ends a passive ejection
    (the member answered again).  After every check C{member.lastCheck} is
    C{(result, time)}.  An inconclusive result (L{CheckResult.inconclusive}:
    the proxy itself was out of descriptors) is recorded and logged, and
    leaves the member's health and the consecutive counts as they were.

    Members the monitor has never checked start as C{initial_state} says;
    a member that already carries a check result (a reload handing the same
    L{Member} to a new monitor) keeps its state.  Stopping the monitor leaves
    C{healthy} as it is.

    Members added or removed at run time are followed through the pool
    (L{Pool.addMember}, L{Pool.removeMember} call L{memberAdded} and
    L{memberRemoved}); code that replaces C{pool.members} directly calls
    L{sync}.

    @ivar pool: The pool.
    @ivar checker: The pool's L{mtlsproxy.interfaces.IHealthChecker}.
    @ivar config: The pool's L{HealthCheckConfig}.
    @ivar observers: Called with C{(member, reason)} after every
        transition (C{member.healthy} already set), and once when the
        monitor starts watching a member without changing its health
        (C{reason} that of its last check, or C{"not checked yet"}), so
        that an observer always knows every watched member's state.  With
        several worker processes, the checking worker reports them to its
        supervisor this way (L{mtlsproxy.healthshare}).  Must not raise.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        pool: "Pool",
        checker: Any,
        config: HealthCheckConfig,
        random: Optional[_random.Random] = None,
    ) -> None:
        """
        @param reactor: The clock to schedule checks on (an
            L{IReactorTime}; what the checker connects with is its own).
        @param checker: An L{mtlsproxy.interfaces.IHealthChecker} provider.
        @param random: The source of the first-check offsets and jitter;
            tests pass a seeded L{random.Random}.
        """
        self._reactor = reactor
        self.pool = pool
        self.checker = checker
        self.config = config
        self._random = random if random is not None else _random.Random()
        self._watches: dict[int, _Watch] = {}
        self.observers: list[Callable[["Member", str], None]] = []
        self.setName(f"health:{pool.name}")

    # -- service -----------------------------------------------------------

    def startService(self) -> None:
        """
        Start checking every member of the pool, and follow additions and
        removals.
        """
        Service.startService(self)
        self.pool.addWatcher(self)
        self.sync()

    def stopService(self) -> "Deferred[None]":
        """
        Stop checking: cancel every scheduled check and every check in
        flight.

        @return: A Deferred that fires when every check in flight has
            finished (cancelled checks close their connections).
        """
        Service.stopService(self)
        self.pool.removeWatcher(self)
        waits = [self._unwatch(watch) for watch in list(self._watches.values())]
        self._watches.clear()
        return gatherResults(waits).addCallback(lambda _: None)

    # -- members -----------------------------------------------------------

    def memberAdded(self, member: "Member") -> None:
        """
        Start checking C{member}, first at a random moment within one
        interval.  Does nothing when the monitor is not running or already
        watches it.
        """
        if not self.running or id(member) in self._watches:
            return
        watch = _Watch(member)
        self._watches[id(member)] = watch
        if member.lastCheck is None and self.config.initial_state == "unhealthy":
            watch.provisional = True
        if watch.provisional and member.healthy:
            self._transition(watch, False, "not checked yet")
        else:
            # Not a transition, but observers learn the state it starts from.
            reason = "not checked yet" if member.lastCheck is None else member.lastCheck[0].reason
            self._notify(member, reason)
        offset = self._random.uniform(0, self.config.interval)
        watch.timer = self._reactor.callLater(offset, self._check, watch)

    def memberRemoved(self, member: "Member") -> None:
        """
        Stop checking C{member}: cancel its scheduled check and any check in
        flight.  Its C{healthy} flag is left as it is.
        """
        watch = self._watches.pop(id(member), None)
        if watch is not None:
            self._unwatch(watch)

    def sync(self) -> None:
        """
        Watch exactly the members in C{pool.members} (compared by identity):
        start checking new ones, stop checking removed ones.
        """
        if not self.running:
            return
        current = {id(m): m for m in self.pool.members}
        for key in [k for k in self._watches if k not in current]:
            self.memberRemoved(self._watches[key].member)
        for member in self.pool.members:
            self.memberAdded(member)

    def watching(self) -> list["Member"]:
        """
        The members being checked now.
        """
        return [w.member for w in self._watches.values()]

    # -- checks ------------------------------------------------------------

    def _unwatch(self, watch: _Watch) -> "Deferred[None]":
        """
        Stop one member's checks.

        @return: A Deferred that fires when its check in flight (if any) has
            finished.
        """
        watch.stopped = True
        if watch.timer is not None and watch.timer.active():
            watch.timer.cancel()
        watch.timer = None
        checking, watch.checking = watch.checking, None
        if checking is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        checking.addBoth(lambda _: done.callback(None))
        checking.cancel()
        return done

    def _nextDelay(self) -> float:
        """
        One interval with jitter: C{interval * (1 + jitter * u)}, C{u}
        uniform in [-1, 1].
        """
        spread = self.config.jitter * self._random.uniform(-1.0, 1.0)
        return self.config.interval * (1.0 + spread)

    def _check(self, watch: _Watch) -> None:
        """
        Run one check of C{watch.member} now.
        """
        watch.timer = None
        started = self._reactor.seconds()
        checking = checkOnce(self._reactor, self.checker, watch.member, self.config.timeout)
        watch.checking = checking
        checking.addCallback(self._checked, watch, started)
        checking.addErrback(self._checkFailed, watch)

    def _checkFailed(self, failure: Failure, watch: _Watch) -> None:
        """
        Swallow the cancellation of a check by L{_unwatch}; log anything
        else (a bug here, since L{checkOnce} turns failures into results).
        """
        if failure.check(CancelledError):
            return
        self.log.failure(
            "Health check of {member} in pool {pool} went wrong",
            failure,
            member=_hostPort(watch.member),
            pool=self.pool.name,
        )

    def _checked(self, result: CheckResult, watch: _Watch, started: float) -> None:
        """
        Apply one result: record it, apply the thresholds, schedule the next
        check.
        """
        if watch.stopped:
            return
        watch.checking = None
        member = watch.member
        now = self._reactor.seconds()
        member.lastCheck = (result, now)
        config = self.config
        if result.inconclusive:
            self.log.warn(
                "Health check of pool {pool} member {member} was inconclusive: {reason};"
                " its health stays {state}",
                pool=self.pool.name,
                member=_hostPort(member),
                reason=result.reason,
                state="healthy" if member.healthy else "unhealthy",
            )
        elif result.healthy:
            watch.failures = 0
            watch.passes += 1
            if not member.healthy and (
                watch.provisional or watch.passes >= config.healthy_threshold
            ):
                self._transition(watch, True, result.reason)
        else:
            watch.passes = 0
            watch.failures += 1
            if member.healthy and watch.failures >= config.unhealthy_threshold:
                self._transition(watch, False, result.reason)
        watch.provisional = False
        due = started + self._nextDelay()
        watch.timer = self._reactor.callLater(max(0.0, due - now), self._check, watch)

    def _transition(self, watch: _Watch, healthy: bool, reason: str) -> None:
        """
        Change a member's health and log it.
        """
        member = watch.member
        member.healthy = healthy
        state = "healthy" if healthy else "unhealthy"
        emit = self.log.info if healthy else self.log.warn
        emit(
            "Pool {pool} member {member} is now {state}: {reason}",
            pool=self.pool.name,
            member=_hostPort(member),
            healthy=healthy,
            state=state,
            reason=reason,
        )
        if healthy:
            member.endEjection("health check passed")
        self._notify(member, reason)

    def _notify(self, member: "Member", reason: str) -> None:
        """
        Tell every observer a member's state (see L{observers}); an
        observer that raises is logged, and the others are still told.
        """
        for observer in list(self.observers):
            try:
                observer(member, reason)
            except Exception:
                self.log.failure("Health observer {observer} failed", observer=observer)
