# -*- test-case-name: tests.test_policy -*-
"""
Tests for L{mtlsproxy.policy} and how L{mtlsproxy.tlscontext} applies it:
the built-in TLS policies, the explicit overrides, their validation at
load time, and their effect on real handshakes (in memory, as in
L{tests.test_tlscontext}).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from mtlsproxy.config import CertificateConfig, ListenerConfig, loadConfig
from mtlsproxy.errors import ConfigurationError
from mtlsproxy.material import ListenerMaterial
from mtlsproxy.policy import DEFAULT_POLICY, POLICIES, listenerPolicy, policyProblem
from mtlsproxy.tlscontext import CONTEXT_OPTIONS, TLS12_CIPHERS, serverContextFactory
from tests.test_sni import NamedClient, inMemory, sniPKI
from tests.test_tlscontext import TLS12, TLS13, Handshake, sessionReused

CBC_ONLY = (
    b"ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES128-SHA256"
)


def policyListener(**overrides: Any) -> ListenerConfig:
    """
    A TLS listener without client certificates, with C{overrides}.
    """
    settings: dict[str, Any] = dict(
        name="policy",
        endpoint="tcp:8443",
        protocol="tls",
        pool="backends",
        certificates=(CertificateConfig("/pki/www.pem", "/pki/www.key"),),
    )
    settings.update(overrides)
    return ListenerConfig(**settings)


class PolicyTableTests(SynchronousTestCase):
    """
    Tests for the built-in policies and L{listenerPolicy}.
    """

    def test_defaultIsModern(self) -> None:
        """
        When a listener names no policy, it gets C{tls12_modern}, whose
        TLS 1.2 ciphers are the ECDHE AEAD list the proxy always used.
        """
        self.assertEqual(DEFAULT_POLICY, "tls12_modern")
        policy = listenerPolicy(policyListener())
        self.assertIs(policy, POLICIES["tls12_modern"])
        self.assertEqual(policy.ciphers.encode(), TLS12_CIPHERS)
        self.assertEqual((policy.minVersion, policy.maxVersion), ("1.2", "1.3"))

    def test_builtinsAccepted(self) -> None:
        """
        When each built-in policy is checked, OpenSSL accepts it; none
        allows RSA key exchange, 3DES, RC4 or SHA-1 suites.
        """
        for name, policy in POLICIES.items():
            self.assertIsNone(policyProblem(policy), name)
            self.assertEqual(policy.name, name)
            context = SSL.Context(SSL.TLS_METHOD)
            context.set_cipher_list(policy.ciphers.encode())
            for cipher in SSL.Connection(context, None).get_cipher_list():
                if cipher.startswith("TLS_"):
                    continue
                self.assertTrue(cipher.startswith("ECDHE-"), (name, cipher))
                self.assertNotIn("3DES", cipher)
                self.assertNotIn("RC4", cipher)
                self.assertFalse(cipher.endswith("-SHA"), (name, cipher))

    def test_overrides(self) -> None:
        """
        When a listener sets explicit keys, they replace the policy's parts
        and the name says it is customised.
        """
        policy = listenerPolicy(
            policyListener(
                tls_policy="tls12_compat", min_version="1.3", groups=("X25519", "P-256")
            )
        )
        self.assertEqual(policy.name, "tls12_compat+custom")
        self.assertEqual(policy.minVersion, "1.3")
        self.assertEqual(policy.groups, ("X25519", "P-256"))
        self.assertEqual(policy.ciphers, POLICIES["tls12_compat"].ciphers)


class PolicyConfigurationTests(SynchronousTestCase):
    """
    Policy keys in the configuration file.
    """

    def load(self, lines: str) -> Any:
        """
        Load a configuration whose TLS listener has C{lines} added.
        """
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        path = os.path.join(folder, "proxy.toml")
        with open(path, "w") as f:
            f.write(
                '[[listeners]]\nname = "web"\nendpoint = "tcp:8443"\nprotocol = "tls"\n'
                f'pool = "app"\n{lines}\n'
                '[[listeners.certificates]]\ncert = "s.pem"\nkey = "s.key"\n'
                '[[pools]]\nname = "app"\n[[pools.members]]\naddress = "127.0.0.1"\nport = 1\n'
            )
        self.path = path
        return loadConfig(path)

    def assertError(self, lines: str, message: str) -> None:
        error = self.assertRaises(ConfigurationError, self.load, lines)
        self.assertEqual(str(error), f"{self.path}: {message}")

    def test_valid(self) -> None:
        """
        When all policy keys are given, they are loaded as they are.
        """
        listener = self.load(
            'tls_policy = "tls13_only"\nmin_version = "1.2"\nmax_version = "1.3"\n'
            'ciphers = "ECDHE+AESGCM"\nciphersuites = "TLS_AES_128_GCM_SHA256"\n'
            'groups = ["X25519", "P-256"]\nsession_tickets = true\nalpn = ["h2", "http/1.1"]\n'
            "strict_sni = true\nclose_revoked_connections = false"
        ).listeners[0]
        self.assertEqual(listener.tls_policy, "tls13_only")
        self.assertEqual(listener.groups, ("X25519", "P-256"))
        self.assertEqual(listener.alpn, ("h2", "http/1.1"))
        self.assertTrue(listener.session_tickets)
        self.assertTrue(listener.strict_sni)
        self.assertFalse(listener.close_revoked_connections)

    def test_unknownPolicy(self) -> None:
        """
        When the policy name is unknown, the error lists the built-in names.
        """
        self.assertError(
            'tls_policy = "modern"',
            'listeners[0].tls_policy: expected one of "tls13_only", "tls12_modern",'
            ' "tls12_compat"; got "modern"',
        )

    def test_badVersion(self) -> None:
        """
        When a version is not 1.2 or 1.3, or min is above max, the error
        names the key.
        """
        self.assertError(
            'min_version = "1.1"',
            'listeners[0].min_version: expected one of "1.2", "1.3"; got "1.1"',
        )
        self.assertError(
            'min_version = "1.3"\nmax_version = "1.2"',
            "listeners[0].min_version: min_version 1.3 is newer than max_version 1.2",
        )

    def test_badCipher(self) -> None:
        """
        When a cipher name matches nothing (even alongside valid ones, which
        OpenSSL would accept silently), the error names it.
        """
        self.assertError(
            'ciphers = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-TYPO"',
            "listeners[0].ciphers: no TLS 1.2 cipher matches 'ECDHE-TYPO'",
        )
        self.assertIsNotNone(self.load('ciphers = "ECDHE+AESGCM:!aNULL:@STRENGTH"'))

    def test_badSuite(self) -> None:
        """
        When a TLS 1.3 suite is unknown, the error names it.
        """
        error = self.assertRaises(
            ConfigurationError, self.load, 'ciphersuites = "TLS_AES_128_GCM_SHA256:TLS_NOPE"'
        )
        self.assertIn("listeners[0].ciphersuites: unknown TLS 1.3 cipher suite 'TLS_NOPE'", str(error))

    def test_badGroup(self) -> None:
        """
        When a group is unknown, the error names it.
        """
        error = self.assertRaises(ConfigurationError, self.load, 'groups = ["X25519", "P-999"]')
        self.assertIn("listeners[0].groups: unknown key exchange group 'P-999'", str(error))
        self.assertError(
            "groups = [1]",
            "listeners[0].groups[0]: expected a non-empty ASCII string of at most 255"
            " characters; got integer 1",
        )

    def test_booleans(self) -> None:
        """
        When a boolean key is not a boolean, the error says so.
        """
        self.assertError(
            'session_tickets = "yes"',
            'listeners[0].session_tickets: expected true or false; got "yes"',
        )

    def test_tcpRefusesPolicy(self) -> None:
        """
        When a TCP listener sets a policy key, it is refused like the other
        TLS keys.
        """
        for key, value in (("tls_policy", "tls13_only"), ("alpn", ("h2",)), ("strict_sni", True)):
            error = self.assertRaises(
                ConfigurationError,
                ListenerConfig,
                name="t",
                endpoint="tcp:1",
                protocol="tcp",
                pool="p",
                **{key: value},
            )
            self.assertEqual(error.key, key)


class _EnforcementMixin:
    """
    Policies applied to real handshakes.
    """

    assertTrue: Any
    assertFalse: Any
    assertEqual: Any
    assertIn: Any
    assertIsNone: Any

    def setUp(self) -> None:
        self.pki = sniPKI()
        self.material = ListenerMaterial(
            chain=(self.pki.www.certificate,), key=self.pki.www.key, cas=(), crls=()
        )

    def connect(self, listener: ListenerConfig, version: Optional[int] = None, **kwargs: Any) -> Handshake:
        factory = serverContextFactory(listener, self.material)
        client = NamedClient(self.pki.serverRoot.certificate, b"www.example.com", None, version, **kwargs)
        self.lastClient = client
        return inMemory(factory, client)

    def test_tls13OnlyRefusesTLS12(self) -> None:
        """
        When the policy is C{tls13_only}, a TLS 1.2 client is refused with
        a protocol_version alert and a TLS 1.3 client is served.
        """
        listener = policyListener(tls_policy="tls13_only")
        refused = self.connect(listener, TLS12)
        self.assertFalse(refused.accepted)
        self.assertIn("protocol version", refused.clientError())
        self.assertTrue(self.connect(listener, TLS13).accepted)

    def test_defaultRefusesCBC(self) -> None:
        """
        When the policy is the default, a TLS 1.2 client offering only CBC
        suites is refused; C{tls12_compat} serves it with one of them.
        """
        refused = self.connect(policyListener(), TLS12, ciphers=CBC_ONLY)
        self.assertFalse(refused.accepted)
        self.assertIn("handshake failure", refused.clientError())
        served = self.connect(policyListener(tls_policy="tls12_compat"), TLS12, ciphers=CBC_ONLY)
        self.assertTrue(served.accepted)
        self.assertEqual(served.serverConnection.get_cipher_name(), "ECDHE-ECDSA-AES128-SHA256")

    def test_compatPrefersAEAD(self) -> None:
        """
        When a client offers both, C{tls12_compat} picks an AEAD cipher.
        """
        served = self.connect(policyListener(tls_policy="tls12_compat"), TLS12)
        self.assertIn("GCM", served.serverConnection.get_cipher_name())

    def test_explicitCiphers(self) -> None:
        """
        When C{ciphers} is set, only those TLS 1.2 ciphers are used.
        """
        listener = policyListener(ciphers="ECDHE-ECDSA-CHACHA20-POLY1305")
        served = self.connect(listener, TLS12)
        self.assertEqual(served.serverConnection.get_cipher_name(), "ECDHE-ECDSA-CHACHA20-POLY1305")

    def test_explicitSuites(self) -> None:
        """
        When C{ciphersuites} is set, TLS 1.3 uses only those.
        """
        listener = policyListener(ciphersuites="TLS_CHACHA20_POLY1305_SHA256")
        served = self.connect(listener, TLS13)
        self.assertEqual(served.serverConnection.get_cipher_name(), "TLS_CHACHA20_POLY1305_SHA256")

    def test_explicitVersion(self) -> None:
        """
        When C{max_version = "1.2"}, a TLS 1.3-only client is refused.
        """
        self.assertFalse(self.connect(policyListener(max_version="1.2"), TLS13).accepted)
        self.assertTrue(self.connect(policyListener(max_version="1.2"), TLS12).accepted)

    def test_groups(self) -> None:
        """
        When C{groups} is set, the key exchange uses one of them (asking
        the client for another key share if needed), and a client with none
        of them is refused.
        """
        for version in (TLS12, TLS13):
            listener = policyListener(groups=("P-384",))
            served = self.connect(listener, version, groups="X25519:P-384:P-256")
            self.assertTrue(served.accepted)
            self.assertEqual(served.serverConnection.get_group_name(), "secp384r1")
            self.assertFalse(self.connect(listener, version, groups="X25519:P-256").accepted)

    def test_alpn(self) -> None:
        """
        When C{alpn} is set, the first of our protocols the client offers is
        chosen; a client with none in common, or none at all, goes on
        without ALPN.
        """
        listener = policyListener(alpn=("h2", "http/1.1"))
        both = self.connect(listener, alpn=[b"http/1.1", b"h2"])
        self.assertEqual(both.serverConnection.get_alpn_proto_negotiated(), b"h2")
        self.assertEqual(both.clientConnection.get_alpn_proto_negotiated(), b"h2")
        old = self.connect(listener, alpn=[b"http/1.1"])
        self.assertEqual(old.clientConnection.get_alpn_proto_negotiated(), b"http/1.1")
        other = self.connect(listener, alpn=[b"imap"])
        self.assertTrue(other.accepted)
        self.assertEqual(other.clientConnection.get_alpn_proto_negotiated(), b"")
        self.assertTrue(self.connect(listener).accepted)

    def test_sessionTickets(self) -> None:
        """
        When C{session_tickets} is off, contexts have C{OP_NO_TICKET}; when
        on (the default), they do not, and sessions resume.
        """
        off = serverContextFactory(policyListener(session_tickets=False), self.material)
        self.assertEqual(off.context.set_options(0) & CONTEXT_OPTIONS, CONTEXT_OPTIONS)
        tickets = serverContextFactory(policyListener(), self.material)
        self.assertFalse(tickets.context.set_options(0) & SSL.OP_NO_TICKET)
        client = NamedClient(self.pki.serverRoot.certificate, b"www.example.com", None, TLS13)
        first = inMemory(tickets, client)
        client.session = first.clientConnection.get_session()
        second = inMemory(tickets, client)
        self.assertTrue(second.accepted)
        self.assertTrue(sessionReused(second.serverConnection))


class EnforcementTests(_EnforcementMixin, SynchronousTestCase):
    """
    Policies applied to real handshakes.
    """
