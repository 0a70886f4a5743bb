"""
Helpers for the robustness tests (C{tests.test_hostile}, C{tests.test_faults},
C{tests.test_tlsgrade}): the proxy process's figures from C{/proc}, its whole
log (rotated files included), a proxy started with resource limits, and
a few backends that misbehave on purpose.

Everything talks only to 127.0.0.1 and every wait is bounded.
"""

from __future__ import annotations

import glob
import os
import re
import resource
import socket
import struct
import subprocess
import threading
import time
from typing import Callable, Optional

from OpenSSL import SSL

from .harness import BIN, DemoPKI, EchoBackend, ProxyProcess, childSignals, clientContext, tlsConfig, tlsExchange


def openDescriptors(pid: int) -> int:
    """
    How many file descriptors process C{pid} has open.
    """
    return len(os.listdir(f"/proc/{pid}/fd"))


def socketDescriptors(pid: int) -> int:
    """
    How many of process C{pid}'s descriptors are sockets.
    """
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


def cpuSeconds(pid: int) -> float:
    """
    User plus system CPU time process C{pid} has used.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def residentKiB(pid: int) -> int:
    """
    The resident set size of process C{pid}, in KiB.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def fullLog(proxy: ProxyProcess) -> str:
    """
    The proxy's whole log: twistd rotates its log file every megabyte
    (C{mtlsproxy.log.1} is the newest rotated one).
    """
    parts = []
    rotated = glob.glob(proxy.logfile + ".*")
    for path in sorted(rotated, key=lambda p: -int(p.rsplit(".", 1)[1]) if p.rsplit(".", 1)[1].isdigit() else 0):
        with open(path, errors="replace") as f:
            parts.append(f.read())
    parts.append(proxy.log())
    return "".join(parts)


