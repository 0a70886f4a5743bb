# -*- test-case-name: tests.test_healthshare -*-
"""
One set of active health checks for all worker processes (C{workers} > 1).

Without this, every worker of L{mtlsproxy.workers} would run the whole
proxy's health checks: N checks of every member per interval, and workers
that disagree about a member for a while.  Instead:

  - worker 0, the I{checker} (L{CHECKER}), runs the pools'
    L{HealthMonitor<mtlsproxy.health.HealthMonitor>}s as a single process
    does, and reports every member's state to the supervisor: each
    transition, and the state each member starts from
    (L{HealthShare.report}, a monitor observer);
  - the supervisor (L{HealthRelay}) remembers the latest verdict per pool
    and member and forwards each one to every other running worker; a
    worker it starts (or starts again) gets them all on its command line
    (C{--health-states}), applied before it accepts a client;
  - the other workers, I{followers}, run no checks: they apply the
    verdicts to their own L{Member<mtlsproxy.pool.Member>}s (logged as the
    checker logs a transition, with C{(from worker 0)}), and, with
    C{initial_state = "unhealthy"}, keep a member they have no verdict for
    out, as the checker does until its first check.

Passive ejection is not shared: it reacts to each worker's own client
connections, so each worker ejects on its own.

Reloads: each worker reloads itself (L{mtlsproxy.reload}).  When one
changes a pool's C{[pools.health_check]}, worker 0 replaces the pool's
monitor and observes the new one; a follower starts none and updates what
it keeps per pool (L{HealthShare.checksChanged}): the settings used for
C{initial_state}, and whether it follows the pool at all.  A follower
applies verdicts only for pools with checks in its own configuration, so
that a worker 0 that has not reloaded yet cannot take out a member of a
pool whose checks this follower's reload removed.

The channel is a pair of pipes per worker, one message per line (JSON,
L{encodeVerdict}): the supervisor writes to the worker's standard input
(file descriptor 0), the worker to its file descriptor 3
(L{WORKER_TO_SUPERVISOR_FD}; another if an inherited listening socket has
that number, L{channelDescriptor}; given as C{--health-channel FD}).
Every line is validated on arrival; an invalid one is logged and ignored.  With C{workers = 1} none of this
exists.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import attrs
from twisted.application.service import Service
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "CHECKER",
    "WORKER_TO_SUPERVISOR_FD",
    "channelDescriptor",
    "HealthVerdict",
    "encodeVerdict",
    "decodeVerdict",
    "encodeVerdicts",
    "decodeVerdicts",
    "LineSplitter",
    "HealthRelay",
    "SupervisorChannel",
    "connectToSupervisor",
    "HealthShare",
]

CHECKER = 0
"""The index of the worker that runs the active health checks."""

WORKER_TO_SUPERVISOR_FD = 3
"""The worker's file descriptor of the pipe to its supervisor, unless a
listening socket it inherits has that number (L{channelDescriptor}); the
supervisor's messages come on standard input."""

MAX_LINE = 16384
"""The longest message line accepted, in bytes (without the newline)."""

MAX_REASON = 1000
"""The longest reason a verdict carries, in characters: longer ones are cut."""

_KEYS = frozenset({"type", "pool", "member", "healthy", "reason", "time"})


