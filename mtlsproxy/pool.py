# -*- test-case-name: tests.test_selectors,tests.test_health -*-
"""
Run-time state of server groups (pools) and their members.

The frozen configuration (L{mtlsproxy.config.PoolConfig},
L{mtlsproxy.config.MemberConfig}) says what a pool should be; the objects here
say what it is now: which members are healthy, ejected or draining, how many
connections each carries.  They change only through the explicit methods
below.

Two things take a member out of rotation without an operator:

  - active health checks (L{mtlsproxy.health.HealthMonitor}) set
    C{member.healthy};
  - passive ejection: the relay reports every failed and every successful
    connection attempt (L{Member.connectFailed}; L{Member.connectSucceeded},
    which L{Member.connectionOpened} implies), and after C{eject_after} consecutive failures the member is ejected for
    C{eject_backoff} seconds, twice as long on each ejection that follows
    without a success in between, up to C{eject_backoff_max}.  Attempts
    that failed because the proxy itself ran out of file descriptors,
    memory or ephemeral ports (L{localResourceError}) are not the member's
    fault and are not reported.

Neither touches established connections: they only decide which members new
connections may go to.
"""

from __future__ import annotations

import errno
import time
from typing import Any, Final, Iterable, Optional, Protocol

import attrs
from twisted.internet.error import ConnectError
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .health import ALL_UNHEALTHY_CHOICES, PassiveEjectionConfig
from .interfaces import IBackendSelector, IMemberState

NO_HEALTHY_MEMBER = "no_healthy_member"
"""
L{Pool.noCandidateReason}: no member may take connections now (all are
unhealthy, ejected, draining or weighted 0) and the pool does not fail open.
"""

MEMBERS_EXHAUSTED = "members_exhausted"
"""
L{Pool.noCandidateReason}: the members that may take connections were all
tried already for this connection.
"""

LOCAL_RESOURCE_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}
)
"""
The errors of a connection attempt that are the proxy's own, not the
member's: out of file descriptors (C{EMFILE} for the process, C{ENFILE} for
the system), of socket buffers or memory (C{ENOBUFS}, C{ENOMEM}), or of
ephemeral ports (C{EADDRNOTAVAIL} from C{connect()}).
"""

LOCAL_CONNECT_FAILED_FORMAT: Final = (
    "Listener {listener}: could not connect to backend {backend} for {peer}:"
    " the proxy itself is out of resources ({errno}: {error});"
    " not counted against the member"
)
"""
The C{log_format} of the error logged for a connection attempt that failed
with one of L{LOCAL_RESOURCE_ERRNOS}.  Fields: C{listener}, C{pool},
C{backend} (C{"host:port"}), C{peer}, C{errno} (its name, C{"EMFILE"}) and
C{error} (Twisted's message).
"""


def localResourceError(reason: Failure) -> Optional[str]:
    """
    Did a connection attempt fail because the proxy itself ran out of a
    resource (L{LOCAL_RESOURCE_ERRNOS})?  Such a failure says nothing about
    the member, so it must not count towards the member's passive ejection
    (L{Member.connectFailed}): under descriptor exhaustion every attempt
    fails and would eject every healthy member.

    Twisted reports a failed C{socket()} as a
    L{ConnectBindError<twisted.internet.error.ConnectBindError>} and a
    failed C{connect()} as a L{ConnectError} (C{getConnectError}), both with
    the errno in C{osError}; a bare L{OSError} is understood too.

    @return: The errno's name (C{"EMFILE"}), or L{None} if the failure is
        not a local resource problem.
    """
    value = reason.value
    number: object = None
    if isinstance(value, ConnectError):
        number = value.osError
    elif isinstance(value, OSError):
        number = value.errno
    if isinstance(number, int) and number in LOCAL_RESOURCE_ERRNOS:
        return errno.errorcode.get(number, str(number))
    return None


