# -*- test-case-name: tests.test_limits -*-
"""
The limits that keep what one client, or many, can hold of the proxy
bounded: time (the TLS handshake deadline, the idle timeout) and
connections (C{max_connections}, file descriptors).

  - L{Timeouts}: a listener's C{handshake_timeout} and C{idle_timeout}.
    The relay (L{mtlsproxy.relay.ProxyServerProtocol}) arms them: the
    handshake deadline runs from accept and is not moved by the bytes the
    client sends, so a client that sends nothing, or one byte a second, is
    closed when it expires; the idle timeout runs while relaying, is
    restarted by every byte either way, and bounds the closing of a
    connection too (a peer that never reads its last bytes or never answers
    close_notify).
  - L{IdleTimer}: an inactivity timer whose C{touch()} is one assignment,
    so it can be called for every chunk of the data path; it keeps one
    L{IDelayedCall} and moves it only when it fires.
  - L{ConnectionGate}: counts a listener's client connections and, at
    C{max_connections}, stops the listening port from accepting (its
    C{pauseProducing}, i.e. C{stopReading}: new clients wait in the
    kernel's backlog, as with HAProxy's C{maxconn}) until a connection
    closes.  Each episode is logged once, and counted for metrics
    (C{atCapacity}, C{capacityEpisodes}, C{refused}).
  - L{checkFileLimit}: at start-up, raises the soft C{RLIMIT_NOFILE} to
    what the listeners' C{max_connections} need (two descriptors per
    proxied connection), within the hard limit, and warns when that is not
    enough.  When descriptors run out anyway, Twisted's C{tcp.Port} handles
    C{EMFILE} on accept: it closes a reserved descriptor, accepts and
    closes the waiting connections, and re-reserves it, logging
    C{"EMFILE encountered; releasing reserved file descriptor."}; the
    listening socket is drained, so the reactor does not spin
    (C{tests.test_faults} checks this against a real C{twistd}).
"""

from __future__ import annotations

import resource
from typing import Any, Callable, Iterable, Optional

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DESCRIPTORS_PER_CONNECTION",
    "DESCRIPTOR_HEADROOM",
    "ConnectionGate",
    "FileLimit",
    "IdleTimer",
    "Timeouts",
    "checkFileLimit",
    "descriptorsNeeded",
    "ensureFileLimit",
]

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
"""
Seconds from accept for a client to complete its TLS handshake
(C{handshake_timeout}).
"""

DEFAULT_IDLE_TIMEOUT = 300.0
"""
Seconds without a byte either way before a relayed connection is closed
(C{idle_timeout}).
"""

DEFAULT_MAX_CONNECTIONS = 10000
"""
Client connections one listener holds at once (C{max_connections}).
"""

DESCRIPTORS_PER_CONNECTION = 2
"""
File descriptors one proxied connection holds: the client's and the
backend's.
"""

DESCRIPTOR_HEADROOM = 100
"""
File descriptors kept for everything else: listening sockets, log files,
health checks, the descriptor Twisted reserves for C{EMFILE} recovery,
certificate files read on reload.
"""

log = Logger()


@attrs.frozen
class Timeouts:
    """
    The time limits of one listener's connections.

    @ivar handshake: Seconds from accept to a completed TLS handshake; on
        expiry the connection is aborted (C{close_reason="handshake_timeout"}).
        Ignored on TCP listeners.
    @ivar idle: Seconds without a byte either way while relaying, and the
        most a connection may take to close; on expiry the connection is
        closed (C{close_reason="idle_timeout"}), or aborted if it was
        already closing.
    """

    handshake: float = DEFAULT_HANDSHAKE_TIMEOUT
    idle: float = DEFAULT_IDLE_TIMEOUT

    @classmethod
    def fromListener(cls, listener: Any) -> Timeouts:
        """
        The timeouts of a L{mtlsproxy.config.ListenerConfig}.
        """
        return cls(handshake=listener.handshake_timeout, idle=listener.idle_timeout)


