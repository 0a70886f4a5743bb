#!/usr/bin/env python3
# -*- test-case-name: tests.test_bench -*-
"""
The mtlsproxy benchmark, in one command::

    .venv/bin/python bench/run.py            # ECDSA P-256
    .venv/bin/python bench/run.py --rsa      # RSA-2048 certificates
    .venv/bin/python bench/run.py --quick    # seconds, small counts (a smoke run)

What it does, all on 127.0.0.1 and bounded in time:

 1. generates a PKI with L{mtlsproxy.pki} (root CA, intermediate, server
    certificate, a valid and a revoked client, a client under a revoked
    intermediate; CRLs for both CAs);
 2. starts the backends (L{bench.backend}: echo, sink, source) and every load
    generator (L{bench.loadgen}) on core 1, each proxy on core 0
    (C{taskset}), one proxy process at a time, restarted for every test;
 3. runs the correctness gates for every proxy first (the valid client
    passes, a revoked client, a client under a revoked intermediate and a
    client without a certificate are refused); a proxy that fails them is
    not measured;
 4. measures full and resumed mTLS handshakes per second (and per proxy
    CPU-second, from C{/proc/PID/stat}; for mtlsproxy and the naive
    forwarder, split into the CPU inside OpenSSL's C{do_handshake} and the
    rest, with the probe in C{bench/probe/}), bulk throughput with 1 and 8
    streams in each direction, 1 KiB round-trip latency over 32 connections
    at a fixed rate, and memory per idle mTLS connection; the same tests
    against the backends directly ("direct") show what the load generator and
    backends can do without a proxy; the same against a naive Twisted
    forwarder (L{bench.naive}: Twisted's C{portforward} behind C{listenSSL},
    the same TLS job, no features) show Twisted's own per-connection floor;
 5. measures what OpenSSL alone needs per server handshake (L{bench.tlscost})
    and mtlsproxy with 1 and 2 worker processes on both cores;
 6. prints a table with the ratios to HAProxy and writes everything to
    C{bench/results/<time>.json}.

The handshake split: for the C{handshakes} and C{resumed} tests (and the
worker scaling), mtlsproxy and the naive forwarder run with C{bench/probe} on
C{PYTHONPATH}; its C{sitecustomize} wraps C{OpenSSL.SSL.Connection.do_handshake}
and writes the thread CPU time spent inside it, per process, to a file read
at both ends of the measured window.  The other tests run without it.

HAProxy and stunnel are used when installed
(C{apt-get install haproxy stunnel4}); the table says so when they are not.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Optional

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from OpenSSL import SSL  # noqa: E402

from mtlsproxy import pki  # noqa: E402

sys.path.insert(0, BENCH)
import loadgen  # noqa: E402
from loadgen import connectAndHandshake  # noqa: E402

PYTHON = sys.executable
BIN = os.path.dirname(PYTHON)
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

PROBE = os.path.join(BENCH, "probe")
"""Put on a proxy's C{PYTHONPATH} to time C{do_handshake} (C{bench/probe/sitecustomize.py})."""

PROXY_CORE = "0"
CLIENT_CORE = "1"

TARGETS = {
    "handshakesPerSecond": 900.0,
    "handshakesVsHAProxy": 1.6,
    "handshakesVsOpenSSL": 0.9,
    "bulkVsHAProxy": 1.0,
    "p99ms": 0.7,
    "idleKiB": 40.0,
}
"""Issue 6's targets, per proxy core, measured in the same run as HAProxy."""


# -- small utilities ---------------------------------------------------------------


