# -*- test-case-name: tests.test_workers -*-
"""
Worker processes: C{workers = N} in the configuration runs the proxy in N
processes that share the listening sockets, so that all cores are used.

With C{workers = 1} (the default) nothing here is used: the twistd process
serves the listeners itself, as it always did.

With more, the twistd process becomes a supervisor (L{WorkerSupervisor}):

  - it checks the configuration, opens every proxy listener's socket (so a
    bad or busy endpoint fails at start-up, and privileged ports work), but
    never accepts on them;
  - it starts N workers, each C{twistd -n mtlsproxy --config FILE --worker I
    --inherit ...} with the listening sockets passed down as file
    descriptors (L{InheritedListener}); a worker adopts them
    (C{reactor.adoptStreamPort}) instead of listening, and the kernel
    spreads new connections over the workers accepting on them;
  - a worker it starts again is given the member drains the fan-in status
    endpoint remembers (C{--drained}, L{encodeDrained}), applied before
    the worker accepts a client;
  - it forwards C{SIGHUP} (reload) to every worker, and on C{SIGTERM} /
    C{SIGINT} (its own shutdown) sends C{SIGTERM} to every worker, each of
    which drains its connections as a single process does
    (C{drain_timeout}), and exits when they all have (C{SIGKILL} for any
    left after C{drain_timeout} plus a grace period);
  - it starts a worker again if one dies (after a delay that grows when a
    worker keeps dying);
  - a worker exits when the supervisor dies: Linux C{PR_SET_PDEATHSIG}
    (L{exitWithParent}), and, where that is missing, a check every second
    that its parent is still the supervisor.
  - there is one log: a worker logs to its standard output (never to a
    file; each line names the worker, L{mtlsproxy.logs}).  When the
    supervisor logs to standard output (C{-n}, C{--logfile -}) it is the
    workers' too.  When the supervisor logs to a file (C{--logfile}, C{[logging]
    file}, a daemon's C{twistd.log}), a worker's standard output and error
    are pipes the supervisor reads: it writes the whole lines of the
    output (L{LineJoiner}: bounded, a last unfinished line written at exit)
    into the very log file its own observer writes to, so that they
    interleave with its own at line ends and are rotated with them (1 MB,
    C{SIGUSR1} to the supervisor), and logs each line of the error as an
    event.  A worker's write to the pipe blocks while the pipe's buffer is
    full: a supervisor that does not read stalls its workers rather than
    letting their log lines pile up in memory.

Every worker runs the whole proxy (pools, reloads, logs), except active
health checks: worker 0 alone runs them and the supervisor passes its
verdicts on to the others (L{mtlsproxy.healthshare}), over a pipe from each
worker (its file descriptor 3, C{--health-channel}) and the worker's
standard input; a worker it
starts gets the verdicts it remembers on its command line
(C{--health-states}).  With a C{[status]} table, the supervisor serves the
configured status endpoint for all of them:

  - it makes a private directory (mode 0700, removed when it stops) and
    gives each worker a socket path in it (C{--status-socket}), where the
    worker serves its own status site in plain HTTP, to its owner only;
  - on each request to the public endpoint it asks every worker at once
    over those sockets and merges the answers (L{mtlsproxy.fanin}):
    C{/metrics} with a C{worker} label on every sample, C{/status} and
    C{/readyz} across workers, member control forwarded to every worker
    (and its drains passed to a worker started again, C{--drained}).
    A worker that is down or does not answer within a couple of seconds is
    reported as such.

Worker 0 alone serves the C{[admin]} console, whose helpers see worker 0
only (C{docs/performance.md}, "Worker processes").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from typing import Any, Callable, Optional, Sequence

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol, ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .healthshare import HealthRelay, channelDescriptor, encodeVerdict, encodeVerdicts

__all__ = [
    "InheritedListener",
    "LineJoiner",
    "WorkerSupervisor",
    "encodeInherited",
    "decodeInherited",
    "decodeDrained",
    "encodeDrained",
    "exitWithParent",
    "workerArguments",
    "workerCount",
]

log = Logger()

_FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}


def workerCount(setting: int | str, cpuCount: Optional[int] = None) -> int:
    """
    How many processes C{workers = setting} asks for.

    @param setting: The configuration value: an integer, or C{"auto"} for
        one per CPU core.
    @param cpuCount: The number of cores, for tests; L{os.cpu_count} if
        L{None}.
    """
    if setting == "auto":
        count = cpuCount if cpuCount is not None else os.cpu_count()
        return max(1, count or 1)
    return int(setting)


@attrs.frozen
class InheritedListener:
    """
    A listening socket a worker received from its supervisor.

    @ivar fd: The file descriptor number in the worker.
    @ivar family: The address family, C{"INET"}, C{"INET6"} or C{"UNIX"}.
    """

    fd: int
    family: str

    @property
    def addressFamily(self) -> int:
        """
        The L{socket} module's constant for L{family}.
        """
        return _FAMILIES[self.family]


def encodeInherited(listeners: dict[str, InheritedListener]) -> str:
    """
    The C{--inherit} option's value for a worker: JSON, listener name to
    C{[fd, family]}.
    """
    return json.dumps({name: [item.fd, item.family] for name, item in listeners.items()}, sort_keys=True)


def decodeInherited(text: str) -> dict[str, InheritedListener]:
    """
    Read an C{--inherit} value (see L{encodeInherited}).

    @raise ValueError: If C{text} is not what L{encodeInherited} writes.
    """
    try:
        raw = json.loads(text)
        result = {}
        for name, (fd, family) in raw.items():
            if not isinstance(name, str) or not isinstance(fd, int) or family not in _FAMILIES:
                raise ValueError(name)
            result[name] = InheritedListener(fd, family)
        return result
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"not a valid --inherit value: {text!r}") from e


def encodeDrained(drained: Sequence[tuple[str, str]]) -> str:
    """
    The C{--drained} option's value for a worker: JSON, a list of C{[pool,
    member]} (member as C{address:port}), the member drains the supervisor
    remembers (L{mtlsproxy.fanin.MemberControlMemory}).
    """
    return json.dumps([[pool, member] for pool, member in drained])


def decodeDrained(text: str) -> list[tuple[str, str]]:
    """
    Read a C{--drained} value (see L{encodeDrained}).

    @raise ValueError: If C{text} is not what L{encodeDrained} writes.
    """
    try:
        raw = json.loads(text)
        if not isinstance(raw, list):
            raise ValueError(text)
        result = []
        for pool, member in raw:
            if not isinstance(pool, str) or not isinstance(member, str):
                raise ValueError(pool)
            result.append((pool, member))
        return result
    except (TypeError, ValueError) as e:
        raise ValueError(f"not a valid --drained value: {text!r}") from e


def _familyOf(port: IListeningPort) -> str:
    address = port.getHost()
    kind = type(address).__name__
    if kind == "IPv6Address":
        return "INET6"
    if kind == "UNIXAddress":
        return "UNIX"
    return "INET"


_PR_SET_PDEATHSIG = 1


def exitWithParent(sig: int = signal.SIGTERM) -> bool:
    """
    Ask Linux to send C{sig} to this process when its parent exits
    (C{prctl(PR_SET_PDEATHSIG)}).

    @return: Whether that worked; where it does not (not Linux), a worker
        watches its parent with L{ParentWatcher}.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class ParentWatcher(Service):
    """
    In a worker: stop the reactor once the supervisor is gone (the parent
    process id changed), whether or not L{exitWithParent} worked, and at
    once if it was gone before this worker could ask to be told.
    """

    def __init__(self, reactor: Any, supervisorPid: int, interval: float = 1.0) -> None:
        self._reactor = reactor
        self.supervisorPid = supervisorPid
        self._call = LoopingCall(self._check)
        self._call.clock = reactor
        self._interval = interval

    def startService(self) -> None:
        """
        Check now and every C{interval} seconds.
        """
        Service.startService(self)
        self._call.start(self._interval, now=True)

    def stopService(self) -> Any:
        """
        Stop checking.
        """
        Service.stopService(self)
        if self._call.running:
            self._call.stop()
        return None

    def _check(self) -> None:
        if os.getppid() != self.supervisorPid:
            log.warn("Supervisor {pid} is gone; this worker stops", pid=self.supervisorPid)
            self._call.stop()
            if self._reactor.running:
                self._reactor.stop()