class IdleTimer:
    """
    Calls C{expired} once nothing has happened for C{timeout} seconds.

    L{touch} only records the time, so that it costs next to nothing on the
    data path; the one L{IDelayedCall} is moved when it fires early.

    @ivar timeout: The inactivity period, in seconds.
    """

    def __init__(self, clock: IReactorTime, timeout: float, expired: Callable[[], object]) -> None:
        """
        @param clock: The reactor, or a L{twisted.internet.task.Clock}.
        @param timeout: Seconds of inactivity allowed.
        @param expired: Called (with no argument) when they are up; the
            timer is then stopped, and may be started again from it.
        """
        self._clock = clock
        self.timeout = timeout
        self._expired = expired
        self._last = 0.0
        self._call: Optional[IDelayedCall] = None

    @property
    def running(self) -> bool:
        """
        Is the timer started and not yet expired or stopped?
        """
        return self._call is not None

    def start(self) -> None:
        """
        Start counting from now (or restart, if running).
        """
        self._last = self._clock.seconds()
        if self._call is None:
            self._call = self._clock.callLater(self.timeout, self._check)

    def touch(self) -> None:
        """
        Something happened: count from now.  Does nothing unless running.
        """
        self._last = self._clock.seconds()

    def stop(self) -> None:
        """
        Stop the timer; C{expired} will not be called.
        """
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _check(self) -> None:
        """
        The delayed call fired: expire, or wait for what is left.
        """
        self._call = None
        idle = self._clock.seconds() - self._last
        if idle >= self.timeout:
            self._expired()
        else:
            self._call = self._clock.callLater(self.timeout - idle, self._check)


class ConnectionGate:
    """
    Admits a listener's client connections up to C{maxConnections} and
    pauses its listening port while that many are open.

    Mutable run-time state, kept apart from the configuration.  The relay
    calls L{admit} when a client connects and L{release} when it is gone;
    the listener service gives it the port with L{attach}.

    A connection that arrives at capacity is refused (L{admit} returns
    C{False}: the relay aborts it).  That only happens to connections the
    port accepted in the same batch as the one that filled it, or on a port
    that cannot be paused; otherwise new clients wait in the kernel's
    listen backlog until a slot frees.

    @ivar listenerName: The listener's name, for the log.
    @ivar active: Client connections open now.
    @ivar atCapacity: C{active} has reached C{maxConnections}: the port is
        paused.
    @ivar capacityEpisodes: How many times the listener reached capacity.
    @ivar refused: Connections refused at capacity, since start.
    @ivar port: The listening port, once listening.
    """

    log = Logger()

    def __init__(self, listenerName: str, maxConnections: int, clock: IReactorTime) -> None:
        self.listenerName = listenerName
        self._maxConnections = maxConnections
        self._clock = clock
        self.active = 0
        self.atCapacity = False
        self.capacityEpisodes = 0
        self.refused = 0
        self.port: Any = None
        self._since = 0.0
        self._refusedInEpisode = 0

    @property
    def maxConnections(self) -> int:
        """
        The most client connections open at once.  Setting it (on reload)
        pauses or resumes the port as needed.
        """
        return self._maxConnections

    @maxConnections.setter
    def maxConnections(self, value: int) -> None:
        self._maxConnections = value
        if self.active >= value:
            self._reachCapacity()
        elif self.atCapacity:
            self._leaveCapacity()

    def attach(self, port: Any) -> None:
        """
        Control C{port} (an L{IListeningPort}; pausing needs its
        C{pauseProducing} and C{resumeProducing}, which Twisted's TCP and
        UNIX ports have), or nothing (L{None}).
        """
        self.port = port
        if port is not None and self.atCapacity:
            self._pausePort()

    def admit(self) -> bool:
        """
        A client connected: count it, and pause the port if it fills the
        listener.

        @return: C{False} if the listener was already full: the connection
            is not counted, and must be closed.
        """
        if self.active >= self._maxConnections:
            self.refused += 1
            self._refusedInEpisode += 1
            self._reachCapacity()
            return False
        self.active += 1
        if self.active >= self._maxConnections:
            self._reachCapacity()
        return True

    def release(self) -> None:
        """
        An admitted client connection is gone: resume the port if it was
        paused.
        """
        if self.active <= 0:
            raise RuntimeError(f"listener {self.listenerName}: release without admit")
        self.active -= 1
        if self.atCapacity and self.active < self._maxConnections:
            self._leaveCapacity()

    def _reachCapacity(self) -> None:
        """
        Start an episode at capacity: pause the port, log once.
        """
        if self.atCapacity:
            return
        self.atCapacity = True
        self.capacityEpisodes += 1
        self._since = self._clock.seconds()
        self._refusedInEpisode = 0
        self._pausePort()
        self.log.warn(
            "Listener {listener} reached max_connections ({max_connections}):"
            " not accepting new connections until one closes",
            listener=self.listenerName,
            max_connections=self._maxConnections,
            active=self.active,
            episode=self.capacityEpisodes,
        )

    def _leaveCapacity(self) -> None:
        """
        End the episode: resume the port, log once.
        """
        self.atCapacity = False
        self._resumePort()
        self.log.info(
            "Listener {listener} accepting connections again after {duration:.3f}s"
            " at max_connections ({max_connections}); {refused} refused meanwhile",
            listener=self.listenerName,
            max_connections=self._maxConnections,
            active=self.active,
            episode=self.capacityEpisodes,
            duration=self._clock.seconds() - self._since,
            refused=self._refusedInEpisode,
        )

    def _pausePort(self) -> None:
        pause = getattr(self.port, "pauseProducing", None)
        if pause is not None:
            pause()

    def _resumePort(self) -> None:
        # tcp.Port.resumeProducing does nothing once the port stopped
        # listening.
        resume = getattr(self.port, "resumeProducing", None)
        if resume is not None:
            resume()


