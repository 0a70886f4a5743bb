# -*- test-case-name: tests.test_bench -*-
"""
The benchmark's load generator: one process, one non-blocking event loop
(epoll, or select where sub-millisecond timers matter), pyOpenSSL clients.

C{bench/run.py} starts it pinned to the load generator's core with one job as
a JSON argument and reads one JSON result from its standard output.  Jobs:

  - C{handshakes}: keep C{concurrency} connections in flight; each connects,
    completes a TLS handshake (a full one, or resumed with the session of the
    previous connection when C{resume}), writes a 64-byte message, reads it
    back, sends close_notify and waits for the server to close.  Counts the
    connections completed between C{startAt} and C{endAt}.
  - C{bulk}: C{streams} connections that each write (C{"up"}, to the sink) or
    read (C{"down"}, from the source) as fast as they can; counts the bytes
    moved between C{startAt} and C{endAt}.
  - C{latency}: C{connections} persistent connections; from C{startAt} a
    1 KiB message is sent every 1/C{rate} seconds, round robin over the
    connections, and the time until its echo has fully arrived is recorded
    (from the moment the message was I{due}, so a stalled connection counts
    its queueing: no coordinated omission).
  - C{idle}: open C{connections} connections, each after one 64-byte echo,
    print C{{"open": n}} and hold them until a line arrives on standard
    input (or C{holdFor} seconds pass).

With C{"tls": null} the same jobs run over plain TCP (the "direct" baseline).
Every job reports the CPU seconds this process used inside its window, so the
benchmark can say when the load generator, not the proxy, was the limit.

Clients present their certificate chain and offer the X25519 group only (the
same key exchange for every proxy, whatever its OpenSSL offers by default);
they do not verify the server, which is the proxy's cost that matters here:
the correctness gates in C{bench/run.py} check both directions separately.
"""

from __future__ import annotations

import collections
import errno
import json
import resource
import select
import socket
import sys
import time
from typing import Any, Optional

from OpenSSL import SSL

_MODE_ACCEPT_MOVING_WRITE_BUFFER = 0x2

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR | select.EPOLLHUP

MESSAGE = b"m" * 64
"""What each connection of the handshake test sends and reads back."""

CHUNK = b"\x5a" * (256 * 1024)
"""What a bulk upload writes, over and over."""


def cpuSeconds() -> float:
    """
    User plus system CPU seconds used by this process so far.
    """
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def clientContext(tls: Optional[dict[str, Any]]) -> Optional[SSL.Context]:
    """
    The client context for a job's C{tls} settings, or L{None} for TCP.

    C{tls} holds C{chain} and C{key} (PEM files), optionally C{groups}
    (default C{"X25519"}) and C{maxVersion} (C{"1.2"} to pin TLS 1.2).
    """
    if tls is None:
        return None
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    if tls.get("maxVersion") == "1.2":
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    ctx.use_certificate_chain_file(tls["chain"])
    ctx.use_privatekey_file(tls["key"])
    ctx.set_verify(SSL.VERIFY_NONE)
    ctx.set_mode(_MODE_ACCEPT_MOVING_WRITE_BUFFER)
    groups = tls.get("groups", "X25519")
    if groups:
        try:
            from OpenSSL._util import lib

            lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode("ascii"))
        except (ImportError, AttributeError):
            pass
    return ctx


def _sessionReused(connection: SSL.Connection) -> bool:
    try:
        from OpenSSL._util import lib

        return bool(lib.SSL_session_reused(connection._ssl))
    except (ImportError, AttributeError):
        return False


def _newSocket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    err = sock.connect_ex(("127.0.0.1", port))
    if err not in (0, errno.EINPROGRESS):
        sock.close()
        raise OSError(err, "connect failed")
    return sock