MAX_LOG_LINE = 64 * 1024
"""The longest line, in bytes, the supervisor keeps of a worker's output
while waiting for its end (L{LineJoiner})."""


class LineJoiner:
    """
    Joins what a worker writes on one of its output pipes into whole lines,
    for its supervisor to write into the shared log file: a line read in
    several pieces is delivered once complete, so the lines of two workers
    (and the supervisor's own) interleave at line ends only.

    Memory stays bounded: no more than C{maxLine} bytes of an unfinished
    line wait; a longer one is delivered in pieces of C{maxLine} bytes, each
    ended by a newline.  (A long line read whole, in one read from the
    pipe, is delivered as it is.)
    """

    def __init__(self, deliver: Callable[[bytes], None], maxLine: int = MAX_LOG_LINE) -> None:
        """
        @param deliver: Called with one or more whole lines, each ended by
            C{b"\\n"}.
        @param maxLine: The longest line kept in pieces.
        """
        self._deliver = deliver
        self._maxLine = maxLine
        self._partial = b""

    def feed(self, data: bytes) -> None:
        """
        Take what was read: deliver every line it completes, keep the rest.
        """
        data = self._partial + data
        end = data.rfind(b"\n") + 1
        if end:
            self._deliver(data[:end])
            data = data[end:]
        while len(data) >= self._maxLine:
            self._deliver(data[: self._maxLine] + b"\n")
            data = data[self._maxLine :]
        self._partial = data

    def flush(self) -> None:
        """
        The stream ended: deliver its last line, unfinished, with a newline.
        """
        if self._partial:
            partial, self._partial = self._partial, b""
            self._deliver(partial + b"\n")