@attrs.frozen
class HealthVerdict:
    """
    The checker's word on one member's health.

    @ivar pool: The pool's name.
    @ivar member: The member, C{address:port} (IPv6 in brackets), as
        L{Member.hostPort<mtlsproxy.pool.Member.hostPort>}.
    @ivar healthy: Whether new connections may go to it.
    @ivar reason: The reason of the check that decided, or C{"not checked
        yet"}.
    @ivar time: When that check was made (the checker's clock, seconds
        since the epoch), or L{None} when it has not been checked.
    """

    pool: str
    member: str
    healthy: bool
    reason: str
    time: Optional[float] = None

    def toJSON(self) -> dict[str, Any]:
        """
        The message object (see L{encodeVerdict}).
        """
        return {
            "type": "health",
            "pool": self.pool,
            "member": self.member,
            "healthy": self.healthy,
            "reason": self.reason,
            "time": self.time,
        }

    @classmethod
    def fromJSON(cls, raw: object) -> "HealthVerdict":
        """
        Read a message object (see L{toJSON}).  C{time} may be missing.

        @raise ValueError: Naming what is wrong, if C{raw} is not one.
        """
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        if raw.get("type") != "health":
            raise ValueError(f"unknown message type {raw.get('type')!r}")
        unknown = set(raw) - _KEYS
        if unknown:
            raise ValueError(f"unknown keys {', '.join(sorted(map(str, unknown)))}")
        pool, member, healthy = raw.get("pool"), raw.get("member"), raw.get("healthy")
        reason, when = raw.get("reason", ""), raw.get("time")
        if not isinstance(pool, str) or not pool:
            raise ValueError("pool: expected a non-empty string")
        if not isinstance(member, str) or not _isHostPort(member):
            raise ValueError("member: expected ADDRESS:PORT")
        if not isinstance(healthy, bool):
            raise ValueError("healthy: expected true or false")
        if not isinstance(reason, str):
            raise ValueError("reason: expected a string")
        if when is not None and (
            isinstance(when, bool) or not isinstance(when, (int, float)) or not math.isfinite(when)
        ):
            raise ValueError("time: expected a number or null")
        return cls(pool, member, healthy, reason[:MAX_REASON], None if when is None else float(when))


def _isHostPort(text: str) -> bool:
    """
    Does C{text} look like C{address:port} (C{[v6]:port})?
    """
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def channelDescriptor(inherited: Iterable[int]) -> int:
    """
    The worker's file descriptor for the pipe to its supervisor:
    L{WORKER_TO_SUPERVISOR_FD}, or the first free one above it when the
    listening sockets the worker inherits (which keep their numbers) take
    it.
    """
    taken = set(inherited)
    fd = WORKER_TO_SUPERVISOR_FD
    while fd in taken:
        fd += 1
    return fd


def encodeVerdict(verdict: HealthVerdict) -> bytes:
    """
    One message line: compact JSON (ASCII only) and a newline, e.g.
    C{{"type":"health","pool":"app","member":"10.0.0.11:8080","healthy":false,
    "reason":"connection refused","time":1700000000.5}}.
    """
    return json.dumps(verdict.toJSON(), separators=(",", ":")).encode("ascii") + b"\n"


def decodeVerdict(line: bytes) -> HealthVerdict:
    """
    Read one message line (without its newline; see L{encodeVerdict}).

    @raise ValueError: Naming what is wrong, if C{line} is not a valid
        message.
    """
    try:
        raw = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"not JSON: {e}") from None
    return HealthVerdict.fromJSON(raw)


def encodeVerdicts(verdicts: Iterable[HealthVerdict]) -> str:
    """
    The C{--health-states} value of a worker: a JSON list of messages.
    """
    return json.dumps([v.toJSON() for v in verdicts], separators=(",", ":"))


def decodeVerdicts(text: str) -> list[HealthVerdict]:
    """
    Read a C{--health-states} value (see L{encodeVerdicts}).

    @raise ValueError: If C{text} is not what L{encodeVerdicts} writes.
    """
    try:
        raw = json.loads(text)
        if not isinstance(raw, list):
            raise ValueError("not a list")
        return [HealthVerdict.fromJSON(item) for item in raw]
    except ValueError as e:
        raise ValueError(f"not a valid --health-states value ({e}): {text[:200]!r}") from None