def connectAndHandshake(port: int, ctx: Optional[SSL.Context], timeout: float = 10.0) -> tuple[socket.socket, Any]:
    """
    A connected non-blocking socket and, with C{ctx}, its completed TLS
    connection (waiting at most C{timeout} seconds).
    """
    deadline = time.monotonic() + timeout
    sock = _newSocket(port)
    select.select([], [sock], [], timeout)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        sock.close()
        raise OSError(err, "connect failed")
    if ctx is None:
        return sock, None
    tls = SSL.Connection(ctx, sock)
    tls.set_connect_state()
    while True:
        try:
            tls.do_handshake()
            return sock, tls
        except SSL.WantReadError:
            wait: tuple[list[Any], list[Any]] = ([sock], [])
        except SSL.WantWriteError:
            wait = ([], [sock])
        if time.monotonic() > deadline:
            sock.close()
            raise TimeoutError("TLS handshake did not complete")
        select.select(wait[0], wait[1], [], 0.1)


class _Errors:
    """
    Counts failures by kind, keeping the first message of each.
    """

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.first: dict[str, str] = {}

    def add(self, kind: str, detail: object) -> None:
        self.counts[kind] += 1
        self.first.setdefault(kind, str(detail)[:200])

    def report(self) -> dict[str, Any]:
        return {"errors": sum(self.counts.values()), "errorKinds": dict(self.counts), "errorFirst": self.first}


# -- handshakes ---------------------------------------------------------------

_CONNECTING, _HANDSHAKE, _SEND, _RECV, _DRAIN, _IDLE = range(6)


class _Conn:
    __slots__ = ("sock", "fd", "tls", "state", "got", "deadline", "events")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.tls: Any = None
        self.state = _CONNECTING
        self.got = 0
        self.deadline = deadline
        self.events = EPOLLOUT