class Clock(Protocol):
    """
    What the pool needs of a clock: the reactor, or a
    L{twisted.internet.task.Clock} in tests.
    """

    def seconds(self) -> float:
        """
        The current time in seconds (the reactor's time base).
        """


class _WallClock:
    """
    The default clock: C{time.time}, the same time base as the reactor's
    C{seconds()}.
    """

    def seconds(self) -> float:
        return time.time()


_WALL_CLOCK = _WallClock()


@attrs.frozen
class ConnectionFacts:
    """
    What a selector may know about the connection it is choosing a member for.

    @ivar listener: The listener's configured name.
    @ivar peerHost: The client's IP address as text.
    @ivar peerPort: The client's source port.
    @ivar sni: The server name the client asked for, or L{None}.
    @ivar clientIdentity: The verified client certificate's identity (an
        object with C{subject}, C{issuer}, C{serial}, C{fingerprint}), or
        L{None} when no certificate was presented.
    """

    listener: str
    peerHost: str
    peerPort: int
    sni: Optional[str] = None
    clientIdentity: Any = None


@implementer(IMemberState)
class Member:
    """
    One backend server of a pool, with its mutable state.

    @ivar config: The member's configuration (address, port, weight).
    @ivar weight: The weight in force (a reload or the admin console may
        change it without touching the configuration object).
    @ivar activeConnections: Proxied connections open to this member now.
    @ivar totalConnections: Proxied connections ever opened to this member.
    @ivar failedConnections: Connection attempts to this member that failed,
        ever.
    @ivar healthy: L{False} while health checks have taken it out.
    @ivar draining: L{True} when an operator drained it: no new connections.
    @ivar lastCheck: The last active health check, C{(result, time)} with a
        L{mtlsproxy.health.CheckResult} and the clock's seconds, or L{None}
        before the first one.
    @ivar consecutiveConnectFailures: Failed connection attempts since the
        last success or ejection.
    @ivar ejectedUntil: While ejected, the time the ejection ends; else
        L{None}.
    @ivar ejections: Ejections since the last successful connection; the
        next ejection lasts C{eject_backoff * 2 ** ejections}.
    @ivar poolName: The name of the pool that adopted it (for logs).
    @ivar ejectionConfig: The pool's L{PassiveEjectionConfig}.
    """

    log = Logger()

    def __init__(
        self,
        config: Any,
        clock: Optional[Clock] = None,
        ejectionConfig: Optional[PassiveEjectionConfig] = None,
        poolName: str = "",
    ) -> None:
        self.config = config
        self.weight: int = config.weight
        self.activeConnections = 0
        self.totalConnections = 0
        self.failedConnections = 0
        self.healthy = True
        self.draining = False
        self.lastCheck: Optional[tuple[Any, float]] = None
        self.consecutiveConnectFailures = 0
        self.ejectedUntil: Optional[float] = None
        self.ejections = 0
        self.clock: Clock = clock if clock is not None else _WALL_CLOCK
        self.ejectionConfig = (
            ejectionConfig if ejectionConfig is not None else PassiveEjectionConfig()
        )
        self.poolName = poolName

    @property
    def address(self) -> str:
        return str(self.config.address)

    @property
    def port(self) -> int:
        return int(self.config.port)

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)

    @property
    def hostPort(self) -> str:
        """
        C{host:port} for logs and status pages, with brackets around an
        IPv6 address.
        """
        if ":" in self.address:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"

    def usable(self) -> bool:
        """
        Is this member in rotation as far as the operator is concerned (not
        draining, weight above zero), whatever its health?
        """
        return not self.draining and self.weight > 0

    def available(self, now: Optional[float] = None) -> bool:
        """
        May this member be offered to a selector for a new connection?
        Healthy, not draining, weight above zero and not ejected.

        @param now: The current time; default the member's clock.
        """
        return self.healthy and self.usable() and not self.ejected(now)

    def ejected(self, now: Optional[float] = None) -> bool:
        """
        Is this member passively ejected at C{now}?  An ejection whose time
        is over ends here (and is logged).

        @param now: The current time; default the member's clock.
        """
        if self.ejectedUntil is None:
            return False
        if now is None:
            now = self.clock.seconds()
        if now < self.ejectedUntil:
            return True
        self.endEjection("ejection time over")
        return False

    def endEjection(self, reason: str) -> None:
        """
        Put an ejected member back into rotation now (the ejection time is
        over, or a health check found it healthy again).  The back-off is
        kept until a connection succeeds.  Does nothing if not ejected.
        """
        if self.ejectedUntil is None:
            return
        self.ejectedUntil = None
        self.log.info(
            "Pool {pool} member {member} returns from ejection: {reason}",
            pool=self.poolName,
            member=self.hostPort,
            reason=reason,
        )

    def connectionOpened(self) -> None:
        """
        A proxied connection to this member was established (which is also
        a successful connection attempt, see L{connectSucceeded}).
        """
        self.activeConnections += 1
        self.totalConnections += 1
        self.connectSucceeded()

    def connectionClosed(self) -> None:
        """
        A proxied connection to this member ended.
        """
        if self.activeConnections <= 0:
            raise RuntimeError(f"connectionClosed without open connection on {self}")
        self.activeConnections -= 1

    def connectFailed(self, now: Optional[float] = None) -> None:
        """
        A connection attempt to this member failed (refused, timed out).
        Not for attempts that failed for want of the proxy's own resources
        (L{localResourceError}).

        After C{ejectionConfig.eject_after} consecutive failures the member is
        ejected (see the module docstring).  Failures while it is ejected
        (attempts that started before) count in C{failedConnections} only.

        @param now: The current time; default the member's clock.
        """
        self.failedConnections += 1
        if not self.ejectionConfig.enabled:
            return
        if now is None:
            now = self.clock.seconds()
        if self.ejected(now):
            return
        self.consecutiveConnectFailures += 1
        if self.consecutiveConnectFailures < self.ejectionConfig.eject_after:
            return
        duration = self.ejectionConfig.duration(self.ejections)
        failures = self.consecutiveConnectFailures
        self.ejectedUntil = now + duration
        self.ejections += 1
        self.consecutiveConnectFailures = 0
        self.log.warn(
            "Pool {pool} member {member} ejected for {duration}s after"
            " {failures} consecutive connect failures",
            pool=self.poolName,
            member=self.hostPort,
            duration=duration,
            failures=failures,
            until=self.ejectedUntil,
        )

    def connectSucceeded(self) -> None:
        """
        A connection attempt to this member succeeded: the failure count and
        the ejection back-off start over.
        """
        self.consecutiveConnectFailures = 0
        self.ejections = 0

    def drain(self) -> None:
        """
        An operator takes the member out of rotation: no new connections go
        to it; established ones go on until they end.
        """
        if not self.draining:
            self.draining = True
            self.log.info(
                "Pool {pool} member {member} draining ({active} connection(s) open)",
                pool=self.poolName,
                member=self.hostPort,
                active=self.activeConnections,
                draining=True,
            )

    def enable(self) -> None:
        """
        An operator puts a drained member back into rotation.
        """
        if self.draining:
            self.draining = False
            self.log.info(
                "Pool {pool} member {member} enabled",
                pool=self.poolName,
                member=self.hostPort,
                draining=False,
            )

    def setWeight(self, weight: int) -> None:
        """
        An operator changes the member's weight (0 takes it out of rotation
        like L{drain}); the configuration is not touched.

        @raise ValueError: If C{weight} is not an integer from 0 to 1000.
        """
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1000:
            raise ValueError(f"weight must be an integer from 0 to 1000, not {weight!r}")
        old, self.weight = self.weight, weight
        self.log.info(
            "Pool {pool} member {member} weight {old} -> {weight}",
            pool=self.poolName,
            member=self.hostPort,
            old=old,
            weight=weight,
        )

    def __repr__(self) -> str:
        return (
            f"<Member {self.address}:{self.port} weight={self.weight}"
            f" active={self.activeConnections} healthy={self.healthy}"
            f"{' draining' if self.draining else ''}"
            f"{' ejected' if self.ejectedUntil is not None else ''}>"
        )