def workerArguments(
    twistdOptions: Any,
    pluginOptions: Any,
    index: int,
    inherited: dict[str, InheritedListener],
    supervisorPid: int,
    statusSocket: Optional[str] = None,
    workers: Optional[int] = None,
    drained: Sequence[tuple[str, str]] = (),
    healthStates: Sequence[Any] = (),
) -> list[str]:
    """
    The command line of worker C{index}: this Python running twistd in the
    foreground, with the supervisor's logging options (but no C{--logfile}:
    it logs to its standard output), and the plugin's
    options plus C{--worker}, C{--supervisor}, C{--inherit},
    C{--health-channel} (its descriptor to the supervisor) and, with
    C{[status]}, C{--status-socket}, with member drains to apply,
    C{--drained}, and with health verdicts to apply, C{--health-states}.

    @param twistdOptions: twistd's own options (C{ServerOptions}), or
        L{None}.
    @param pluginOptions: The C{mtlsproxy} plugin's options.
    @param statusSocket: Where the worker serves its status site for the
        supervisor, or L{None} for nowhere.
    @param workers: How many workers there are (C{--workers}: each worker
        takes its share of every listener's C{max_connections}).
    @param drained: (pool, member) of every member the worker drains before
        it accepts a client (L{WorkerSupervisor.drainedMembers}); none if
        empty.
    @param healthStates: The health verdicts the supervisor remembers
        (L{mtlsproxy.healthshare.HealthVerdict}), applied before the worker
        accepts a client; none if empty.
    """
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]
    if twistdOptions is not None:
        # Never --logfile: a worker logs to its standard output, which is
        # either the supervisor's or a pipe the supervisor copies into its
        # own log file (WorkerSupervisor, logFile).
        logger = twistdOptions.get("logger")
        if isinstance(logger, str) and logger and not logger.startswith("mtlsproxy.logs."):
            argv += ["--logger", logger]
        if twistdOptions.get("syslog"):
            argv += ["--syslog", "--prefix", twistdOptions.get("prefix") or "twisted"]
        if twistdOptions.get("reactor"):
            argv += ["--reactor", twistdOptions["reactor"]]
    argv += ["mtlsproxy", "--config", pluginOptions["config"]]
    formats = dict(pluginOptions)
    if (
        twistdOptions is not None
        and twistdOptions.get("logger") == "mtlsproxy.logs.jsonLogger"
        and not formats.get("log-format")
    ):
        # The supervisor logs JSON through twistd's --logger; its workers
        # (which get our own logger) must too.
        formats["log-format"] = "json"
    for option in ("log-format", "log-level"):
        if formats.get(option):
            argv += [f"--{option}", formats[option]]
    argv += [
        "--worker",
        str(index),
        "--supervisor",
        str(supervisorPid),
        "--inherit",
        encodeInherited(inherited),
        "--health-channel",
        str(channelDescriptor(item.fd for item in inherited.values())),
    ]
    if statusSocket is not None:
        argv += ["--status-socket", statusSocket]
    if workers is not None:
        argv += ["--workers", str(workers)]
    if drained:
        argv += ["--drained", encodeDrained(drained)]
    if healthStates:
        from .healthshare import encodeVerdicts

        argv += ["--health-states", encodeVerdicts(healthStates)]
    return argv


