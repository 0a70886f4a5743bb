# -*- test-case-name: tests.test_cli,tests.test_config -*-
"""
The README's demo: a generated PKI, two HTTP backends that answer with their
own name, and C{twistd -n mtlsproxy} in front of them requiring client
certificates.

C{python -m mtlsproxy.demo} runs everything until interrupted;
C{python -m mtlsproxy.demo backend NAME PORT} runs one demo backend (the demo
starts two of them as child processes).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "etc", "mtlsproxy.toml")
PKI = os.path.join(ROOT, "demo", "pki")
PROXY = ("127.0.0.1", 8443)
STATUS = ("127.0.0.1", 9180)
BACKENDS = (("backend-1", 9001), ("backend-2", 9002))


def runBackend(name: str, port: int) -> None:
    """
    Serve C{hello from NAME} over plain HTTP on 127.0.0.1:PORT until killed.
    """
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class Hello(Resource):
        isLeaf = True

        def render_GET(self, request: object) -> bytes:
            return f"hello from {name}\n".encode()

    reactor.listenTCP(port, Site(Hello()), interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
    reactor.run()  # type: ignore[attr-defined]


def _waitForPort(host: str, port: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the demo; return the exit status.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["backend"]:
        runBackend(args[1], int(args[2]))
        return 0

    from . import pki

    if not all(os.path.exists(os.path.join(PKI, name)) for name in pki.DEMO_FILES):
        # A missing or half-written demo PKI (an interrupted run) is made anew.
        shutil.rmtree(PKI, ignore_errors=True)
        if pki.main(["--dir", PKI, "demo"]) != 0:
            return 1
    children: list[subprocess.Popen[bytes]] = []

    def stop(*_: object) -> None:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()

    try:
        for name, port in BACKENDS:
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", "mtlsproxy.demo", "backend", name, str(port)],
                    start_new_session=True,
                )
            )
        for name, port in BACKENDS:
            if not _waitForPort("127.0.0.1", port):
                print(f"demo: backend {name} did not start on port {port}", file=sys.stderr)
                return 1
        check = subprocess.run([_bin("mtlsproxy"), "check", "--config", CONFIG])
        if check.returncode != 0:
            return 1
        proxy = subprocess.Popen(
            [_bin("twistd"), "-n", "--pidfile=", "mtlsproxy", "--config", CONFIG],
            cwd=ROOT,
            # Own session: a Ctrl-C in the terminal reaches only the demo,
            # which then stops the proxy once (SIGTERM, graceful drain).
            start_new_session=True,
        )
        children.append(proxy)
        if not _waitForPort(*PROXY):
            print("demo: the proxy did not start", file=sys.stderr)
            return 1
        rel = os.path.relpath(PKI)
        curl = [
            "curl", "-sS",
            "--cert", os.path.join(rel, "client.crt"),
            "--key", os.path.join(rel, "client.key"),
            "--cacert", os.path.join(rel, "root.crt"),
            f"https://{PROXY[0]}:{PROXY[1]}/",
        ]
        bare = ["curl", "-sS", "--cacert", os.path.join(rel, "root.crt"), f"https://{PROXY[0]}:{PROXY[1]}/"]
        print("\n=== mtlsproxy demo is running (Ctrl-C to stop) ===")
        print("With a client certificate (mTLS required), run twice to see round robin:")
        print("    " + shlex.join(curl))
        if shutil.which("curl"):
            for _ in range(2):
                result = subprocess.run(curl, capture_output=True, text=True, timeout=15)
                print("    -> " + (result.stdout.strip() or result.stderr.strip()))
            print("Without a client certificate the handshake is refused:")
            print("    " + shlex.join(bare))
            result = subprocess.run(bare, capture_output=True, text=True, timeout=15)
            print(f"    -> exit {result.returncode}: " + (result.stderr.strip() or result.stdout.strip()))
        revoked = [part.replace("client.", "revoked-client.") for part in curl]
        print("A revoked client certificate is refused too:")
        print("    " + shlex.join(revoked))
        if shutil.which("curl"):
            result = subprocess.run(revoked, capture_output=True, text=True, timeout=15)
            print(f"    -> exit {result.returncode}: " + (result.stderr.strip() or result.stdout.strip()))
        print("Status, health checks and metrics of every worker:")
        print(f"    curl -sS http://{STATUS[0]}:{STATUS[1]}/status    (and /metrics, /readyz)")
        sys.stdout.flush()
        signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        while all(c.poll() is None for c in children):
            time.sleep(0.5)
        print("demo: a child process exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop()


if __name__ == "__main__":
    sys.exit(main())
