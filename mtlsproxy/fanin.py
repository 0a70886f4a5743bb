# -*- test-case-name: tests.test_fanin -*-
"""
The status endpoint of a supervisor (C{workers} more than 1): one answer
for all the worker processes.

Each worker serves its own status site (L{mtlsproxy.status}) in plain
HTTP on a private UNIX socket (L{mtlsproxy.workers.WorkerSupervisor.statusSocket}).
The supervisor serves the configured C{[status]} endpoint (same TLS and
client-certificate settings, L{mtlsproxy.status.StatusService}) with the
resources here, which ask every worker at once (L{WorkerStatusClient}, a
couple of seconds at most per worker) and merge the answers:

  - C{/metrics}: every worker's families with a C{worker="I"} label on
    every sample, one family per name, plus the supervisor's own
    C{process_*} (C{worker="supervisor"}), C{mtlsproxy_worker_up} and
    C{mtlsproxy_worker_starts} (L{mergeMetrics});
  - C{/status}: today's keys summed or merged across workers, plus every
    worker's own report under C{workers} (L{mergeStatus});
  - C{/healthz}: the supervisor runs;
  - C{/readyz}: ready when every worker answers ready (L{mergeReadiness});
  - C{POST /members/...}: forwarded to every worker, each one's answer
    reported (L{mergeControl}); the drains still in force are remembered
    (L{MemberControlMemory}) and passed on the command line of a worker
    the supervisor starts again (C{--drained},
    L{mtlsproxy.workers.WorkerSupervisor.drainedMembers}), which drains
    them before it accepts a client; as a backstop, they are replayed to it
    once its status socket answers, with the member control made while it
    was starting (L{FanIn.workerStarted}).

A worker that is not running, or does not answer in time, is named in the
answer (never a hang, never a traceback).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence
from urllib.parse import quote

import attrs
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from . import __version__
from .metrics import renderFor
from .status import StatusService, _Healthz, _json, controlRefusal

__all__ = [
    "FanIn",
    "FanInResource",
    "MemberControlMemory",
    "WorkerReply",
    "WorkerStatusClient",
    "mergeControl",
    "mergeMetrics",
    "mergeReadiness",
    "mergeStatus",
    "supervisorStatusService",
]

log = Logger()

OPENMETRICS = b"application/openmetrics-text; version=1.0.0; charset=utf-8"
"""
What the supervisor asks the workers' C{/metrics} for: OpenMetrics keeps a
counter's C{_total} and C{_created} in one family, so the merge loses
nothing, whatever format the scraper asks the supervisor for.
"""


@attrs.frozen
class WorkerReply:
    """
    What one worker answered one request, or why it did not.

    @ivar worker: The worker's index.
    @ivar code: The HTTP status code, or L{None} without an answer.
    @ivar body: The body of the answer.
    @ivar error: Why there is no answer (naming the socket), or L{None}.
    """

    worker: int
    code: Optional[int] = None
    body: bytes = b""
    error: Optional[str] = None

    @property
    def answered(self) -> bool:
        """
        Whether the worker answered at all (any status code).
        """
        return self.error is None and self.code is not None

    def describe(self) -> str:
        """
        One line for a report: why there is no answer, or its status code.
        """
        if self.error is not None:
            return self.error
        return f"answered HTTP {self.code}"

    def json(self) -> Any:
        """
        The body as JSON, or L{None} if it is not.
        """
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None


@implementer(IAgentEndpointFactory)
class _OneEndpoint:
    """
    Sends every request of an L{Agent} to one endpoint: a worker's socket.
    """

    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri: Any) -> Any:
        """
        The worker's socket, whatever the URI (its host names the worker
        for the logs only).
        """
        return self._endpoint


class WorkerStatusClient:
    """
    Asks a worker's private status site over its UNIX socket.

    @ivar timeout: Seconds a request may take, connecting included.
    """

    def __init__(self, reactor: Any, timeout: float = 2.0) -> None:
        self._reactor = reactor
        self.timeout = timeout

    def fetch(
        self, worker: int, socketPath: str, method: bytes, path: bytes, accept: Optional[bytes] = None
    ) -> Deferred[WorkerReply]:
        """
        Send one request and read the whole answer.

        @param worker: The worker's index, for the reply.
        @param socketPath: Its status socket.
        @param method: C{b"GET"} or C{b"POST"}.
        @param path: The path (and query), as the client sent it.
        @param accept: The C{Accept} header to send, if any.
        @return: Fires with a L{WorkerReply}, never fails: a refused
            connection or no answer within L{timeout} seconds is a reply
            with an C{error}.
        """
        endpoint = UNIXClientEndpoint(self._reactor, socketPath, timeout=max(1, round(self.timeout)))
        agent = Agent.usingEndpointFactory(
            self._reactor, _OneEndpoint(endpoint), pool=HTTPConnectionPool(self._reactor, persistent=False)
        )
        headers = Headers({b"accept": [accept]} if accept is not None else {})
        d = agent.request(method, b"http://worker-%d%s" % (worker, path), headers)

        def read(response: Any) -> Deferred[WorkerReply]:
            return readBody(response).addCallback(
                lambda body: WorkerReply(worker, response.code, body)
            )

        d.addCallback(read)

        def late(result: object, timeout: float) -> WorkerReply:
            # Called instead of the failure from cancelling the request.
            return WorkerReply(worker, error=f"not answering on {socketPath}: no answer within {timeout:g}s")

        d.addTimeout(self.timeout, self._reactor, onTimeoutCancel=late)

        def failed(failure: Failure) -> WorkerReply:
            if failure.check(ConnectError, OSError):
                why = f"cannot connect: {failure.getErrorMessage()}"
            else:
                why = f"{failure.type.__name__}: {failure.getErrorMessage()}"
            return WorkerReply(worker, error=f"not answering on {socketPath}: {why}")

        return d.addErrback(failed)


class FanIn:
    """
    Asks every worker of a supervisor the same request at once.

    @ivar supervisor: The L{mtlsproxy.workers.WorkerSupervisor}: its
        C{workers} (L{mtlsproxy.workers.WorkerState}), C{statusSocket(i)},
        C{stopping}, C{startedAt}, C{startObservers} (to which this adds
        L{workerStarted}) and C{drainedMembers} (which this sets to
        L{MemberControlMemory.drained}, passed to a worker it starts).
    @ivar client: Sends one request to one worker (L{WorkerStatusClient}).
    @ivar clock: Provides C{seconds()}.
    @ivar registry: The supervisor's own metrics (its C{process_*}).
    @ivar memory: The member control forwarded that still applies, replayed
        to a worker started again (L{MemberControlMemory}, L{control}).
    """

    replayDelay = 0.1
    """Seconds before a drain is replayed to a worker just started, and
    again while its status socket does not answer; doubled each time up to
    L{maxReplayDelay}."""

    maxReplayDelay = 1.0

    replayTimeout = 60.0
    """Seconds after a worker's start when replaying gives up if its status
    socket still does not answer."""

    def __init__(
        self, supervisor: Any, client: Any, clock: Any, registry: Optional[CollectorRegistry] = None
    ) -> None:
        self.supervisor = supervisor
        self.client = client
        self.clock = clock
        if registry is None:
            registry = CollectorRegistry(auto_describe=False)
            ProcessCollector(registry=registry)
        self.registry = registry
        self.memory = MemberControlMemory()
        self._replays: dict[int, _Replay] = {}
        supervisor.startObservers.append(self.workerStarted)
        supervisor.drainedMembers = self.memory.drained

    def ask(self, method: bytes, path: bytes, accept: Optional[bytes] = None) -> Deferred[list[WorkerReply]]:
        """
        Send the request to every worker that runs.

        @return: Fires with one L{WorkerReply} per worker, in index order;
            a worker that is not running (being started again) gets an
            error reply without being asked.
        """
        asked: list[Deferred[WorkerReply]] = []
        for state in self.supervisor.workers:
            socketPath = self.supervisor.statusSocket(state.index)
            if state.pid is None:
                asked.append(succeed(WorkerReply(state.index, error="not running (being started again)")))
            elif socketPath is None:
                asked.append(succeed(WorkerReply(state.index, error="serves no status socket")))
            else:
                asked.append(self.client.fetch(state.index, socketPath, method, path, accept))
        d: Deferred[Any] = DeferredList(asked, consumeErrors=True)

        def replies(results: list[tuple[bool, Any]]) -> list[WorkerReply]:
            out = []
            for state, (ok, value) in zip(self.supervisor.workers, results):
                if ok:
                    out.append(value)
                else:
                    out.append(WorkerReply(state.index, error=f"failed: {value.getErrorMessage()}"))
            return out

        return d.addCallback(replies)

    def control(self, path: bytes, pool: str, member: str, action: str) -> Deferred[list[WorkerReply]]:
        """
        Forward C{POST /members/<pool>/<member>/<action>} to every worker,
        and remember it (L{memory}) when at least one worker applied it
        (answered 200), so that a worker started again later gets it too
        (L{workerStarted}).

        @param path: The request's path, as the client sent it.
        @param action: C{"drain"} or C{"enable"}.
        @return: Fires with every worker's reply, as L{ask}.
        """

        def remember(replies: list[WorkerReply]) -> list[WorkerReply]:
            if any(reply.code == 200 for reply in replies):
                self.memory.applied(pool, member, action)
                for reply in replies:
                    if not reply.answered:
                        self._catchUp(reply.worker)
            return replies

        return self.ask(b"POST", path).addCallback(remember)

    def _catchUp(self, index: int) -> None:
        """
        Worker C{index} runs but did not answer a member control the others
        applied (it is still starting, or was busy past the timeout): replay
        the remembered drains to it once it answers (L{_Replay}), unless a
        replay is on its way already (it reads the memory as it goes).  A
        worker that is down gets them on its command line when it is started
        again.
        """
        if index in self._replays or self.supervisor.stopping:
            return
        state = self.supervisor.workers[index]
        if state.pid is None:
            return
        replay = self._replays[index] = _Replay(self, index, state.pid)
        replay.start()

    def workerStarted(self, index: int) -> None:
        """
        Worker C{index} was (re)started
        (L{mtlsproxy.workers.WorkerSupervisor.startObservers}), its command
        line given the remembered drains (which it applies before it
        accepts): replay them to it once its status socket answers
        (L{_Replay}: idempotent, and it catches the member control made
        while the process started, which it missed), leaving any replay to
        its previous process.
        """
        previous = self._replays.pop(index, None)
        if previous is not None:
            previous.stop()
        passed = self.memory.drained()
        if not passed:
            return
        state = self.supervisor.workers[index]
        replay = self._replays[index] = _Replay(self, index, state.pid, passed)
        replay.start()

    def _replayEnded(self, replay: _Replay) -> None:
        if self._replays.get(replay.worker) is replay:
            del self._replays[replay.worker]


class MemberControlMemory:
    """
    The member control a supervisor forwarded to its workers and that
    still applies: the members an operator drained and has not enabled
    since, by pool, in the order they were drained.

    An enable forgets the drain (an enabled member is what a worker starts
    with), so only drains are kept.
    """

    def __init__(self) -> None:
        self._drained: dict[tuple[str, str], None] = {}

    def applied(self, pool: str, member: str, action: str) -> None:
        """
        The workers applied C{action} (C{"drain"} or C{"enable"}) to
        C{member} (C{address:port}) of C{pool}.
        """
        if action == "drain":
            self._drained[(pool, member)] = None
        else:
            self.forget(pool, member)

    def forget(self, pool: str, member: str) -> None:
        """
        Stop remembering a drain of C{member} of C{pool}, if any.
        """
        self._drained.pop((pool, member), None)

    def isDrained(self, pool: str, member: str) -> bool:
        """
        Whether a drain of C{member} of C{pool} is remembered.
        """
        return (pool, member) in self._drained

    def drained(self) -> list[tuple[str, str]]:
        """
        (pool, member) of every remembered drain, oldest first.
        """
        return list(self._drained)


def controlPath(pool: str, member: str, action: str) -> bytes:
    """
    The path of C{POST /members/<pool>/<member>/<action>}, each segment
    quoted as twisted.web unquotes it.
    """
    return b"/members/%s/%s/%s" % (
        quote(pool.encode("utf-8"), safe="").encode("ascii"),
        quote(member.encode("utf-8"), safe=":[]").encode("ascii"),
        action.encode("ascii"),
    )


class _Replay:
    """
    Sends the remembered drains (L{MemberControlMemory}) to one process of
    a worker that was just started, one after the other, each as the
    memory holds it at that time (a drain enabled meanwhile is not sent, a
    new one is); then an enable of every drain passed on the process's
    command line (C{--drained}) and enabled since (the enable forwarded
    while the process started did not reach it).

    While the worker's status socket does not answer yet (the process is
    starting), the drain is tried again after L{FanIn.replayDelay}
    seconds, doubled each time up to L{FanIn.maxReplayDelay}, until it
    answers, the process is gone (died, or the supervisor stops: a new
    process gets a new replay) or L{FanIn.replayTimeout} seconds have
    passed.  A drain the worker refuses (404: the member is gone after a
    reload) is forgotten.

    @ivar worker: The worker's index.
    @ivar pid: The process this replay is for.
    @ivar passed: The drains on that process's command line.
    """

    def __init__(
        self, fanIn: FanIn, worker: int, pid: Optional[int], passed: Sequence[tuple[str, str]] = ()
    ) -> None:
        self.fanIn = fanIn
        self.worker = worker
        self.pid = pid
        self.passed = list(passed)
        self._done: set[tuple[str, str, str]] = set()
        self._delay = fanIn.replayDelay
        self._began = fanIn.clock.seconds()
        self._call: Any = None
        self._stopped = False

    def start(self) -> None:
        """
        Try the first drain after L{FanIn.replayDelay} seconds: the new
        process needs at least that long to listen.
        """
        self._later()

    def stop(self) -> None:
        """
        Send nothing more (an answer on its way is ignored).
        """
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.fanIn._replayEnded(self)

    def _current(self) -> bool:
        """
        Whether this replay should go on: its process still runs.
        """
        supervisor = self.fanIn.supervisor
        if self._stopped:
            return False
        if supervisor.stopping or supervisor.workers[self.worker].pid != self.pid:
            self.stop()
            return False
        return True

    def _later(self) -> None:
        self._call = self.fanIn.clock.callLater(self._delay, self._next)
        self._delay = min(self._delay * 2, self.fanIn.maxReplayDelay)

    def _next(self) -> None:
        self._call = None
        if not self._current():
            return
        drained = self.fanIn.memory.drained()
        todo = [(pool, member, "drain") for pool, member in drained] + [
            (pool, member, "enable") for pool, member in self.passed if (pool, member) not in drained
        ]
        todo = [key for key in todo if key not in self._done]
        socketPath = self.fanIn.supervisor.statusSocket(self.worker)
        if not todo or socketPath is None:
            self.stop()
            return
        pool, member, action = todo[0]
        self.fanIn.client.fetch(
            self.worker, socketPath, b"POST", controlPath(pool, member, action)
        ).addCallback(self._answered, pool, member, action)

    def _answered(self, reply: WorkerReply, pool: str, member: str, action: str = "drain") -> None:
        if not self._current():
            return
        if not reply.answered:
            if self.fanIn.clock.seconds() - self._began >= self.fanIn.replayTimeout:
                log.warn(
                    "Worker {worker}: gave up replaying the {action} of pool {pool} member {member}"
                    " after {timeout:g}s: {error}",
                    action=action,
                    worker=self.worker,
                    pool=pool,
                    member=member,
                    timeout=self.fanIn.replayTimeout,
                    error=reply.describe(),
                )
                self.stop()
            else:
                self._later()
            return
        self._done.add((pool, member, action))
        if action == "enable":
            if reply.code == 200:
                log.info(
                    "Worker {worker}: replayed the enable of pool {pool} member {member}"
                    " (drained on its command line, enabled since)",
                    worker=self.worker,
                    pool=pool,
                    member=member,
                )
            else:
                log.warn(
                    "Worker {worker} refused the replayed enable of pool {pool} member {member}"
                    " ({error})",
                    worker=self.worker,
                    pool=pool,
                    member=member,
                    code=reply.code,
                    error=reply.describe(),
                )
        elif reply.code == 200:
            log.info(
                "Worker {worker}: replayed the drain of pool {pool} member {member}",
                worker=self.worker,
                pool=pool,
                member=member,
            )
        else:
            answer = reply.json()
            log.warn(
                "Worker {worker} refused the replayed drain of pool {pool} member {member}"
                " ({error}): forgotten",
                worker=self.worker,
                pool=pool,
                member=member,
                code=reply.code,
                error=answer.get("error") if isinstance(answer, dict) and "error" in answer else reply.describe(),
            )
            self.fanIn.memory.forget(pool, member)
            # Nothing to enable either: the worker has no such member.
            self._done.add((pool, member, "enable"))
        self._next()


# ---------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------


def _labelled(family: Metric, worker: str) -> Iterator[Any]:
    for sample in family.samples:
        yield sample._replace(labels={**sample.labels, "worker": worker})


def _addFamilies(merged: dict[str, Metric], families: Iterable[Metric], worker: str) -> None:
    """
    Add C{families}' samples, labelled C{worker}, to the families of the
    same name in C{merged} (created from the first one seen).
    """
    for family in families:
        into = merged.get(family.name)
        if into is None:
            into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
        elif into.type != family.type:
            log.warn(
                "Metric {name} is a {type} in worker {worker}, a {expected} elsewhere: left out",
                name=family.name,
                type=family.type,
                worker=worker,
                expected=into.type,
            )
            continue
        into.samples.extend(_labelled(family, worker))


def mergeMetrics(
    replies: Sequence[WorkerReply], supervisor: Iterable[Metric], starts: Sequence[tuple[int, int]]
) -> list[Metric]:
    """
    One set of metric families for all the workers.

    @param replies: Every worker's answer to C{GET /metrics} in OpenMetrics.
    @param supervisor: The supervisor's own families (labelled
        C{worker="supervisor"}).
    @param starts: (index, times started) of every worker.
    @return: Every family of every worker that answered, each sample with
        a C{worker} label; then the supervisor's; then
        C{mtlsproxy_worker_up} (1 if the worker's metrics are in) and
        C{mtlsproxy_worker_starts}.
    """
    merged: dict[str, Metric] = {}
    up = GaugeMetricFamily(
        "mtlsproxy_worker_up",
        "1 if the worker answered the supervisor's scrape (its samples are in), else 0.",
        labels=["worker"],
    )
    for reply in replies:
        families: Optional[list[Metric]] = None
        if reply.code == 200:
            try:
                families = list(text_string_to_metric_families(reply.body.decode("utf-8")))
            except (UnicodeDecodeError, ValueError) as e:
                log.warn("Worker {worker}: unreadable metrics: {error}", worker=reply.worker, error=e)
        up.add_metric([str(reply.worker)], 0.0 if families is None else 1.0)
        if families is not None:
            _addFamilies(merged, families, str(reply.worker))
    _addFamilies(merged, supervisor, "supervisor")
    started = CounterMetricFamily(
        "mtlsproxy_worker_starts",
        "Times the supervisor started the worker (more than 1: it died and was started again).",
        labels=["worker"],
    )
    for index, count in starts:
        started.add_metric([str(index)], float(count))
    return list(merged.values()) + [up, started]


class _Families:
    """
    A collector of fixed families, to render merged ones with
    C{prometheus_client}'s encoders.
    """

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        return self._families


def renderMetrics(families: list[Metric], accept: Optional[str]) -> tuple[bytes, str]:
    """
    C{families} in the format the scraper's C{Accept} header asks for
    (L{mtlsproxy.metrics.renderFor}).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))  # type: ignore[arg-type]
    return renderFor(registry, accept)


