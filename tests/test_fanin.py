# -*- test-case-name: tests.test_fanin -*-
"""
Tests for L{mtlsproxy.fanin}: the supervisor's status site over two real
worker L{ProxyService}s (on L{MemoryReactorClock}s, their private status
sites rendered in memory), and L{WorkerStatusClient} over real UNIX sockets.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openMetricsFamilies,
)
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor as globalReactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from mtlsproxy.fanin import (
    FanIn,
    FanInResource,
    WorkerReply,
    WorkerStatusClient,
    mergeControl,
    mergeReadiness,
)
from mtlsproxy.service import ProxyService
from mtlsproxy.status import privateEndpoint
from mtlsproxy.workers import WorkerSupervisor

from .test_drain import makeProxy
from .test_status import STATUS_CONFIG, body, render
from .test_workers import _FakePort, _Reactor

class _WorkerClient:
    """
    Answers the supervisor's requests with the private status sites of
    real worker L{ProxyService}s, rendered in memory; or not at all, for
    the workers in C{silent}.
    """

    def __init__(self, workers: list[ProxyService]) -> None:
        self.workers = workers
        self.asked: list[tuple[int, str, bytes, bytes, Optional[bytes]]] = []
        self.silent: set[int] = set()
        self.pending: list[Deferred[WorkerReply]] = []
        self.refusing: set[int] = set()

    def fetch(
        self, worker: int, socketPath: str, method: bytes, path: bytes, accept: Optional[bytes] = None
    ) -> Deferred[WorkerReply]:
        self.asked.append((worker, socketPath, method, path, accept))
        if worker in self.silent:
            d: Deferred[WorkerReply] = Deferred()
            self.pending.append(d)
            return d
        if worker in self.refusing:
            # A process starting: its socket is not there yet.
            return succeed(
                WorkerReply(worker, error=f"not answering on {socketPath}: cannot connect: No such file")
            )
        service = self.workers[worker].statusService
        assert service is not None and service.private
        request = render(
            service.resource, path, method, {b"accept": accept} if accept is not None else None
        )
        assert request.finished
        return succeed(WorkerReply(worker, request.responseCode or 200, body(request)))


class FanInTests(SynchronousTestCase):
    """
    The supervisor's status site over two workers.
    """

    def setUp(self) -> None:
        self.reactor = _Reactor()
        self.supervisor = WorkerSupervisor(
            self.reactor,
            [("plain", "tcp:0")],
            2,
            lambda index, inherited, pid, statusSocket, drained=(): [
                "worker", str(index), str(statusSocket), json.dumps(drained)
            ],
            drainTimeout=3.0,
            installSignalHandlers=False,
            listen=lambda description, factory: succeed(_FakePort(10)),
            statusSockets=True,
        )
        self.supervisor.startService()
        self.addCleanup(self._stopSupervisor)
        self.workers = [self._worker(index) for index in range(2)]
        self.client = _WorkerClient(self.workers)
        self.fanIn = FanIn(self.supervisor, self.client, self.reactor)
        self.controlAllowed = True
        self.root = FanInResource(self.fanIn, lambda: self.controlAllowed)

    def _worker(self, index: int, config: str = STATUS_CONFIG) -> ProxyService:
        """
        A started worker L{ProxyService} with index C{index}, serving its
        status site on the supervisor's socket for it.
        """
        proxy, _ = makeProxy(self, config)
        socketPath = self.supervisor.statusSocket(index)
        assert socketPath is not None
        proxy = ProxyService(proxy._reactor, proxy.loaded, workerIndex=index, statusSocket=socketPath)
        proxy.startService()
        self.addCleanup(proxy.stopService)
        return proxy

    def _stopSupervisor(self) -> None:
        stopped = self.supervisor.stopService()
        for protocol, _, _, _ in self.reactor.spawned:
            if protocol.index in self.supervisor._processes and not protocol.ended.called:
                protocol.processEnded(Failure(ProcessTerminated(signal=15)))
        self.successResultOf(stopped)

    def _kill(self, index: int) -> None:
        """
        Worker C{index}'s current process ends (the supervisor will start
        it again later).
        """
        [protocol, *_] = [p for p, process, _, _ in reversed(self.reactor.spawned) if p.index == index]
        protocol.processEnded(Failure(ProcessTerminated(signal=9)))

    def test_workersServePrivately(self) -> None:
        """
        When a worker has a status socket, it serves its status site there
        (mode 0600, plain HTTP, member control allowed) and not on the
        configured endpoint.
        """
        worker = self.workers[1]
        reactor = worker._reactor
        assert worker.statusService is not None
        self.assertEqual(
            [(path, mode, factory) for path, factory, _, mode, _ in reactor.unixServers],
            [(self.supervisor.statusSocket(1), 0o600, worker.statusService.factory)],
        )
        self.assertEqual([s for s in reactor.tcpServers if s[1] is worker.statusService.factory], [])
        self.assertTrue(worker.statusService.private)
        self.assertTrue(worker.statusService.controlAllowed)

    def test_metricsFromEveryWorker(self) -> None:
        """
        When /metrics is scraped, every worker's samples are there with a
        C{worker} label, each family once, with the supervisor's own
        process metrics and C{mtlsproxy_worker_up}; the text parses back.
        """
        for index, count in ((0, 2), (1, 3)):
            for _ in range(count):
                self.workers[index].metrics.forListener("plain").connectionOpened()
        request = render(self.root, b"/metrics")
        self.assertTrue(request.finished)
        self.assertEqual(request.responseCode, 200)
        text = body(request).decode()
        self.assertEqual(text.count("# TYPE mtlsproxy_connections_total counter"), 1)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        connections = {
            s.labels["worker"]: s.value
            for s in families["mtlsproxy_connections"].samples
            if s.name == "mtlsproxy_connections_total"
        }
        self.assertEqual(connections, {"0": 2.0, "1": 3.0})
        self.assertEqual(
            {s.labels["worker"]: s.value for s in families["mtlsproxy_worker_up"].samples},
            {"0": 1.0, "1": 1.0},
        )
        self.assertEqual(
            {s.labels["worker"] for s in families["process_open_fds"].samples},
            {"0", "1", "supervisor"},
        )
        self.assertEqual(
            {s.labels["worker"]: s.value for s in families["mtlsproxy_listener_up"].samples},
            {"0": 1.0, "1": 1.0},
        )
        # The workers were asked in OpenMetrics, which keeps _created with
        # its counter.
        self.assertEqual({a[4] for a in self.client.asked}, {b"application/openmetrics-text; version=1.0.0; charset=utf-8"})

    def test_openMetrics(self) -> None:
        """
        When the scraper asks for OpenMetrics, the merged families are
        OpenMetrics that the strict parser accepts.
        """
        self.workers[1].metrics.forListener("plain").connectionOpened()
        request = render(
            self.root, b"/metrics", headers={b"accept": b"application/openmetrics-text; version=1.0.0"}
        )
        self.assertIn(b"openmetrics", request.responseHeaders.getRawHeaders(b"content-type")[0])
        text = body(request).decode()
        self.assertTrue(text.endswith("# EOF\n"))
        families = {f.name: f for f in openMetricsFamilies(text)}
        total = [
            s for s in families["mtlsproxy_connections"].samples
            if s.name == "mtlsproxy_connections_total"
        ]
        self.assertEqual([(s.labels["worker"], s.value) for s in total], [("0", 0.0), ("1", 1.0)])

    def test_metricsWorkerDown(self) -> None:
        """
        When a worker is not running, /metrics still answers: its
        C{mtlsproxy_worker_up} is 0 and it has no samples; the supervisor
        does not try its socket.
        """
        self._kill(1)
        request = render(self.root, b"/metrics")
        self.assertEqual(request.responseCode, 200)
        families = {f.name: f for f in text_string_to_metric_families(body(request).decode())}
        self.assertEqual(
            {s.labels["worker"]: s.value for s in families["mtlsproxy_worker_up"].samples},
            {"0": 1.0, "1": 0.0},
        )
        self.assertEqual(
            {s.labels["worker"] for s in families["mtlsproxy_listener_up"].samples}, {"0"}
        )
        self.assertEqual([a[0] for a in self.client.asked], [0])

    def test_statusMerged(self) -> None:
        """
        When /status is fetched, it has a single process's keys over every
        worker (connection counts summed, a member drained in one worker is
        draining and not available) and each worker's own report.
        """
        self.workers[0].pools["app"].members[0].totalConnections = 4
        self.workers[1].pools["app"].members[0].totalConnections = 5
        self.workers[1].pools["app"].members[0].drain()
        request = render(self.root, b"/status")
        self.assertEqual(request.responseCode, 200)
        status = json.loads(body(request))
        single = json.loads(body(render(self.workers[0].statusService.resource, b"/status")))  # type: ignore[union-attr]
        self.assertLessEqual(set(single), set(status))
        self.assertFalse(status["ready"])
        self.assertEqual(status["problems"], ["worker 1: pool app has no available member"])
        [pool] = status["pools"]
        [member] = pool["members"]
        self.assertEqual(member["total_connections"], 9)
        self.assertTrue(member["draining"])
        self.assertFalse(member["available"])
        self.assertEqual(pool["available_members"], 0)
        self.assertEqual([l["name"] for l in status["listeners"]], ["plain"])
        self.assertEqual(status["connections"], {"active": 0, "by_listener": {"plain": 0}})
        self.assertEqual(
            [(w["worker"], w["pid"], w["status"]["pools"][0]["members"][0]["draining"]) for w in status["workers"]],
            [(0, 1000, False), (1, 1001, True)],
        )
        self.assertEqual(
            status["supervisor"],
            {"pid": os.getpid(), "workers": 2, "drained_members": [], "health_verdicts": []},
        )

    def test_statusShowsHealthVerdicts(self) -> None:
        """
        When worker 0 has reported a member's health, the supervisor's
        /status lists the verdict it relays to the other workers.
        """
        from mtlsproxy.healthshare import HealthVerdict, encodeVerdict

        verdict = HealthVerdict("app", "127.0.0.1:9", False, "connection refused", 1700000000.5)
        self.supervisor.healthRelay.splitterFor(0).feed(encodeVerdict(verdict))
        status = json.loads(body(render(self.root, b"/status")))
        self.assertEqual(
            status["supervisor"]["health_verdicts"],
            [{"pool": "app", "member": "127.0.0.1:9", "healthy": False,
              "reason": "connection refused", "time": 1700000000.5}],
        )

    def test_statusWorkerNotAnswering(self) -> None:
        """
        When a worker does not answer, /status answers once the client
        gives up on it, naming the worker and why.
        """
        self.client.silent.add(1)
        request = render(self.root, b"/status")
        self.assertFalse(request.finished)
        self.client.pending[0].callback(WorkerReply(1, error="not answering on /x/worker-1.sock: no answer within 2s"))
        self.assertTrue(request.finished)
        status = json.loads(body(request))
        self.assertFalse(status["ready"])
        self.assertEqual(
            status["problems"], ["worker 1: not answering on /x/worker-1.sock: no answer within 2s"]
        )
        self.assertEqual(status["workers"][1]["error"], status["problems"][0][len("worker 1: "):])
        self.assertEqual(status["pools"][0]["available_members"], 1)

    def test_clientGone(self) -> None:
        """
        When the client disconnects before the workers answer, nothing is
        written afterwards.
        """
        self.client.silent.add(0)
        request = render(self.root, b"/readyz")
        for d in request._finishedDeferreds:
            d.errback(Failure(ConnectionError("gone")))
        request._finishedDeferreds = []
        self.client.pending[0].callback(WorkerReply(0, 200, b"ready\n"))
        self.assertEqual(request.written, [])
        self.assertFalse(request.finished)

    def test_readyz(self) -> None:
        """
        When every worker is ready, /readyz is 200; when one is not, or is
        not running, or the supervisor is shutting down, 503 with reasons
        naming the worker.
        """
        request = render(self.root, b"/readyz")
        self.assertEqual((request.responseCode, body(request)), (200, b"ready\n"))
        self.workers[0].pools["app"].members[0].drain()
        self._kill(1)
        request = render(self.root, b"/readyz")
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(
            body(request),
            b"not ready: worker 0: pool app has no available member;"
            b" worker 1: not running (being started again)\n",
        )

    def test_readyzStopping(self) -> None:
        """
        When the supervisor is shutting down, /readyz says so.
        """
        self.supervisor._stopping = True
        self.assertEqual(mergeReadiness([WorkerReply(0, 200, b"ready\n")], True), (False, ["shutting down"]))
        request = render(self.root, b"/readyz")
        self.assertEqual(request.responseCode, 503)
        self.assertTrue(body(request).startswith(b"not ready: shutting down"))

    def test_healthz(self) -> None:
        """
        /healthz answers while the supervisor runs, asking no worker.
        """
        self.assertEqual(body(render(self.root, b"/healthz")), b"ok\n")
        self.assertEqual(self.client.asked, [])

    def test_drainForwarded(self) -> None:
        """
        When a member is drained through the supervisor, every worker
        drains it and each one's answer is reported.
        """
        request = render(self.root, b"/members/app/127.0.0.1:9/drain", b"POST")
        self.assertEqual(request.responseCode, 200)
        answer = json.loads(body(request))
        self.assertTrue(answer["draining"])
        self.assertEqual([(w["worker"], w["code"], w["answer"]["draining"]) for w in answer["workers"]],
                         [(0, 200, True), (1, 200, True)])
        self.assertEqual([w.pools["app"].members[0].draining for w in self.workers], [True, True])
        self.assertEqual({a[3] for a in self.client.asked}, {b"/members/app/127.0.0.1:9/drain"})
        render(self.root, b"/members/app/127.0.0.1:9/enable", b"POST")
        self.assertEqual([w.pools["app"].members[0].draining for w in self.workers], [False, False])

    def _restart(self, index: int, config: str = STATUS_CONFIG) -> ProxyService:
        """
        Kill worker C{index} (unless it is down already) and let the
        supervisor start it again: a new worker service (returned) whose
        socket does not answer yet (the client refuses it until the test
        says otherwise).
        """
        if self.supervisor.workers[index].pid is not None:
            self._kill(index)
        self.client.refusing.add(index)
        self.workers[index] = self._worker(index, config)
        pid = self.supervisor.workers[index].pid
        self.reactor.advance(self.supervisor._delay)
        self.assertNotEqual(self.supervisor.workers[index].pid, pid)
        self.assertIsNotNone(self.supervisor.workers[index].pid)
        return self.workers[index]

    def _replays(self, index: int) -> list[bytes]:
        """
        The paths POSTed to worker C{index} so far.
        """
        return [a[3] for a in self.client.asked if a[0] == index and a[2] == b"POST"]

    def test_drainReplayedToRestartedWorker(self) -> None:
        """
        When a worker is started again after a member was drained through
        the supervisor, the supervisor drains it there too, retrying with a
        growing delay until the new process's socket answers; it logs the
        replay, and /status lists the drain under C{supervisor}.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        render(self.root, b"/members/app/127.0.0.1:9/drain", b"POST")
        self.client.asked.clear()
        worker = self._restart(1)
        self.assertFalse(worker.pools["app"].members[0].draining)
        self.assertEqual(self._replays(1), [])
        # Not answering yet: tried after 0.1s, then 0.2s, then 0.4s later.
        for delay in (0.1, 0.2, 0.4):
            self.reactor.advance(delay)
        self.assertEqual(self._replays(1), [b"/members/app/127.0.0.1:9/drain"] * 3)
        self.assertFalse(worker.pools["app"].members[0].draining)
        self.client.refusing.clear()
        self.reactor.advance(0.7)
        self.assertEqual(self._replays(1), [b"/members/app/127.0.0.1:9/drain"] * 3)
        self.reactor.advance(0.1)
        self.assertEqual(self._replays(1), [b"/members/app/127.0.0.1:9/drain"] * 4)
        self.assertTrue(worker.pools["app"].members[0].draining)
        # Done: nothing more is sent, and worker 0 was not asked.
        self.reactor.advance(10)
        self.assertEqual(self._replays(1), [b"/members/app/127.0.0.1:9/drain"] * 4)
        self.assertEqual(self._replays(0), [])
        [event] = [e for e in observer if "replayed" in e["log_format"]]
        self.assertEqual(
            (event["log_format"], event["worker"], event["pool"], event["member"]),
            ("Worker {worker}: replayed the drain of pool {pool} member {member}", 1, "app", "127.0.0.1:9"),
        )
        status = json.loads(body(render(self.root, b"/status")))
        self.assertEqual(status["supervisor"]["drained_members"], [{"pool": "app", "member": "127.0.0.1:9"}])
        self.assertTrue(status["workers"][1]["status"]["pools"][0]["members"][0]["draining"])

    def test_drainsOnRestartedWorkersCommandLine(self) -> None:
        """
        When a worker is started again, the drains the supervisor remembers
        at that moment are on its command line (C{drained}), so that it
        drains them before it accepts; a drain enabled since is not.
        """
        self.assertEqual([argv[3] for _, _, argv, _ in self.reactor.spawned], ["[]", "[]"])
        render(self.root, b"/members/app/127.0.0.1:9/drain", b"POST")
        self._restart(1)
        self.assertEqual(self.reactor.spawned[-1][2][:2], ["worker", "1"])
        self.assertEqual(json.loads(self.reactor.spawned[-1][2][3]), [["app", "127.0.0.1:9"]])
        render(self.root, b"/members/app/127.0.0.1:9/enable", b"POST")
        self._restart(0)
        self.assertEqual(self.reactor.spawned[-1][2][:2], ["worker", "0"])
        self.assertEqual(self.reactor.spawned[-1][2][3], "[]")

    def test_drainWhileWorkerDownReplayed(self) -> None:
        """
        When a member is drained while a worker is down (502: the others
        applied it), the worker gets the drain once it is started again.
        """
        self._kill(1)
        self.assertEqual(render(self.root, b"/members/app/127.0.0.1:9/drain", b"POST").responseCode, 502)
        worker = self._restart(1)
        self.client.refusing.clear()
        self.reactor.advance(0.1)
        self.assertTrue(worker.pools["app"].members[0].draining)

    def test_drainMissedByRunningWorkerReplayed(self) -> None:
        """
        When a running worker does not answer a drain the others applied
        (still starting, or busy past the timeout), the supervisor replays
        it to that worker once it answers, without a restart.
        """
        self.client.refusing.add(1)
        self.assertEqual(render(self.root, b"/members/app/127.0.0.1:9/drain", b"POST").responseCode, 502)
        self.assertFalse(self.workers[1].pools["app"].members[0].draining)
        self.reactor.advance(0.1)
        self.assertFalse(self.workers[1].pools["app"].members[0].draining)
        self.client.refusing.clear()
        self.reactor.advance(0.2)
        self.assertTrue(self.workers[1].pools["app"].members[0].draining)
        self.assertTrue(self.workers[0].pools["app"].members[0].draining)
        # Done: nothing more is sent.
        sent = len(self._replays(1))
        self.reactor.advance(10)
        self.assertEqual(len(self._replays(1)), sent)

    def test_enableCancelsReplay(self) -> None:
        """
        When a drained member is enabled again before the restarted
        worker's socket answers, the drain is not replayed to it, and the
        enable is (the drain was on its command line, the forwarded enable
        did not reach it); an enable before the restart means no replay at
        all.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        render(self.root, b"/members/app/127.0.0.1:9/drain", b"POST")
        worker = self._restart(1)
        # The drain on its command line, applied at its start.
        worker.pools["app"].members[0].drain()
        self.reactor.advance(0.1)
        self.assertEqual(len(self._replays(1)), 2)  # The drain, and the refused replay.
        render(self.root, b"/members/app/127.0.0.1:9/enable", b"POST")
        self.assertTrue(worker.pools["app"].members[0].draining)
        self.client.refusing.clear()
        self.reactor.advance(10)
        self.assertEqual(self._replays(1)[2:], [b"/members/app/127.0.0.1:9/enable"] * 2)
        self.assertFalse(worker.pools["app"].members[0].draining)
        [event] = [e for e in observer if "replayed the enable" in e["log_format"]]
        self.assertEqual((event["worker"], event["pool"], event["member"]), (1, "app", "127.0.0.1:9"))
        self.assertEqual(self.fanIn.memory.drained(), [])

        render(self.root, b"/members/app/127.0.0.1:9/drain", b"POST")
        render(self.root, b"/members/app/127.0.0.1:9/enable", b"POST")
        self.client.asked.clear()
        self._restart(0)
        self.client.refusing.clear()
        self.reactor.advance(10)
        self.assertEqual(self.client.asked, [])

    def test_replayRefusedForgotten(self) -> None:
        """
        When the restarted worker refuses the replayed drain (404: its
        configuration no longer has the member), a warning names the
        worker, pool, member and reason, and the drain is forgotten.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        render(self.root, b"/members/app/127.0.0.1:9/drain", b"POST")
        self._restart(1, STATUS_CONFIG.replace("port = 9", "port = 10"))
        self.client.refusing.clear()
        self.reactor.advance(0.1)
        [event] = [e for e in observer if "refused the replayed drain" in e["log_format"]]
        self.assertEqual(
            (event["log_level"].name, event["worker"], event["pool"], event["member"], event["code"], event["error"]),
            ("warn", 1, "app", "127.0.0.1:9", 404, "pool 'app' has no member '127.0.0.1:9'"),
        )
        self.assertEqual(self.fanIn.memory.drained(), [])
        self.reactor.advance(10)
        self.assertEqual(len(self._replays(1)), 2)

    def test_replayBounded(self) -> None:
        """
        When the restarted worker's socket never answers, the replay is
        tried at most once a second and given up (with a warning) after
        C{replayTimeout} seconds; the drain is still remembered for the
        next start. When the worker dies again meanwhile, its replay stops.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        render(self.root, b"/members/app/127.0.0.1:9/drain", b"POST")
        self._restart(1)
        self.reactor.pump([0.1] * 700)
        tries = len(self._replays(1)) - 1
        self.assertLessEqual(tries, 4 + self.fanIn.replayTimeout)
        self.assertGreater(tries, self.fanIn.replayTimeout / 2)
        [event] = [e for e in observer if "gave up" in e["log_format"]]
        self.assertEqual((event["worker"], event["pool"], event["member"]), (1, "app", "127.0.0.1:9"))
        self.assertEqual(self.fanIn.memory.drained(), [("app", "127.0.0.1:9")])

        self.client.asked.clear()
        self._restart(1)
        self.reactor.advance(0.1)
        self.assertEqual(len(self._replays(1)), 1)
        self._kill(1)
        self.reactor.advance(self.supervisor._delay - 0.5)
        self.assertEqual(len(self._replays(1)), 1)

    def test_drainUnknownMember(self) -> None:
        """
        When every worker answers 404 (no such member), so does the
        supervisor, with the worker's reason.
        """
        request = render(self.root, b"/members/app/127.0.0.1:10/drain", b"POST")
        self.assertEqual(request.responseCode, 404)
        self.assertEqual(json.loads(body(request))["error"], "pool 'app' has no member '127.0.0.1:10'")

    def test_drainWithWorkerDown(self) -> None:
        """
        When a worker is down, a drain is applied by the others and
        answered 502 naming the worker that did not apply it.
        """
        self._kill(0)
        request = render(self.root, b"/members/app/127.0.0.1:9/drain", b"POST")
        self.assertEqual(request.responseCode, 502)
        answer = json.loads(body(request))
        self.assertEqual(answer["error"], "not every worker applied it: worker 0: not running (being started again)")
        self.assertEqual(answer["workers"][1]["code"], 200)
        self.assertTrue(self.workers[1].pools["app"].members[0].draining)

    def test_controlRefused(self) -> None:
        """
        When member control is not allowed on the public endpoint, or the
        request carries an C{Origin}, or the path is not an action, no
        worker is asked.
        """
        request = render(self.root, b"/members/app/127.0.0.1:9/drain", b"POST", {b"origin": b"https://evil"})
        self.assertEqual(request.responseCode, 403)
        self.assertEqual(render(self.root, b"/members/app/127.0.0.1:9/explode", b"POST").responseCode, 404)
        self.assertEqual(render(self.root, b"/members/app/127.0.0.1:9/drain").responseCode, 405)
        self.controlAllowed = False
        self.assertEqual(render(self.root, b"/members/app/127.0.0.1:9/drain", b"POST").responseCode, 403)
        self.assertEqual(self.client.asked, [])
        self.assertFalse(self.workers[0].pools["app"].members[0].draining)

    def test_privateSocketFailure(self) -> None:
        """
        When a worker's private status socket cannot listen, the worker
        keeps running (its supervisor reports it as not answering).
        """
        from mtlsproxy.config import StatusConfig
        from mtlsproxy.status import StatusService
        from twisted.internet.testing import MemoryReactorClock

        class Reactor(MemoryReactorClock):
            running = True

            def listenUNIX(self, *args: Any, **kwargs: Any) -> Any:
                from twisted.internet.error import CannotListenError

                raise CannotListenError(None, args[0], OSError("path too long"))

            def stop(self) -> None:
                raise AssertionError("a worker stopped for its status socket")

        service = StatusService(Reactor(), None, None, StatusConfig(), endpoint=privateEndpoint("/x/w.sock"))
        service.startService()
        self.assertIsNone(service.port)
        self.assertEqual(len(self.flushLoggedErrors()), 1)

    def test_mergeControlMixed(self) -> None:
        """
        When workers give different codes, the answer is 502 naming those
        that did not answer 200.
        """
        code, answer = mergeControl(
            [WorkerReply(0, 200, b'{"draining": true}'), WorkerReply(1, 404, b'{"error": "x"}')]
        )
        self.assertEqual(code, 502)
        self.assertEqual(answer["error"], "not every worker applied it: worker 1: answered HTTP 404")


class _Never(Protocol):
    """
    Accepts and never answers.
    """


class WorkerStatusClientTests(TestCase):
    """
    L{WorkerStatusClient} over real UNIX sockets in a private directory.
    """

    timeout = 20

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="mtlsproxy-fanin-")
        self.addCleanup(lambda: __import__("shutil").rmtree(self.directory, ignore_errors=True))
        self.client = WorkerStatusClient(globalReactor, timeout=0.5)

    def _listen(self, name: str, factory: Any) -> str:
        from twisted.internet.endpoints import serverFromString

        path = os.path.join(self.directory, name)
        d = serverFromString(globalReactor, privateEndpoint(path)).listen(factory)

        def listening(port: Any) -> None:
            self.addCleanup(port.stopListening)

        d.addCallback(listening)
        return path

    def test_fetch(self) -> None:
        """
        When the worker answers, the reply has its code and body, and the
        socket is its owner's only.
        """
        root = Resource()

        class Page(Resource):
            isLeaf = True

            def render_POST(self, request: Any) -> bytes:
                request.setResponseCode(202)
                return b"posted " + request.path

        root.putChild(b"page", Page())
        path = self._listen("w:0.sock", Site(root))
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)

        def check(reply: WorkerReply) -> None:
            self.assertEqual(reply, WorkerReply(3, 202, b"posted /page"))

        return self.client.fetch(3, path, b"POST", b"/page").addCallback(check)

    def test_noSocket(self) -> None:
        """
        When nothing listens on the socket, the reply says so, naming it.
        """
        path = os.path.join(self.directory, "missing.sock")

        def check(reply: WorkerReply) -> None:
            self.assertIsNone(reply.code)
            assert reply.error is not None
            self.assertTrue(reply.error.startswith(f"not answering on {path}: cannot connect"), reply.error)

        return self.client.fetch(0, path, b"GET", b"/status").addCallback(check)

    def test_noAnswer(self) -> None:
        """
        When the worker accepts but does not answer, the reply says so after
        the timeout, not later.
        """
        protocols: list[Protocol] = []

        class Keep(Factory):
            def buildProtocol(self, addr: Any) -> Protocol:
                protocol = _Never()
                protocols.append(protocol)
                return protocol

        path = self._listen("slow.sock", Keep())
        started = globalReactor.seconds()

        def check(reply: WorkerReply) -> None:
            self.assertEqual(reply.error, f"not answering on {path}: no answer within 0.5s")
            self.assertLess(globalReactor.seconds() - started, 5)

        return self.client.fetch(1, path, b"GET", b"/status").addCallback(check)
