#!/usr/bin/env python3
# -*- test-case-name: tests.test_soak -*-
"""
Soak test for mtlsproxy: many mutual-TLS connections through a real
C{twistd -n mtlsproxy}, every byte checked, and no leak afterwards.

    python bench/soak.py                               # 10,000 sequential, 1,000 concurrent
    python bench/soak.py --sequential 500 --concurrent 200

What it does, all on 127.0.0.1:

  1. Generates a PKI (root CA, server and client certificates, CRL) in a
     temporary folder, starts an echo-with-hash backend (a child process:
     C{soak.py --backend}) and the proxy (C{twistd -n mtlsproxy}) with a TLS
     listener that requires client certificates.
  2. Warms up, then records the proxy's baseline: open file descriptors
     (C{/proc/PID/fd}) and resident memory (C{VmRSS}).
  3. Runs C{--sequential} connections one after the other, then
     C{--rounds} rounds of C{--concurrent} connections all open at once,
     each with a random payload size (log-uniform up to C{--max-payload}).
     Each client sends an 8-byte length and its payload; the backend echoes
     the payload as it arrives, then sends the SHA-256 of what it received
     and closes.  The client checks both ways: the echo's SHA-256 and the
     backend's digest must equal the payload's.
  4. After each half of the sequential connections and each concurrent
     round, waits for the proxy to close everything and reads its
     descriptors and memory.

It prints its figures and exits with status 0 only if every connection
completed intact, the proxy's descriptors came back to the baseline
(within C{--fd-slack}) after every phase, and its memory stopped growing:
the second half of the sequential connections may add at most
C{--rss-slack} MiB plus C{--rss-per-connection} KiB per connection, and the
concurrent rounds after the first at most C{--rss-slack} MiB (the first
sets the buffers' high-water mark, which the allocator keeps).  It exits
with 1 otherwise, 2 if it could not run.  Every wait is bounded
(C{--timeout} for the whole run).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import os
import random
import re
import shutil
import signal
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

HEADER = struct.Struct("!Q")
DIGEST_SIZE = 32


# -- the backend ------------------------------------------------------------


async def _serveEcho(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """
    Read an 8-byte length, echo that many bytes as they arrive, then send
    the SHA-256 of what was received and close.
    """
    try:
        (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
        digest = hashlib.sha256()
        left = length
        while left:
            chunk = await reader.read(min(left, 65536))
            if not chunk:
                return
            left -= len(chunk)
            digest.update(chunk)
            writer.write(chunk)
            await writer.drain()
        writer.write(digest.digest())
        await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _backendMain() -> None:
    server = await asyncio.start_server(_serveEcho, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    # Exit with the parent: it holds our stdin open.
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def stdinReadable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(sys.stdin.fileno(), stdinReadable)
    await done


# -- process figures ----------------------------------------------------------


def openDescriptors(pid: int) -> int:
    """
    How many file descriptors process C{pid} has open.
    """
    return len(os.listdir(f"/proc/{pid}/fd"))


def residentKiB(pid: int) -> int:
    """
    The resident set size of process C{pid}, in KiB.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpuSeconds(pid: int) -> float:
    """
    User plus system CPU time process C{pid} has used, in seconds.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- set-up -------------------------------------------------------------------


def writePKI(directory: str) -> dict[str, str]:
    """
    Write a root CA, a server certificate for 127.0.0.1 / localhost, a
    client certificate and the root's (empty) CRL.
    """
    from mtlsproxy import pki

    root = pki.createRootCA("Soak Root")
    server = pki.issueServerCertificate(
        root, "localhost", dnsNames=["localhost"], ipAddresses=["127.0.0.1"]
    )
    client = pki.issueClientCertificate(root, "soak-client")
    files = {
        "root": pki.certificatePEM(root.certificate),
        "crl": pki.crlPEM(pki.buildCRL(root)),
        "server": pki.chainPEM([server.certificate]),
        "serverKey": pki.keyPEM(server.key),
        "client": pki.chainPEM([client.certificate]),
        "clientKey": pki.keyPEM(client.key),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = os.path.join(directory, name + ".pem")
        with open(paths[name], "wb") as f:
            f.write(data)
    return paths


def proxyConfig(paths: dict[str, str], backendPort: int, maxConnections: int) -> str:
    # One process: the soak measures that process's descriptors and memory.
    return f"""
workers = 1

