"""
Tests for L{mtlsproxy.cli}, the C{mtlsproxy} console script.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
from datetime import datetime, timezone

from twisted.trial.unittest import SynchronousTestCase

from mtlsproxy import pki
from mtlsproxy.cli import main

from .test_checks import DAY, NOW, CheckTestsMixin, when

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CheckCommandTests(CheckTestsMixin, SynchronousTestCase):
    """
    Tests for C{mtlsproxy check --config FILE}.
    """

    def setUp(self) -> None:
        self.setUpFiles()
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)

    def runMain(self, *argv: str, now: datetime = NOW) -> int:
        """
        Run C{main} with C{argv} at the time C{now}.
        """
        return main(list(argv), now=lambda: now)

    def test_ok(self) -> None:
        """
        When the configuration is usable, C{check} says so on standard
        output with the number of listeners and pools and exits with 0.
        """
        path = self.writeConfig(self.configText())
        self.assertEqual(self.runMain("check", "--config", path), 0)
        self.assertEqual(self.stdout.getvalue(), "configuration OK: 1 listener, 1 pool\n")
        self.assertEqual(self.stderr.getvalue(), "")

    def test_plural(self) -> None:
        """
        When there are several listeners and pools, the counts say so.
        """
        text = self.configText(
            pools='[[pools]]\nname = "b"\n[[pools.members]]\naddress = "a"\nport = 1\n'
        )
        text += '[[listeners]]\nname = "t"\nendpoint = "tcp:1"\nprotocol = "tcp"\npool = "b"\n'
        path = self.writeConfig(text)
        self.assertEqual(self.runMain("check", "--config", path), 0)
        self.assertEqual(self.stdout.getvalue(), "configuration OK: 2 listeners, 2 pools\n")

    def test_warnings(self) -> None:
        """
        When the checks produce warnings, each is printed on standard error
        as C{warning: ...} and the configuration is still OK.
        """
        server = self.pki.serverCertificate(NOW - DAY, NOW + 3 * DAY)
        chain = self.write("soon.pem", pki.certificatePEM(server.certificate))
        key = self.write("soon.key", pki.keyPEM(server.key))
        path = self.writeConfig(self.configText(cert=chain, key=key))
        self.assertEqual(self.runMain("check", "--config", path), 0)
        self.assertEqual(
            self.stderr.getvalue(),
            f"warning: listener 'mtls': the server certificate (CN=localhost) in {chain}"
            f" expires on {when(NOW + 3 * DAY)}, in 3 days\n",
        )
        self.assertEqual(self.stdout.getvalue(), "configuration OK: 1 listener, 1 pool\n")

    def test_configurationError(self) -> None:
        """
        When the configuration file is invalid, the one-line error is
        printed on standard error, nothing on standard output, and the exit
        status is 1.
        """
        path = self.writeConfig(self.configText(clientAuth="sometimes"))
        self.assertEqual(self.runMain("check", "--config", path), 1)
        self.assertEqual(
            self.stderr.getvalue(),
            f"error: {path}: listeners[0].client_auth: expected one of"
            ' "off", "optional", "required", "passthrough"; got "sometimes"\n',
        )
        self.assertEqual(self.stdout.getvalue(), "")

    def test_checkError(self) -> None:
        """
        When a start-up check fails (an expired server certificate), the
        exit status is 1 and the error names the setting.
        """
        path = self.writeConfig(self.configText())
        later = NOW + 400 * DAY
        self.assertEqual(self.runMain("check", "--config", path, now=later), 1)
        self.assertEqual(
            self.stderr.getvalue(),
            f"error: {path}: listeners[0].certificates[0].cert: the server certificate"
            f" (CN=localhost) in {self.serverChain} expired on {when(NOW + 365 * DAY)}\n",
        )

    def test_missingConfiguration(self) -> None:
        """
        When the configuration file does not exist, the error says so and
        the exit status is 1: no traceback.
        """
        path = os.path.join(self.folder, "nope.toml")
        self.assertEqual(self.runMain("check", "-c", path), 1)
        self.assertEqual(
            self.stderr.getvalue(),
            f"error: {path}: cannot read configuration file: No such file or directory\n",
        )

    def test_usage(self) -> None:
        """
        When no command or no C{--config} is given, argparse's usage error
        is printed and the exit status is 2.
        """
        self.assertEqual(self.runMain(), 2)
        self.assertIn("usage: mtlsproxy", self.stderr.getvalue())
        self.stderr.seek(0)
        self.stderr.truncate()
        self.assertEqual(self.runMain("check"), 2)
        self.assertIn("the following arguments are required: --config", self.stderr.getvalue())

    def test_help(self) -> None:
        """
        When C{--help} is given, the help goes to standard output and the
        exit status is 0.
        """
        self.assertEqual(self.runMain("check", "--help"), 0)
        self.assertIn("--config FILE", self.stdout.getvalue())

    def test_argvDefault(self) -> None:
        """
        When C{main} is called without arguments, it reads C{sys.argv}, as
        the console script does.
        """
        path = self.writeConfig(self.configText())
        self.patch(sys, "argv", ["mtlsproxy", "check", "--config", path])
        self.assertEqual(main(now=lambda: NOW), 0)

    def test_exampleWithDemoPKI(self) -> None:
        """
        When the shipped C{etc/mtlsproxy.toml} is checked against a PKI made
        by C{mtlsproxy-pki demo} in the layout the demo uses, it is OK and
        has no warnings.
        """
        top = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(top, "etc"))
        shutil.copy(os.path.join(ROOT, "etc", "mtlsproxy.toml"), os.path.join(top, "etc"))
        self.assertEqual(pki.main(["--dir", os.path.join(top, "demo", "pki"), "demo"]), 0)
        self.stdout.seek(0)
        self.stdout.truncate()
        config = os.path.join(top, "etc", "mtlsproxy.toml")
        status = main(["check", "--config", config], now=lambda: datetime.now(timezone.utc))
        self.assertEqual(
            (status, self.stdout.getvalue(), self.stderr.getvalue()),
            (0, "configuration OK: 1 listener, 1 pool\n", ""),
        )