def waitUntil(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """
    Poll C{predicate} until it is true or C{timeout} seconds have passed.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def quietDescriptors(pid: int, quiet: float = 0.5, timeout: float = 10.0) -> int:
    """
    How many descriptors process C{pid} has once the count has not changed
    for C{quiet} seconds (or after C{timeout}): a baseline that does not
    include a connection still closing (a status request, a health check).
    """
    deadline = time.monotonic() + timeout
    count = openDescriptors(pid)
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = openDescriptors(pid)
        if now != count:
            count, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return count


def settledDescriptors(pid: int, baseline: int, timeout: float = 20.0) -> int:
    """
    Wait until process C{pid} has no more descriptors than C{baseline}, or
    C{timeout}; return how many it has.  When it still has more, what they
    are (and the process's TCP table) is written to standard error, so a
    failure in CI says which descriptors stayed open.
    """
    waitUntil(lambda: openDescriptors(pid) <= baseline, timeout, 0.1)
    if openDescriptors(pid) > baseline:
        import sys
        for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
            try:
                print("open descriptor", fd, os.readlink(f"/proc/{pid}/fd/{fd}"), file=sys.stderr)
            except OSError:
                pass
        try:
            print(open(f"/proc/{pid}/net/tcp").read(), file=sys.stderr)
        except OSError:
            pass
    return openDescriptors(pid)


def accessLines(log: str, reason: Optional[str] = None, port: Optional[int] = None) -> list[str]:
    """
    The access log lines of C{log}, optionally only those with
    C{close_reason} C{reason} and from client port C{port}.
    """
    lines = [line for line in log.splitlines() if "[mtlsproxy.access#" in line]
    if reason is not None:
        lines = [line for line in lines if re.search(rf" -> \S+ {re.escape(reason)} ", line)]
    if port is not None:
        lines = [line for line in lines if f" 127.0.0.1:{port} -> " in line]
    return lines


def withBacklog(config: str, backlog: int = 4096) -> str:
    """
    The configuration from L{tlsConfig} with a larger listen backlog, for
    connection storms.
    """
    return config.replace(
        'endpoint = "tcp:0:interface=127.0.0.1"',
        f'endpoint = "tcp:0:interface=127.0.0.1:backlog={backlog}"',
    )


class LimitedProxyProcess(ProxyProcess):
    """
    A L{ProxyProcess} whose twistd runs with C{RLIMIT_NOFILE} set to
    C{fileLimit} (soft and hard: it cannot raise it), in the child only.
    """

    fileLimit: Optional[int] = None

    def start(self, listeners: int = 1, timeout: float = 20.0,
              env: Optional[dict[str, str]] = None) -> "LimitedProxyProcess":
        limit = self.fileLimit
        signals = childSignals()

        def lower() -> None:
            if signals is not None:
                signals()
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        self.process = subprocess.Popen(
            self.command(),
            cwd=self.directory,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=lower,
        )
        deadline = time.monotonic() + timeout
        pattern = re.compile(r"Listener (\S+) \(\w+\) listening on [\d.:\[\]a-f]*:(\d+)")
        while time.monotonic() < deadline:
            self.ports = {m.group(1): int(m.group(2)) for m in pattern.finditer(self.log())}
            if len(self.ports) >= listeners:
                return self
            if self.process.poll() is not None:
                out = self.process.stdout.read().decode() if self.process.stdout else ""
                raise RuntimeError(f"twistd exited {self.process.returncode}: {out}\n{self.log()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"proxy did not start listening:\n{self.log()}")


class ScriptedBackend:
    """
    A TCP backend on 127.0.0.1 whose connections are handled by C{handle}
    in a thread each; the sockets it accepted are in C{connections}.
    """

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self._handle = handle
        self.connections: list[socket.socket] = []
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._stopped = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self._handle(conn)
        except OSError:
            pass

    def stop(self) -> None:
        self._stopped = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        for conn in self.connections:
            try:
                conn.close()
            except OSError:
                pass


def reset(conn: socket.socket) -> None:
    """
    Close C{conn} with a TCP RST (SO_LINGER with a zero timeout).
    """
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def connectTLS(port: int, ctx: SSL.Context, timeout: float = 10.0) -> tuple[socket.socket, SSL.Connection]:
    """
    A blocking pyOpenSSL client connection with its handshake done.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(None)
    conn = SSL.Connection(ctx, sock)
    conn.set_tlsext_host_name(b"localhost")
    conn.set_connect_state()
    sock.settimeout(timeout)
    _retry(conn.do_handshake, timeout)
    return sock, conn


def _retry(call: Callable[[], object], timeout: float) -> object:
    """
    Call a pyOpenSSL operation on a socket with a timeout, retrying on
    C{WantRead}/C{WantWrite} until C{timeout}.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except (SSL.WantReadError, SSL.WantWriteError):
            if time.monotonic() > deadline:
                raise TimeoutError("TLS operation did not finish")
            time.sleep(0.005)


def echoRoundTrip(port: int, ctx: SSL.Context, payload: bytes, timeout: float = 15.0) -> bytes:
    """
    Connect with TLS, send C{payload} and read as many bytes back (from an
    echo backend), then close.  Unlike L{tlsExchange} it does not use
    C{select()}, so it works in a process with more than 1,024 descriptors
    open.
    """
    sock, conn = connectTLS(port, ctx, timeout)
    try:
        _retry(lambda: conn.sendall(payload), timeout)
        received = b""
        deadline = time.monotonic() + timeout
        while len(received) < len(payload):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(received)} of {len(payload)} bytes echoed")
            try:
                data = conn.recv(65536)
            except SSL.WantReadError:
                time.sleep(0.002)
                continue
            if not data:
                break
            received += data
        return received
    finally:
        sock.close()


def readUntilClosed(conn: SSL.Connection, timeout: float) -> tuple[bytes, str]:
    """
    Read from a TLS connection until it ends; return what was read and how
    it ended: C{"close_notify"}, C{"eof"} (TCP FIN without close_notify),
    C{"reset"} or C{"timeout"}.
    """
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = conn.recv(65536)
        except SSL.WantReadError:
            time.sleep(0.005)
            continue
        except SSL.ZeroReturnError:
            return b"".join(chunks), "close_notify"
        except SSL.SysCallError as e:
            if e.args[0] in (-1, 0):
                return b"".join(chunks), "eof"
            return b"".join(chunks), "reset"
        except (ConnectionResetError, BrokenPipeError):
            return b"".join(chunks), "reset"
        except socket.timeout:
            continue
        except SSL.Error:
            return b"".join(chunks), "reset"
        if not data:
            return b"".join(chunks), "eof"
        chunks.append(data)
    return b"".join(chunks), "timeout"


def rawClosed(sock: socket.socket, timeout: float) -> Optional[float]:
    """
    Read and drop from a plain socket until the peer closes it (EOF or
    reset); return after how many seconds, or L{None} if it stayed open for
    C{timeout}.
    """
    started = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - started < timeout:
        try:
            if not sock.recv(65536):
                return time.monotonic() - started
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic() - started
    return None


__all__ = [
    "DemoPKI",
    "EchoBackend",
    "LimitedProxyProcess",
    "ProxyProcess",
    "ScriptedBackend",
    "accessLines",
    "clientContext",
    "connectTLS",
    "echoRoundTrip",
    "cpuSeconds",
    "fullLog",
    "openDescriptors",
    "rawClosed",
    "readUntilClosed",
    "reset",
    "residentKiB",
    "settledDescriptors",
    "socketDescriptors",
    "tlsConfig",
    "tlsExchange",
    "waitUntil",
    "withBacklog",
]