class _HandshakeRunner:
    """
    The C{handshakes} and C{idle} jobs: connections that each handshake and
    echo one message, then close (C{handshakes}) or stay open (C{idle}).
    """

    def __init__(self, job: dict[str, Any], hold: bool) -> None:
        self.port: int = job["port"]
        self.ctx = clientContext(job.get("tls"))
        self.resume = bool(job.get("resume"))
        self.hold = hold
        self.timeout = float(job.get("timeout", 10.0))
        self.poller = select.epoll()
        self.conns: dict[int, _Conn] = {}
        self.session: Any = None
        self.errors = _Errors()
        self.completed = 0
        self.resumed = 0
        self.held: list[_Conn] = []
        self.counting = False

    def start(self) -> None:
        try:
            sock = _newSocket(self.port)
        except OSError as e:
            self.errors.add("connect", e)
            return
        conn = _Conn(sock, time.monotonic() + self.timeout)
        self.conns[conn.fd] = conn
        self.poller.register(conn.fd, EPOLLOUT)

    def _want(self, conn: _Conn, events: int) -> None:
        if conn.events != events:
            conn.events = events
            self.poller.modify(conn.fd, events)

    def _finish(self, conn: _Conn, error: Optional[tuple[str, object]] = None) -> None:
        del self.conns[conn.fd]
        self.poller.unregister(conn.fd)
        if error is not None:
            conn.sock.close()
            self.errors.add(*error)
            return
        if self.hold:
            conn.state = _IDLE
            self.held.append(conn)
            self.completed += 1
            return
        conn.sock.close()
        if self.counting:
            self.completed += 1
            if self.resume and conn.tls is not None and _sessionReused(conn.tls):
                self.resumed += 1

    def step(self, conn: _Conn, events: int) -> None:
        state = conn.state
        tls = conn.tls
        try:
            if state == _CONNECTING:
                err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._finish(conn, ("connect", OSError(err, "connect")))
                    return
                if self.ctx is None:
                    state = _SEND
                else:
                    tls = conn.tls = SSL.Connection(self.ctx, conn.sock)
                    tls.set_connect_state()
                    if self.resume and self.session is not None:
                        tls.set_session(self.session)
                    state = _HANDSHAKE
            if state == _HANDSHAKE:
                conn.state = state
                tls.do_handshake()
                state = _SEND
            if state == _SEND:
                conn.state = state
                (tls or conn.sock).send(MESSAGE)
                state = _RECV
            if state == _RECV:
                conn.state = state
                while conn.got < len(MESSAGE):
                    data = (tls or conn.sock).recv(4096)
                    if not data:
                        self._finish(conn, ("eof", "closed before the echo"))
                        return
                    conn.got += len(data)
                if self.resume and tls is not None:
                    self.session = tls.get_session()
                if self.hold:
                    self._finish(conn)
                    return
                if tls is not None:
                    tls.shutdown()
                else:
                    conn.sock.shutdown(socket.SHUT_WR)
                state = _DRAIN
            if state == _DRAIN:
                conn.state = state
                while True:
                    if not (tls or conn.sock).recv(4096):
                        break
                self._finish(conn)
                return
        except SSL.WantReadError:
            conn.state = state
            self._want(conn, EPOLLIN)
        except SSL.WantWriteError:
            conn.state = state
            self._want(conn, EPOLLOUT)
        except BlockingIOError:
            conn.state = state
            self._want(conn, EPOLLIN)
        except SSL.ZeroReturnError:
            if state == _DRAIN:
                self._finish(conn)
            else:
                self._finish(conn, ("eof", f"close_notify in state {state}"))
        except SSL.SysCallError as e:
            if state == _DRAIN:
                self._finish(conn)
            else:
                self._finish(conn, ("syscall", e))
        except (SSL.Error, OSError) as e:
            if state == _DRAIN:
                self._finish(conn)
            else:
                self._finish(conn, ("tls" if isinstance(e, SSL.Error) else "os", e))

    def expire(self, now: float) -> None:
        for conn in [c for c in self.conns.values() if c.deadline < now]:
            self._finish(conn, ("timeout", f"state {conn.state}"))

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        concurrency = int(job.get("concurrency", 32))
        startAt = float(job.get("startAt", time.monotonic()))
        endAt = float(job["endAt"])
        limit = job.get("count")
        cpuStart = cpuStop = None
        started = 0
        nextExpiry = time.monotonic() + 0.5
        conns = self.conns
        poll = self.poller.poll
        while True:
            now = time.monotonic()
            if not self.counting and now >= startAt:
                self.counting = True
                cpuStart = cpuSeconds()
                windowStart = now
            if now >= endAt:
                break
            while len(conns) < concurrency and (limit is None or started < limit):
                started += 1
                self.start()
            if not conns:
                break
            for fd, events in poll(0.05):
                conn = conns.get(fd)
                if conn is not None:
                    self.step(conn, events)
            if now > nextExpiry:
                self.expire(now)
                nextExpiry = now + 0.5
        windowEnd = time.monotonic()
        cpuStop = cpuSeconds()
        if cpuStart is None:
            cpuStart, windowStart = cpuStop, windowEnd
        for conn in list(conns.values()):
            conn.sock.close()
        seconds = max(windowEnd - windowStart, 1e-9)
        return {
            "completed": self.completed,
            "resumed": self.resumed,
            "seconds": seconds,
            "rate": self.completed / seconds,
            "cpu": cpuStop - cpuStart,
            **self.errors.report(),
        }


def runHandshakes(job: dict[str, Any]) -> dict[str, Any]:
    """
    The C{handshakes} job (see the module docstring).
    """
    return _HandshakeRunner(job, hold=False).run(job)


def runIdle(job: dict[str, Any]) -> dict[str, Any]:
    """
    Open C{connections} connections (C{concurrency} at a time), each after
    one echo, report them, and hold them until told.
    """
    runner = _HandshakeRunner(job, hold=True)
    total = int(job["connections"])
    deadline = time.monotonic() + float(job.get("openWithin", 120.0))
    result = runner.run(
        {"concurrency": job.get("concurrency", 64), "count": total, "endAt": deadline}
    )
    print(json.dumps({"open": len(runner.held), **runner.errors.report()}), flush=True)
    holdUntil = time.monotonic() + float(job.get("holdFor", 120.0))
    while time.monotonic() < holdUntil:
        readable, _, _ = select.select([sys.stdin], [], [], 0.2)
        if readable:
            sys.stdin.readline()
            break
    for conn in runner.held:
        conn.sock.close()
    result["open"] = len(runner.held)
    return result


# -- bulk ------------------------------------------------------------------------