class LineSplitter:
    """
    Cut a byte stream into lines, bounded: a line longer than L{MAX_LINE}
    is dropped (reported to C{tooLong}) and the lines after it are still
    read.
    """

    def __init__(
        self,
        lineReceived: Callable[[bytes], None],
        tooLong: Callable[[int], None],
        maxLength: int = MAX_LINE,
    ) -> None:
        self._lineReceived = lineReceived
        self._tooLong = tooLong
        self._maxLength = maxLength
        self._buffer = b""
        self._skipping = False

    def feed(self, data: bytes) -> None:
        """
        Take more bytes; call C{lineReceived} for every complete line.
        """
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            if self._skipping:
                self._skipping = False
                continue
            if len(line) > self._maxLength:
                self._tooLong(len(line))
            elif line.strip():
                self._lineReceived(line)
        if len(self._buffer) > self._maxLength:
            if not self._skipping:
                self._tooLong(len(self._buffer))
            self._skipping = True
            self._buffer = b""


# ---------------------------------------------------------------------------
# The supervisor's side
# ---------------------------------------------------------------------------


class HealthRelay:
    """
    In the supervisor: the latest verdict per (pool, member) from the
    checker, and forwarding each new one to the other workers.

    @ivar verdicts: The latest verdict by (pool, member), in the order
        first heard of.
    """

    log = Logger()

    def __init__(self, forward: Callable[[int, bytes], None], running: Callable[[], Iterable[int]]) -> None:
        """
        @param forward: Writes a message line to worker C{index}'s standard
            input.
        @param running: The indexes of the workers running now.
        """
        self._forward = forward
        self._running = running
        self.verdicts: dict[tuple[str, str], HealthVerdict] = {}

    def splitterFor(self, index: int) -> LineSplitter:
        """
        A L{LineSplitter} for what worker C{index} writes (one per process:
        a worker started again starts with an empty buffer).
        """

        def tooLong(length: int) -> None:
            self.log.warn(
                "Worker {index}: ignored a message of {length} bytes from it (at most {limit})",
                index=index,
                length=length,
                limit=MAX_LINE,
            )

        return LineSplitter(lambda line: self.lineReceived(index, line), tooLong)

    def lineReceived(self, index: int, line: bytes) -> None:
        """
        A line from worker C{index}: if it is a valid verdict from the
        checker, remember it and forward it to every other running worker;
        otherwise log it and do nothing else.
        """
        try:
            verdict = decodeVerdict(line)
        except ValueError as e:
            self.log.warn(
                "Worker {index}: ignored an invalid message ({problem}): {line}",
                index=index,
                problem=str(e),
                line=line[:200].decode("utf-8", "replace"),
            )
            return
        if index != CHECKER:
            self.log.warn(
                "Worker {index}: ignored a health verdict on pool {pool} member {member}:"
                " only worker {checker} checks health",
                index=index,
                pool=verdict.pool,
                member=verdict.member,
                checker=CHECKER,
            )
            return
        self.verdicts[(verdict.pool, verdict.member)] = verdict
        encoded = encodeVerdict(verdict)
        for other in self._running():
            if other != index:
                self._forward(other, encoded)

    def current(self) -> list[HealthVerdict]:
        """
        Every remembered verdict, for a worker being started.
        """
        return list(self.verdicts.values())


# ---------------------------------------------------------------------------
# A worker's side
# ---------------------------------------------------------------------------


class SupervisorChannel(Protocol):
    """
    A worker's end of the channel: message lines from the supervisor in,
    verdicts out.  Before it is connected, what is sent waits.
    """

    log = Logger()

    def __init__(self, received: Callable[[HealthVerdict], None]) -> None:
        self._received = received
        self._splitter = LineSplitter(self._lineReceived, self._tooLong)
        self._waiting: list[bytes] = []
        self.connected = False

    def connectionMade(self) -> None:
        """
        Send what waited.
        """
        self.connected = True
        waiting, self._waiting = self._waiting, []
        for data in waiting:
            self.transport.write(data)  # type: ignore[union-attr]

    def send(self, verdict: HealthVerdict) -> None:
        """
        Send a verdict to the supervisor (once connected).
        """
        data = encodeVerdict(verdict)
        if self.connected and self.transport is not None:
            self.transport.write(data)
        else:
            self._waiting.append(data)

    def dataReceived(self, data: bytes) -> None:
        """
        Message bytes from the supervisor.
        """
        self._splitter.feed(data)

    def _lineReceived(self, line: bytes) -> None:
        try:
            verdict = decodeVerdict(line)
        except ValueError as e:
            self.log.warn(
                "Ignored an invalid message from the supervisor ({problem}): {line}",
                problem=str(e),
                line=line[:200].decode("utf-8", "replace"),
            )
            return
        self._received(verdict)

    def _tooLong(self, length: int) -> None:
        self.log.warn(
            "Ignored a message of {length} bytes from the supervisor (at most {limit})",
            length=length,
            limit=MAX_LINE,
        )

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        """
        The supervisor is gone (or we are stopping): nothing more to share.
        """
        self.connected = False
        self.log.debug("Health channel to the supervisor closed: {reason}", reason=reason.getErrorMessage())


