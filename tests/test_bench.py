# -*- test-case-name: tests.test_bench -*-
"""
A smoke run of the benchmark (C{bench/run.py --quick}) so that it cannot rot:
tiny counts and windows, mtlsproxy and the direct baseline only, well under
a minute.  The figures are not checked (the machine may be busy), only that
every test ran, the correctness gates passed and the results are complete.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchSmokeTests(SynchronousTestCase):
    """
    C{bench/run.py --quick}.
    """

    def test_quickRun(self) -> None:
        """
        When the benchmark runs with tiny counts, mtlsproxy passes the
        correctness gates and every test reports figures without errors.
        """
        out = os.path.join(tempfile.mkdtemp(prefix="mtlsbench-test-"), "results.json")
        done = subprocess.run(
            [
                sys.executable,
                os.path.join(REPO, "bench", "run.py"),
                "--quick",
                "--proxies",
                "mtlsproxy,direct",
                "--tests",
                "tlscost,handshakes,resumed,bulk,latency,idle",
                "--json",
                out,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stdout[-3000:] + done.stderr[-3000:])
        with open(out) as f:
            results = json.load(f)
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
        self.assertIn("full mTLS handshakes/s", done.stdout)