def descriptorsNeeded(maxConnections: Iterable[int]) -> int:
    """
    The file descriptors a process needs for listeners with these
    C{max_connections}: two per connection, plus L{DESCRIPTOR_HEADROOM}.
    """
    return sum(maxConnections) * DESCRIPTORS_PER_CONNECTION + DESCRIPTOR_HEADROOM


@attrs.frozen
class FileLimit:
    """
    The outcome of L{ensureFileLimit}.

    @ivar needed: The descriptors wanted.
    @ivar before: The soft limit found.
    @ivar after: The soft limit now.
    @ivar hard: The hard limit (C{resource.RLIM_INFINITY} for none).
    """

    needed: int
    before: int
    after: int
    hard: int

    @property
    def sufficient(self) -> bool:
        """
        Is the soft limit now at least what is needed?
        """
        return self.after == resource.RLIM_INFINITY or self.after >= self.needed

    @property
    def raised(self) -> bool:
        """
        Was the soft limit raised?
        """
        return self.after != self.before


def ensureFileLimit(
    needed: int,
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> FileLimit:
    """
    Raise the process's soft C{RLIMIT_NOFILE} to C{needed}, or as close as
    the hard limit allows.  Never lowers it.

    @param getrlimit: L{resource.getrlimit}, or a fake.
    @param setrlimit: L{resource.setrlimit}, or a fake.
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return FileLimit(needed, soft, soft, hard)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    after = soft
    if target > soft:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            pass
        else:
            after = target
    return FileLimit(needed, soft, after, hard)


def checkFileLimit(
    listeners: Iterable[Any],
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
    *,
    workers: int = 1,
) -> FileLimit:
    """
    Make room for the C{max_connections} of C{listeners}
    (L{mtlsproxy.config.ListenerConfig}s) with L{ensureFileLimit}, and log
    what was done: an info event when the limit was raised, a warning when
    it is still too low (connections beyond it fail with C{EMFILE}).

    @param workers: How many worker processes share the listeners: this
        process needs room for its share of each C{max_connections}.
    """
    listeners = list(listeners)
    limit = ensureFileLimit(
        descriptorsNeeded(-(-listener.max_connections // workers) for listener in listeners),
        getrlimit,
        setrlimit,
    )
    if limit.raised:
        log.info(
            "Raised the open file limit from {before} to {after} for max_connections",
            before=limit.before,
            after=limit.after,
            needed=limit.needed,
        )
    if not limit.sufficient:
        connections = max(0, (limit.after - DESCRIPTOR_HEADROOM) // DESCRIPTORS_PER_CONNECTION)
        log.warn(
            "The open file limit ({limit}, hard {hard}) is below the {needed} that"
            " max_connections of all listeners needs; beyond about {connections}"
            " connections, accepting fails (EMFILE) until some close",
            limit=limit.after,
            hard=limit.hard,
            needed=limit.needed,
            connections=connections,
        )
    return limit