[[listeners]]
name = "soak"
endpoint = "tcp:0:interface=127.0.0.1:backlog=4096"
protocol = "tls"
pool = "echo"
client_auth = "required"
ca_certificates = ["{paths['root']}"]
crls = ["{paths['crl']}"]
max_connections = {maxConnections}

[[listeners.certificates]]
cert = "{paths['server']}"
key = "{paths['serverKey']}"

[[pools]]
name = "echo"
connect_timeout = 5

[[pools.members]]
address = "127.0.0.1"
port = {backendPort}
"""


class Processes:
    """
    The backend and proxy child processes, stopped on exit.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.backend: Optional[subprocess.Popen[bytes]] = None
        self.proxy: Optional[subprocess.Popen[bytes]] = None
        self.logfile = os.path.join(directory, "mtlsproxy.log")

    def startBackend(self, timeout: float) -> int:
        self.backend = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--backend"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.backend.stdout is not None
        line = _readLine(self.backend.stdout, timeout)
        return int(line)

    def startProxy(self, config: str, timeout: float) -> int:
        path = os.path.join(self.directory, "mtlsproxy.toml")
        with open(path, "w") as f:
            f.write(config)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        with open(os.path.join(self.directory, "twistd.out"), "wb") as output:
            self.proxy = subprocess.Popen(
                [twistd, "-n", "--pidfile=", "--logfile", self.logfile, "mtlsproxy", "--config", path],
                cwd=self.directory,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        pattern = re.compile(r"Listener soak \(tls\) listening on [\d.]+:(\d+)")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = pattern.search(self.log())
            if match:
                return int(match.group(1))
            if self.proxy.poll() is not None:
                with open(os.path.join(self.directory, "twistd.out"), errors="replace") as f:
                    printed = f.read()
                raise RuntimeError(f"twistd exited {self.proxy.returncode}:\n{printed}{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"proxy did not start listening:\n{self.log()}")

    def log(self) -> str:
        try:
            with open(self.logfile, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.send_signal(signal.SIGTERM)
            try:
                self.proxy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait()
        if self.backend is not None and self.backend.poll() is None:
            assert self.backend.stdin is not None
            self.backend.stdin.close()
            try:
                self.backend.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.backend.kill()
                self.backend.wait()
        if self.backend is not None and self.backend.stdout is not None:
            self.backend.stdout.close()


def _readLine(stream: Any, timeout: float) -> bytes:
    import select

    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise RuntimeError("backend did not start")
    return stream.readline()


# -- the clients --------------------------------------------------------------


class Results:
    """
    What the clients saw.
    """

    def __init__(self) -> None:
        self.completed = 0
        self.bytes = 0
        self.failures: list[str] = []
        self.latencies: list[float] = []

    def merge(self, other: "Results") -> None:
        self.completed += other.completed
        self.bytes += other.bytes
        self.failures.extend(other.failures)
        self.latencies.extend(other.latencies)

    def fail(self, text: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(text)
        else:
            self.failures.append("")


def payloadSize(rng: random.Random, maximum: int) -> int:
    """
    A log-uniform size from 0 to C{maximum}: mostly small, some large.
    """
    if maximum <= 0:
        return 0
    return min(maximum, int(math.exp(rng.uniform(0, math.log(maximum + 1)))) - 1)


async def exchange(
    port: int, context: ssl.SSLContext, payload: bytes, timeout: float, results: Results
) -> None:
    """
    One connection: send the length and the payload (from a task, reading
    meanwhile), read the echo and the backend's digest, check both.
    """
    started = time.monotonic()
    writer: Optional[asyncio.StreamWriter] = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="localhost"
            )

            async def send() -> None:
                assert writer is not None
                writer.write(HEADER.pack(len(payload)))
                view = memoryview(payload)
                for offset in range(0, len(view), 65536):
                    writer.write(view[offset : offset + 65536])
                    await writer.drain()
                await writer.drain()

            sender = asyncio.create_task(send())
            echo = hashlib.sha256()
            left = len(payload)
            while left:
                chunk = await reader.read(min(left, 262144))
                if not chunk:
                    raise ConnectionError(f"echo cut short: {left} of {len(payload)} bytes missing")
                left -= len(chunk)
                echo.update(chunk)
            digest = await reader.readexactly(DIGEST_SIZE)
            rest = await reader.read()
            await sender
        expected = hashlib.sha256(payload).digest()
        if echo.digest() != expected:
            results.fail(f"{len(payload)} bytes: echo differs from what was sent")
        elif digest != expected:
            results.fail(f"{len(payload)} bytes: backend received different bytes")
        elif rest:
            results.fail(f"{len(payload)} bytes: {len(rest)} unexpected bytes after the digest")
        else:
            results.completed += 1
            results.bytes += 2 * len(payload)
            results.latencies.append(time.monotonic() - started)
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError) as e:
        results.fail(f"{len(payload)} bytes: {type(e).__name__}: {e}")
    finally:
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 5)
            except (OSError, ssl.SSLError, TimeoutError):
                pass


def clientContext(paths: dict[str, str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(paths["root"])
    context.load_cert_chain(paths["client"], paths["clientKey"])
    return context


async def runSequential(
    count: int, port: int, context: ssl.SSLContext, rng: random.Random, maximum: int, timeout: float
) -> Results:
    results = Results()
    for _ in range(count):
        await exchange(port, context, rng.randbytes(payloadSize(rng, maximum)), timeout, results)
    return results


async def runConcurrent(
    count: int, port: int, context: ssl.SSLContext, rng: random.Random, maximum: int, timeout: float
) -> Results:
    results = Results()
    payloads = [rng.randbytes(payloadSize(rng, maximum)) for _ in range(count)]
    await asyncio.gather(*(exchange(port, context, p, timeout, results) for p in payloads))
    return results


# -- the run ------------------------------------------------------------------


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _report(name: str, results: Results, count: int, elapsed: float) -> None:
    print(
        f"{name}: {results.completed}/{count} intact, {len(results.failures)} failed,"
        f" {results.bytes / 2**20:.1f} MiB checked, {elapsed:.1f}s"
        f" ({results.completed / elapsed if elapsed else 0:.0f} conn/s),"
        f" latency p50 {_percentile(results.latencies, 0.5) * 1000:.1f} ms"
        f" p99 {_percentile(results.latencies, 0.99) * 1000:.1f} ms",
        flush=True,
    )
    for failure in [f for f in results.failures if f][:10]:
        print(f"  failure: {failure}", flush=True)


def _settle(pid: int, baseline: int, slack: int, timeout: float) -> int:
    """
    Wait until the proxy's descriptors are back within C{slack} of
    C{baseline}, or C{timeout}; return the count.
    """
    deadline = time.monotonic() + timeout
    count = openDescriptors(pid)
    while count > baseline + slack and time.monotonic() < deadline:
        time.sleep(0.2)
        count = openDescriptors(pid)
    return count


def parseArguments(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sequential", type=int, default=10000, help="sequential connections (10000)")
    parser.add_argument("--concurrent", type=int, default=1000, help="connections open at once (1000)")
    parser.add_argument("--max-payload", type=int, default=256 * 1024, help="largest payload in bytes (262144)")
    parser.add_argument("--warmup", type=int, default=50, help="connections before the baseline (50)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole run (900)")
    parser.add_argument("--connection-timeout", type=float, default=60.0, help="seconds per connection (60)")
    parser.add_argument("--fd-slack", type=int, default=2, help="descriptors allowed above the baseline (2)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of concurrent connections (2)")
    parser.add_argument("--rss-slack", type=float, default=16.0,
                        help="MiB of RSS growth allowed in the second half of the sequential"
                             " connections and after the first concurrent round (16)")
    parser.add_argument("--rss-per-connection", type=float, default=1.0,
                        help="KiB of RSS growth allowed per connection in the second half of"
                             " the sequential connections (1)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--keep", metavar="DIR", default=None, help="work in DIR and keep it (PKI, config, proxy log)")
    parser.add_argument("--backend", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parseArguments(argv)
    if args.backend:
        asyncio.run(_backendMain())
        return 0
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    started = time.monotonic()
    directory = args.keep or tempfile.mkdtemp(prefix="mtlsproxy-soak-")
    os.makedirs(directory, exist_ok=True)
    processes = Processes(directory)
    # The whole run is bounded: SIGALRM ends it with status 1.
    signal.signal(signal.SIGALRM, _timedOut)
    signal.alarm(max(1, int(args.timeout)))
    try:
        paths = writePKI(directory)
        backendPort = processes.startBackend(30)
        maxConnections = max(args.concurrent + 100, 1000)
        port = processes.startProxy(proxyConfig(paths, backendPort, maxConnections), 30)
        assert processes.proxy is not None
        pid = processes.proxy.pid
        context = clientContext(paths)
        print(f"soak: seed {seed}, proxy pid {pid} on 127.0.0.1:{port}, backend :{backendPort}, work in {directory}", flush=True)

        warm = asyncio.run(runSequential(args.warmup, port, context, rng, args.max_payload, args.connection_timeout))
        time.sleep(0.5)
        baselineFDs = openDescriptors(pid)
        baselineRSS = residentKiB(pid)
        baselineCPU = cpuSeconds(pid)
        print(f"baseline: {baselineFDs} fds, RSS {baselineRSS / 1024:.1f} MiB (after {warm.completed} warm-up connections)", flush=True)

        problems: list[str] = []
        failures = len(warm.failures)

        def checkDescriptors(when: str) -> int:
            count = _settle(pid, baselineFDs, args.fd_slack, 30)
            if count > baselineFDs + args.fd_slack:
                problems.append(f"descriptors leaked {when}: {count} open, baseline {baselineFDs}")
            return count

        # Sequential, in two halves: memory that keeps growing in the second
        # half (after caches and allocator pools have filled) is a leak.
        halves = (args.sequential // 2, args.sequential - args.sequential // 2)
        sequential = Results()
        rssAfter = []
        t = time.monotonic()
        for half in halves:
            part = asyncio.run(runSequential(half, port, context, rng, args.max_payload, args.connection_timeout))
            sequential.merge(part)
            checkDescriptors("after sequential connections")
            rssAfter.append(residentKiB(pid))
        _report("sequential", sequential, args.sequential, time.monotonic() - t)
        growth = rssAfter[1] - rssAfter[0]
        allowed = args.rss_slack * 1024 + args.rss_per_connection * halves[1]
        print(
            f"  RSS {baselineRSS / 1024:.1f} -> {rssAfter[0] / 1024:.1f} (half) -> {rssAfter[1] / 1024:.1f} MiB;"
            f" second half +{growth / 1024:.1f} MiB ({growth / max(1, halves[1]) * 1024:.0f} B/connection,"
            f" allowed {allowed / 1024:.1f} MiB)",
            flush=True,
        )
        if growth > allowed:
            problems.append(
                f"RSS grew by {growth / 1024:.1f} MiB over the last {halves[1]} sequential connections"
                f" (allowed {allowed / 1024:.1f})"
            )

        # Concurrent, in rounds: the first sets the high-water mark of the
        # buffers; the next ones must not go beyond it.
        concurrent = Results()
        rssRounds = []
        t = time.monotonic()
        for _ in range(args.rounds):
            part = asyncio.run(runConcurrent(args.concurrent, port, context, rng, args.max_payload, args.connection_timeout))
            concurrent.merge(part)
            checkDescriptors("after concurrent connections")
            rssRounds.append(residentKiB(pid))
        _report(f"concurrent ({args.rounds} x {args.concurrent})", concurrent, args.rounds * args.concurrent, time.monotonic() - t)
        growth = rssRounds[-1] - rssRounds[0]
        print(
            f"  RSS after each round: {', '.join(f'{r / 1024:.1f}' for r in rssRounds)} MiB;"
            f" growth after the first +{growth / 1024:.1f} MiB (allowed {args.rss_slack:.1f})",
            flush=True,
        )
        if growth > args.rss_slack * 1024:
            problems.append(f"RSS grew by {growth / 1024:.1f} MiB after the first concurrent round")

        finalFDs = openDescriptors(pid)
        finalRSS = residentKiB(pid)
        print(
            f"end: {finalFDs} fds (baseline {baselineFDs}), RSS {finalRSS / 1024:.1f} MiB"
            f" (baseline {baselineRSS / 1024:.1f}), proxy CPU {cpuSeconds(pid) - baselineCPU:.1f}s",
            flush=True,
        )
        failures += len(sequential.failures) + len(concurrent.failures)
        if failures:
            problems.insert(0, f"{failures} connection(s) failed")
        if sequential.completed != args.sequential or concurrent.completed != args.rounds * args.concurrent:
            problems.insert(0, "not every connection completed intact")
        if processes.proxy.poll() is not None:
            problems.append(f"the proxy exited with status {processes.proxy.returncode}")
        print(f"soak: {'FAILED: ' + '; '.join(problems) if problems else 'OK'} in {time.monotonic() - started:.1f}s", flush=True)
        return 1 if problems else 0
    except (RuntimeError, OSError) as e:
        print(f"soak: could not run: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        signal.alarm(0)
        processes.stop()
        if args.keep is None:
            shutil.rmtree(directory, ignore_errors=True)


def _timedOut(signum: int, frame: Any) -> None:
    print("soak: FAILED: time limit reached", flush=True)
    raise SystemExit(1)


if __name__ == "__main__":
    sys.exit(main())