def log(message: str) -> None:
    """
    Print a progress line, with the time, on standard error.
    """
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def freePorts(count: int) -> list[int]:
    """
    Ports the kernel considers free on 127.0.0.1 right now.
    """
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def waitForPorts(ports: list[int], process: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    """
    Wait until something accepts TCP connections on every port, or fail.
    """
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nothing listens on {port} after {timeout}s")
                time.sleep(0.05)


def pinned(core: Optional[str], argv: list[str]) -> list[str]:
    """
    C{argv} under C{taskset -c core} when pinning is possible.
    """
    if core is None or shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        return argv
    return ["taskset", "-c", core] + argv


def descendants(pid: int) -> list[int]:
    """
    C{pid} and all its descendants (worker processes).
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    result, todo = [], [pid]
    while todo:
        p = todo.pop()
        result.append(p)
        todo.extend(children.get(p, []))
    return result


def cpuOf(pid: int) -> float:
    """
    CPU seconds (user + system) of C{pid} and its descendants.
    """
    total = 0.0
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def memoryKiB(pid: int) -> float:
    """
    Resident memory of C{pid} in KiB (its RSS), or, with worker processes,
    the sum of their proportional set sizes (shared pages counted once).
    """
    pids = descendants(pid)
    key = "Rss:" if len(pids) == 1 else "Pss:"
    total = 0.0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith(key):
                        total += float(line.split()[1])
        except OSError:
            continue
    return total


def readProbe(prefix: str) -> tuple[int, float]:
    """
    The C{do_handshake} calls and the CPU seconds spent inside them so far,
    summed over every process's probe file (C{prefix.<pid>}, written by
    C{bench/probe/sitecustomize.py}).
    """
    directory, base = os.path.split(prefix)
    calls, seconds = 0, 0.0
    try:
        names = [n for n in os.listdir(directory) if n.startswith(base + ".") and n[len(base) + 1:].isdigit()]
    except OSError:
        return 0, 0.0
    for name in names:
        for _ in range(5):
            try:
                with open(os.path.join(directory, name)) as f:
                    fields = f.read().split()
                if len(fields) == 3 and fields[0] == fields[2]:
                    calls += int(fields[0])
                    seconds += float(fields[1])
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.001)  # a torn record: read again
    return calls, seconds


def loadAverage() -> list[float]:
    """
    The 1, 5 and 15 minute load averages.
    """
    return list(os.getloadavg())


def run(argv: list[str], timeout: float = 30.0) -> str:
    """
    The output (standard output and error) of a short command, or why it failed.
    """
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return done.stdout + done.stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"({e})"


# -- PKI ---------------------------------------------------------------------------------


def makePKI(directory: str, keyType: str) -> dict[str, str]:
    """
    The benchmark's certificates, keys and CRLs, written to C{directory}.
    """
    os.makedirs(directory, exist_ok=True)
    root = pki.createRootCA("Bench Root", keyType=keyType)
    inter = pki.createIntermediateCA(root, "Bench Intermediate", keyType=keyType)
    badInter = pki.createIntermediateCA(root, "Bench Revoked Intermediate", keyType=keyType)
    server = pki.issueServerCertificate(
        inter, "localhost", dnsNames=["localhost"], ipAddresses=["127.0.0.1"], keyType=keyType
    )
    client = pki.issueClientCertificate(inter, "bench-client", keyType=keyType)
    revoked = pki.issueClientCertificate(inter, "bench-revoked", keyType=keyType)
    underRevoked = pki.issueClientCertificate(badInter, "bench-under-revoked", keyType=keyType)

    def write(name: str, data: bytes) -> str:
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    paths = {
        "root": write("root.pem", pki.certificatePEM(root.certificate)),
        "ca": write("ca.pem", pki.chainPEM([root.certificate, inter.certificate, badInter.certificate])),
        "crls": write(
            "crls.pem",
            pki.crlPEM(pki.buildCRL(root, [badInter.certificate]))
            + pki.crlPEM(pki.buildCRL(inter, [revoked.certificate]))
            + pki.crlPEM(pki.buildCRL(badInter)),
        ),
        "serverChain": write("server-chain.pem", pki.chainPEM([server.certificate, inter.certificate])),
        "serverKey": write("server.key", pki.keyPEM(server.key)),
    }
    paths["serverAll"] = write(
        "server-all.pem", pki.chainPEM([server.certificate, inter.certificate]) + pki.keyPEM(server.key)
    )
    for name, issued, issuer in (
        ("client", client, inter),
        ("revoked", revoked, inter),
        ("underRevoked", underRevoked, badInter),
    ):
        paths[name + "Chain"] = write(f"{name}-chain.pem", pki.chainPEM([issued.certificate, issuer.certificate]))
        paths[name + "Key"] = write(f"{name}.key", pki.keyPEM(issued.key))
    # What bench/tlscost.py loads (mtlsproxy's own configuration loader).
    write("client.key", pki.keyPEM(client.key))
    write(
        "tlscost.toml",
        mtlsproxyConfig(paths, {"echo": (1, 2)}).encode(),
    )
    return paths


# -- proxies -------------------------------------------------------------------------------

LISTENERS = ("echo", "sink", "source")


def mtlsproxyConfig(paths: dict[str, str], routes: dict[str, tuple[int, int]], workers: Optional[int] = None,
                    sessionTickets: bool = True) -> str:
    """
    An mtlsproxy configuration: one mTLS listener per backend, client
    certificate required, CRLs checked.  C{routes} maps a name to
    (listening port, backend port).  C{session_tickets} is always written:
    C{true} (the product's default, stateless TLS 1.3 tickets) unless
    C{sessionTickets} is false (OpenSSL's stateful session cache,
    C{--stateful-sessions}).
    """
    text = ""
    if workers is not None:
        text += f"workers = {workers}\n\n"
    for name, (port, backend) in routes.items():
        text += f"""
[[listeners]]
name = "{name}"
endpoint = "tcp:{port}:interface=127.0.0.1:backlog=4096"
protocol = "tls"
pool = "{name}"
client_auth = "required"
ca_certificates = ["{paths['ca']}"]
crls = ["{paths['crls']}"]
session_tickets = {"true" if sessionTickets else "false"}

[[listeners.certificates]]
cert = "{paths['serverChain']}"
key = "{paths['serverKey']}"

[[pools]]
name = "{name}"
connect_timeout = 5.0

[[pools.members]]
address = "127.0.0.1"
port = {backend}
"""
    return text


def haproxyConfig(paths: dict[str, str], routes: dict[str, tuple[int, int]], logFile: str) -> str:
    """
    An HAProxy configuration equivalent to L{mtlsproxyConfig}: one thread, mTLS required, CRLs, TCP log.
    """
    text = f"""global
    nbthread 1
    maxconn 8000
    log stdout format raw local0 info
    ssl-default-bind-options ssl-min-ver TLSv1.2
    ssl-default-bind-ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305

defaults
    mode tcp
    log global
    option tcplog
    maxconn 8000
    timeout connect 5s
    timeout client 120s
    timeout server 120s
"""
    for name, (port, backend) in routes.items():
        text += f"""
frontend fe_{name}
    bind 127.0.0.1:{port} ssl crt {paths['serverAll']} ca-file {paths['ca']} crl-file {paths['crls']} verify required
    default_backend be_{name}

backend be_{name}
    server s1 127.0.0.1:{backend}
"""
    return text


def stunnelConfig(paths: dict[str, str], routes: dict[str, tuple[int, int]], logFile: str) -> str:
    """
    A stunnel configuration equivalent to L{mtlsproxyConfig}: mTLS required, CRLs, its default logging.
    """
    text = f"""foreground = yes
pid =
output = {logFile}
debug = 5
"""
    for name, (port, backend) in routes.items():
        text += f"""
[{name}]
accept = 127.0.0.1:{port}
connect = 127.0.0.1:{backend}
cert = {paths['serverChain']}
key = {paths['serverKey']}
CAfile = {paths['ca']}
CRLfile = {paths['crls']}
verifyChain = yes
requireCert = yes
sslVersionMin = TLSv1.2
"""
    return text


class Proxy:
    """
    One proxy under test: how to configure, start and stop it.

    @ivar name: As shown in the table.
    @ivar tls: Whether clients speak TLS to it (not for C{direct}).
    """

    name = ""
    tls = True
    probeable = False
    """Whether it runs on the venv's Python, so C{bench/probe} can time its C{do_handshake}."""

    def __init__(self, work: str, paths: dict[str, str], backendPorts: dict[str, int]) -> None:
        self.work = os.path.join(work, self.name)
        os.makedirs(self.work, exist_ok=True)
        self.paths = paths
        self.backendPorts = backendPorts
        self.process: Optional[subprocess.Popen[Any]] = None
        self.ports: dict[str, int] = {}
        self.core: Optional[str] = PROXY_CORE
        self.environment: Optional[dict[str, str]] = None
        self.pythonPath: list[str] = []
        self.probePath: Optional[str] = None
        """With the probe (C{probeable} only): where its files go (C{probePath.<pid>})."""
        self.starts = 0
        self.profileTo: Optional[str] = None
        self.pySpy = ""
        self.profiler: Optional[subprocess.Popen[Any]] = None

    def missing(self) -> Optional[str]:
        """
        Why this proxy cannot run here, or L{None}.
        """
        return None

    def command(self, routes: dict[str, tuple[int, int]]) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        ports = freePorts(len(LISTENERS))
        routes = {name: (port, self.backendPorts[name]) for name, port in zip(LISTENERS, ports)}
        self.ports = {name: port for name, (port, _) in routes.items()}
        argv = pinned(self.core, self.command(routes))
        self.logFile = open(os.path.join(self.work, "output.log"), "ab")
        self.process = subprocess.Popen(argv, cwd=self.work, stdout=self.logFile, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=self.processEnvironment())
        try:
            waitForPorts(list(self.ports.values()), self.process)
            if self.profileTo is not None:
                self.profiler = subprocess.Popen(
                    [self.pySpy, "record", "--pid", str(self.process.pid), "--rate", "250", "--nonblocking",
                     "--subprocesses", "--format", "raw", "-o", self.profileTo],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                time.sleep(0.5)
        except RuntimeError as e:
            self.stop()
            with open(os.path.join(self.work, "output.log"), errors="replace") as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"{self.name} did not start: {e}\n{tail}") from None
        except BaseException:
            # E.g. py-spy missing: never leave the proxy running behind us.
            self.stop()
            raise

    def processEnvironment(self) -> Optional[dict[str, str]]:
        """
        The proxy's environment: C{self.environment} (or ours) with
        C{self.pythonPath} and, with C{self.probePath} set, the probe's
        directory added in front of C{PYTHONPATH} (the virtualenv's
        site-packages still come after them) and C{MTLSPROXY_BENCH_PROBE}.
        """
        paths = list(self.pythonPath)
        if self.probePath is not None:
            paths.append(PROBE)
        if not paths and "MTLSPROXY_BENCH_PROBE" not in os.environ:
            return self.environment
        env = dict(self.environment if self.environment is not None else os.environ)
        env.pop("MTLSPROXY_BENCH_PROBE", None)
        if self.probePath is not None:
            self.starts += 1
            self.probeFiles = f"{self.probePath}-{self.starts}"
            env["MTLSPROXY_BENCH_PROBE"] = self.probeFiles
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        return env

    def probe(self) -> Optional[tuple[int, float]]:
        """
        The probe's cumulative (C{do_handshake} calls, CPU seconds inside
        them) over this start's processes, or L{None} without the probe.
        """
        if self.probePath is None or self.process is None:
            return None
        return readProbe(self.probeFiles)

    def stop(self) -> None:
        if self.process is not None:
            if self.profiler is not None:
                self.profiler.send_signal(signal.SIGINT)
                try:
                    self.profiler.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.profiler.kill()
                    self.profiler.wait()
                self.profiler = None
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    for pid in reversed(descendants(self.process.pid)):
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
                    self.process.wait()
            self.process = None
            self.logFile.close()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def version(self) -> str:
        return ""


_logNumbers = itertools.count(1)
"""Numbers mtlsproxy's log files, one per start (L{MTLSProxy.command})."""


class MTLSProxy(Proxy):
    """
    mtlsproxy itself, C{twistd -n mtlsproxy}: one process (C{workers = 1},
    written explicitly since the product's default is now one worker per
    core), or C{workers} processes for the scaling test.
    """
    name = "mtlsproxy"

    workers: Optional[int] = None
    """C{workers} in the configuration; L{None} means 1 (omitted for an older C{source} without the setting)."""
    source: Optional[str] = None
    """Another checkout to run mtlsproxy from (C{--mtlsproxy-source})."""
    probeable = True
    sessionTickets = True
    """C{session_tickets} on every listener: C{true} (the product's default), C{false} with C{--stateful-sessions}."""

    def _command(self, routes: dict[str, tuple[int, int]]) -> list[str]:
        config = os.path.join(self.work, "mtlsproxy.toml")
        with open(config, "w") as f:
            f.write(mtlsproxyConfig(self.paths, routes, self.workerSetting(), self.sessionTickets))
        self.pythonPath = [self.source] if self.source else []
        reactor = ["--reactor", self.reactor] if self.reactor else []
        return [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "--logfile", self.logPath, *reactor,
                "mtlsproxy", "--config", config]

    reactor: Optional[str] = None
    """twistd's C{--reactor} (C{--reactor} of the benchmark), or L{None} for its default (epoll)."""

    def workerSetting(self) -> Optional[int]:
        """
        What C{workers} the configuration says: C{self.workers}, else 1,
        except for a C{--mtlsproxy-source} checkout from before the setting
        existed (it would refuse the key; it runs one process anyway).
        """
        if self.workers is not None:
            return self.workers
        if self.source:
            try:
                with open(os.path.join(self.source, "mtlsproxy", "config.py")) as f:
                    if "workers" not in f.read():
                        return None
            except OSError:
                pass
        return 1

    def start(self) -> None:
        super().start()
        # With workers, the supervisor's sockets accept into their backlog
        # before the workers run: wait until every worker listens.  Workers
        # log to LOG.worker-I beside the supervisor's LOG (older versions:
        # to LOG itself); each start has a log of its own, so neither an
        # earlier start's lines nor twistd's rotation (at 1 MB) can mislead.
        expected = len(LISTENERS) * (self.workers or 1)
        directory, base = os.path.split(self.logPath)
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            ready = 0
            for name in os.listdir(directory):
                if name == base or name.startswith(base + ".worker-"):
                    try:
                        with open(os.path.join(directory, name), errors="replace") as f:
                            ready += f.read().count(") listening on ")
                    except OSError:
                        pass
            if ready >= expected:
                return
            time.sleep(0.1)
        raise RuntimeError(f"mtlsproxy: fewer than {expected} listeners ready after 60 s")

    def command(self, routes: dict[str, tuple[int, int]]) -> list[str]:
        self.logPath = os.path.join(self.work, f"mtlsproxy-{next(_logNumbers)}.log")
        return self._command(routes)

    def version(self) -> str:
        import twisted

        return f"mtlsproxy (Twisted {twisted.__version__}, {SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()})"


class HAProxy(Proxy):
    """
    Debian's HAProxy, C{haproxy -db}, one thread.
    """
    name = "haproxy"

    def missing(self) -> Optional[str]:
        if shutil.which("haproxy") is None:
            return "not installed: apt-get install haproxy"
        return None

    def command(self, routes: dict[str, tuple[int, int]]) -> list[str]:
        config = os.path.join(self.work, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(haproxyConfig(self.paths, routes, os.path.join(self.work, "access.log")))
        return ["haproxy", "-db", "-f", config]

    def version(self) -> str:
        text = run(["haproxy", "-vv"])
        lines = [line.strip() for line in text.splitlines()
                 if line.startswith("HAProxy version") or "Running on OpenSSL" in line]
        return "; ".join(lines)


class Stunnel(Proxy):
    """
    Debian's stunnel, in the foreground.
    """
    name = "stunnel"

    def missing(self) -> Optional[str]:
        if self.binary() is None:
            return "not installed: apt-get install stunnel4"
        return None

    def binary(self) -> Optional[str]:
        return shutil.which("stunnel4") or shutil.which("stunnel")

    def command(self, routes: dict[str, tuple[int, int]]) -> list[str]:
        config = os.path.join(self.work, "stunnel.conf")
        with open(config, "w") as f:
            f.write(stunnelConfig(self.paths, routes, os.path.join(self.work, "stunnel.log")))
        binary = self.binary()
        assert binary is not None
        return [binary, config]

    def version(self) -> str:
        binary = self.binary()
        if binary is None:
            return ""
        lines = run([binary, "-version"]).splitlines()
        return "; ".join(line.strip() for line in lines if line.startswith(("stunnel", "Compiled with", "Running  with", "Running with")))


class Naive(Proxy):
    """
    A naive Twisted forwarder (L{bench.naive}): C{portforward.ProxyFactory}
    behind C{reactor.listenSSL}, the same TLS job (client certificate
    required, CA file, CRLs with C{CRL_CHECK_ALL}, TLS 1.2 minimum), no
    access log, none of mtlsproxy's features: Twisted's per-connection
    floor.  A baseline, not a secure proxy: it connects to the backend
    before the handshake has completed.
    """
    name = "naive"
    probeable = True

    def command(self, routes: dict[str, tuple[int, int]]) -> list[str]:
        config = os.path.join(self.work, "naive.json")
        with open(config, "w") as f:
            json.dump({"routes": routes, **{k: self.paths[k] for k in ("serverChain", "serverKey", "ca", "crls")}}, f)
        return [PYTHON, os.path.join(BENCH, "naive.py"), config]

    def version(self) -> str:
        import twisted

        return (f"naive Twisted portforward (Twisted {twisted.__version__},"
                f" {SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()})")


class Direct(Proxy):
    """
    No proxy: the load generator talks plain TCP to the backends.
    """

    name = "direct"
    tls = False

    def start(self) -> None:
        self.ports = dict(self.backendPorts)

    def stop(self) -> None:
        pass


# -- load generator --------------------------------------------------------------------


class LoadGenerators:
    """
    Runs C{count} load generator processes with one job and gathers their
    results.
    """

    def __init__(self, job: dict[str, Any], count: int = 1, core: Optional[str] = CLIENT_CORE) -> None:
        self.processes = []
        for i in range(count):
            self.processes.append(
                subprocess.Popen(
                    pinned(core, [PYTHON, os.path.join(BENCH, "loadgen.py"), json.dumps(job)]),
                    stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True,
                )
            )

    def results(self, timeout: float) -> list[dict[str, Any]]:
        """
        Each load generator's JSON result (waiting at most C{timeout} seconds).
        """
        results = []
        for process in self.processes:
            try:
                out, _ = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                out, _ = process.communicate()
            lines = [line for line in out.splitlines() if line.startswith("{")]
            results.append(json.loads(lines[-1]) if lines else {"failed": f"no result (exit {process.returncode})"})
        return results


class Bench:
    """
    One benchmark run: its settings, backends and results.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: dict[str, Any] = {"proxies": {}, "direct": {}}
        self.work = tempfile.mkdtemp(prefix="mtlsbench-")
        self.backend: Optional[subprocess.Popen[Any]] = None
        self.backendPorts: dict[str, int] = {}

    # -- set-up

    def startBackend(self) -> None:
        """
        Start the backends on the load generator's core and learn their ports.
        """
        self.backend = subprocess.Popen(
            pinned(CLIENT_CORE, [PYTHON, os.path.join(BENCH, "backend.py"), "--lifetime", "3600"]),
            stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True,
        )
        assert self.backend.stdout is not None
        line = self.backend.stdout.readline()
        info = json.loads(line)
        self.backendPid = info.pop("pid")
        self.backendPorts = info

    def stopBackend(self) -> None:
        """
        Stop the backends (closing their standard input ends them).
        """
        if self.backend is not None:
            assert self.backend.stdin is not None
            self.backend.stdin.close()
            try:
                self.backend.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.backend.kill()
                self.backend.wait()

    def tlsSettings(self) -> dict[str, Any]:
        """
        The load generator's client settings: the valid client's chain and key, the groups.
        """
        return {"chain": self.paths["clientChain"], "key": self.paths["clientKey"], "groups": self.args.groups}

    # -- gates

    def gates(self, proxy: Proxy) -> dict[str, Any]:
        """
        The correctness gates: the valid client's message comes back; the
        revoked client, the client under a revoked intermediate and a client
        without a certificate get nothing through.
        """
        port = proxy.ports["echo"]
        details = {
            "valid": self._exchange(port, "client"),
            "revoked": self._exchange(port, "revoked"),
            "revokedIntermediate": self._exchange(port, "underRevoked"),
            "noCertificate": self._exchange(port, None),
            "largeEcho": self._largeEcho(port),
        }
        outcome: dict[str, Any] = {
            "valid": details["valid"] == "ok",
            "revokedRejected": details["revoked"].startswith("rejected"),
            "revokedIntermediateRejected": details["revokedIntermediate"].startswith("rejected"),
            "noCertificateRejected": details["noCertificate"].startswith("rejected"),
        }
        # The whole chain's revocation (CRL_CHECK_ALL) is reported, not
        # required: stunnel checks the leaf's CRL only and has no setting
        # for more; it is measured with that caveat printed.
        outcome["largeEchoIntact"] = details["largeEcho"] == "ok"
        outcome["passed"] = (outcome["valid"] and outcome["revokedRejected"] and outcome["noCertificateRejected"]
                             and outcome["largeEchoIntact"])
        outcome["details"] = details
        return outcome

    def _largeEcho(self, port: int, size: int = 4 * 1024 * 1024) -> str:
        """
        Send C{size} random bytes through the echo listener while reading
        the echo; C{"ok"} if exactly the same bytes came back.  (A proxy
        that loses or reorders data under load fails here, not just in the
        figures.)
        """
        payload = os.urandom(size)
        try:
            sock, tls = connectAndHandshake(port, loadgen.clientContext(self.tlsSettings()))
        except (SSL.Error, OSError) as e:
            return f"error: {type(e).__name__}: {e}"
        io: Any = tls if tls is not None else sock
        sent, received = 0, []
        got = 0
        deadline = time.monotonic() + 30.0
        try:
            while got < size and time.monotonic() < deadline:
                if sent < size:
                    try:
                        sent += io.send(payload[sent:sent + 65536])
                    except (SSL.WantReadError, SSL.WantWriteError, BlockingIOError):
                        pass
                try:
                    chunk = io.recv(262144)
                    if not chunk:
                        break
                    received.append(chunk)
                    got += len(chunk)
                except (SSL.WantReadError, SSL.WantWriteError, BlockingIOError):
                    select.select([sock], [sock] if sent < size else [], [], 0.05)
        except (SSL.Error, OSError) as e:
            return f"error: {type(e).__name__}: {e}"
        finally:
            sock.close()
        data = b"".join(received)
        if data == payload:
            return "ok"
        return f"error: sent {size} bytes, got {len(data)} back, equal prefix {os.path.commonprefix([data, payload]).__len__()}"

    def _exchange(self, port: int, client: Optional[str]) -> str:
        """
        One gate connection: C{"ok"} if the message came back, C{"rejected:
        ..."} if the proxy refused (a TLS alert or a close without the
        echo), C{"error: ..."} for anything else (a time-out, a bug here).
        """
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.load_verify_locations(self.paths["root"])
        ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
        if client is not None:
            ctx.use_certificate_chain_file(self.paths[client + "Chain"])
            ctx.use_privatekey_file(self.paths[client + "Key"])
        sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
        sock.setblocking(False)
        conn = SSL.Connection(ctx, sock)
        conn.set_connect_state()
        deadline = time.monotonic() + 10.0

        def retry(call: Callable[[], Any]) -> Any:
            while True:
                try:
                    return call()
                except SSL.WantReadError:
                    wait = ([sock], [])
                except SSL.WantWriteError:
                    wait = ([], [sock])
                if time.monotonic() > deadline:
                    raise TimeoutError("no answer within 10 s")
                select.select(wait[0], wait[1], [], 0.1)

        try:
            retry(conn.do_handshake)
            retry(lambda: conn.send(b"gate-check"))
            data = b""
            while len(data) < 10:
                chunk = retry(lambda: conn.recv(1024))
                if not chunk:
                    break
                data += chunk
            return "ok" if data == b"gate-check" else f"rejected: closed after {data!r}"
        except (SSL.ZeroReturnError, SSL.SysCallError) as e:
            return f"rejected: closed ({e})"
        except SSL.Error as e:
            return f"rejected: {e}"
        except Exception as e:
            return f"error: {type(e).__name__}: {e}"
        finally:
            sock.close()

    # -- measurements

    def window(self, warmup: float, duration: float) -> tuple[float, float]:
        """
        The measured window, after C{warmup} seconds from now, on the monotonic clock the load generators share.
        """
        startAt = time.monotonic() + warmup
        return startAt, startAt + duration

    def measureWindow(self, proxy: Optional[Proxy], startAt: float, endAt: float) -> dict[str, float]:
        """
        Sleep through the window, reading the proxy's and the backend's CPU
        time at both ends.
        """
        time.sleep(max(0.0, startAt - time.monotonic()))
        probeStart = proxy.probe() if proxy is not None else None
        proxyStart = cpuOf(proxy.pid) if proxy is not None and proxy.process else 0.0
        backendStart = cpuOf(self.backendPid)
        wallStart = time.monotonic()
        time.sleep(max(0.0, endAt - time.monotonic()))
        wall = time.monotonic() - wallStart
        proxyCPU = (cpuOf(proxy.pid) - proxyStart) if proxy is not None and proxy.process else 0.0
        probeEnd = proxy.probe() if proxy is not None else None
        window = {
            "proxyCPU": proxyCPU,
            "proxyUtilisation": proxyCPU / wall,
            "backendCPU": cpuOf(self.backendPid) - backendStart,
            "wall": wall,
        }
        if probeStart is not None and probeEnd is not None:
            window["doHandshakeCalls"] = probeEnd[0] - probeStart[0]
            window["doHandshakeCPU"] = probeEnd[1] - probeStart[1]
        return window

    def handshakes(self, proxy: Proxy, resume: bool, clients: int = 1, core: Optional[str] = CLIENT_CORE) -> dict[str, Any]:
        """
        Full or resumed handshakes per second (and per proxy CPU-second).
        """
        startAt, endAt = self.window(self.args.warmup, self.args.duration)
        job = {"job": "handshakes", "port": proxy.ports["echo"], "tls": self.tlsSettings() if proxy.tls else None,
               "resume": resume, "concurrency": self.args.concurrency, "startAt": startAt, "endAt": endAt}
        generators = LoadGenerators(job, clients, core)
        window = self.measureWindow(proxy if proxy.process else None, startAt, endAt)
        results = generators.results(timeout=30)
        return self._combine(results, window, "completed")

    def _combine(self, results: list[dict[str, Any]], window: dict[str, float], countKey: str) -> dict[str, Any]:
        failed = [r["failed"] for r in results if "failed" in r]
        if failed:
            return {"failed": failed[0], **window}
        count = sum(r[countKey] for r in results)
        seconds = max(r["seconds"] for r in results)
        clientCPU = sum(r["cpu"] for r in results)
        combined: dict[str, Any] = {
            countKey: count,
            "rate": count / seconds,
            "seconds": seconds,
            "errors": sum(r.get("errors", 0) for r in results),
            "errorKinds": [r.get("errorKinds") for r in results if r.get("errors")],
            "errorFirst": [r.get("errorFirst") for r in results if r.get("errors")],
            "clientCPU": clientCPU,
            **window,
        }
        if "resumed" in results[0]:
            combined["resumed"] = sum(r["resumed"] for r in results)
        combined["clientCoreBusy"] = (clientCPU + window["backendCPU"]) / window["wall"]
        if window["proxyCPU"] > 0:
            combined["perProxyCPUSecond"] = count / window["proxyCPU"]
        if "doHandshakeCPU" in window and count > 0 and window["doHandshakeCalls"] > 0:
            # The handshake split: CPU inside OpenSSL's do_handshake (with
            # any verify callback it calls) and the rest of the proxy's CPU.
            combined["opensslUsPerHandshake"] = window["doHandshakeCPU"] / count * 1e6
            combined["restUsPerHandshake"] = (window["proxyCPU"] - window["doHandshakeCPU"]) / count * 1e6
            combined["doHandshakeCallsPerHandshake"] = window["doHandshakeCalls"] / count
        if clientCPU > 0:
            combined["clientCeiling"] = count / clientCPU
        return combined

    def bulk(self, proxy: Proxy, direction: str, streams: int) -> dict[str, Any]:
        """
        Megabytes per second through C{streams} connections in one direction.
        """
        startAt, endAt = self.window(self.args.warmup + 0.2 * streams, self.args.bulkDuration)
        job = {"job": "bulk", "port": proxy.ports["sink" if direction == "up" else "source"],
               "tls": self.tlsSettings() if proxy.tls else None, "direction": direction, "streams": streams,
               "startAt": startAt, "endAt": endAt}
        generators = LoadGenerators(job)
        window = self.measureWindow(proxy if proxy.process else None, startAt, endAt)
        result = self._combine(generators.results(timeout=30), window, "bytes")
        if "bytes" in result:
            result["MBps"] = result["bytes"] / result["seconds"] / 1e6
            if window["proxyCPU"] > 0:
                result["MBperProxyCPUSecond"] = result["bytes"] / window["proxyCPU"] / 1e6
        return result

    def latency(self, proxy: Proxy) -> dict[str, Any]:
        """
        1 KiB round trips over 32 connections at C{--rate} per second: percentiles.
        """
        # Connections are set up before startAt; the first second is not recorded.
        startAt = time.monotonic() + 1.5
        recordFrom = startAt + 1.0
        endAt = recordFrom + self.args.latencyDuration
        job = {"job": "latency", "port": proxy.ports["echo"], "tls": self.tlsSettings() if proxy.tls else None,
               "connections": 32, "rate": self.args.rate, "size": 1024,
               "startAt": startAt, "recordFrom": recordFrom, "endAt": endAt}
        generators = LoadGenerators(job)
        window = self.measureWindow(proxy if proxy.process else None, recordFrom, endAt)
        result = generators.results(timeout=self.args.latencyDuration + 30)[0]
        result.update(window)
        return result

    def idle(self, proxy: Proxy) -> dict[str, Any]:
        """
        Memory per idle mTLS connection: the proxy's RSS before and after
        C{--idle} connections were opened (each after one echo) and left idle.
        """
        count = self.args.idle
        warm = {"job": "handshakes", "port": proxy.ports["echo"], "tls": self.tlsSettings(),
                "concurrency": 16, "count": 200, "endAt": time.monotonic() + 20}
        LoadGenerators(warm).results(timeout=30)
        time.sleep(1.0)
        before = memoryKiB(proxy.pid)
        job = {"job": "idle", "port": proxy.ports["echo"], "tls": self.tlsSettings(), "connections": count,
               "concurrency": 32, "holdFor": 120.0, "openWithin": 100.0}
        process = subprocess.Popen(
            pinned(CLIENT_CORE, [PYTHON, os.path.join(BENCH, "loadgen.py"), json.dumps(job)]),
            stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True,
        )
        assert process.stdout is not None and process.stdin is not None
        opened = json.loads(process.stdout.readline() or '{"open": 0}')
        time.sleep(2.0)
        after = memoryKiB(proxy.pid)
        process.stdin.write("close\n")
        process.stdin.flush()
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        open_ = opened.get("open", 0)
        return {
            "open": open_,
            "errors": opened.get("errors"),
            "rssBeforeKiB": before,
            "rssAfterKiB": after,
            "KiBPerConnection": (after - before) / open_ if open_ else None,
        }

    # -- per proxy

    def prepareProxy(self, proxy: Proxy) -> dict[str, Any]:
        """
        A proxy's version, whether it is installed, and its correctness
        gates: the start of its results.
        """
        result: dict[str, Any] = {"version": proxy.version()}
        why = proxy.missing()
        if why is not None:
            log(f"{proxy.name}: {why}")
            result["missing"] = why
            return result
        if proxy.tls:
            try:
                proxy.start()
            except RuntimeError as e:
                log(f"{proxy.name}: {e}")
                result["gates"] = {"passed": False, "failed": str(e)}
                return result
            try:
                result["gates"] = self.gates(proxy)
            finally:
                proxy.stop()
            log(f"{proxy.name}: gates {result['gates']}")
            if not result["gates"]["passed"]:
                log(f"{proxy.name}: FAILED the correctness gates; not measured")
        return result

    def plan(self) -> list[tuple[str, bool, Callable[[Proxy], dict[str, Any]]]]:
        """
        The tests in the order they run: (name, TLS only, measurement).
        Each test runs for every proxy before the next test starts, so that
        the proxies compared in one row were measured within a minute of
        each other (this virtual machine's speed drifts by 10-20 % over
        minutes).
        """
        plan: list[tuple[str, bool, Callable[[Proxy], dict[str, Any]]]] = [
            ("handshakes", False, lambda p: self.handshakes(p, resume=False)),
            ("resumed", True, lambda p: self.handshakes(p, resume=True)),
        ]
        for direction in ("up", "down"):
            for streams in (1, 8):
                plan.append((f"bulk.{direction}{streams}", False,
                             lambda p, d=direction, n=streams: self.bulk(p, d, n)))
        plan.append(("latency", False, self.latency))
        # The same with the proxy on the load generator's core: on a virtual
        # machine, waking an idle vCPU can take milliseconds, and every round
        # trip above wakes the proxy's core twice.
        plan.append(("latency.sameCore", True, self._latencySameCore))
        plan.append(("idle", True, self.idle))
        return [entry for entry in plan if entry[0].split(".")[0] in self.args.tests]

    def _latencySameCore(self, proxy: Proxy) -> dict[str, Any]:
        return self.latency(proxy)

    def measure(self, proxy: Proxy, name: str, measurement: Callable[[Proxy], dict[str, Any]]) -> dict[str, Any]:
        """
        One test against a freshly started proxy.
        """
        if self.args.profile and isinstance(proxy, MTLSProxy):
            proxy.pySpy = self.args.pySpy
            proxy.profileTo = os.path.join(self.args.profile, f"{proxy.name}-{name}.txt")
        proxy.core = CLIENT_CORE if name == "latency.sameCore" else PROXY_CORE
        # The handshake split (bench/probe) for the handshake tests only:
        # the other tests run exactly as without it.
        proxy.probePath = (os.path.join(proxy.work, f"probe-{name}")
                           if proxy.probeable and name in ("handshakes", "resumed") else None)
        try:
            proxy.start()
        except RuntimeError as e:
            return {"failed": str(e)}
        try:
            result = measurement(proxy)
        except Exception as e:
            result = {"failed": f"{type(e).__name__}: {e}"}
        finally:
            proxy.stop()
            proxy.core = PROXY_CORE
            proxy.probePath = None
        log(f"{proxy.name}: {name}: {summarise(name, result)}")
        return result

    def scaling(self) -> dict[str, Any]:
        """
        mtlsproxy with 1 and 2 worker processes, on both cores, sharing them
        with two load generator processes and the backend.
        """
        result = {}
        for workers in (1, 2):
            proxy = MTLSProxy(self.work, self.paths, self.backendPorts)
            proxy.source = self.args.source
            proxy.reactor = self.args.reactor
            proxy.sessionTickets = not self.args.statefulSessions
            proxy.workers = workers
            proxy.core = None
            proxy.probePath = os.path.join(proxy.work, f"probe-workers{workers}")
            proxy.start()
            try:
                result[f"workers{workers}"] = self.handshakes(proxy, resume=False, clients=2, core=None)
            except Exception as e:
                result[f"workers{workers}"] = {"failed": f"{type(e).__name__}: {e}"}
            finally:
                proxy.stop()
            log(f"scaling: {workers} worker(s): {summarise('handshakes', result[f'workers{workers}'])}")
        return result

    def tlsCost(self) -> dict[str, Any]:
        """
        The OpenSSL limit (L{bench.tlscost}), measured on the proxy's core.
        """
        out = subprocess.run(
            pinned(PROXY_CORE, [PYTHON, os.path.join(BENCH, "tlscost.py"), self.pkiDir, str(self.args.tlscostCount)]),
            capture_output=True, text=True, timeout=300,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if not lines:
            return {"failed": out.stderr[-2000:]}
        return json.loads(lines[-1])

    # -- the whole run

    def run(self) -> dict[str, Any]:
        """
        The whole benchmark: PKI, backends, gates, every test for every proxy, scaling.
        """
        args = self.args
        self.results["started"] = datetime.now(timezone.utc).isoformat()
        self.results["command"] = " ".join([os.path.relpath(PYTHON, REPO) if PYTHON.startswith(REPO) else PYTHON]
                                           + [os.path.relpath(os.path.abspath(sys.argv[0]), REPO)] + sys.argv[1:])
        self.results["settings"] = {k: v for k, v in vars(args).items() if k != "json"}
        self.results["machine"] = machine()
        self.results["loadBefore"] = loadAverage()
        self.pkiDir = os.path.join(self.work, "pki")
        log(f"PKI ({'RSA-2048' if args.rsa else 'ECDSA P-256'}) in {self.pkiDir}")
        self.paths = makePKI(self.pkiDir, "rsa" if args.rsa else "ec")
        self.startBackend()
        try:
            if "tlscost" in args.tests:
                log("OpenSSL cost per server handshake ...")
                self.results["tlscost"] = self.tlsCost()
                log(f"tlscost: {json.dumps(self.results['tlscost'])}")
            classes = {"mtlsproxy": MTLSProxy, "haproxy": HAProxy, "stunnel": Stunnel, "naive": Naive,
                       "direct": Direct}
            proxies = []
            for name in args.proxies:
                proxy = classes[name](self.work, self.paths, self.backendPorts)
                if isinstance(proxy, MTLSProxy):
                    proxy.source = args.source
                    proxy.reactor = args.reactor
                    proxy.sessionTickets = not args.statefulSessions
                result = self.results["proxies"][name] = self.prepareProxy(proxy)
                if "missing" not in result and result.get("gates", {"passed": True})["passed"]:
                    proxies.append(proxy)
            for test, tlsOnly, measurement in self.plan():
                log(f"== {test}")
                for proxy in proxies:
                    if tlsOnly and not proxy.tls:
                        continue
                    self.results["proxies"][proxy.name][test] = self.measure(proxy, test, measurement)
            if "scaling" in args.tests and "mtlsproxy" in args.proxies:
                self.results["scaling"] = self.scaling()
        finally:
            self.stopBackend()
        self.results["loadAfter"] = loadAverage()
        self.results["finished"] = datetime.now(timezone.utc).isoformat()
        self.results["verdict"] = verdict(self.results)
        return self.results


# -- reporting -------------------------------------------------------------------------


def summarise(name: str, r: dict[str, Any]) -> str:
    """
    One line about one test's result, for the progress log.
    """
    if "failed" in r:
        return f"FAILED {r['failed']}"
    if name in ("handshakes", "resumed"):
        text = f"{r['rate']:.0f}/s, {r.get('perProxyCPUSecond', 0):.0f} per proxy CPU-s, proxy {r['proxyUtilisation']:.0%}, client core {r['clientCoreBusy']:.0%}, errors {r['errors']}"
        if name == "resumed":
            text += f", resumed {r.get('resumed', 0)}/{r['completed']}"
        if "opensslUsPerHandshake" in r:
            text += (f", per handshake {r['opensslUsPerHandshake']:.0f} us in OpenSSL + {r['restUsPerHandshake']:.0f} us"
                     f" rest ({r['doHandshakeCallsPerHandshake']:.1f} do_handshake calls)")
        return text
    if name.startswith("bulk"):
        return (f"{r['MBps']:.0f} MB/s, {r.get('MBperProxyCPUSecond', 0):.0f} MB per proxy CPU-s, proxy"
                f" {r['proxyUtilisation']:.0%}, client core {r['clientCoreBusy']:.0%}, errors {r['errors']}")
    if name.startswith("latency"):
        if not r.get("samples"):
            return f"no samples {r}"
        return f"p50 {r['p50ms']:.3f} ms, p99 {r['p99ms']:.3f} ms, p99.9 {r['p999ms']:.3f} ms, {r['samples']} samples, late {r['late']}"
    if name == "idle":
        per = r.get("KiBPerConnection")
        return f"{r['open']} open, {per:.1f} KiB/conn" if per is not None else f"{r}"
    return json.dumps(r)


def _get(results: dict[str, Any], proxy: str, *keys: str) -> Optional[float]:
    value: Any = results["proxies"].get(proxy, {})
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value if isinstance(value, (int, float)) else None


ROWS = [
    ("full mTLS handshakes/s", ("handshakes", "rate"), "{:.0f}"),
    ("  per proxy CPU-second", ("handshakes", "perProxyCPUSecond"), "{:.0f}"),
    ("  proxy core busy", ("handshakes", "proxyUtilisation"), "{:.0%}"),
    ("  client core busy", ("handshakes", "clientCoreBusy"), "{:.0%}"),
    ("  in OpenSSL, us/handshake", ("handshakes", "opensslUsPerHandshake"), "{:.0f}"),
    ("  rest (Python, syscalls), us/handshake", ("handshakes", "restUsPerHandshake"), "{:.0f}"),
    ("resumed handshakes/s", ("resumed", "rate"), "{:.0f}"),
    ("  per proxy CPU-second", ("resumed", "perProxyCPUSecond"), "{:.0f}"),
    ("bulk up, 1 stream MB/s", ("bulk.up1", "MBps"), "{:.0f}"),
    ("  per proxy CPU-second", ("bulk.up1", "MBperProxyCPUSecond"), "{:.0f}"),
    ("bulk up, 8 streams MB/s", ("bulk.up8", "MBps"), "{:.0f}"),
    ("bulk down, 1 stream MB/s", ("bulk.down1", "MBps"), "{:.0f}"),
    ("  per proxy CPU-second", ("bulk.down1", "MBperProxyCPUSecond"), "{:.0f}"),
    ("bulk down, 8 streams MB/s", ("bulk.down8", "MBps"), "{:.0f}"),
    ("  up 1: proxy core busy", ("bulk.up1", "proxyUtilisation"), "{:.0%}"),
    ("  down 1: proxy core busy", ("bulk.down1", "proxyUtilisation"), "{:.0%}"),
    ("1 KiB RTT p50 ms", ("latency", "p50ms"), "{:.3f}"),
    ("1 KiB RTT p99 ms", ("latency", "p99ms"), "{:.3f}"),
    ("1 KiB RTT p99.9 ms", ("latency", "p999ms"), "{:.3f}"),
    ("  same core: p50 ms", ("latency.sameCore", "p50ms"), "{:.3f}"),
    ("  same core: p99 ms", ("latency.sameCore", "p99ms"), "{:.3f}"),
    ("KiB per idle mTLS conn", ("idle", "KiBPerConnection"), "{:.1f}"),
]


def table(results: dict[str, Any]) -> str:
    """
    The results table: one column per proxy, the ratio to HAProxy, notes and verdicts.
    """
    proxies = list(results["proxies"])
    width = max(28, max(len(label) for label, _, _ in ROWS) + 1)
    lines = []
    header = "".ljust(width) + "".join(p.rjust(12) for p in proxies)
    if "haproxy" in proxies and "mtlsproxy" in proxies:
        header += "ours/haproxy".rjust(14)
    lines.append(header)
    for label, keys, fmt in ROWS:
        cells = []
        for p in proxies:
            v = _get(results, p, *keys)
            cells.append((fmt.format(v) if v is not None else "-").rjust(12))
        line = label.ljust(width) + "".join(cells)
        if "haproxy" in proxies and "mtlsproxy" in proxies:
            ours, theirs = _get(results, "mtlsproxy", *keys), _get(results, "haproxy", *keys)
            ratio = f"{ours / theirs:.2f}x" if ours and theirs and "busy" not in label else ""
            line += ratio.rjust(14)
        lines.append(line)
    direct = _get(results, "direct", "latency", "p99ms")
    ours = _get(results, "mtlsproxy", "latency", "p99ms")
    if direct is not None and ours is not None:
        lines.append(f"added p99 latency vs direct: mtlsproxy {ours - direct:+.3f} ms"
                     + "".join(f", {p} {v - direct:+.3f} ms" for p in proxies
                               if p not in ("mtlsproxy", "direct")
                               and (v := _get(results, p, "latency", "p99ms")) is not None))
    rest = {p: v for p in proxies if (v := _get(results, p, "handshakes", "restUsPerHandshake")) is not None}
    if "mtlsproxy" in rest and "naive" in rest:
        lines.append(f"per full handshake outside OpenSSL's do_handshake: mtlsproxy {rest['mtlsproxy']:.0f} us, "
                     f"naive Twisted portforward {rest['naive']:.0f} us (Twisted's floor: "
                     f"{rest['naive'] / rest['mtlsproxy']:.0%} of ours)")
    for p in proxies:
        r = results["proxies"][p]
        if p == "naive" and "missing" not in r:
            lines.append("naive: Twisted's portforward behind listenSSL, no features, no logs; a baseline, not a"
                         " secure proxy (it connects the backend before the handshake completes)")
        if "missing" in r:
            lines.append(f"{p}: {r['missing']}")
        elif "gates" in r:
            gates = r["gates"]
            text = f"{p}: correctness gates {'passed' if gates['passed'] else 'FAILED (not measured)'}"
            if gates["passed"] and not gates.get("revokedIntermediateRejected"):
                text += "; CAVEAT: a client under a revoked intermediate got through (leaf-only CRL check)"
            lines.append(text)
        if (r.get("handshakes", {}).get("clientCoreBusy") or 0) > 0.9:
            lines.append(f"{p}: handshakes limited by the load generator's core "
                         f"(client ceiling ~{r['handshakes'].get('clientCeiling', 0):.0f}/s): "
                         "read 'per proxy CPU-second'")
    cost = results.get("tlscost", {})
    for key, label in (("pyopenssl", "pyOpenSSL"), ("stdlib", "system")):
        c = cost.get(key)
        if c:
            lines.append(f"OpenSSL limit ({label}, {c['openssl']}): {c['usPerHandshake']:.0f} us per server "
                         f"handshake = {c['handshakesPerCPUSecond']:.0f}/CPU-s ({c['version']} {c['cipher']})")
    scaling = results.get("scaling")
    if scaling:
        parts = []
        for k, v in scaling.items():
            if "rate" not in v:
                parts.append(f"{k}: {v.get('failed')}")
                continue
            part = f"{k}: {v['rate']:.0f}/s"
            if "opensslUsPerHandshake" in v:
                part += f" ({v['opensslUsPerHandshake']:.0f} us OpenSSL + {v['restUsPerHandshake']:.0f} us rest per handshake)"
            parts.append(part)
        lines.append("mtlsproxy handshakes on both cores (shared with the load generator): " + ", ".join(parts))
    lines.append("targets: " + ", ".join(f"{k} {'met' if ok else 'NOT met'}" for k, ok in results["verdict"].items()))
    return "\n".join(lines)


def verdict(results: dict[str, Any]) -> dict[str, bool]:
    """
    Which of issue 6's targets this run met (only those it measured).
    """
    out: dict[str, bool] = {}
    rate = _get(results, "mtlsproxy", "handshakes", "rate")
    perCPU = _get(results, "mtlsproxy", "handshakes", "perProxyCPUSecond")
    theirs = _get(results, "haproxy", "handshakes", "rate")
    if rate is not None:
        out["handshakes>=900/s"] = rate >= TARGETS["handshakesPerSecond"]
        if perCPU is not None:
            out["handshakes/CPU-s>=900"] = perCPU >= TARGETS["handshakesPerSecond"]
    if rate is not None and theirs:
        out["handshakes>=1.6x haproxy"] = rate / theirs >= TARGETS["handshakesVsHAProxy"]
    limit = results.get("tlscost", {}).get("pyopenssl", {}).get("handshakesPerCPUSecond")
    if perCPU is not None and limit:
        out["handshakes/CPU-s>=0.9 OpenSSL limit"] = perCPU / limit >= TARGETS["handshakesVsOpenSSL"]
    for key in ("bulk.up1", "bulk.up8", "bulk.down1", "bulk.down8"):
        ours, theirs = _get(results, "mtlsproxy", key, "MBps"), _get(results, "haproxy", key, "MBps")
        if ours is not None and theirs:
            out[f"{key}>=1.0x haproxy"] = ours / theirs >= TARGETS["bulkVsHAProxy"]
    p99 = _get(results, "mtlsproxy", "latency", "p99ms")
    if p99 is not None:
        out["p99<=0.7ms"] = p99 <= TARGETS["p99ms"]
    p99 = _get(results, "mtlsproxy", "latency.sameCore", "p99ms")
    if p99 is not None:
        out["p99<=0.7ms (same core)"] = p99 <= TARGETS["p99ms"]
    idle = _get(results, "mtlsproxy", "idle", "KiBPerConnection")
    if idle is not None:
        out["idle<=40KiB"] = idle <= TARGETS["idleKiB"]
    return out


def machine() -> dict[str, Any]:
    """
    What this run ran on: CPU model, cores, versions.
    """
    import ssl

    import twisted
    import OpenSSL

    model = ""
    try:
        for line in run(["lscpu"]).splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
                break
    except Exception:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "pyopenssl": OpenSSL.__version__,
        "pyopensslOpenSSL": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        "pythonSSL": ssl.OPENSSL_VERSION,
        "systemOpenSSL": run(["openssl", "version"]).strip(),
        "haproxy": HAProxy.version(None) if shutil.which("haproxy") else None,  # type: ignore[arg-type]
        "stunnel": Stunnel.version(Stunnel.__new__(Stunnel)) if (shutil.which("stunnel4") or shutil.which("stunnel")) else None,
    }


# -- command line ---------------------------------------------------------------------

ALL_TESTS = ("tlscost", "handshakes", "resumed", "bulk", "latency", "idle", "scaling")


def parseArgs(argv: Optional[list[str]]) -> argparse.Namespace:
    """
    The command line (C{--help} lists it).
    """
    parser = argparse.ArgumentParser(
        description="Benchmark mtlsproxy against HAProxy and stunnel (mTLS, CRLs, one core each).")
    parser.add_argument("--rsa", action="store_true", help="RSA-2048 certificates instead of ECDSA P-256")
    parser.add_argument("--quick", action="store_true", help="a smoke run: short windows, small counts")
    parser.add_argument("--proxies", default="mtlsproxy,haproxy,stunnel,naive,direct",
                        help="comma-separated: mtlsproxy, haproxy, stunnel, naive (Twisted's portforward"
                             " behind listenSSL, bench/naive.py), direct")
    parser.add_argument("--tests", default=",".join(ALL_TESTS), help="comma-separated: " + ", ".join(ALL_TESTS))
    parser.add_argument("--duration", type=float, default=6.0, help="handshake test window, seconds")
    parser.add_argument("--bulk-duration", dest="bulkDuration", type=float, default=4.0)
    parser.add_argument("--latency-duration", dest="latencyDuration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--concurrency", type=int, default=32, help="handshakes in flight")
    parser.add_argument("--rate", type=float, default=2000.0, help="round trips per second in the latency test")
    parser.add_argument("--idle", type=int, default=1000, help="idle connections in the memory test")
    parser.add_argument("--groups", default="X25519", help="key exchange groups the clients offer")
    parser.add_argument("--tlscost-count", dest="tlscostCount", type=int, default=1000)
    parser.add_argument("--mtlsproxy-source", dest="source",
                        help="run mtlsproxy from this checkout instead (e.g. a baseline: git worktree add)")
    parser.add_argument("--profile", metavar="DIR",
                        help="record mtlsproxy with py-spy during each test (collapsed stacks in DIR;"
                             " summarise with bench/profile.py); the figures are then not representative")
    parser.add_argument("--py-spy", dest="pySpy", default=_findPySpy())
    parser.add_argument("--reactor", default=None,
                        help="twistd's --reactor for mtlsproxy (epoll, the default; poll, select, asyncio)")
    parser.add_argument("--stateful-sessions", dest="statefulSessions", action="store_true",
                        help="mtlsproxy listeners with session_tickets = false (OpenSSL's stateful session cache,"
                             " OP_NO_TICKET); the default is the product's, session_tickets = true")
    parser.add_argument("--session-tickets", dest="sessionTicketsAlias", action="store_true",
                        help="accepted for compatibility, does nothing: stateless tickets are the default now")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (configurations, logs)")
    parser.add_argument("--json", help="where to write the results (default bench/results/<time>.json)")
    args = parser.parse_args(argv)
    args.proxies = [p for p in args.proxies.split(",") if p]
    unknown = [p for p in args.proxies if p not in ("mtlsproxy", "haproxy", "stunnel", "naive", "direct")]
    if unknown:
        parser.error(f"unknown proxies: {', '.join(unknown)}")
    args.tests = [t for t in args.tests.split(",") if t]
    if args.profile:
        args.profile = os.path.abspath(args.profile)
        os.makedirs(args.profile, exist_ok=True)
    if args.quick:
        args.duration, args.bulkDuration, args.latencyDuration, args.warmup = 1.0, 0.5, 1.0, 0.5
        args.idle, args.tlscostCount, args.rate = 50, 50, 500.0
    return args


def _findPySpy() -> str:
    """
    py-spy on C{PATH}, else beside this Python (the virtualenv's C{bin}).
    """
    found = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    return found or "py-spy"


def main(argv: Optional[list[str]] = None) -> int:
    """
    Run the benchmark; exit status 1 if a proxy failed its correctness gates.
    """
    args = parseArgs(argv)
    bench = Bench(args)
    try:
        results = bench.run()
    finally:
        if args.keep:
            log(f"kept {bench.work}")
        else:
            shutil.rmtree(bench.work, ignore_errors=True)
    path = args.json or os.path.join(BENCH, "results", time.strftime("%Y%m%d-%H%M%S") + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(table(results))
    print(f"results: {path}")
    gates = [r.get("gates", {}).get("passed", True) for r in results["proxies"].values()]
    return 0 if all(gates) else 1


if __name__ == "__main__":
    sys.exit(main())