_MAX_SOCKET_PATH = 107
"""Bytes in a UNIX socket's path, at most (Linux C{sun_path} less the NUL)."""


def _privateDirectory(longestName: str) -> str:
    """
    Make a directory for the workers' status sockets: C{mkdtemp} (mode
    0700, a name nobody can guess or make first) in the usual temporary
    directory, or in C{/tmp} if C{TMPDIR} is too long for a socket path
    ending in C{longestName}.
    """
    directory = tempfile.mkdtemp(prefix="mtlsproxy-status-")
    if len(os.fsencode(os.path.join(directory, longestName))) > _MAX_SOCKET_PATH:
        os.rmdir(directory)
        directory = tempfile.mkdtemp(prefix="mtlsproxy-status-", dir="/tmp")
    return directory


class _NoAccept(Factory):
    """
    The supervisor's factory for the sockets it opens: it never accepts
    (reading is stopped at once), so this never builds anything.
    """

    noisy = False

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        return None


class _WorkerProtocol(ProcessProtocol):
    """
    Tells the supervisor when its worker ends, and what it says on its
    health channel (its descriptor C{channelFD}); with C{logFile}, copies
    the worker's standard output into it and logs its standard error, line
    by line.
    """

    def __init__(
        self, supervisor: WorkerSupervisor, index: int, channelFD: int, logFile: Any = None
    ) -> None:
        self.supervisor = supervisor
        self.index = index
        self.channelFD = channelFD
        self.ended: Deferred[None] = Deferred()
        self._lines = supervisor.healthRelay.splitterFor(index)
        self._logFile = logFile
        self._output: dict[int, LineJoiner] = {}
        if logFile is not None:
            self._output = {1: LineJoiner(self._writeLines), 2: LineJoiner(self._logErrors)}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """
        Message lines from the worker's health channel; its log lines
        (standard output) and anything else it writes (standard error),
        when read.
        """
        if childFD == self.channelFD:
            self._lines.feed(data)
        elif childFD in self._output:
            self._output[childFD].feed(data)

    def _writeLines(self, lines: bytes) -> None:
        """
        Whole log lines from the worker, into the supervisor's log file
        (rotated as the supervisor's own lines are).  A failed write (a full
        disk) loses these lines rather than closing the pipe, which would
        end the worker's logging.
        """
        try:
            self._logFile.write(lines)
            self._logFile.flush()
        except (OSError, ValueError):
            pass

    def _logErrors(self, lines: bytes) -> None:
        """
        Lines the worker wrote on its standard error outside its logging (a
        configuration warning before it starts logging, a traceback Python
        prints as it dies): logged by the supervisor, in its log's format.
        """
        for line in lines.decode("utf-8", "replace").splitlines():
            self.supervisor.log.warn("Worker {worker} standard error: {line}", worker=self.index, line=line)

    def childConnectionLost(self, childFD: int) -> None:
        """
        One of the worker's pipes closed: write its last, unfinished line.
        """
        if childFD in self._output:
            self._output[childFD].flush()

    def processEnded(self, reason: Failure) -> None:
        """
        The worker exited (its pipes are closed): tell the supervisor, then
        whoever waits for it.
        """
        for output in self._output.values():
            output.flush()
        self.supervisor._workerEnded(self, reason)
        self.ended.callback(None)


@attrs.define
class WorkerState:
    """
    Run-time facts about one worker, for logs and status.

    @ivar index: 0 to N - 1.
    @ivar pid: The process id of the current process, or L{None}.
    @ivar starts: How many times it was started.
    @ivar startedAt: When the current process was started (reactor time).
    """

    index: int
    pid: Optional[int] = None
    starts: int = 0
    startedAt: float = 0.0


