# -*- test-case-name: tests.test_packaging -*-
"""
Packaging: the twistd plugin is found both from the checkout (editable
install) and from a built wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from twisted.trial.unittest import SynchronousTestCase

from .harness import BIN, REPO


class PackagingTests(SynchronousTestCase):
    """
    Tests for C{setup.cfg} and C{twisted/plugins/mtlsproxy_plugin.py}.
    """

    def test_twistdListsPlugin(self) -> None:
        """
        When C{twistd --help} runs from outside the checkout, it lists
        mtlsproxy (the editable install is seen by the plugin scan).
        """
        result = subprocess.run(
            [os.path.join(BIN, "twistd"), "--help"],
            capture_output=True, text=True, timeout=60, cwd="/",
        )
        self.assertIn("mtlsproxy", result.stdout)

    def test_wheelContainsPluginAndIsDiscovered(self) -> None:
        """
        When a wheel is built, it holds the plugin module and the package but
        no C{twisted/plugins/__init__.py} and no dropin.cache, and a Python
        that sees only the wheel's contents (not the checkout) finds the
        plugin.
        """
        out = os.path.abspath(self.mktemp())
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "-q", "-w", out, REPO],
            check=True, capture_output=True, timeout=300,
        )
        [wheel] = [f for f in os.listdir(out) if f.endswith(".whl")]
        with zipfile.ZipFile(os.path.join(out, wheel)) as z:
            names = z.namelist()
            z.extractall(os.path.join(out, "site"))
        self.assertIn("twisted/plugins/mtlsproxy_plugin.py", names)
        self.assertIn("mtlsproxy/relay.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertFalse(any(n.endswith("dropin.cache") for n in names))
        site = os.path.join(out, "site")
        script = (
            "import sys\n"
            f"sys.path = [p for p in sys.path if p not in ('', {REPO!r})]\n"
            f"sys.path.insert(0, {site!r})\n"
            "from twisted.plugin import getPlugins\n"
            "from twisted.application.service import IServiceMaker\n"
            "import twisted.plugins, mtlsproxy\n"
            "print(mtlsproxy.__file__)\n"
            "print(sorted(p.tapname for p in getPlugins(IServiceMaker)))\n"
        )
        env = dict(os.environ, PYTHONPATH="")
        result = subprocess.run(
            [sys.executable, "-I", "-c", script], capture_output=True, text=True,
            timeout=60, cwd=out, env=env,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.splitlines()[0].startswith(site), result.stdout)
        self.assertIn("'mtlsproxy'", result.stdout)