class _RawTLS:
    """
    Bulk I/O on a pyOpenSSL connection through OpenSSL's C{SSL_write} /
    C{SSL_read} directly (the calls pyOpenSSL makes, without a Python
    object and an exception per 16 KiB record), so that the load
    generator's core is not what limits a bulk test.  Whole 256 KiB writes
    (partial writes off); reads into one buffer, counted, never copied.
    """

    _WANT = (2, 3)  # SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE
    _ZERO_RETURN = 6

    def __init__(self) -> None:
        try:
            from OpenSSL._util import ffi, lib
        except ImportError:
            self.available = False
            return
        self.available = hasattr(lib, "SSL_write") and hasattr(lib, "SSL_get_error")
        self.lib = lib
        self.size = len(CHUNK)
        self.out = ffi.new("char[]", CHUNK)
        self.into = ffi.new("char[]", self.size)
        self.prepared: set[int] = set()

    def _prepare(self, tls: SSL.Connection) -> Any:
        ssl = tls._ssl
        key = id(tls)
        if key not in self.prepared:
            self.prepared.add(key)
            self.lib.SSL_clear_mode(ssl, 1)  # SSL_MODE_ENABLE_PARTIAL_WRITE
        return ssl

    def _problem(self, ssl: Any, result: int) -> None:
        error = self.lib.SSL_get_error(ssl, result)
        if error in self._WANT:
            return
        if error == self._ZERO_RETURN:
            raise EOFError("close_notify")
        raise SSL.Error(f"SSL error {error}")

    def send(self, tls: SSL.Connection) -> int:
        ssl = self._prepare(tls)
        total = 0
        for _ in range(8):
            result = self.lib.SSL_write(ssl, self.out, self.size)
            if result <= 0:
                self._problem(ssl, result)
                break
            total += result
        return total

    def receive(self, tls: SSL.Connection) -> int:
        ssl = tls._ssl
        total = 0
        for _ in range(256):
            result = self.lib.SSL_read(ssl, self.into, self.size)
            if result <= 0:
                self._problem(ssl, result)
                break
            total += result
        return total


def runBulk(job: dict[str, Any]) -> dict[str, Any]:
    """
    C{streams} connections writing to the sink (C{"up"}) or reading from the
    source (C{"down"}) until C{endAt}; bytes counted from C{startAt}.
    """
    ctx = clientContext(job.get("tls"))
    up = job["direction"] == "up"
    startAt = float(job["startAt"])
    endAt = float(job["endAt"])
    errors = _Errors()
    poller = select.epoll()
    streams: dict[int, list[Any]] = {}  # fd -> [sock, tls, handshaking]
    for _ in range(int(job.get("streams", 1))):
        # Set-up is not measured.
        sock, tls = connectAndHandshake(job["port"], ctx)
        streams[sock.fileno()] = [sock, tls]
        poller.register(sock.fileno(), EPOLLOUT if up else EPOLLIN)
    buffer = bytearray(256 * 1024)
    fast = _RawTLS() if ctx is not None else None
    counted = 0
    counting = False
    cpuStart = windowStart = 0.0
    while True:
        now = time.monotonic()
        if not counting and now >= startAt:
            counting = True
            counted = 0
            cpuStart = cpuSeconds()
            windowStart = now
        if now >= endAt:
            break
        for fd, events in poller.poll(0.05):
            entry = streams.get(fd)
            if entry is None:
                continue
            sock, tls = entry
            try:
                if fast is not None and fast.available:
                    counted += fast.send(tls) if up else fast.receive(tls)
                elif up:
                    for _ in range(16):
                        if tls is not None:
                            n = tls.send(CHUNK)
                        else:
                            n = sock.send(CHUNK)
                        counted += n
                else:
                    for _ in range(64):
                        if tls is not None:
                            n = len(tls.recv(65536))
                        else:
                            n = sock.recv_into(buffer)
                        if not n:
                            raise EOFError("stream ended")
                        counted += n
            except (SSL.WantReadError, SSL.WantWriteError, BlockingIOError):
                pass
            except (SSL.Error, OSError, EOFError) as e:
                errors.add(type(e).__name__, e)
                poller.unregister(fd)
                del streams[fd]
                sock.close()
        if not streams:
            break
    windowEnd = time.monotonic()
    cpu = cpuSeconds() - cpuStart
    for sock, tls in streams.values():
        sock.close()
    seconds = max(windowEnd - windowStart, 1e-9)
    return {
        "bytes": counted,
        "seconds": seconds,
        "MBps": counted / seconds / 1e6,
        "cpu": cpu,
        **errors.report(),
    }