def _problemsOf(reply: WorkerReply) -> Optional[list[str]]:
    """
    A worker's readiness problems from its C{/readyz} answer: C{[]} when
    ready, L{None} when it gave no readiness answer.
    """
    if reply.code == 200:
        return []
    if reply.code == 503:
        text = reply.body.decode("utf-8", "replace").strip()
        if text.startswith("not ready:"):
            text = text[len("not ready:"):]
        return [p.strip() for p in text.split(";") if p.strip()] or ["not ready"]
    return None


def mergeReadiness(replies: Sequence[WorkerReply], stopping: bool) -> tuple[bool, list[str]]:
    """
    Are all the workers ready, from their answers to C{GET /readyz}?

    @param stopping: Whether the supervisor is shutting down.
    @return: C{(ready, problems)}, each problem naming its worker.
    """
    problems = ["shutting down"] if stopping else []
    for reply in replies:
        own = _problemsOf(reply)
        if own is None:
            problems.append(f"worker {reply.worker}: {reply.describe()}")
        else:
            problems.extend(f"worker {reply.worker}: {p}" for p in own)
    return (not problems, problems)


def _sum(values: Iterable[Any]) -> Optional[int]:
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return sum(numbers) if numbers else None  # type: ignore[return-value]


def _mergeListeners(statuses: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    Each listener once: the first worker's entry, with C{active_connections}
    summed and C{listening} true only if it is in every worker.
    """
    merged: dict[str, dict[str, Any]] = {}
    seen: dict[str, list[dict[str, Any]]] = {}
    for status in statuses:
        for listener in status.get("listeners", []):
            name = listener.get("name")
            merged.setdefault(name, dict(listener))
            seen.setdefault(name, []).append(listener)
    for name, entry in merged.items():
        entry["active_connections"] = _sum(e.get("active_connections") for e in seen[name]) or 0
        entry["listening"] = all(e.get("listening") for e in seen[name])
    return list(merged.values())


_SUMMED = ("active_connections", "total_connections", "failed_connections")
_EVERY = ("healthy", "available")
_ANY = ("draining", "ejected")


def _mergePools(statuses: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    Each pool once, each member once: the first worker's entry, with the
    connection counts summed, C{healthy} and C{available} true only if
    they are in every worker, C{draining} and C{ejected} if they are in
    any.  Health is worker 0's in every worker (L{mtlsproxy.healthshare}),
    reaching the others a moment later, which "in every worker" covers;
    each worker ejects members on its own.  C{last_check} is the first
    answering worker's: worker 0's, the one that checks, when it answers.
    """
    pools: dict[str, dict[str, Any]] = {}
    members: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for status in statuses:
        for pool in status.get("pools", []):
            name = pool.get("name")
            if name not in pools:
                pools[name] = dict(pool)
                members[name] = {}
            else:
                pools[name]["failing_open"] = pools[name].get("failing_open") or pool.get("failing_open")
            for member in pool.get("members", []):
                members[name].setdefault(member.get("member"), []).append(member)
    for name, pool in pools.items():
        merged = []
        for entries in members[name].values():
            entry = dict(entries[0])
            for key in _SUMMED:
                entry[key] = _sum(e.get(key) for e in entries)
            for key in _EVERY:
                entry[key] = all(e.get(key) for e in entries)
            for key in _ANY:
                entry[key] = any(e.get(key) for e in entries)
            merged.append(entry)
        pool["members"] = merged
        pool["available_members"] = sum(1 for m in merged if m["available"])
    return list(pools.values())


def _iso(now: float) -> str:
    return datetime.fromtimestamp(now, timezone.utc).isoformat().replace("+00:00", "Z")


def mergeStatus(
    replies: Sequence[WorkerReply],
    workers: Sequence[Any],
    now: float,
    startedAt: float,
    stopping: bool,
    supervisorPid: int,
    drainedMembers: Sequence[tuple[str, str]] = (),
    healthVerdicts: Sequence[Any] = (),
) -> dict[str, Any]:
    """
    One C{/status} for all the workers, from their answers to C{GET
    /status}.

    The keys of a single process's C{/status} keep their meaning:
    C{ready} and C{problems} cover every worker (each problem naming its
    worker; a worker that did not answer is one); C{state} is
    C{draining} if the supervisor or any worker is; connection counts are
    summed; listeners and pool members are merged (see L{_mergeListeners},
    L{_mergePools}); C{certificates} and C{crls} are the first answering
    worker's (all read the same files).  Added: C{supervisor} (with
    C{drained_members}, the drains it passes to a worker started again,
    and C{health_verdicts}, worker 0's latest health verdict per member as
    the supervisor relays it to the others) and C{workers}, each worker's
    own report (or why there is none).

    @param workers: The supervisor's L{mtlsproxy.workers.WorkerState}s, in
        the order of C{replies}.
    @param startedAt: When the supervisor started (clock time).
    @param drainedMembers: (pool, member) of every drain the supervisor
        remembers (L{MemberControlMemory.drained}).
    @param healthVerdicts: The verdicts the supervisor remembers
        (L{HealthVerdict<mtlsproxy.healthshare.HealthVerdict>}s,
        L{HealthRelay.current<mtlsproxy.healthshare.HealthRelay.current>}).
    """
    entries: list[dict[str, Any]] = []
    statuses: list[dict[str, Any]] = []
    problems = ["shutting down"] if stopping else []
    for state, reply in zip(workers, replies):
        entry: dict[str, Any] = {"worker": state.index, "pid": state.pid, "starts": state.starts}
        status = reply.json() if reply.code == 200 else None
        if isinstance(status, dict):
            entry["status"] = status
            statuses.append(status)
            problems.extend(f"worker {state.index}: {p}" for p in status.get("problems", []))
        else:
            entry["error"] = reply.describe()
            problems.append(f"worker {state.index}: {reply.describe()}")
        entries.append(entry)
    byListener: dict[str, int] = {}
    for status in statuses:
        for name, count in status.get("connections", {}).get("by_listener", {}).items():
            byListener[name] = byListener.get(name, 0) + int(count)
    first = statuses[0] if statuses else {}
    draining = stopping or any(s.get("state") == "draining" for s in statuses)
    return {
        "version": __version__,
        "time": _iso(now),
        "state": "draining" if draining else "running",
        "ready": not problems,
        "problems": problems,
        "uptime_seconds": round(now - startedAt, 3),
        "listeners": _mergeListeners(statuses),
        "pools": _mergePools(statuses),
        "connections": {
            "active": sum(int(s.get("connections", {}).get("active", 0)) for s in statuses),
            "by_listener": byListener,
        },
        "certificates": first.get("certificates", []),
        "crls": first.get("crls", []),
        "supervisor": {
            "pid": supervisorPid,
            "workers": len(workers),
            "drained_members": [{"pool": pool, "member": member} for pool, member in drainedMembers],
            "health_verdicts": [
                {key: value for key, value in verdict.toJSON().items() if key != "type"}
                for verdict in sorted(healthVerdicts, key=lambda v: (v.pool, v.member))
            ],
        },
        "workers": entries,
    }


def mergeControl(replies: Sequence[WorkerReply]) -> tuple[int, dict[str, Any]]:
    """
    One answer to C{POST /members/...} forwarded to every worker.

    @return: The status code and the JSON body: when every worker gave the
        same code (200 applied, 404 unknown pool or member), that code and
        the first worker's answer; otherwise 502 and an C{error} naming the
        workers that did not apply it.  Either way C{workers} holds each
        worker's code and answer, or why there is none.
    """
    results: list[dict[str, Any]] = []
    failed: list[str] = []
    for reply in replies:
        if reply.answered:
            results.append({"worker": reply.worker, "code": reply.code, "answer": reply.json()})
        else:
            results.append({"worker": reply.worker, "error": reply.describe()})
    codes = {r.code for r in replies}
    if len(codes) == 1 and None not in codes and replies:
        first = replies[0].json()
        body = dict(first) if isinstance(first, dict) else {}
        body["workers"] = results
        return replies[0].code or 502, body
    for reply in replies:
        if reply.code != 200:
            failed.append(f"worker {reply.worker}: {reply.describe()}")
    return 502, {"error": "not every worker applied it: " + "; ".join(failed), "workers": results}


# ---------------------------------------------------------------------------
# The web resources
# ---------------------------------------------------------------------------


@attrs.frozen
class _Answer:
    code: int
    contentType: bytes
    body: bytes
    cache: bool = False


class _FanInPage(Resource):
    """
    A page answered once every worker has: L{answer} makes the answer.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, fanIn: FanIn) -> None:
        super().__init__()
        self.fanIn = fanIn

    def answer(self, request: Request) -> Deferred[_Answer]:
        raise NotImplementedError()

    def render_GET(self, request: Request) -> Any:
        return self._respond(request, self.answer(request))

    def _respond(self, request: Request, answering: Deferred[_Answer]) -> Any:
        gone: list[object] = []
        request.notifyFinish().addBoth(gone.append)

        def write(answer: _Answer) -> None:
            if gone:
                return  # The client went away meanwhile.
            request.setResponseCode(answer.code)
            request.setHeader(b"content-type", answer.contentType)
            if not answer.cache:
                request.setHeader(b"cache-control", b"no-store")
            request.write(answer.body)
            request.finish()

        def failed(failure: Failure) -> None:
            self.log.failure("Status endpoint: merging the workers' answers failed", failure)
            write(_Answer(500, b"text/plain; charset=utf-8", b"internal error; see the supervisor's log\n"))

        answering.addCallback(write).addErrback(failed)
        return NOT_DONE_YET


def _jsonAnswer(code: int, data: Any) -> _Answer:
    return _Answer(code, b"application/json", json.dumps(data, indent=2).encode("utf-8") + b"\n")


class _Status(_FanInPage):
    def answer(self, request: Request) -> Deferred[_Answer]:
        fanIn = self.fanIn

        def merge(replies: list[WorkerReply]) -> _Answer:
            supervisor = fanIn.supervisor
            return _jsonAnswer(
                200,
                mergeStatus(
                    replies,
                    supervisor.workers,
                    fanIn.clock.seconds(),
                    supervisor.startedAt,
                    supervisor.stopping,
                    os.getpid(),
                    fanIn.memory.drained(),
                    supervisor.healthRelay.current(),
                ),
            )

        return fanIn.ask(b"GET", b"/status").addCallback(merge)


class _Metrics(_FanInPage):
    def answer(self, request: Request) -> Deferred[_Answer]:
        fanIn = self.fanIn
        accept = request.getHeader(b"accept")

        def merge(replies: list[WorkerReply]) -> _Answer:
            families = mergeMetrics(
                replies,
                fanIn.registry.collect(),
                [(state.index, state.starts) for state in fanIn.supervisor.workers],
            )
            body, contentType = renderMetrics(
                families, accept.decode("latin-1") if accept is not None else None
            )
            return _Answer(200, contentType.encode("ascii"), body, cache=True)

        return fanIn.ask(b"GET", b"/metrics", OPENMETRICS).addCallback(merge)


class _Readyz(_FanInPage):
    def answer(self, request: Request) -> Deferred[_Answer]:
        fanIn = self.fanIn

        def merge(replies: list[WorkerReply]) -> _Answer:
            ready, problems = mergeReadiness(replies, fanIn.supervisor.stopping)
            text = "ready\n" if ready else "not ready: " + "; ".join(problems) + "\n"
            return _Answer(200 if ready else 503, b"text/plain; charset=utf-8", text.encode("utf-8"))

        return fanIn.ask(b"GET", b"/readyz").addCallback(merge)


class _Members(_FanInPage):
    """
    C{POST /members/<pool>/<address>:<port>/drain} and C{.../enable},
    checked as a single process checks them, then sent to every worker.
    """

    def __init__(self, fanIn: FanIn, controlAllowed: Callable[[], bool]) -> None:
        super().__init__(fanIn)
        self.controlAllowed = controlAllowed

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"allow", b"POST")
        return _json(request, 405, {"error": "use POST"})

    def render_POST(self, request: Request) -> Any:
        refusal = controlRefusal(request, self.controlAllowed)
        if refusal is not None:
            return refusal
        path = request.postpath or []
        pool, member, action = (segment.decode("utf-8", "replace") for segment in path)
        self.log.info(
            "Status API: {action} pool {pool} member {member} in every worker",
            action=action,
            pool=pool,
            member=member,
        )

        def merge(replies: list[WorkerReply]) -> _Answer:
            code, body = mergeControl(replies)
            return _jsonAnswer(code, body)

        # request.path as the client sent it (still quoted).
        return self._respond(
            request, self.fanIn.control(request.path, pool, member, action).addCallback(merge)
        )


class FanInResource(Resource):
    """
    The root of the supervisor's status site: C{status}, C{metrics},
    C{healthz}, C{readyz} and C{members}, over every worker.
    """

    def __init__(self, fanIn: FanIn, controlAllowed: Callable[[], bool]) -> None:
        """
        @param controlAllowed: Tells whether C{POST /members/...} may act
            (L{mtlsproxy.status.StatusService.controlAllowed}).
        """
        super().__init__()
        self.fanIn = fanIn
        self.putChild(b"status", _Status(fanIn))
        self.putChild(b"metrics", _Metrics(fanIn))
        self.putChild(b"healthz", _Healthz())
        self.putChild(b"readyz", _Readyz(fanIn))
        self.putChild(b"members", _Members(fanIn, controlAllowed))

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"mtlsproxy status (all workers): /status /metrics /healthz /readyz\n"


def supervisorStatusService(
    reactor: Any, supervisor: Any, statusConfig: Any, material: Any, timeout: float = 2.0
) -> StatusService:
    """
    The supervisor's status endpoint: the configured C{[status]} endpoint
    (with its TLS material, L{mtlsproxy.status.loadStatusMaterial}) serving
    L{FanInResource} over the workers of C{supervisor}.

    @param timeout: Seconds each worker has to answer.
    """
    fanIn = FanIn(supervisor, WorkerStatusClient(reactor, timeout), reactor)
    return StatusService(
        reactor,
        None,
        None,
        statusConfig,
        material,
        resource=lambda controlAllowed: FanInResource(fanIn, controlAllowed),
    )