class PoolWatcher(Protocol):
    """
    What L{Pool.addWatcher} expects: told about members added and removed at
    run time (L{mtlsproxy.health.HealthMonitor} is one).
    """

    def memberAdded(self, member: Member) -> None:
        """
        C{member} was added to the pool.
        """

    def memberRemoved(self, member: Member) -> None:
        """
        C{member} was removed from the pool.
        """


class Pool:
    """
    A server group: its members and the selector that picks among them.

    @ivar allUnhealthy: What to do when no member is available (all
        unhealthy or ejected): C{"reject"} offers no candidate, so clients
        are refused (L{NO_HEALTHY_MEMBER}); C{"use_all"} fails open and
        offers every usable member (not draining, weight above zero),
        logged once as an error when it starts and once when it ends.
    @ivar ejectionConfig: The passive ejection settings given to every
        member.
    @ivar clock: What C{seconds()} is read from for ejections.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        members: Iterable[Member],
        selector: IBackendSelector,
        clock: Optional[Clock] = None,
        allUnhealthy: str = "reject",
        ejectionConfig: Optional[PassiveEjectionConfig] = None,
    ) -> None:
        """
        @param clock: Default C{time.time}; pass the reactor.
        @raise ValueError: If C{allUnhealthy} is not one of
            L{ALL_UNHEALTHY_CHOICES}.
        """
        if allUnhealthy not in ALL_UNHEALTHY_CHOICES:
            raise ValueError(
                f"allUnhealthy must be one of {', '.join(ALL_UNHEALTHY_CHOICES)},"
                f" not {allUnhealthy!r}"
            )
        self.name = name
        self.selector: Any = selector
        self.clock: Clock = clock if clock is not None else _WALL_CLOCK
        self.allUnhealthy = allUnhealthy
        self.ejectionConfig = (
            ejectionConfig if ejectionConfig is not None else PassiveEjectionConfig()
        )
        self.members: list[Member] = []
        self._watchers: list[PoolWatcher] = []
        self._failingOpen = False
        for member in members:
            self._adopt(member)
            self.members.append(member)

    @classmethod
    def fromConfig(
        cls,
        config: Any,
        selector: IBackendSelector,
        clock: Optional[Clock] = None,
    ) -> "Pool":
        """
        Build the run-time pool for a L{mtlsproxy.config.PoolConfig}.

        The pool-level keys C{all_unhealthy}, C{eject_after},
        C{eject_backoff} and C{eject_backoff_max} are read when C{config}
        has them; otherwise the defaults apply.
        """
        ejectionConfig = PassiveEjectionConfig(
            eject_after=getattr(config, "eject_after", 5),
            eject_backoff=getattr(config, "eject_backoff", 30.0),
            eject_backoff_max=getattr(config, "eject_backoff_max", 300.0),
        )
        return cls(
            config.name,
            [Member(m) for m in config.members],
            selector,
            clock=clock,
            allUnhealthy=getattr(config, "all_unhealthy", "reject"),
            ejectionConfig=ejectionConfig,
        )

    def _adopt(self, member: Member) -> None:
        """
        Give a member this pool's clock, ejection settings and name.
        """
        member.clock = self.clock
        member.ejectionConfig = self.ejectionConfig
        member.poolName = self.name

    def addMember(self, member: Member) -> None:
        """
        Add a member at run time and tell the watchers (health checks start).

        @raise ValueError: If the pool has it already.
        """
        if any(m is member for m in self.members):
            raise ValueError(f"{member!r} is already in pool {self.name}")
        self._adopt(member)
        self.members.append(member)
        for watcher in list(self._watchers):
            watcher.memberAdded(member)

    def removeMember(self, member: Member) -> None:
        """
        Remove a member at run time and tell the watchers (health checks
        stop).  Its established connections are not touched.

        @raise ValueError: If the pool does not have it.
        """
        for index, m in enumerate(self.members):
            if m is member:
                del self.members[index]
                break
        else:
            raise ValueError(f"{member!r} is not in pool {self.name}")
        for watcher in list(self._watchers):
            watcher.memberRemoved(member)

    def addWatcher(self, watcher: PoolWatcher) -> None:
        """
        Tell C{watcher} about members added and removed from now on.
        """
        if not any(w is watcher for w in self._watchers):
            self._watchers.append(watcher)

    def removeWatcher(self, watcher: PoolWatcher) -> None:
        """
        Stop telling C{watcher}; nothing happens if it was not watching.
        """
        self._watchers = [w for w in self._watchers if w is not watcher]

    def candidates(
        self, exclude: Iterable[Member] = (), now: Optional[float] = None
    ) -> list[Member]:
        """
        The members a selector may choose from now: the available ones
        (healthy, not ejected, not draining, weight above zero) that are not
        in C{exclude}.  When no member at all is available and the pool
        fails open (C{allUnhealthy == "use_all"}), the usable ones (not
        draining, weight above zero) instead.

        @param exclude: Members already tried for this connection.
        @param now: The current time; default the pool's clock.
        """
        if now is None:
            now = self.clock.seconds()
        excluded = set(map(id, exclude))
        available = [m for m in self.members if m.available(now)]
        failOpen = not available and self.allUnhealthy == "use_all"
        if failOpen:
            available = [m for m in self.members if m.usable()]
            failOpen = bool(available)
        self._noteFailingOpen(failOpen)
        return [m for m in available if id(m) not in excluded]

    def _noteFailingOpen(self, failingOpen: bool) -> None:
        """
        Log when failing open starts and when it ends.
        """
        if failingOpen == self._failingOpen:
            return
        self._failingOpen = failingOpen
        if failingOpen:
            self.log.error(
                "Pool {pool}: no member is healthy; sending connections to all"
                " {count} members regardless of health (all_unhealthy = \"use_all\")",
                pool=self.name,
                count=sum(1 for m in self.members if m.usable()),
                failingOpen=True,
            )
        else:
            self.log.info(
                "Pool {pool}: a member is healthy again; health checks apply again",
                pool=self.name,
                failingOpen=False,
            )

    @property
    def failingOpen(self) -> bool:
        """
        Did the last L{candidates} call fail open (for status pages)?
        """
        return self._failingOpen

    def noCandidateReason(
        self, exclude: Iterable[Member] = (), now: Optional[float] = None
    ) -> Optional[str]:
        """
        Why L{candidates} is empty: L{NO_HEALTHY_MEMBER} or
        L{MEMBERS_EXHAUSTED}; L{None} if it is not.  For the relay, to name
        the reason it closes a client with.
        """
        if self.candidates(exclude, now):
            return None
        if self.candidates((), now):
            return MEMBERS_EXHAUSTED
        return NO_HEALTHY_MEMBER

    def pick(self, facts: ConnectionFacts, exclude: Iterable[Member] = ()) -> Optional[Member]:
        """
        Choose a member for a new connection, or L{None} if there is none.

        @param exclude: Members already tried for this connection.
        """
        candidates = self.candidates(exclude)
        if not candidates:
            return None
        try:
            chosen = self.selector.pick(candidates, facts)
        except Exception:
            self.log.failure(
                "Selector {selector!r} of pool {pool} raised",
                selector=self.selector,
                pool=self.name,
            )
            return None
        if chosen is None:
            return None
        if not any(chosen is c for c in candidates):
            self.log.error(
                "Selector {selector!r} of pool {pool} returned {member!r},"
                " which was not a candidate",
                selector=self.selector,
                pool=self.name,
                member=chosen,
            )
            return None
        return chosen