class WorkerSupervisor(MultiService):
    """
    The twistd process's service when C{workers} is more than 1: opens the
    listening sockets, runs the workers, forwards signals (see the module
    docstring).

    Its children (the public status endpoint) start with it and stop only
    once every worker has exited, so the endpoint reports the shutdown
    drain as a single process's does.

    @ivar workers: A L{WorkerState} per worker.
    @ivar inherited: The listening sockets by listener name, once open.
    @ivar statusDirectory: The private directory of the workers' status
        sockets while running (with C{statusSockets}), else L{None}.
    @ivar startedAt: When the supervisor started (reactor time).
    @ivar startObservers: Called with a worker's index each time it is
        started (its L{WorkerState} updated): the fan-in status endpoint
        replays member drains to a worker started again
        (L{mtlsproxy.fanin.FanIn.workerStarted}).
    @ivar drainedMembers: L{None}, or returns (pool, member) of every member
        drain in force, read each time a worker is started and passed to
        it (C{drained}, see L{workerArguments}): set by the fan-in status
        endpoint (L{mtlsproxy.fanin.FanIn}), which remembers them.
    @ivar healthRelay: The health verdicts of worker 0 (the checker), the
        latest per pool member, forwarded to the other workers and passed
        to every worker started (C{healthStates}, see L{workerArguments})
        (L{mtlsproxy.healthshare.HealthRelay}).
    """

    log = Logger()

    restartDelay = 1.0
    """Seconds before a worker that died is started again; doubled (up to
    L{maxRestartDelay}) while workers die within L{stableAfter} seconds."""

    maxRestartDelay = 30.0
    stableAfter = 10.0

    killGrace = 5.0
    """Seconds, after C{drainTimeout}, before workers still running at
    shutdown are killed."""

    maxHealthArgument = 96 * 1024
    """The longest C{--health-states} value, in bytes (Linux takes at most
    128 KiB per argument): beyond it, a worker started gets the verdicts
    over its channel instead, just after it starts."""

    def __init__(
        self,
        reactor: Any,
        endpoints: Sequence[tuple[str, str]],
        count: int,
        arguments: Callable[..., list[str]],
        drainTimeout: float,
        environment: Optional[dict[str, str]] = None,
        installSignalHandlers: bool = True,
        listen: Optional[Callable[[str, Factory], Deferred[Any]]] = None,
        statusSockets: bool = False,
        logFile: Optional[Callable[[], Any]] = None,
    ) -> None:
        """
        @param endpoints: (listener name, endpoint description) of every
            listener the workers serve.
        @param count: How many workers.
        @param arguments: Makes a worker's command line from its index, the
            inherited sockets, the supervisor's pid and the worker's status
            socket path (or L{None}) (L{workerArguments}, partially
            applied), plus, only when there are member drains to pass on
            (L{drainedMembers}), C{drained=} their list.
        @param drainTimeout: The configuration's C{drain_timeout}.
        @param environment: The workers' environment; this process's if
            L{None}.
        @param installSignalHandlers: Forward C{SIGHUP}; off for tests.
        @param listen: Opens an endpoint description with a factory; by
            default C{serverFromString(reactor, description).listen}.
        @param statusSockets: Give every worker a private status socket
            (L{statusSocket}), for the fan-in status endpoint.
        @param logFile: Returns the file the supervisor's own log observer
            writes to (L{mtlsproxy.logs.TwistdObserverFactory.logFile}:
            anything with C{write(bytes)} and C{flush()}), or L{None} when
            it logs elsewhere; called as each worker is started.  With a
            file, each worker's standard output and error are pipes the
            supervisor reads, and its whole lines are written into that
            file; without, workers share the supervisor's standard output
            and error.
        """
        MultiService.__init__(self)
        self._reactor = reactor
        self.endpoints = list(endpoints)
        self.count = count
        self._arguments = arguments
        self.drainTimeout = drainTimeout
        self._environment = environment
        self._installSignalHandlers = installSignalHandlers
        self.setName("workers")
        self.workers = [WorkerState(i) for i in range(count)]
        self.inherited: dict[str, InheritedListener] = {}
        self.ports: dict[str, IListeningPort] = {}
        self._processes: dict[int, Any] = {}
        self._protocols: dict[int, _WorkerProtocol] = {}
        self._stopping = False
        self._delay = self.restartDelay
        self._pending: dict[int, Any] = {}
        self._previousHUP: Any = None
        self._listen = listen or (lambda description, factory: serverFromString(reactor, description).listen(factory))
        self._statusSockets = statusSockets
        self._logFile = logFile
        self.statusDirectory: Optional[str] = None
        self.startedAt: float = reactor.seconds()
        self.startObservers: list[Callable[[int], None]] = []
        self.drainedMembers: Optional[Callable[[], Sequence[tuple[str, str]]]] = None
        self.healthRelay = HealthRelay(self._sendToWorker, lambda: sorted(self._processes))

    @property
    def stopping(self) -> bool:
        """
        Whether the supervisor is shutting down (its workers draining).
        """
        return self._stopping

    def statusSocket(self, index: int) -> Optional[str]:
        """
        The path of worker C{index}'s private status socket, or L{None}
        when the workers serve none (no C{[status]}, or not running).
        """
        if self.statusDirectory is None:
            return None
        return os.path.join(self.statusDirectory, f"worker-{index}.sock")

    # -- start

    def startService(self) -> None:
        """
        Open the listeners, then start the workers; forward C{SIGHUP}.
        With C{statusSockets}, first make the private directory of their
        status sockets: here rather than at construction, so that it
        belongs to the user twistd runs as once it has shed privileges.
        """
        if self._statusSockets:
            self.statusDirectory = _privateDirectory(f"worker-{self.count - 1}.sock")
        self.startedAt = self._reactor.seconds()
        MultiService.startService(self)
        opened = [self._open(name, description) for name, description in self.endpoints]
        DeferredList(opened, fireOnOneErrback=True, consumeErrors=True).addCallbacks(
            lambda _: self._startAll(), self._openFailed
        ).addErrback(self._openFailed)
        if self._installSignalHandlers:
            self._previousHUP = signal.signal(signal.SIGHUP, self._onHUP)

    def _open(self, name: str, description: str) -> Deferred[Any]:
        d = self._listen(description, _NoAccept())

        def opened(port: IListeningPort) -> None:
            # The supervisor never accepts: only the workers do.
            port.stopReading()  # type: ignore[attr-defined]
            self.ports[name] = port
            self.inherited[name] = InheritedListener(port.fileno(), _familyOf(port))  # type: ignore[attr-defined]
            self.log.info(
                "Listener {listener} open on {address} for {count} workers",
                listener=name,
                address=port.getHost(),
                count=self.count,
            )

        return d.addCallback(opened)

    def _openFailed(self, failure: Failure) -> None:
        """
        A listener could not be opened, or the workers not started: stop, as
        a single process does when it cannot listen.
        """
        reason = getattr(failure.value, "subFailure", None) or failure
        self.log.failure("Could not start the workers", reason)
        if self._reactor.running:
            self._reactor.stop()
        else:
            self._reactor.callWhenRunning(self._reactor.stop)

    def _startAll(self) -> None:
        for state in self.workers:
            self._start(state.index)

    def _start(self, index: int) -> None:
        self._pending.pop(index, None)
        if self._stopping:
            return
        state = self.workers[index]
        extra: dict[str, Any] = {}
        drained = list(self.drainedMembers()) if self.drainedMembers is not None else []
        if drained:
            extra["drained"] = drained
        verdicts = self.healthRelay.current()
        replay = []
        if verdicts and len(encodeVerdicts(verdicts)) <= self.maxHealthArgument:
            extra["healthStates"] = verdicts
        elif verdicts:
            replay = verdicts
            self.log.warn(
                "Worker {index}: {count} health verdicts are too many for its command line;"
                " sent over its channel once it runs",
                index=index,
                count=len(verdicts),
            )
        argv = self._arguments(index, self.inherited, os.getpid(), self.statusSocket(index), **extra)
        # 0: the supervisor's messages (health verdicts) to the worker;
        # 1 and 2: the supervisor's own, or, when it logs to a file, pipes it
        # copies into that file; the listening sockets; 3 (or the first free
        # one above them, as workerArguments says too): the worker's
        # messages to the supervisor.
        logFile = self._logFile() if self._logFile is not None else None
        childFDs: dict[int, Any] = {0: "w", 1: 1, 2: 2} if logFile is None else {0: "w", 1: "r", 2: "r"}
        for item in self.inherited.values():
            childFDs[item.fd] = item.fd
        channelFD = channelDescriptor(item.fd for item in self.inherited.values())
        childFDs[channelFD] = "r"
        protocol = _WorkerProtocol(self, index, channelFD, logFile)
        process = self._reactor.spawnProcess(
            protocol,
            argv[0],
            argv,
            env=self._environment if self._environment is not None else os.environ,
            childFDs=childFDs,
        )
        self._processes[index] = process
        for verdict in replay:
            self._sendToWorker(index, encodeVerdict(verdict))
        self._protocols[index] = protocol
        state.pid = process.pid
        state.starts += 1
        state.startedAt = self._reactor.seconds()
        self.log.info("Worker {index} started, pid {pid}", index=index, pid=process.pid)
        for observer in list(self.startObservers):
            observer(index)

    # -- events

    def _workerEnded(self, protocol: _WorkerProtocol, reason: Failure) -> None:
        index = protocol.index
        state = self.workers[index]
        self._processes.pop(index, None)
        pid, state.pid = state.pid, None
        self._removeStatusSocket(index)
        if self._stopping:
            self.log.info("Worker {index} (pid {pid}) stopped", index=index, pid=pid)
            return
        lived = self._reactor.seconds() - state.startedAt
        if lived >= self.stableAfter:
            self._delay = self.restartDelay
        else:
            self._delay = min(self._delay * 2, self.maxRestartDelay)
        how = "exited" if reason.check(ProcessDone, ProcessTerminated) else "ended"
        self.log.warn(
            "Worker {index} (pid {pid}) {how}: {reason}; starting it again in {delay}s",
            index=index,
            pid=pid,
            how=how,
            reason=reason.getErrorMessage(),
            delay=self._delay,
        )
        self._pending[index] = self._reactor.callLater(self._delay, self._start, index)

    def _removeStatusSocket(self, index: int) -> None:
        """
        Remove what is left of a worker's status socket once it has exited
        (a worker killed outright leaves it), so that it can listen again.
        """
        path = self.statusSocket(index)
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                self.log.warn("Cannot remove {path}: {error}", path=path, error=e)

    def _sendToWorker(self, index: int, data: bytes) -> None:
        """
        Write a message line to worker C{index}'s standard input, if it
        runs (it reads it as soon as its reactor does: the pipe, then the
        process transport, hold it until then).
        """
        process = self._processes.get(index)
        if process is None:
            return
        try:
            process.writeToChild(0, data)
        except Exception as e:  # ProcessExitedAlready, a closed pipe
            self.log.debug("Worker {index}: cannot write to it: {error}", index=index, error=e)

    def _onHUP(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.signalWorkers, signal.SIGHUP)

    def signalWorkers(self, sig: int) -> None:
        """
        Send C{sig} to every running worker.
        """
        for index, process in list(self._processes.items()):
            try:
                process.signalProcess(sig)
            except Exception as e:  # ProcessExitedAlready, OSError
                self.log.debug("Worker {index}: signal {sig}: {error}", index=index, sig=sig, error=e)

    # -- stop

    def stopService(self) -> Deferred[Any]:
        """
        Stop every worker (C{SIGTERM}: each drains its connections for up
        to C{drain_timeout} seconds), then close the listening sockets, stop
        the children (the status endpoint) and remove the status sockets'
        directory.

        @return: Fires once every worker has exited and all that is done.
        """
        Service.stopService(self)
        self._stopping = True
        if self._installSignalHandlers and self._previousHUP is not None:
            signal.signal(signal.SIGHUP, self._previousHUP)
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        ended = [protocol.ended for index, protocol in self._protocols.items() if index in self._processes]
        self.signalWorkers(signal.SIGTERM)
        killer = self._reactor.callLater(self.drainTimeout + self.killGrace, self.signalWorkers, signal.SIGKILL)
        d: Deferred[Any] = DeferredList(ended, consumeErrors=True) if ended else succeed(None)

        def closePorts(_: object) -> Deferred[Any]:
            if killer.active():
                killer.cancel()
            closing = [port.stopListening() for port in self.ports.values()]
            self.ports.clear()
            return DeferredList([c for c in closing if c is not None], consumeErrors=True)

        def stopChildren(_: object) -> Deferred[Any]:
            return MultiService.stopService(self)  # type: ignore[no-any-return]

        def removeDirectory(result: object) -> object:
            directory, self.statusDirectory = self.statusDirectory, None
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
            return result

        return d.addCallback(closePorts).addCallback(stopChildren).addBoth(removeDirectory)