# -- latency ---------------------------------------------------------------------


def runLatency(job: dict[str, Any]) -> dict[str, Any]:
    """
    1 KiB round trips over C{connections} persistent connections at C{rate}
    per second, recorded from C{recordFrom} to C{endAt}.
    """
    ctx = clientContext(job.get("tls"))
    size = int(job.get("size", 1024))
    message = b"r" * size
    conns = []
    for _ in range(int(job.get("connections", 32))):
        sock, tls = connectAndHandshake(job["port"], ctx)
        conns.append(
            {"sock": sock, "io": tls if tls is not None else sock, "queue": collections.deque(), "due": None, "got": 0}
        )
    bySock = {c["sock"]: c for c in conns}
    errors = _Errors()
    interval = 1.0 / float(job["rate"])
    startAt = float(job["startAt"])
    recordFrom = float(job.get("recordFrom", startAt))
    endAt = float(job["endAt"])
    samples: list[float] = []
    late = 0
    index = 0
    cpuStart = None

    def send(c: dict[str, Any]) -> None:
        c["due"] = c["queue"].popleft()
        c["got"] = 0
        c["io"].send(message)

    while True:
        now = time.monotonic()
        if cpuStart is None and now >= recordFrom:
            cpuStart = cpuSeconds()
        due = startAt + index * interval
        while due <= now and due < endAt:
            c = conns[index % len(conns)]
            c["queue"].append(due)
            if c["due"] is None:
                send(c)
            else:
                late += due >= recordFrom
            index += 1
            due = startAt + index * interval
        busy = [c["sock"] for c in conns if c["due"] is not None]
        if due >= endAt and not busy:
            break
        if now > endAt + 5.0:
            errors.add("timeout", f"{len(busy)} replies missing")
            break
        timeout = max(0.0, min(due, endAt + 5.0) - time.monotonic())
        readable, _, _ = select.select(busy, [], [], timeout)
        for sock in readable:
            c = bySock[sock]
            try:
                while c["got"] < size:
                    data = c["io"].recv(65536)
                    if not data:
                        raise EOFError("closed")
                    c["got"] += len(data)
            except (SSL.WantReadError, BlockingIOError):
                continue
            except (SSL.Error, OSError, EOFError) as e:
                errors.add(type(e).__name__, e)
                return {"samples": 0, **errors.report()}
            finished = time.monotonic()
            if c["due"] >= recordFrom:
                samples.append(finished - c["due"])
            c["due"] = None
            if c["queue"]:
                send(c)
    cpu = cpuSeconds() - (cpuStart if cpuStart is not None else cpuSeconds())
    for c in conns:
        c["sock"].close()
    samples.sort()

    def pct(p: float) -> Optional[float]:
        if not samples:
            return None
        return samples[min(len(samples) - 1, int(p / 100.0 * len(samples)))] * 1000.0

    return {
        "samples": len(samples),
        "late": late,
        "p50ms": pct(50),
        "p90ms": pct(90),
        "p99ms": pct(99),
        "p999ms": pct(99.9),
        "maxms": samples[-1] * 1000.0 if samples else None,
        "cpu": cpu,
        "seconds": endAt - recordFrom,
        **errors.report(),
    }


JOBS = {
    "handshakes": runHandshakes,
    "bulk": runBulk,
    "latency": runLatency,
    "idle": runIdle,
}


def main(argv: Optional[list[str]] = None) -> None:
    """
    Run the job given as a JSON argument and print its result as JSON.
    """
    args = sys.argv[1:] if argv is None else argv
    job = json.loads(args[0])
    try:
        result = JOBS[job["job"]](job)
    except Exception as e:  # report, so the benchmark can say what went wrong
        result = {"failed": f"{type(e).__name__}: {e}"}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
