# -*- test-case-name: tests.test_tlsgrade -*-
"""
The default TLS policy graded by a real scanner: SSLyze against the real
C{twistd -n mtlsproxy} on 127.0.0.1.

SSLyze pins an older C{cryptography} than mtlsproxy needs, so
C{scripts/setup.sh} installs it in a virtualenv of its own,
C{.venv/tools/sslyze}; C{MTLSPROXY_SSLYZE} may name another C{sslyze}
executable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from .harness import REPO
from .robustness import DemoPKI, EchoBackend, ProxyProcess, tlsConfig

STRONG_GROUPS = {"X25519", "X448", "secp256r1", "secp384r1", "secp521r1"}
"""
The key exchange groups a listener may offer.
"""

TLS12_SUITE = re.compile(
    r"^TLS_ECDHE_(ECDSA|RSA)_WITH_(AES_128_GCM_SHA256|AES_256_GCM_SHA384|CHACHA20_POLY1305_SHA256)$"
)
"""
The TLS 1.2 suites a listener may accept: ECDHE with an AEAD cipher.
"""

WEAK = ("CBC", "RC4", "3DES", "DES_", "NULL", "EXPORT", "anon", "MD5")


def sslyze() -> str:
    """
    The sslyze executable, or fail saying how to get it.
    """
    candidates = [
        os.environ.get("MTLSPROXY_SSLYZE", ""),
        os.path.join(REPO, ".venv", "tools", "sslyze", "bin", "sslyze"),
        shutil.which("sslyze") or "",
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise AssertionError("sslyze is not installed: scripts/setup.sh installs it in .venv/tools/sslyze")


class DefaultPolicyGradeTests(SynchronousTestCase):
    """
    SSLyze's findings about a listener with the default policy and
    C{client_auth = "required"}.
    """

    def setUp(self) -> None:
        self.scanner = sslyze()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.pki = DemoPKI(os.path.join(self.dir, "pki"))
        backend = EchoBackend("backend-1")
        self.addCleanup(backend.stop)
        self.proxy = ProxyProcess(self.dir, tlsConfig(self.pki.directory, [backend], "required"))
        self.addCleanup(self.proxy.stop)
        self.proxy.start()
        self.target = f"127.0.0.1:{self.proxy.ports['mtls']}"

    def scan(self, name: str, *options: str) -> dict[str, Any]:
        """
        Run sslyze with C{options}; return the one server's results.
        """
        output = os.path.join(self.dir, f"{name}.json")
        result = subprocess.run(
            [self.scanner, "--quiet", "--json_out", output, *options, self.target],
            capture_output=True, text=True, timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        with open(output) as f:
            [server] = json.load(f)["server_scan_results"]
        self.assertEqual(server["connectivity_status"], "COMPLETED", server)
        self.assertEqual(server["scan_status"], "COMPLETED", server)
        return server

    def accepted(self, results: dict[str, Any], version: str) -> list[str]:
        scan = results[f"{version}_cipher_suites"]
        self.assertEqual(scan["status"], "COMPLETED", scan)
        return [s["cipher_suite"]["name"] for s in scan["result"]["accepted_cipher_suites"]]

    def test_protocolsSuitesGroupsCompression(self) -> None:
        """
        When sslyze scans without a client certificate, it finds no SSL 2.0,
        SSL 3.0, TLS 1.0 or 1.1; only ECDHE AEAD suites on TLS 1.2 (no CBC,
        RC4 or 3DES anywhere); TLS 1.3 accepted; no compression; only strong
        groups; and a required client certificate.
        """
        server = self.scan(
            "versions",
            "--sslv2", "--sslv3", "--tlsv1", "--tlsv1_1", "--tlsv1_2", "--tlsv1_3",
            "--compression", "--elliptic_curves",
        )
        self.assertEqual(server["connectivity_result"]["client_auth_requirement"], "REQUIRED")
        results = server["scan_result"]
        for version in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"):
            self.assertEqual(self.accepted(results, version), [], version)
        tls12 = self.accepted(results, "tls_1_2")
        self.assertTrue(tls12)
        for suite in tls12:
            self.assertRegex(suite, TLS12_SUITE)
        tls13 = self.accepted(results, "tls_1_3")
        self.assertTrue(tls13)
        for suite in tls12 + tls13:
            for weak in WEAK:
                self.assertNotIn(weak, suite)
        self.assertEqual(results["tls_compression"]["result"]["supports_compression"], False)
        curves = results["elliptic_curves"]["result"]
        supported = {c["name"] for c in curves["supported_curves"]}
        self.assertTrue(supported)
        self.assertLessEqual(supported, STRONG_GROUPS)

    def test_noClientRenegotiation(self) -> None:
        """
        When sslyze, presenting a valid client certificate, tries to
        renegotiate, no renegotiation succeeds.
        """
        server = self.scan(
            "reneg", "--reneg",
            "--cert", self.pki.path("client-chain.pem"), "--key", self.pki.path("client.key"),
        )
        renegotiation = server["scan_result"]["session_renegotiation"]
        self.assertEqual(renegotiation["status"], "COMPLETED", renegotiation)
        self.assertEqual(renegotiation["result"]["client_renegotiations_success_count"], 0)
        self.assertFalse(renegotiation["result"]["is_vulnerable_to_client_renegotiation_dos"])