def connectToSupervisor(reactor: Any, protocol: Protocol, fd: int = WORKER_TO_SUPERVISOR_FD) -> Any:
    """
    Connect C{protocol} to the pipes from (standard input) and to (C{fd},
    see L{channelDescriptor}) the supervisor.

    @return: The transport (a L{twisted.internet.stdio.StandardIO}).
    """
    from twisted.internet import stdio

    # Workers are POSIX only, where StandardIO takes the descriptors (mypy
    # reads the Windows signature).
    return stdio.StandardIO(  # type: ignore[call-arg]
        protocol, stdin=0, stdout=fd, reactor=reactor
    )


def _fromWorker(reason: str) -> str:
    return f"{reason} (from worker {CHECKER})"


class _FollowedPool:
    """
    A follower's watch on one pool with health checks: members added at
    run time (a reload) start from the verdict heard for them, or as
    C{initial_state} says.
    """

    def __init__(self, share: "HealthShare", pool: Any, config: Any) -> None:
        self.share = share
        self.pool = pool
        self.config = config

    def memberAdded(self, member: Any) -> None:
        self.share._startFollowing(self.pool, self.config, member)

    def memberRemoved(self, member: Any) -> None:
        pass


class HealthShare(Service):
    """
    A worker's part in sharing health (see the module docstring): the
    checker (worker L{CHECKER}) reports its monitors' verdicts
    (L{report}); a follower applies the verdicts it receives to its
    members and runs no checks.

    @ivar index: This worker's index.
    @ivar checking: Whether this worker is the checker.
    @ivar heard: The latest verdict received, inherited or (in the
        checker) reported, by (pool, member), including those for members
        this worker does not have (yet: a reload may add them a moment
        later).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        index: int,
        pools: Mapping[str, Any],
        healthChecks: Mapping[str, Any],
        inherited: Sequence[HealthVerdict] = (),
        connect: Optional[Callable[[Protocol], Any]] = None,
    ) -> None:
        """
        @param pools: The run-time pools by name (L{mtlsproxy.pool.Pool}).
        @param healthChecks: The L{HealthCheckConfig<mtlsproxy.health.
            HealthCheckConfig>} of every pool with active checks, by name.
        @param inherited: The verdicts the supervisor passed on the command
            line (C{--health-states}), applied by L{applyInherited}.
        @param connect: Connects the channel protocol to the supervisor;
            L{connectToSupervisor} by default.
        """
        self._reactor = reactor
        self.index = index
        self.checking = index == CHECKER
        self.pools = pools
        self.healthChecks = dict(healthChecks)
        self.heard: dict[tuple[str, str], HealthVerdict] = {(v.pool, v.member): v for v in inherited}
        self._connect = connect if connect is not None else (lambda protocol: connectToSupervisor(reactor, protocol))
        self.channel = SupervisorChannel(self.received)
        self._transport: Any = None
        self._watchers: list[tuple[Any, _FollowedPool]] = []
        self.setName("healthshare")

    # -- start-up ----------------------------------------------------------

    def applyInherited(self) -> None:
        """
        Before the listeners accept (and, in the checker, before the
        monitors start): give every member the state the supervisor passed
        on; a follower also keeps out, with C{initial_state =
        "unhealthy"}, the members it has no verdict for.  The checker's
        monitors then continue from those states (a member that carries a
        check result keeps its health).
        """
        for poolName, pool in self.pools.items():
            config = self.healthChecks.get(poolName)
            if config is None:
                continue
            for member in pool.members:
                verdict = self.heard.get((poolName, member.hostPort))
                if verdict is not None:
                    self._apply(pool, member, verdict)
                elif not self.checking:
                    self._initialState(pool, config, member)

    def startService(self) -> None:
        """
        Connect to the supervisor; a follower follows members added later.
        """
        Service.startService(self)
        if not self.checking:
            for poolName, config in self.healthChecks.items():
                pool = self.pools.get(poolName)
                if pool is not None:
                    watcher = _FollowedPool(self, pool, config)
                    pool.addWatcher(watcher)
                    self._watchers.append((pool, watcher))
        self._transport = self._connect(self.channel)

    def stopService(self) -> None:
        """
        Stop following; close the channel.
        """
        Service.stopService(self)
        for pool, watcher in self._watchers:
            pool.removeWatcher(watcher)
        self._watchers.clear()
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.loseConnection()

    # -- reloads -----------------------------------------------------------

    def checksChanged(self, poolName: str, config: Any) -> None:
        """
        A reload changed, added (C{config} a L{HealthCheckConfig<mtlsproxy.
        health.HealthCheckConfig>}) or removed (C{config} L{None}) the
        active health checks of pool C{poolName}; the pool exists already.
        The checker's monitors are the reload's business
        (L{mtlsproxy.reload}); here only what is kept per pool changes:

          - the configuration used for C{initial_state} (L{applyInherited},
            members added later);
          - in a follower, which pools it follows: a pool that gains checks
            is followed from now on, each member getting the verdict heard
            for it or, if none, its initial state (as worker 0's new monitor
            gives it); a pool whose checks were removed is no longer
            followed, and the verdicts heard for it are forgotten (the
            reload makes its members healthy, and a late verdict from a
            worker 0 still checking it is not applied).
        """
        added = config is not None and poolName not in self.healthChecks
        if config is None:
            self.healthChecks.pop(poolName, None)
            for key in [k for k in self.heard if k[0] == poolName]:
                del self.heard[key]
        else:
            self.healthChecks[poolName] = config
        if self.checking or not self.running:
            # (A follower not started yet follows healthChecks when it is.)
            return
        pool = self.pools.get(poolName)
        for watched, watcher in [w for w in self._watchers if w[1].pool.name == poolName]:
            watched.removeWatcher(watcher)
            self._watchers.remove((watched, watcher))
        if config is None or pool is None:
            return
        watcher = _FollowedPool(self, pool, config)
        pool.addWatcher(watcher)
        self._watchers.append((pool, watcher))
        if added:
            for member in pool.members:
                self._startFollowing(pool, config, member)

    def wasHealed(self, poolName: str, member: Any, reason: str) -> None:
        """
        In the checker: a reload that removed a pool's checks made
        C{member} healthy; tell the supervisor, so that the verdict it
        remembers (and passes on) is no longer an old "unhealthy".
        """
        if self.checking:
            self.report(poolName, member, reason)

    # -- the checker -------------------------------------------------------

    def observe(self, monitor: Any) -> None:
        """
        In the checker: report what C{monitor} decides (see L{report}).
        """
        poolName = monitor.pool.name
        monitor.observers.append(lambda member, reason: self.report(poolName, member, reason))

    def report(self, poolName: str, member: Any, reason: str) -> None:
        """
        In the checker: send a member's state to the supervisor (a
        L{HealthMonitor<mtlsproxy.health.HealthMonitor>} observer).
        """
        lastCheck = member.lastCheck
        verdict = HealthVerdict(
            poolName,
            member.hostPort,
            bool(member.healthy),
            reason[:MAX_REASON],
            None if lastCheck is None else float(lastCheck[1]),
        )
        self.heard[(verdict.pool, verdict.member)] = verdict
        self.channel.send(verdict)

    # -- a follower --------------------------------------------------------

    def received(self, verdict: HealthVerdict) -> None:
        """
        A verdict from the supervisor.  A follower remembers it and applies
        it to its member; a pool or member it lacks, or a pool without
        health checks in its configuration, is ignored quietly (workers
        reload a moment apart; the verdict is applied if this worker's own
        reload adds the member or the checks).  The checker decides for
        itself and ignores it.
        """
        if self.checking:
            self.log.debug(
                "Ignored a health verdict on pool {pool} member {member}: this worker checks",
                pool=verdict.pool,
                member=verdict.member,
            )
            return
        self.heard[(verdict.pool, verdict.member)] = verdict
        if verdict.pool not in self.healthChecks:
            # Workers reload a moment apart: worker 0 may still check a
            # pool this worker's reload took the checks from (or check one
            # already that this worker's reload will give checks); the
            # verdict is kept for the latter.
            self.log.debug(
                "Health verdict on pool {pool} member {member} from worker {checker}:"
                " the pool has no health checks in this worker's configuration (now); kept",
                pool=verdict.pool,
                member=verdict.member,
                checker=CHECKER,
            )
            return
        pool = self.pools.get(verdict.pool)
        member = None if pool is None else next((m for m in pool.members if m.hostPort == verdict.member), None)
        if member is None:
            self.log.debug(
                "Health verdict on pool {pool} member {member} from worker {checker}:"
                " not in this worker's configuration (yet); kept",
                pool=verdict.pool,
                member=verdict.member,
                checker=CHECKER,
            )
            return
        self._apply(pool, member, verdict)

    def _startFollowing(self, pool: Any, config: Any, member: Any) -> None:
        """
        A member added at run time: the verdict heard for it, if any, else
        its initial state.
        """
        verdict = self.heard.get((pool.name, member.hostPort))
        if verdict is not None:
            self._apply(pool, member, verdict)
        else:
            self._initialState(pool, config, member)

    def _initialState(self, pool: Any, config: Any, member: Any) -> None:
        """
        A member never checked: with C{initial_state = "unhealthy"} it
        gets no connections until the checker says otherwise, as in the
        checker itself.
        """
        if member.lastCheck is None and config.initial_state == "unhealthy" and member.healthy:
            self._transition(pool, member, False, "not checked yet")

    def _apply(self, pool: Any, member: Any, verdict: HealthVerdict) -> None:
        """
        Give C{member} the verdict's state; record its check (marked as
        worker 0's) for the status page.
        """
        from .health import CheckResult

        if verdict.time is not None:
            reason = verdict.reason if self.checking else _fromWorker(verdict.reason)
            member.lastCheck = (CheckResult(verdict.healthy, reason), verdict.time)
        if bool(member.healthy) != verdict.healthy:
            source = "as the supervisor remembers it" if self.checking else f"from worker {CHECKER}"
            self._transition(pool, member, verdict.healthy, verdict.reason, source)

    def _transition(
        self, pool: Any, member: Any, healthy: bool, reason: str, source: Optional[str] = None
    ) -> None:
        """
        Change a member's health and log it as the checker's
        L{HealthMonitor<mtlsproxy.health.HealthMonitor>} does (same fields;
        with C{source}, whose verdict it is, also as the field C{source});
        becoming healthy ends a passive ejection.
        """
        member.healthy = healthy
        state = "healthy" if healthy else "unhealthy"
        emit = self.log.info if healthy else self.log.warn
        fields = dict(pool=pool.name, member=member.hostPort, healthy=healthy, state=state, reason=reason)
        if source is None:
            emit("Pool {pool} member {member} is now {state}: {reason}", **fields)
        else:
            emit("Pool {pool} member {member} is now {state}: {reason} ({source})", source=source, **fields)
        if healthy:
            member.endEjection("health check passed")
