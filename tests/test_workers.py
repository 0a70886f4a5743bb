# -*- test-case-name: tests.test_workers -*-
"""
Tests for L{mtlsproxy.workers}: the C{workers} setting, the supervisor's
life cycle (in memory) and, with real processes, a proxy with two workers.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from typing import Any, Optional

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtlsproxy.config import loadConfig
from mtlsproxy.errors import ConfigurationError
from mtlsproxy.workers import (
    MAX_LOG_LINE,
    InheritedListener,
    LineJoiner,
    WorkerSupervisor,
    decodeDrained,
    decodeInherited,
    encodeDrained,
    encodeInherited,
    workerArguments,
    workerCount,
)

from . import harness
from .test_integration_ops import OPS, http, metric, statusPort


class SettingTests(SynchronousTestCase):
    """
    The C{workers} key and how many processes it means.
    """

    def _config(self, value: str) -> Any:
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "mtlsproxy.toml")
        with open(path, "w") as f:
            f.write(
                f"workers = {value}\n"
                '[[listeners]]\nname = "l"\nendpoint = "tcp:0"\nprotocol = "tcp"\npool = "p"\n'
                '[[pools]]\nname = "p"\n[[pools.members]]\naddress = "127.0.0.1"\nport = 1\n'
            )
        return loadConfig(path)

    def test_one(self) -> None:
        """
        When C{workers = 1}, one process serves everything.
        """
        config = self._config("1")
        self.assertEqual(workerCount(config.workers), 1)

    def test_defaultIsOnePerCore(self) -> None:
        """
        When C{workers} is not set, it is C{"auto"}: one process per core,
        and on a one-core machine the twistd process alone.
        """
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "mtlsproxy.toml")
        with open(path, "w") as f:
            f.write(
                '[[listeners]]\nname = "l"\nendpoint = "tcp:0"\nprotocol = "tcp"\npool = "p"\n'
                '[[pools]]\nname = "p"\n[[pools.members]]\naddress = "127.0.0.1"\nport = 1\n'
            )
        config = loadConfig(path)
        self.assertEqual(config.workers, "auto")
        self.assertEqual(workerCount(config.workers, cpuCount=4), 4)
        self.assertEqual(workerCount(config.workers, cpuCount=1), 1)

    def test_number(self) -> None:
        """
        When C{workers} is a number, that many processes run.
        """
        self.assertEqual(workerCount(self._config("3").workers), 3)

    def test_auto(self) -> None:
        """
        When C{workers = "auto"}, one process per core runs.
        """
        self.assertEqual(workerCount(self._config('"auto"').workers, cpuCount=6), 6)

    def test_invalid(self) -> None:
        """
        When C{workers} is 0 or not a number, the error names the key and
        what is expected.
        """
        for value in ("0", '"many"', "true"):
            with self.assertRaises(ConfigurationError) as raised:
                self._config(value)
            self.assertIn("workers", str(raised.exception))
            self.assertIn('an integer from 1 to 256 or "auto"', str(raised.exception))


class InheritTests(SynchronousTestCase):
    """
    The C{--inherit} option that tells a worker its listening sockets.
    """

    def test_roundTrip(self) -> None:
        """
        When the supervisor encodes its sockets, the worker decodes the same.
        """
        listeners = {"a b": InheritedListener(7, "INET"), "v6": InheritedListener(9, "INET6")}
        self.assertEqual(decodeInherited(encodeInherited(listeners)), listeners)

    def test_invalid(self) -> None:
        """
        When the value is not what the supervisor writes, L{ValueError}.
        """
        for text in ("", "[]", '{"a": [1]}', '{"a": ["x", "INET"]}', '{"a": [3, "IPX"]}'):
            self.assertRaises(ValueError, decodeInherited, text)

    def test_arguments(self) -> None:
        """
        When a worker's command line is made, it runs twistd in the
        foreground without a pid file and without a log file (it logs to
        its standard output, which the supervisor shares or copies into its
        own file), and names its index, its supervisor, its sockets and its
        health channel to the supervisor.
        """
        twistd = {"logfile": "/var/log/p.log", "logger": object(), "syslog": False}
        plugin = {"config": "/etc/p.toml", "log-format": "json"}
        argv = workerArguments(twistd, plugin, 1, {"l": InheritedListener(5, "INET")}, 42)
        self.assertIn("-n", argv)
        self.assertIn("--pidfile=", argv)
        self.assertNotIn("--logfile", argv)
        self.assertNotIn("--logger", argv)
        tail = argv[argv.index("mtlsproxy"):]
        self.assertEqual(
            tail,
            ["mtlsproxy", "--config", "/etc/p.toml", "--log-format", "json", "--worker", "1",
             "--supervisor", "42", "--inherit", '{"l": [5, "INET"]}', "--health-channel", "3"],
        )

    def test_jsonLoggerReachesWorkers(self) -> None:
        """
        When the supervisor logs JSON through twistd's C{--logger
        mtlsproxy.logs.jsonLogger}, its workers are told C{--log-format
        json} (they log through mtlsproxy's own logger); an explicit
        C{--log-format} wins.
        """
        twistd = {"logger": "mtlsproxy.logs.jsonLogger", "syslog": False}
        argv = workerArguments(twistd, {"config": "/etc/p.toml"}, 0, {}, 42)
        self.assertNotIn("--logger", argv)
        self.assertEqual(argv[argv.index("--log-format") + 1], "json")
        argv = workerArguments(twistd, {"config": "/etc/p.toml", "log-format": "text"}, 0, {}, 42)
        self.assertEqual(argv[argv.index("--log-format") + 1], "text")


class DrainedTests(SynchronousTestCase):
    """
    The C{--drained} option that passes the supervisor's remembered member
    drains to a worker it starts, and the worker applying them before it
    accepts.
    """

    def test_roundTrip(self) -> None:
        """
        When the supervisor encodes its drains, the worker decodes the same,
        in order.
        """
        drained = [("app", "127.0.0.1:9"), ("a/b \u00e9", "[::1]:443")]
        self.assertEqual(decodeDrained(encodeDrained(drained)), drained)
        self.assertEqual(decodeDrained(encodeDrained([])), [])

    def test_invalid(self) -> None:
        """
        When the value is not what the supervisor writes, L{ValueError}.
        """
        for text in ("", "{}", "[1]", '[["a"]]', '[["a", 9]]', '[["a", "b", "c"]]', '"ab"'):
            self.assertRaises(ValueError, decodeDrained, text)

    def test_arguments(self) -> None:
        """
        When the supervisor remembers drains, the worker's command line
        passes them with C{--drained}; when it remembers none, there is no
        C{--drained}.
        """
        plugin = {"config": "/etc/p.toml"}
        argv = workerArguments(None, plugin, 1, {}, 42, drained=[("app", "127.0.0.1:9")])
        self.assertEqual(argv[argv.index("--drained") + 1], '[["app", "127.0.0.1:9"]]')
        self.assertNotIn("--drained", workerArguments(None, plugin, 1, {}, 42))
        self.assertNotIn("--drained", workerArguments(None, plugin, 1, {}, 42, drained=[]))

    def test_optionParses(self) -> None:
        """
        When a worker's command line has C{--drained}, the plugin's options
        read it back as (pool, member) pairs; without it, L{None}; an
        invalid value, or C{--drained} without C{--worker}, is a usage
        error naming the option.
        """
        from twisted.python import usage

        from mtlsproxy.tap import Options

        plugin = {"config": "/etc/p.toml"}
        argv = workerArguments(None, plugin, 1, {}, 42, drained=[("app", "127.0.0.1:9"), ("b", "h:1")])
        options = Options()
        options.parseOptions(argv[argv.index("mtlsproxy") + 1:])
        self.assertEqual(options["drained"], [("app", "127.0.0.1:9"), ("b", "h:1")])
        argv = workerArguments(None, plugin, 1, {}, 42)
        options = Options()
        options.parseOptions(argv[argv.index("mtlsproxy") + 1:])
        self.assertIsNone(options["drained"])
        for extra in (["--worker", "1", "--supervisor", "42", "--inherit", "{}", "--drained", "[1]"],
                      ["--drained", "[]"]):
            with self.assertRaises(usage.UsageError) as raised:
                Options().parseOptions(["--config", "x", *extra])
            self.assertIn("--drained", str(raised.exception))

    def test_makeServicePassesDrains(self) -> None:
        """
        When a worker is started with C{--drained}, its L{ProxyService} gets
        those drains.
        """
        from mtlsproxy import workers
        from mtlsproxy.service import ProxyService
        from mtlsproxy.tap import Options, makeService

        from .test_drain import CONFIG

        self.patch(workers, "exitWithParent", lambda: True)
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "p.toml")
        with open(path, "w") as f:
            f.write(CONFIG)
        options = Options()
        options.parseOptions(["--config", path, "--worker", "1", "--supervisor", "42", "--inherit", "{}",
                              "--drained", '[["app", "127.0.0.1:9"]]'])
        service = makeService(options, _Reactor())
        assert isinstance(service, ProxyService)
        self.assertEqual(service.inheritedDrains, [("app", "127.0.0.1:9")])

    def test_drainedBeforeListening(self) -> None:
        """
        When a L{ProxyService} is built with drained members, they are
        draining by the time its listeners start (and stay so), and no
        warning is logged.
        """
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import LogLevel, globalLogPublisher

        from mtlsproxy.service import ProxyService

        from .test_drain import CONFIG, makeProxy

        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        proxy, reactor = makeProxy(self, CONFIG)
        worker = ProxyService(reactor, proxy.loaded, workerIndex=1, workerCount=2,
                              drained=[("app", "127.0.0.1:9")])
        [member] = worker.pools["app"].members
        self.assertFalse(member.draining)
        listener = worker.listeners["plain"]
        seen: list[bool] = []
        start = listener.startService

        def recordingStart() -> None:
            seen.append(member.draining)
            start()

        listener.startService = recordingStart  # type: ignore[method-assign]
        worker.startService()
        self.addCleanup(worker.stopService)
        self.assertEqual(seen, [True])
        self.assertTrue(listener.port is not None)
        self.assertTrue(member.draining)
        self.assertEqual([e for e in observer if e["log_level"] >= LogLevel.warn], [])

    def test_unknownDrainWarned(self) -> None:
        """
        When a drained member's pool or member is not in the worker's
        configuration, one warning each names it, and the rest is applied.
        """
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import LogLevel, globalLogPublisher

        from mtlsproxy.service import ProxyService

        from .test_drain import CONFIG, makeProxy

        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        proxy, reactor = makeProxy(self, CONFIG)
        worker = ProxyService(
            reactor, proxy.loaded, workerIndex=1, workerCount=2,
            drained=[("gone", "127.0.0.1:9"), ("app", "127.0.0.1:10"), ("app", "127.0.0.1:9")],
        )
        worker.startService()
        self.addCleanup(worker.stopService)
        self.assertTrue(worker.pools["app"].members[0].draining)
        warnings = [e for e in observer if e["log_level"] >= LogLevel.warn]
        self.assertEqual(
            [(e["pool"], e["member"], e["reason"]) for e in warnings],
            [("gone", "127.0.0.1:9", "no such pool"), ("app", "127.0.0.1:10", "no such member")],
        )


class WorkerLogOptionsTests(SynchronousTestCase):
    """
    A worker's logging options: never a log file of its own (it logs to its
    standard output), the supervisor's syslog or --logger otherwise.
    """

    def _argv(self, twistd: dict[str, Any], logging: Any = None) -> list[str]:
        class Plugin(dict):  # type: ignore[type-arg]
            pass

        plugin = Plugin(config="/etc/p.toml")
        if logging is not None:
            plugin.loggingConfig = logging  # type: ignore[attr-defined]
        argv = workerArguments(twistd, plugin, 1, {}, 42)
        return argv[: argv.index("mtlsproxy")]

    def test_noLogFile(self) -> None:
        """
        When the supervisor logs to a file (a daemon's twistd.log, [logging]
        file, --logfile) or to standard output, a worker gets no --logfile.
        """
        from mtlsproxy.config import LoggingConfig

        logging = LoggingConfig(file="/var/log/p.log")
        for twistd, config in (
            ({"nodaemon": False}, None),
            ({"nodaemon": True}, logging),
            ({"nodaemon": False, "logfile": "/x/t.log"}, logging),
            ({"nodaemon": True}, None),
            ({"nodaemon": True, "logfile": "-"}, None),
        ):
            self.assertNotIn("--logfile", self._argv(twistd, config), twistd)

    def test_syslogAndLogger(self) -> None:
        """
        When the supervisor logs to syslog, or through a --logger of its
        own, a worker does the same.
        """
        argv = self._argv({"nodaemon": False, "syslog": True, "prefix": "p"})
        self.assertEqual(argv[argv.index("--syslog"):], ["--syslog", "--prefix", "p"])
        argv = self._argv({"nodaemon": True, "logger": "example.logger"})
        self.assertEqual(argv[argv.index("--logger") + 1], "example.logger")


class LineJoinerTests(SynchronousTestCase):
    """
    L{LineJoiner}: a worker's output as whole, bounded lines.
    """

    def setUp(self) -> None:
        self.delivered: list[bytes] = []
        self.joiner = LineJoiner(self.delivered.append, maxLine=16)

    def test_partialLinesJoined(self) -> None:
        """
        When a line arrives in pieces, it is delivered once, whole, when its
        newline arrives; whole lines read together are delivered together.
        """
        self.joiner.feed(b"one ")
        self.joiner.feed(b"li")
        self.assertEqual(self.delivered, [])
        self.joiner.feed(b"ne\ntwo\nthr")
        self.assertEqual(self.delivered, [b"one line\ntwo\n"])
        self.joiner.feed(b"ee\n")
        self.assertEqual(self.delivered, [b"one line\ntwo\n", b"three\n"])

    def test_overlongLineInPieces(self) -> None:
        """
        When a line is longer than C{maxLine}, it is delivered in pieces of
        C{maxLine} bytes, each ended by a newline, and no more than
        C{maxLine} bytes wait for a newline.
        """
        self.joiner.feed(b"x" * 40)
        self.assertEqual(self.delivered, [b"x" * 16 + b"\n"] * 2)
        self.assertEqual(len(self.joiner._partial), 8)
        self.joiner.feed(b"y\n")
        self.assertEqual(self.delivered[-1], b"x" * 8 + b"y\n")

    def test_flushWritesLastPartialLine(self) -> None:
        """
        When the stream ends, its unfinished line is delivered with a
        newline, once; nothing is delivered when it ended on a newline.
        """
        self.joiner.feed(b"done\nlast wor")
        self.joiner.flush()
        self.joiner.flush()
        self.assertEqual(self.delivered, [b"done\n", b"last wor\n"])

    @given(st.lists(st.binary(max_size=40)))
    def test_outputPreserved(self, chunks: list[bytes]) -> None:
        """
        When output arrives in any pieces, no more than C{maxLine} bytes
        ever wait, every delivery is whole lines, and, once flushed, the
        deliveries are the output with newlines added only at its end and
        within lines longer than C{maxLine}.
        """
        delivered: list[bytes] = []
        joiner = LineJoiner(delivered.append, maxLine=16)
        for chunk in chunks:
            joiner.feed(chunk)
            self.assertLessEqual(len(joiner._partial), 16)
        joiner.flush()
        output = b"".join(chunks)
        joined = b"".join(delivered)
        self.assertTrue(all(piece.endswith(b"\n") for piece in delivered))
        self.assertEqual(joined.replace(b"\n", b""), output.replace(b"\n", b""))
        original = output.split(b"\n")
        if output.endswith(b"\n") or not output:
            original.pop()
        pieces = joined.split(b"\n")[:-1]
        # Each original line is one or more delivered lines, in order.
        index = 0
        for line in original:
            rebuilt = pieces[index]
            index += 1
            while rebuilt != line:
                self.assertEqual(len(rebuilt) % 16, 0)
                rebuilt += pieces[index]
                index += 1
        self.assertEqual(index, len(pieces))


class WorkerOptionsTests(SynchronousTestCase):
    """
    The worker's status socket on its command line and in its service; the
    C{--workers} option.
    """

    def test_workersOption(self) -> None:
        """
        When C{--workers} is given, it is a number from 1 to 256 or
        C{"auto"}; anything else is a usage error naming the option.
        """
        from twisted.python import usage

        from mtlsproxy.tap import Options

        for text, expected in (("1", 1), ("16", 16), ("auto", "auto")):
            options = Options()
            options.parseOptions(["--config", "x", "--workers", text])
            self.assertEqual(options["workers"], expected)
        for text in ("0", "257", "many", "-1"):
            with self.assertRaises(usage.UsageError) as raised:
                Options().parseOptions(["--config", "x", "--workers", text])
            self.assertIn("--workers", str(raised.exception))

    def test_workersOptionOverridesConfig(self) -> None:
        """
        When C{--workers 1} is given, a configuration asking for two runs in
        one process; C{--workers 2} starts a supervisor for a configuration
        that asks for one, and its workers are told how many there are.
        """
        from mtlsproxy.service import ProxyService
        from mtlsproxy.tap import Options, makeService

        from .test_drain import CONFIG

        directory = self.mktemp()
        os.makedirs(directory)
        for inFile, option, expected in (("2", "1", ProxyService), ("1", "2", WorkerSupervisor)):
            path = os.path.join(directory, f"p{inFile}.toml")
            with open(path, "w") as f:
                f.write(f"workers = {inFile}\n" + CONFIG)
            options = Options()
            options.parseOptions(["--config", path, "--workers", option])
            service = makeService(options, _Reactor())
            self.assertIsInstance(service, expected)
        argv = service._arguments(1, {}, 42, None)  # type: ignore[attr-defined]
        self.assertEqual(argv[argv.index("--workers") + 1], "2")

    def test_workerTakesItsShareOfMaxConnections(self) -> None:
        """
        When a worker is one of N, each listener's C{max_connections} is
        shared: the worker admits at most its share, rounded up, so the
        listener's limit holds for all the workers together.
        """
        from mtlsproxy.service import ProxyService

        from .test_drain import CONFIG, makeProxy

        proxy, reactor = makeProxy(self, CONFIG)
        [listener] = proxy.loaded.config.listeners
        limit = listener.max_connections
        for count, share in ((1, limit), (2, -(-limit // 2)), (3, -(-limit // 3))):
            worker = ProxyService(reactor, proxy.loaded, workerIndex=0, workerCount=count)
            self.assertEqual(worker._gateFor(listener).maxConnections, share)
        self.assertEqual(ProxyService(reactor, proxy.loaded)._gateFor(listener).maxConnections, limit)

    def test_statusSocketArgument(self) -> None:
        """
        When a worker has a status socket, its command line names it, and
        the plugin's options read it back.
        """
        from mtlsproxy.tap import Options

        plugin = {"config": "/etc/p.toml"}
        argv = workerArguments(None, plugin, 0, {}, 42, "/run/d/worker-0.sock")
        tail = argv[argv.index("mtlsproxy") + 1:]
        self.assertEqual(tail[-2:], ["--status-socket", "/run/d/worker-0.sock"])
        options = Options()
        options.parseOptions(tail)
        self.assertEqual(options["status-socket"], "/run/d/worker-0.sock")
        self.assertEqual(options["worker"], 0)
        self.assertNotIn("--status-socket", workerArguments(None, plugin, 0, {}, 42))

    def test_supervisorServesStatus(self) -> None:
        """
        When C{workers = 2} and C{[status]} is configured, the twistd
        process's service is the supervisor, with the fan-in status site on
        the configured endpoint as its child, and it gives its workers
        status sockets.
        """
        from mtlsproxy.fanin import FanInResource
        from mtlsproxy.tap import Options, makeService

        from .test_drain import CONFIG

        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "p.toml")
        with open(path, "w") as f:
            f.write("workers = 2\n" + CONFIG + '\n[status]\nendpoint = "tcp:0:interface=127.0.0.1"\n')
        options = Options()
        options.parseOptions(["--config", path])
        service = makeService(options, _Reactor())
        self.assertIsInstance(service, WorkerSupervisor)
        [status] = list(service)
        self.assertEqual(status.config.endpoint, "tcp:0:interface=127.0.0.1")
        self.assertIsInstance(status.resource, FanInResource)
        self.assertTrue(service._statusSockets)

    def test_workersDoNotServePublicStatus(self) -> None:
        """
        When C{[status]} is configured, a worker (worker 0 included) serves
        it on its private socket only, and without a socket not at all;
        worker 0 alone keeps the admin console.
        """
        from .test_drain import CONFIG, makeProxy

        text = CONFIG + '\n[status]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
        proxy, reactor = makeProxy(self, text)
        from mtlsproxy.service import ProxyService

        worker0 = ProxyService(reactor, proxy.loaded, workerIndex=0, statusSocket="/d/worker-0.sock")
        worker0.startService()
        self.addCleanup(worker0.stopService)
        assert worker0.statusService is not None
        self.assertTrue(worker0.statusService.private)
        self.assertEqual([server[0] for server in reactor.unixServers], ["/d/worker-0.sock"])
        self.assertEqual([s for s in reactor.tcpServers if s[1] is worker0.statusService.factory], [])
        worker1 = ProxyService(reactor, proxy.loaded, workerIndex=1)
        self.assertIsNone(worker1.statusService)
        single = ProxyService(reactor, proxy.loaded)
        assert single.statusService is not None
        self.assertFalse(single.statusService.private)


class _FakePort:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.reading = True
        self.closed = False

    def stopReading(self) -> None:
        self.reading = False

    def fileno(self) -> int:
        return self.fd

    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", 1000 + self.fd)

    def stopListening(self) -> Any:
        self.closed = True
        return succeed(None)


class _FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []
        self.written: list[tuple[int, bytes]] = []

    def signalProcess(self, sig: int) -> None:
        self.signals.append(sig)

    def writeToChild(self, childFD: int, data: bytes) -> None:
        self.written.append((childFD, data))


class _Reactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, _FakeProcess, list[str], dict[int, Any]]] = []

    def spawnProcess(self, protocol: Any, executable: Any, args: Any = (), env: Any = None,
                     path: Any = None, uid: Any = None, gid: Any = None, usePTY: Any = False,
                     childFDs: Any = None) -> _FakeProcess:
        process = _FakeProcess(1000 + len(self.spawned))
        self.spawned.append((protocol, process, list(args), dict(childFDs)))
        return process


class SupervisorTests(SynchronousTestCase):
    """
    L{WorkerSupervisor} with a fake reactor: sockets, spawning, restarts,
    signals and shutdown.
    """

    def setUp(self) -> None:
        self.reactor = _Reactor()
        self.ports: list[_FakePort] = []

        def listen(description: str, factory: Any) -> Any:
            port = _FakePort(10 + len(self.ports))
            self.ports.append(port)
            return succeed(port)

        self.extras: list[dict[str, Any]] = []

        def arguments(index: int, inherited: Any, pid: int, statusSocket: Any, **extra: Any) -> list[str]:
            self.extras.append(extra)
            return ["worker", str(index), encodeInherited(inherited)]

        self.supervisor = WorkerSupervisor(
            self.reactor,
            [("a", "tcp:1"), ("b", "tcp:2")],
            2,
            arguments,
            drainTimeout=3.0,
            installSignalHandlers=False,
            listen=listen,
        )
        self.supervisor.startService()

    def test_startsWorkersWithSockets(self) -> None:
        """
        When started, the supervisor opens every listener without accepting
        and starts each worker with every socket passed down.
        """
        self.assertEqual([p.reading for p in self.ports], [False, False])
        self.assertEqual(len(self.reactor.spawned), 2)
        for index, (protocol, process, argv, childFDs) in enumerate(self.reactor.spawned):
            self.assertEqual(argv[:2], ["worker", str(index)])
            self.assertEqual(childFDs[10], 10)
            self.assertEqual(childFDs[11], 11)
            # No log file given: the workers share the supervisor's
            # standard output and error.
            self.assertEqual({fd: childFDs[fd] for fd in (0, 1, 2, 3)}, {0: "w", 1: 1, 2: 2, 3: "r"})
            self.assertEqual(self.supervisor.workers[index].pid, process.pid)

    def test_restartsDeadWorker(self) -> None:
        """
        When a worker dies, it is started again after a delay that grows
        while workers keep dying quickly.
        """
        protocol, process, _, _ = self.reactor.spawned[0]
        protocol.processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertIsNone(self.supervisor.workers[0].pid)
        self.reactor.advance(1.9)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(0.2)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertEqual(self.supervisor.workers[0].starts, 2)
        protocol, _, _, _ = self.reactor.spawned[2]
        protocol.processEnded(Failure(ProcessTerminated(signal=9)))
        self.reactor.advance(3.9)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.reactor.advance(0.2)
        self.assertEqual(len(self.reactor.spawned), 4)

    def test_passesDrainedMembers(self) -> None:
        """
        When the supervisor has C{drainedMembers}, a worker started again is
        given what it returns at that moment (C{drained=}); when it returns
        none, or there is no C{drainedMembers}, no C{drained} is given.
        """
        self.assertEqual(self.extras, [{}, {}])
        drained: list[tuple[str, str]] = []
        self.supervisor.drainedMembers = lambda: drained
        for index, expected in ((0, {}), (1, {"drained": [("app", "127.0.0.1:9")]})):
            if index:
                drained.append(("app", "127.0.0.1:9"))
            protocol = [p for p, _, _, _ in self.reactor.spawned if p.index == index][-1]
            protocol.processEnded(Failure(ProcessTerminated(signal=9)))
            self.reactor.advance(self.supervisor._delay)
            self.assertEqual(self.extras[-1], expected)
        self.assertEqual(len(self.extras), 4)

    def test_forwardsSignals(self) -> None:
        """
        When the supervisor is asked to signal its workers (SIGHUP), every
        running worker gets the signal.
        """
        self.supervisor.signalWorkers(signal.SIGHUP)
        self.assertEqual([p.signals for _, p, _, _ in self.reactor.spawned], [[signal.SIGHUP]] * 2)

    def test_stopWaitsForWorkers(self) -> None:
        """
        When stopped, the supervisor sends SIGTERM to every worker, does not
        start them again, and finishes once all have exited, closing the
        sockets.
        """
        stopped = self.supervisor.stopService()
        results: list[object] = []
        stopped.addCallback(results.append)
        self.assertEqual([p.signals for _, p, _, _ in self.reactor.spawned], [[signal.SIGTERM]] * 2)
        self.reactor.spawned[0][0].processEnded(Failure(ProcessDone(0)))
        self.assertEqual(results, [])
        self.reactor.spawned[1][0].processEnded(Failure(ProcessDone(0)))
        self.assertEqual(len(results), 1)
        self.assertEqual([p.closed for p in self.ports], [True, True])
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_stopKillsStragglers(self) -> None:
        """
        When a worker is still running C{drain_timeout} plus a grace period
        after SIGTERM, it is killed.
        """
        self.supervisor.stopService()
        self.reactor.advance(3.0 + WorkerSupervisor.killGrace + 0.1)
        for _, process, _, _ in self.reactor.spawned:
            self.assertEqual(process.signals, [signal.SIGTERM, signal.SIGKILL])


class _LogFile:
    """
    Stands for the supervisor's log file: records each write.
    """

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.flushes = 0
        self.fail = False

    def write(self, data: bytes) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        self.writes.append(data)

    def flush(self) -> None:
        self.flushes += 1

    def text(self) -> bytes:
        return b"".join(self.writes)


class SupervisorLogTests(SynchronousTestCase):
    """
    L{WorkerSupervisor} with C{logFile}: the workers' output copied, in
    whole lines, into the supervisor's log file.
    """

    def setUp(self) -> None:
        self.reactor = _Reactor()
        self.logFile: Optional[Any] = _LogFile()

        def listen(description: str, factory: Any) -> Any:
            return succeed(_FakePort(10))

        self.supervisor = WorkerSupervisor(
            self.reactor,
            [("a", "tcp:1")],
            2,
            lambda index, inherited, pid, statusSocket, **extra: ["worker", str(index)],
            drainTimeout=3.0,
            installSignalHandlers=False,
            listen=listen,
            logFile=lambda: self.logFile,
        )
        self.supervisor.startService()
        self.workers = [protocol for protocol, _, _, _ in self.reactor.spawned]

    def test_outputPiped(self) -> None:
        """
        When the supervisor logs to a file, each worker's standard output
        and error are pipes it reads; its standard input, health channel
        and sockets are as without a file.
        """
        for _, _, _, childFDs in self.reactor.spawned:
            self.assertEqual(childFDs, {0: "w", 1: "r", 2: "r", 3: "r", 10: 10})

    def test_noFileSharesStandardOutput(self) -> None:
        """
        When C{logFile} returns None (the supervisor logs to standard output
        or syslog), a worker started shares its standard output and error.
        """
        self.logFile = None
        self.workers[0].processEnded(Failure(ProcessTerminated(signal=9)))
        self.reactor.advance(self.supervisor._delay)
        self.assertEqual(self.reactor.spawned[-1][3], {0: "w", 1: 1, 2: 2, 3: "r", 10: 10})

    def test_wholeLinesOnly(self) -> None:
        """
        When two workers' lines arrive in pieces, between the supervisor's
        own lines, each is written whole, once complete: lines interleave
        at line ends only.
        """
        assert isinstance(self.logFile, _LogFile)
        first, second = self.workers
        first.childDataReceived(1, b"2024 [a#info] [worker 0] one, ")
        second.childDataReceived(1, b"2024 [a#info] [worker 1] two\n2024 [a#info] [worker 1] thr")
        self.logFile.write(b"2024 [supervisor#info] own line\n")
        first.childDataReceived(1, b"in pieces\n")
        second.childDataReceived(1, b"ee\n")
        self.assertEqual(
            self.logFile.text().splitlines(),
            [
                b"2024 [a#info] [worker 1] two",
                b"2024 [supervisor#info] own line",
                b"2024 [a#info] [worker 0] one, in pieces",
                b"2024 [a#info] [worker 1] three",
            ],
        )
        self.assertTrue(all(write.endswith(b"\n") for write in self.logFile.writes))
        self.assertEqual(self.logFile.flushes, 3)

    def test_overlongLineBounded(self) -> None:
        """
        When a worker writes a line longer than L{MAX_LOG_LINE} in pieces,
        it is written in pieces of that length, each ended by a newline,
        without waiting for its end.
        """
        assert isinstance(self.logFile, _LogFile)
        chunk = b"x" * 8192
        for _ in range(20):
            self.workers[0].childDataReceived(1, chunk)
        self.assertEqual(self.logFile.writes, [b"x" * MAX_LOG_LINE + b"\n"] * 2)
        self.workers[0].childDataReceived(1, b"end\n")
        self.assertEqual(self.logFile.writes[-1], b"x" * (20 * 8192 - 2 * MAX_LOG_LINE) + b"end\n")

    def test_lastPartialLineOnExit(self) -> None:
        """
        When a worker exits after writing an unfinished line, that line is
        written, with a newline, before the supervisor learns of the exit.
        """
        assert isinstance(self.logFile, _LogFile)
        logFile = self.logFile
        seen: list[bytes] = []
        ended = self.supervisor._workerEnded
        self.patch(self.supervisor, "_workerEnded", lambda *a: (seen.append(logFile.text()), ended(*a)))
        self.workers[1].childDataReceived(1, b"whole\nlast words")
        self.workers[1].childConnectionLost(1)
        self.assertEqual(logFile.text(), b"whole\nlast words\n")
        self.workers[1].childDataReceived(2, b"Traceback (most")
        self.workers[1].processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertEqual(seen, [b"whole\nlast words\n"])

    def test_standardErrorLogged(self) -> None:
        """
        When a worker writes on its standard error (outside its logging),
        the supervisor logs each line as its own event, naming the worker.
        """
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.workers[1].childDataReceived(2, b"Traceback (most recent call last):\n  File")
        self.workers[1].childDataReceived(2, b' "x.py"\n')
        logged = [e for e in events if e["log_format"] == "Worker {worker} standard error: {line}"]
        self.assertEqual(
            [(e["worker"], e["line"]) for e in logged],
            [(1, "Traceback (most recent call last):"), (1, '  File "x.py"')],
        )
        assert isinstance(self.logFile, _LogFile)
        self.assertEqual(self.logFile.writes, [])

    def test_writeFailureDropsLines(self) -> None:
        """
        When the log file cannot be written (a full disk), the worker's
        lines are dropped and later ones written once it can.
        """
        assert isinstance(self.logFile, _LogFile)
        self.logFile.fail = True
        self.workers[0].childDataReceived(1, b"lost\n")
        self.logFile.fail = False
        self.workers[0].childDataReceived(1, b"kept\n")
        self.assertEqual(self.logFile.text(), b"kept\n")

    def test_rotatedWithSupervisorLog(self) -> None:
        """
        When the log file is twistd's LogFile and it is rotated, workers'
        lines after the rotation go to the new file.
        """
        from twisted.python.logfile import LogFile

        path = os.path.abspath(self.mktemp())
        self.logFile = LogFile.fromFullPath(path)
        self.addCleanup(self.logFile.close)
        self.workers[0].processEnded(Failure(ProcessTerminated(signal=9)))
        self.reactor.advance(self.supervisor._delay)
        worker = self.reactor.spawned[-1][0]
        worker.childDataReceived(1, b"before\nacr")
        self.logFile.rotate()
        worker.childDataReceived(1, b"oss\nafter\n")
        with open(path + ".1", "rb") as f:
            self.assertEqual(f.read(), b"before\n")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"across\nafter\n")


class StatusSocketTests(SynchronousTestCase):
    """
    L{WorkerSupervisor} with C{statusSockets}: the private directory of the
    workers' status sockets.
    """

    def setUp(self) -> None:
        self.reactor = _Reactor()
        self.sockets: list[Any] = []

        def arguments(index: int, inherited: Any, pid: int, statusSocket: Any) -> list[str]:
            self.sockets.append(statusSocket)
            return ["worker", str(index)]

        self.supervisor = WorkerSupervisor(
            self.reactor,
            [("a", "tcp:1")],
            2,
            arguments,
            drainTimeout=3.0,
            installSignalHandlers=False,
            listen=lambda description, factory: succeed(_FakePort(10)),
            statusSockets=True,
        )
        from twisted.application.service import Service

        self.child = Service()
        self.child.setServiceParent(self.supervisor)
        self.supervisor.startService()

    def test_privateDirectory(self) -> None:
        """
        When started, the supervisor makes a directory only its user may
        enter and gives each worker its own socket path there.
        """
        directory = self.supervisor.statusDirectory
        assert directory is not None
        self.assertEqual(os.stat(directory).st_mode & 0o777, 0o700)
        self.assertEqual(
            self.sockets, [os.path.join(directory, "worker-0.sock"), os.path.join(directory, "worker-1.sock")]
        )
        self.assertTrue(self.child.running)
        self.supervisor.stopService()
        for protocol, _, _, _ in self.reactor.spawned:
            protocol.processEnded(Failure(ProcessDone(0)))

    def test_deadWorkersSocketRemoved(self) -> None:
        """
        When a worker dies, what is left of its socket is removed before it
        is started again with the same path.
        """
        path = self.sockets[1]
        with open(path, "w"):
            pass
        self.reactor.spawned[1][0].processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertFalse(os.path.exists(path))
        self.reactor.advance(2.1)
        self.assertEqual(self.sockets[2], path)
        self.supervisor.stopService()
        for protocol, _, _, _ in self.reactor.spawned[::2]:
            protocol.processEnded(Failure(ProcessDone(0)))

    def test_stopRemovesDirectoryAfterWorkers(self) -> None:
        """
        When stopped, the children (the status endpoint) keep running until
        every worker has exited, then stop, and the directory is removed.
        """
        directory = self.supervisor.statusDirectory
        assert directory is not None
        stopped = self.supervisor.stopService()
        self.reactor.spawned[0][0].processEnded(Failure(ProcessDone(0)))
        self.assertTrue(self.child.running)
        self.assertTrue(os.path.isdir(directory))
        self.assertTrue(self.supervisor.stopping)
        self.reactor.spawned[1][0].processEnded(Failure(ProcessDone(0)))
        self.successResultOf(stopped)
        self.assertFalse(self.child.running)
        self.assertFalse(os.path.exists(directory))
        self.assertIsNone(self.supervisor.statusSocket(0))


class WorkersIntegrationTests(TestCase):
    """
    A real C{twistd -n mtlsproxy} with C{workers = 2}.
    """

    timeout = 90

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="mtlsproxy-workers-")
        self.pki = harness.DemoPKI(os.path.join(self.directory, "pki"))
        self.backend = harness.EchoBackend("b")
        self.addCleanup(self.backend.stop)
        # With [status]: the supervisor serves it, asking each worker over
        # its private socket.
        self.proxy = harness.ProxyProcess(
            self.directory,
            "workers = 2\n" + OPS + harness.tlsConfig(self.pki.directory, [self.backend]),
        )
        # Cleanups run last first: this one after the proxy has stopped.
        self.addCleanup(self._removeStatusDirectories)
        self.addCleanup(self.proxy.stop)

    def _removeStatusDirectories(self) -> None:
        """
        Remove the directories of the workers' status sockets that a
        supervisor killed outright (SIGKILL) could not remove itself.
        """
        import re
        import shutil

        for path in set(re.findall(r"Private status socket for the supervisor at (\S+)", self.proxy.log())):
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)

    def _waitForWorkers(self) -> None:
        """
        Wait until both workers listen (their own log lines: the
        supervisor's status endpoint logs "listening on" too).
        """
        self.assertTrue(
            harness.waitFor(lambda: self.proxy.log().count("Listener mtls (tls) listening on") >= 2, timeout=30),
            self.proxy.log()[-3000:],
        )

    def _workerPids(self) -> set[int]:
        assert self.proxy.process is not None
        pids = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == self.proxy.process.pid:
                            pids.add(int(entry))
                except OSError:
                    pass
        return pids

    def _servedByBoth(self, port: int, workersOf: Any) -> list[str]:
        """
        Make connections until the log shows access lines of both workers
        (C{workersOf()}: the worker of every access line so far); at most
        80.
        """
        ctx = harness.clientContext(self.pki, "client")
        made = 0
        while made < 80 and set(workersOf()) != {0, 1}:
            for _ in range(3):
                self.assertEqual(harness.tlsExchange(port, ctx, b"hello", expectLength=5)[:5], b"hello")
                made += 1
            harness.waitFor(lambda: len(workersOf()) >= made, 5)
        seen = workersOf()
        self.assertEqual(set(seen), {0, 1}, seen)
        return seen

    def test_workersLogIntoSupervisorFile(self) -> None:
        """
        When the supervisor logs to a file (-n --logfile FILE), the workers'
        lines are in FILE, whole, each marked with its worker: the access
        lines of connections served by both workers, and no FILE.worker-*
        file exists.  SIGUSR1 to the supervisor rotates FILE (to FILE.1),
        and the workers' later lines go to the new FILE.
        """
        import glob
        import re

        path = self.proxy.logfile
        lineFormat = re.compile(r"^\S+ \[[^\]]+\] ")
        access = re.compile(r"^\S+ \[mtlsproxy\.access#info\] \[worker (\d)\] mtls 127\.0\.0\.1:\d+ -> ", re.M)

        def read(name: str) -> str:
            try:
                with open(name) as f:
                    return f.read()
            except FileNotFoundError:
                return ""

        self.proxy.start()
        self._waitForWorkers()
        port = self.proxy.ports["mtls"]
        served = self._servedByBoth(port, lambda: [int(w) for w in access.findall(read(path))])
        text = read(path)
        self.assertEqual(glob.glob(path + ".worker-*"), [])
        self.assertIn("Worker 1 started", text)
        self.assertEqual(text.count("Listener mtls (tls) listening on"), 2)
        # Every line is a whole log line (or a traceback's tab-indented
        # continuation): nothing spliced mid-line.
        for line in text.splitlines():
            self.assertTrue(lineFormat.match(line) or line.startswith("\t"), line)

        assert self.proxy.process is not None
        self.proxy.process.send_signal(signal.SIGUSR1)
        self.assertTrue(harness.waitFor(lambda: os.path.exists(path + ".1"), 10))
        rotated = read(path + ".1")
        self.assertEqual(len(access.findall(rotated)), len(served))
        self._servedByBoth(port, lambda: [int(w) for w in access.findall(read(path))])
        self.assertNotIn("Worker 1 started", read(path))

    def test_daemonWorkersLogToSupervisorFile(self) -> None:
        """
        When twistd runs as a daemon (no -n, no --logfile) with JSON logs,
        the workers' lines reach its twistd.log (not the daemon's
        /dev/null, nor twistd.log.worker-I): every line is one JSON object,
        a worker's with its C{worker} field, and both workers' access
        events are there.
        """
        import glob
        import subprocess

        run = os.path.join(self.directory, "run")
        os.makedirs(run)
        pidfile = os.path.join(run, "twistd.pid")
        subprocess.run(
            [os.path.join(harness.BIN, "twistd"), "--pidfile", pidfile, "mtlsproxy", "--config",
             self.proxy.config, "--log-level", "info", "--log-format", "json"],
            cwd=run, check=True, timeout=60,
        )

        def stop() -> None:
            try:
                with open(pidfile) as f:
                    os.kill(int(f.read()), signal.SIGTERM)
            except (OSError, ValueError):
                return
            harness.waitFor(lambda: not os.path.exists(pidfile), 20)

        self.addCleanup(stop)

        def events() -> list[dict[str, Any]]:
            try:
                with open(os.path.join(run, "twistd.log")) as f:
                    text = f.read()
            except FileNotFoundError:
                return []
            # Only whole lines: the last may be being written.
            return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]

        def listening() -> list[dict[str, Any]]:
            return [e for e in events() if e.get("log_format") == "Listener {listener} ({protocol}) listening on {address}"]

        self.assertTrue(harness.waitFor(lambda: len(listening()) >= 2, 30), events()[-20:])
        import re

        self.assertEqual(sorted(e["worker"] for e in listening()), [0, 1])
        port = int(re.findall(r"listening on [\d.]+:(\d+)", listening()[0]["message"])[0])
        self._servedByBoth(
            port, lambda: [e["worker"] for e in events() if e.get("log_category") == "access"]
        )
        everything = events()
        started = [e for e in everything if e.get("log_format") == "Worker {index} started, pid {pid}"]
        # The supervisor's own events, in the same file, have no worker field.
        self.assertEqual(sorted(e["index"] for e in started), [0, 1])
        self.assertTrue(all("worker" not in e for e in started))
        self.assertEqual(glob.glob(os.path.join(run, "twistd.log.worker-*")), [])

    def test_twoWorkersServeAndStop(self) -> None:
        """
        When C{workers = 2}, two worker processes accept on the listener:
        a valid client is relayed and a revoked one refused; SIGHUP reaches
        both (each reloads); SIGTERM stops both and the supervisor.
        """
        self.proxy.start()
        self._waitForWorkers()
        port = self.proxy.ports["mtls"]
        self.assertEqual(len(self._workerPids()), 2)
        ctx = harness.clientContext(self.pki, "client")
        for _ in range(6):
            reply = harness.tlsExchange(port, ctx, b"hello", expectLength=5)
            self.assertEqual(reply[:5], b"hello")
        from OpenSSL import SSL

        with self.assertRaises((SSL.Error, OSError, TimeoutError)):
            reply = harness.tlsExchange(port, harness.clientContext(self.pki, "revoked"), b"x", timeout=5)
            if not reply.startswith(b"x"):
                raise SSL.Error("refused")
        assert self.proxy.process is not None
        self.proxy.process.send_signal(signal.SIGHUP)
        self.assertTrue(
            harness.waitFor(lambda: self.proxy.log().count("(SIGHUP)") >= 2, timeout=20),
            self.proxy.log()[-3000:],
        )
        workers = self._workerPids()
        self.proxy.stop()
        assert self.proxy.process is not None
        self.assertIsNotNone(self.proxy.process.returncode)
        self.assertTrue(harness.waitFor(lambda: not any(os.path.exists(f"/proc/{p}") for p in workers), 10))

    def test_statusAndMetricsCoverEveryWorker(self) -> None:
        """
        When C{workers = 2} with C{[status]}, the supervisor's /metrics has
        each worker's samples (the accepted connections of both sum to the
        connections made), /status lists both workers and sums their
        figures, and /readyz turns 503 naming a killed worker; once the
        supervisor has started it again, a member drained before the kill
        is drained in it too (on its command line: from its very first
        status answer), and /readyz is 200 again once the member is
        enabled.
        """
        self.proxy.start()
        self._waitForWorkers()
        status = statusPort(self.proxy)
        self.assertTrue(harness.waitFor(lambda: http(status, "/readyz")[0] == 200, timeout=30),
                        http(status, "/readyz"))
        port = self.proxy.ports["mtls"]
        ctx = harness.clientContext(self.pki, "client")

        def accepted() -> dict[str, float]:
            code, body = http(status, "/metrics")
            self.assertEqual(code, 200)
            return {
                sample.labels["worker"]: sample.value
                for family in text_string_to_metric_families(body.decode())
                for sample in family.samples
                if sample.name == "mtlsproxy_connections_total"
            }

        made = 0
        while made < 80 and not (made >= 6 and min(accepted().values(), default=0) > 0):
            for _ in range(3):
                self.assertEqual(harness.tlsExchange(port, ctx, b"hello", expectLength=5)[:5], b"hello")
                made += 1
        counts = accepted()
        self.assertEqual(set(counts), {"0", "1"})
        self.assertTrue(all(count > 0 for count in counts.values()), counts)
        self.assertEqual(sum(counts.values()), made)
        code, body = http(status, "/metrics")
        self.assertEqual(metric(body.decode(), "mtlsproxy_worker_up", worker="0"), 1.0)
        self.assertEqual(metric(body.decode(), "mtlsproxy_worker_up", worker="1"), 1.0)
        self.assertEqual(body.decode().count("# TYPE mtlsproxy_connections_total counter"), 1)

        code, body = http(status, "/status")
        self.assertEqual(code, 200)
        report = json.loads(body)
        self.assertTrue(report["ready"], report["problems"])
        pids = {entry["worker"]: entry["pid"] for entry in report["workers"]}
        self.assertEqual(set(pids.values()), self._workerPids())
        self.assertEqual(report["pools"][0]["members"][0]["total_connections"], made)
        self.assertEqual(
            [entry["status"]["pools"][0]["members"][0]["total_connections"] for entry in report["workers"]],
            [counts["0"], counts["1"]],
        )

        # A member drained through the supervisor before the kill is drained
        # again in the new worker 1 (passed on its command line, applied
        # before it accepts; the supervisor replays it too).
        pool, member = report["pools"][0]["name"], report["pools"][0]["members"][0]["member"]
        self.assertEqual(http(status, f"/members/{pool}/{member}/drain", "POST")[0], 200)
        os.kill(pids[1], signal.SIGKILL)
        notReady = harness.waitFor(
            lambda: (lambda r: r[0] == 503 and b"worker 1: not " in r[1] and r)(http(status, "/readyz")), timeout=10
        )
        self.assertTrue(notReady)

        answers: list[tuple[int, bool]] = []
        commandLines: dict[int, list[str]] = {}

        def restartedDrained() -> bool:
            entry = json.loads(http(status, "/status")[1])["workers"][1]
            pid = entry["pid"]
            if pid in (None, pids[1]):
                return False
            if pid not in commandLines:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        commandLines[pid] = f.read().decode().split("\0")
                except OSError:
                    pass
            if "status" not in entry:
                return False
            draining = bool(entry["status"]["pools"][0]["members"][0].get("draining"))
            answers.append((pid, draining))
            return draining

        def worker1() -> str:
            entry = json.loads(http(status, "/status")[1])["workers"][1]
            return json.dumps([entry["pid"], entry.get("error"), entry.get("status", {}).get("pools")])

        self.assertTrue(harness.waitFor(restartedDrained, timeout=40), worker1())
        # Its very first status answer already has the member draining.
        self.assertEqual(answers[0], (answers[-1][0], True), answers)
        argv = commandLines[answers[-1][0]]
        self.assertEqual(json.loads(argv[argv.index("--drained") + 1]), [[pool, member]])
        # Drained before it listened (its own log: the last twistd started).
        restarted = self.proxy.log().rsplit("starting up.", 1)[1]
        drainedAt = restarted.find(f"Pool {pool} member {member} draining")
        self.assertTrue(0 <= drainedAt < restarted.find("Listener mtls (tls) listening on"), restarted)
        # The replay, a backstop, follows (a no-op).
        import re

        self.assertTrue(
            self.proxy.waitForLog(re.escape(f"Worker 1: replayed the drain of pool {pool} member {member}"), 10)
        )
        self.assertEqual(
            json.loads(http(status, "/status")[1])["supervisor"]["drained_members"], [{"pool": pool, "member": member}]
        )
        self.assertEqual(http(status, f"/members/{pool}/{member}/enable", "POST")[0], 200)
        self.assertTrue(harness.waitFor(lambda: http(status, "/readyz") == (200, b"ready\n"), timeout=40),
                        http(status, "/readyz"))
        code, body = http(status, "/metrics")
        self.assertEqual(metric(body.decode(), "mtlsproxy_worker_starts_total", worker="1"), 2.0)
        self.assertEqual(metric(body.decode(), "mtlsproxy_worker_up", worker="1"), 1.0)
        report = json.loads(http(status, "/status")[1])
        self.assertNotEqual(report["workers"][1]["pid"], pids[1])

    def test_workersExitWithSupervisor(self) -> None:
        """
        When the supervisor is killed outright, its workers exit too.
        """
        self.proxy.start()
        self._waitForWorkers()
        workers = self._workerPids()
        self.assertEqual(len(workers), 2)
        assert self.proxy.process is not None
        self.proxy.process.kill()
        self.proxy.process.wait()

        def gone() -> bool:
            for pid in workers:
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                            return False
                except OSError:
                    pass
            return True

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not gone():
            time.sleep(0.1)
        self.assertTrue(gone(), self.proxy.log()[-4000:])
