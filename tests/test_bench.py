# -*- test-case-name: tests.test_bench -*-
"""
A smoke run of the benchmark (C{bench/run.py --quick}) so that it cannot rot:
tiny counts and windows, mtlsproxy and the direct baseline only, well under
a minute; and the naive Twisted forwarder's handshake test.  The figures are
not checked (the machine may be busy), only that every test ran, the
correctness gates passed and the results are complete.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quickRun(testCase: SynchronousTestCase, *arguments: str) -> tuple[dict[str, Any], str]:
    """
    Run C{bench/run.py --quick} with C{arguments}; its JSON results and standard output.
    """
    out = os.path.join(tempfile.mkdtemp(prefix="mtlsbench-test-"), "results.json")
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "run.py"), "--quick", *arguments, "--json", out],
        capture_output=True,
        text=True,
        timeout=120,
    )
    testCase.assertEqual(done.returncode, 0, done.stdout[-3000:] + done.stderr[-3000:])
    with open(out) as f:
        return json.load(f), done.stdout


class BenchSmokeTests(SynchronousTestCase):
    """
    C{bench/run.py --quick}.
    """

    def test_quickRun(self) -> None:
        """
        When the benchmark runs with tiny counts, mtlsproxy passes the
        correctness gates and every test reports figures without errors.
        """
        results, stdout = quickRun(
            self, "--proxies", "mtlsproxy,direct", "--tests", "tlscost,handshakes,resumed,bulk,latency,idle"
        )
        ours = results["proxies"]["mtlsproxy"]
        self.assertTrue(ours["gates"]["passed"], ours["gates"])
        self.assertTrue(ours["gates"]["revokedIntermediateRejected"], ours["gates"])
        for name in ("handshakes", "resumed", "bulk.up1", "bulk.up8", "bulk.down1", "bulk.down8"):
            self.assertNotIn("failed", ours[name], name)
            self.assertEqual(ours[name]["errors"], 0, (name, ours[name]))
        self.assertGreater(ours["handshakes"]["completed"], 0)
        self.assertGreater(ours["handshakes"]["perProxyCPUSecond"], 0)
        self.assertGreater(ours["resumed"]["resumed"], 0)
        self.assertGreater(ours["bulk.up1"]["MBps"], 0)
        self.assertGreater(ours["latency"]["samples"], 0)
        self.assertIsNotNone(ours["latency"]["p99ms"])
        self.assertEqual(ours["idle"]["open"], 50)
        self.assertGreater(results["proxies"]["direct"]["latency"]["samples"], 0)
        self.assertGreater(results["tlscost"]["pyopenssl"]["handshakesPerCPUSecond"], 0)
        self.assertIn("full mTLS handshakes/s", stdout)
        # The handshake split (bench/probe): the time inside do_handshake
        # and the rest, per handshake, for both handshake tests.
        for name in ("handshakes", "resumed"):
            self.assertGreater(ours[name]["opensslUsPerHandshake"], 0, (name, ours[name]))
            self.assertGreater(ours[name]["restUsPerHandshake"], 0, (name, ours[name]))
            self.assertGreaterEqual(ours[name]["doHandshakeCallsPerHandshake"], 1, (name, ours[name]))
        self.assertIn("in OpenSSL, us/handshake", stdout)
        self.assertNotIn("opensslUsPerHandshake", ours["bulk.up1"])

    def test_naive(self) -> None:
        """
        The naive Twisted forwarder (C{bench/naive.py}) passes the same
        correctness gates, refusing the revoked clients, and its handshakes
        are measured and split like mtlsproxy's.
        """
        results, stdout = quickRun(self, "--proxies", "naive", "--tests", "handshakes")
        naive = results["proxies"]["naive"]
        self.assertTrue(naive["gates"]["passed"], naive["gates"])
        self.assertTrue(naive["gates"]["revokedIntermediateRejected"], naive["gates"])
        self.assertEqual(naive["handshakes"]["errors"], 0, naive["handshakes"])
        self.assertGreater(naive["handshakes"]["completed"], 0)
        self.assertGreater(naive["handshakes"]["opensslUsPerHandshake"], 0)
        self.assertIn("not a secure proxy", stdout)


    def test_peersAndScaling(self) -> None:
        """
        HAProxy and stunnel (which C{scripts/test.sh} installs) run with
        the same mTLS job: both pass the correctness gates (a revoked
        client refused, a valid one served; a client under a revoked
        intermediate is refused by HAProxy and reported as stunnel's
        caveat), their handshakes are measured, the table gives mtlsproxy's
        ratio to HAProxy, and the scaling test measures 1 and 2 workers.
        """
        results, stdout = quickRun(
            self, "--proxies", "mtlsproxy,haproxy,stunnel", "--tests", "handshakes,scaling"
        )
        for name in ("haproxy", "stunnel"):
            peer = results["proxies"][name]
            self.assertNotIn("missing", peer, peer)
            self.assertTrue(peer["gates"]["passed"], (name, peer["gates"]))
            self.assertTrue(peer["gates"]["revokedRejected"], (name, peer["gates"]))
            self.assertEqual(peer["handshakes"]["errors"], 0, (name, peer["handshakes"]))
            self.assertGreater(peer["handshakes"]["completed"], 0, name)
        # HAProxy checks the CRLs of the whole chain as we do; stunnel only
        # the leaf's, which the table reports as a caveat.
        self.assertTrue(results["proxies"]["haproxy"]["gates"]["revokedIntermediateRejected"])
        self.assertFalse(results["proxies"]["stunnel"]["gates"]["revokedIntermediateRejected"])
        self.assertIn("stunnel: correctness gates passed; CAVEAT: a client under a revoked intermediate", stdout)
        self.assertRegex(stdout, r"full mTLS handshakes/s .*\d+\.\d\dx")
        scaling = results["scaling"]
        self.assertEqual(sorted(scaling), ["workers1", "workers2"], scaling)
        for key, value in scaling.items():
            self.assertGreater(value.get("rate", 0), 0, (key, value))

    def test_clientLimitFlagged(self) -> None:
        """
        When the load generator's core was busy during the handshake test,
        the table says the result is the client's limit, not the proxy's.
        """
        spec = importlib.util.spec_from_file_location("bench_run", os.path.join(REPO, "bench", "run.py"))
        assert spec is not None and spec.loader is not None
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        handshakes = {"rate": 500.0, "perProxyCPUSecond": 900.0, "completed": 500, "errors": 0,
                      "clientCoreBusy": 0.97, "clientCeiling": 515.0}
        results = {"proxies": {"mtlsproxy": {"gates": {"passed": True, "revokedIntermediateRejected": True},
                                             "handshakes": handshakes}},
                   "verdict": {}}
        text = bench.table(results)
        self.assertIn("mtlsproxy: handshakes limited by the load generator's core (client ceiling ~515/s)", text)
        handshakes["clientCoreBusy"] = 0.5
        self.assertNotIn("limited by the load generator", bench.table(results))


class ConfigurationTests(SynchronousTestCase):
    """
    The configuration C{bench/run.py} writes for mtlsproxy.
    """

    def setUp(self) -> None:
        spec = importlib.util.spec_from_file_location("bench_run", os.path.join(REPO, "bench", "run.py"))
        assert spec is not None and spec.loader is not None
        self.bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.bench)

    def test_sessionTickets(self) -> None:
        """
        Every listener says C{session_tickets} explicitly: C{true} (the
        product's default) unless C{--stateful-sessions}; C{--session-tickets}
        is still accepted and changes nothing.
        """
        paths = {"ca": "ca.pem", "crls": "crls.pem", "serverChain": "chain.pem", "serverKey": "key.pem"}
        routes = {"echo": (1, 2), "sink": (3, 4)}
        self.assertEqual(self.bench.mtlsproxyConfig(paths, routes).count("session_tickets = true"), 2)
        self.assertEqual(
            self.bench.mtlsproxyConfig(paths, routes, sessionTickets=False).count("session_tickets = false"), 2
        )
        self.assertFalse(self.bench.parseArgs([]).statefulSessions)
        self.assertFalse(self.bench.parseArgs(["--session-tickets"]).statefulSessions)
        self.assertTrue(self.bench.parseArgs(["--stateful-sessions"]).statefulSessions)
        self.assertIn("naive", self.bench.parseArgs([]).proxies)
