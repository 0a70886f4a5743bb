"""
The benchmark's handshake probe (C{bench/run.py} puts this directory on the
proxy's C{PYTHONPATH} for the handshake tests).

Python imports C{sitecustomize} at start-up.  This one does nothing unless
C{MTLSPROXY_BENCH_PROBE} names a file and this process is a twistd process
(C{twistd ...}, or mtlsproxy's worker processes, C{python -c "from
twisted.scripts.twistd import run; run()" ...}) or the benchmark's naive
forwarder (C{bench/naive.py}).  It then wraps
C{OpenSSL.SSL.Connection.do_handshake} to add up the thread CPU time spent
inside it (C{time.thread_time}, so OpenSSL's C{SSL_do_handshake} with
whatever it calls back into, such as a Python verify callback) and the number
of calls, and every L{EVERY} calls overwrites a fixed-width record::

    <calls> <seconds> <calls>

at the start of C{$MTLSPROXY_BENCH_PROBE.<pid>} (one file per process, so
worker processes can be summed).  The count is written twice so that a reader
racing a write can tell a torn record (and read again).  The cost: two
C{thread_time} calls and a Python frame per C{do_handshake} call (about
1-2 us), one C{pwrite} per L{EVERY} calls.

Another C{sitecustomize} further on C{sys.path} (the interpreter's or the
virtualenv's, if any) is run afterwards, so this one shadows nothing.
"""

from __future__ import annotations

import os
import sys

EVERY = 16
"""How many C{do_handshake} calls between two writes of the record."""

RECORD = "%20d %20.9f %20d\n"
"""The record: fixed width, so an overwrite leaves no stale tail."""


def _isProbed() -> bool:
    """
    Whether this process is one the benchmark measures: a twistd process
    (mtlsproxy or one of its workers) or C{bench/naive.py}.
    """
    argv = list(getattr(sys, "orig_argv", []) or [])
    if not argv:
        try:
            with open("/proc/self/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            return False
    for arg in argv[:3]:
        if os.path.basename(arg) in ("twistd", "naive.py") or "twisted.scripts.twistd" in arg:
            return True
    return False


def install(path: str) -> None:
    """
    Wrap C{OpenSSL.SSL.Connection.do_handshake}, writing the cumulative
    figures to C{path}.
    """
    from time import thread_time

    from OpenSSL import SSL

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    original = SSL.Connection.do_handshake
    state = [0, 0.0]  # calls, seconds

    def write() -> None:
        calls = state[0]
        os.pwrite(fd, (RECORD % (calls, state[1], calls)).encode("ascii"), 0)

    def do_handshake(self: SSL.Connection) -> None:
        start = thread_time()
        try:
            return original(self)
        finally:
            state[1] += thread_time() - start
            state[0] += 1
            if state[0] % EVERY == 0:
                write()

    do_handshake.__doc__ = original.__doc__
    do_handshake.__wrapped__ = original  # type: ignore[attr-defined]
    SSL.Connection.do_handshake = do_handshake  # type: ignore[method-assign]
    write()


def _chain() -> None:
    """
    Run the next C{sitecustomize} on C{sys.path}, if there is one.
    """
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def _main() -> None:
    path = os.environ.get("MTLSPROXY_BENCH_PROBE")
    if path and _isProbed():
        try:
            install(f"{path}.{os.getpid()}")
        except Exception as e:  # never keep the proxy from starting
            print(f"bench probe: not installed: {type(e).__name__}: {e}", file=sys.stderr)
    _chain()


_main()
