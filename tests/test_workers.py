# -*- test-case-name: tests.test_workers -*-
"""
Tests for L{mtlsproxy.workers}: the C{workers} setting, the supervisor's
life cycle (in memory) and, with real processes, a proxy with two workers.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtlsproxy.config import loadConfig
from mtlsproxy.errors import ConfigurationError
from mtlsproxy.workers import (
    InheritedListener,
    WorkerSupervisor,
    decodeInherited,
    encodeInherited,
    workerArguments,
    workerCount,
)

from . import harness


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

    def test_defaultIsOne(self) -> None:
        """
        When C{workers} is not set, one process serves everything.
        """
        config = self._config("1")
        self.assertEqual(workerCount(config.workers), 1)

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
        foreground without a pid file, logs to its own file beside the
        supervisor's (C{LOGFILE.worker-N}: twistd's LogFile cannot be shared), and
        names its index, its supervisor and its sockets.
        """
        twistd = {"logfile": "/var/log/p.log", "logger": object(), "syslog": False}
        plugin = {"config": "/etc/p.toml", "log-format": "json"}
        argv = workerArguments(twistd, plugin, 1, {"l": InheritedListener(5, "INET")}, 42)
        self.assertIn("-n", argv)
        self.assertIn("--pidfile=", argv)
        self.assertEqual(argv[argv.index("--logfile") + 1], "/var/log/p.log.worker-1")
        self.assertNotIn("--logger", argv)
        tail = argv[argv.index("mtlsproxy"):]
        self.assertEqual(
            tail,
            ["mtlsproxy", "--config", "/etc/p.toml", "--log-format", "json", "--worker", "1",
             "--supervisor", "42", "--inherit", '{"l": [5, "INET"]}'],
        )


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

    def signalProcess(self, sig: int) -> None:
        self.signals.append(sig)


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

        self.supervisor = WorkerSupervisor(
            self.reactor,
            [("a", "tcp:1"), ("b", "tcp:2")],
            2,
            lambda index, inherited, pid: ["worker", str(index), encodeInherited(inherited)],
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
        self.proxy = harness.ProxyProcess(
            self.directory, "workers = 2\n" + harness.tlsConfig(self.pki.directory, [self.backend])
        )
        self.addCleanup(self.proxy.stop)

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

    def test_twoWorkersServeAndStop(self) -> None:
        """
        When C{workers = 2}, two worker processes accept on the listener:
        a valid client is relayed and a revoked one refused; SIGHUP reaches
        both (each reloads); SIGTERM stops both and the supervisor.
        """
        self.proxy.start()
        self.assertTrue(harness.waitFor(lambda: self.proxy.log().count(") listening on ") >= 2, timeout=30))
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

    def test_workersExitWithSupervisor(self) -> None:
        """
        When the supervisor is killed outright, its workers exit too.
        """
        self.proxy.start()
        self.assertTrue(harness.waitFor(lambda: self.proxy.log().count(") listening on ") >= 2, timeout=30))
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
        self.assertTrue(gone())
