# -*- test-case-name: tests.test_soak -*-
"""
A scaled-down run of C{bench/soak.py}: 500 sequential and 2 x 200
concurrent mutual-TLS connections through a real C{twistd -n mtlsproxy},
every byte checked both ways, descriptors back to their baseline and memory
not growing.  (The full soak, 10,000 and 1,000, is C{python bench/soak.py}.)
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from .harness import REPO

SOAK = os.path.join(REPO, "bench", "soak.py")


class SoakTests(SynchronousTestCase):
    """
    C{bench/soak.py} with small counts.
    """

    def test_smallSoak(self) -> None:
        """
        When 500 sequential and 2 x 200 concurrent connections with random
        payloads go through the proxy, every one arrives intact both ways,
        and the proxy's descriptors and memory come back to their baseline;
        the soak says so and exits 0 within its time limit.
        """
        result = subprocess.run(
            [sys.executable, SOAK, "--sequential", "500", "--concurrent", "200", "--rounds", "2",
             "--timeout", "150"],
            capture_output=True, text=True, timeout=200, cwd=REPO,
        )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output)
        self.assertIn("sequential: 500/500 intact, 0 failed", output)
        self.assertIn("concurrent (2 x 200): 400/400 intact, 0 failed", output)
        self.assertIn("soak: OK", output)

    def test_timeLimit(self) -> None:
        """
        When the soak cannot finish within its time limit, it stops there,
        says so and exits 1, leaving no process behind.
        """
        result = subprocess.run(
            [sys.executable, SOAK, "--sequential", "100000", "--timeout", "8"],
            capture_output=True, text=True, timeout=120, cwd=REPO,
        )
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("soak: FAILED: time limit reached", result.stdout)
