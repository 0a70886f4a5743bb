# -*- test-case-name: tests.test_integration_plugins -*-
"""
Integration tests for the plugin points, through the real C{twistd -n
mtlsproxy}: health checks taking a dead backend out and putting it back, and
a third-party selector used by name from the configuration.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from .harness import EchoBackend, ProxyProcess, waitFor

EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "examples", "mtlsproxy-example-plugins",
)


def _config(backends: list[EchoBackend], poolExtra: str = "", selector: str = "round_robin") -> str:
    members = "".join(
        f'[[pools.members]]\naddress = "127.0.0.1"\nport = {b.port}\n' for b in backends
    )
    return (
        '[[listeners]]\nname = "plain"\nendpoint = "tcp:0:interface=127.0.0.1"\n'
        'protocol = "tcp"\npool = "app"\n\n'
        f'[[pools]]\nname = "app"\nselector = "{selector}"\nconnect_timeout = 1.0\n'
        f"{poolExtra}\n{members}"
    )


def _exchange(port: int, payload: bytes = b"x") -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode()


class HealthCheckIntegrationTests(SynchronousTestCase):
    """
    A pool with C{[pools.health_check] type = "tcp"} in the real proxy.
    """

    interval = 0.3
    threshold = 2

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.backends = [EchoBackend("backend-1"), EchoBackend("backend-2")]
        for b in self.backends:
            self.addCleanup(lambda b=b: b.stop())
        health = (
            "[pools.health_check]\n"
            f'type = "tcp"\ninterval = {self.interval}\ntimeout = 0.25\njitter = 0.1\n'
            f"healthy_threshold = {self.threshold}\nunhealthy_threshold = {self.threshold}\n"
        )
        self.proxy = ProxyProcess(self.dir, _config(self.backends, health))
        self.addCleanup(self.proxy.stop)
        self.proxy.start()
        self.port = self.proxy.ports["plain"]

    def test_deadBackendTakenOutAndPutBack(self) -> None:
        """
        When a backend dies, health checks mark it unhealthy within about
        interval x threshold and no client connection is sent to it; when it
        comes back on the same port it is marked healthy again and gets
        connections.
        """
        dead = self.backends[0]
        deadPort = dead.port
        member = f"127.0.0.1:{deadPort}"
        dead.stop()
        # Bound, not listening, until the member comes back: connections
        # to it are refused, and no other process takes the port meanwhile.
        reserved = socket.socket()
        self.addCleanup(reserved.close)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reserved.bind(("127.0.0.1", deadPort))
        started = time.monotonic()
        unhealthy = self.proxy.waitForLog(
            rf"member {re.escape(member)} is now unhealthy", timeout=10
        )
        self.assertIsNotNone(unhealthy, self.proxy.log())
        elapsed = time.monotonic() - started
        # interval x threshold plus one interval of jitter/first-check slack
        # and one timeout, with room for a loaded machine.
        self.assertLess(elapsed, self.interval * (self.threshold + 1) + 0.25 + 2.0)
        logBefore = self.proxy.log()
        names = [_exchange(self.port).split()[-2] for _ in range(6)]
        self.assertEqual(set(names), {"backend-2"})
        # The proxy never tried the dead member for a client: no connect
        # failure was logged for it after it was marked unhealthy.
        newLog = self.proxy.log()[len(logBefore):]
        self.assertNotIn(member, "\n".join(
            line for line in newLog.splitlines() if "health" not in line.lower()
            and "access" not in line
        ))

        revived = EchoBackend("backend-1b", port=deadPort)
        self.addCleanup(revived.stop)
        healthy = self.proxy.waitForLog(rf"member {re.escape(member)} is now healthy", timeout=10)
        self.assertIsNotNone(healthy, self.proxy.log())
        names = {_exchange(self.port).split()[-2] for _ in range(4)}
        self.assertEqual(names, {"backend-1b", "backend-2"})


class ThirdPartySelectorTests(SynchronousTestCase):
    """
    The example distribution under C{examples/}, installed with pip into a
    directory of its own, used by name from a configuration.
    """

    def test_exampleSelectorUsedByName(self) -> None:
        """
        When the example distribution is installed and the configuration says
        C{selector = "first_available"}, C{twistd mtlsproxy} sends every
        connection to the first member (active/standby), and to the second
        when the first is down.
        """
        work = os.path.abspath(self.mktemp())
        source = os.path.join(work, "source")
        target = os.path.join(work, "site")
        shutil.copytree(
            EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "dropin.cache", "__pycache__")
        )
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
             "--no-index", "--disable-pip-version-check", "-q", "--target", target, source],
            check=True, capture_output=True, timeout=180, env=env, cwd=work,
        )
        backends = [EchoBackend("active"), EchoBackend("standby")]
        for b in backends:
            self.addCleanup(lambda b=b: b.stop())
        proxy = ProxyProcess(work, _config(backends, selector="first_available"))
        self.addCleanup(proxy.stop)
        env["PYTHONPATH"] = target
        proxy.start(env=env)
        port = proxy.ports["plain"]
        self.assertEqual({_exchange(port).split()[-2] for _ in range(4)}, {"active"})
        backends[0].stop()
        self.assertEqual({_exchange(port).split()[-2] for _ in range(3)}, {"standby"})

    def test_unknownSelectorListsAvailable(self) -> None:
        """
        When the configuration names a selector nobody installed, twistd
        exits with one line that lists the available names.
        """
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        proxy = ProxyProcess(work, _config([], selector="first_available").replace(
            '[[pools]]', '[[pools]]\n', 1) + '[[pools.members]]\naddress = "127.0.0.1"\nport = 1\n')
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        with self.assertRaises(RuntimeError) as caught:
            proxy.start(env=env, timeout=30)
        message = str(caught.exception)
        self.assertIn("pools[0].selector: unknown selector 'first_available'; available:", message)
        self.assertIn("least_connections", message)
        self.assertNotIn("Traceback", message)
