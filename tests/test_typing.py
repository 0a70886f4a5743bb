# -*- test-case-name: tests.test_typing -*-
"""
The library type-checks: mypy (with the mypy-zope plugin, configured in
C{setup.cfg}) reports no error in C{mtlsproxy/}.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from .harness import REPO


class TypingTests(SynchronousTestCase):
    """
    mypy over the library.
    """

    def test_mypyClean(self) -> None:
        """
        When mypy checks the C{mtlsproxy} package, it finds no error.
        """
        result = subprocess.run(
            [sys.executable, "-m", "mypy", "--cache-dir", os.path.abspath(self.mktemp()), "mtlsproxy"],
            capture_output=True, text=True, timeout=600, cwd=REPO,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("Success: no issues found", result.stdout)
