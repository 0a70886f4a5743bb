"""
Tests for L{mtlsproxy.config} and L{mtlsproxy.errors}.
"""

from __future__ import annotations

import math
import os
import tomllib
from datetime import date, datetime, time, timezone
from typing import Any, Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mtlsproxy.config import (
    CertificateConfig,
    ListenerConfig,
    MemberConfig,
    PoolConfig,
    ProxyConfig,
    endpointProblem,
    loadConfig,
)
from mtlsproxy.errors import ConfigurationError

def keysOf(cls: type) -> str:
    """
    The valid TOML keys of a configuration class, in the order the loader's
    "unknown key" message lists them.  Computed, so that the tests below keep
    checking the message's shape as later issues add keys.
    """
    from mtlsproxy.config import _tomlFields

    return ", ".join(f.name for f, _ in _tomlFields(cls))


LISTENER_KEYS = keysOf(ListenerConfig)

VALID = """\
[[listeners]]
name = "mtls"
endpoint = "tcp:8443:interface=127.0.0.1"
protocol = "tls"
pool = "app"
client_auth = "required"
ca_certificates = ["pki/ca-bundle.pem"]
crls = ["pki/crls.pem", "/abs/other.crl"]

[[listeners.certificates]]
cert = "pki/server-chain.pem"
key = "../keys/server.key"

[[listeners]]
name = "plain"
endpoint = "tcp:8080"
protocol = "tcp"
pool = "app"

[[pools]]
name = "app"

[[pools.members]]
address = "127.0.0.1"
port = 9001

[[pools.members]]
address = "127.0.0.1"
port = 9002
weight = 3
"""

MINIMAL_POOL = """
[[pools]]
name = "app"
[[pools.members]]
address = "127.0.0.1"
port = 9001
"""

TCP_LISTENER = """
[[listeners]]
name = "plain"
endpoint = "tcp:8080"
protocol = "tcp"
pool = "app"
"""


class ConfigFileMixin:
    """
    Write configuration files into a fresh folder.
    """

    mktemp: Callable[[], str]

    def writeConfig(self, text: str | bytes, name: str = "proxy.toml") -> str:
        """
        Write C{text} to a new file and return its absolute path.
        """
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
        return path


class ConfigurationErrorTests(SynchronousTestCase):
    """
    Tests for L{ConfigurationError}.
    """

    def test_allParts(self) -> None:
        """
        When file, key path and problem are known, C{str()} joins them with
        colons.
        """
        error = ConfigurationError("bad", path="/etc/p.toml", key="listeners[0].name")
        self.assertEqual(str(error), "/etc/p.toml: listeners[0].name: bad")

    def test_missingParts(self) -> None:
        """
        When the file or the key path is not known, it is left out.
        """
        self.assertEqual(str(ConfigurationError("bad")), "bad")
        self.assertEqual(str(ConfigurationError("bad", key="pools")), "pools: bad")
        self.assertEqual(str(ConfigurationError("bad", path="/p.toml")), "/p.toml: bad")

    def test_line(self) -> None:
        """
        When a line number is given, it stands where the key path would.
        """
        error = ConfigurationError("Invalid value (column 3)", path="/p.toml", line=4)
        self.assertEqual(str(error), "/p.toml: line 4: Invalid value (column 3)")

    def test_oneLine(self) -> None:
        """
        When the problem spans several lines, C{str()} is still one line.
        """
        error = ConfigurationError("first\n  second\r\nthird", path="/p.toml")
        self.assertEqual(str(error), "/p.toml: first second third")

    def test_within(self) -> None:
        """
        When an error is taken C{within} a prefix, its key path is prefixed,
        with a dot before names and none before indexes.
        """
        self.assertEqual(
            ConfigurationError("x", key="client_auth").within("listeners[1]").key,
            "listeners[1].client_auth",
        )
        self.assertEqual(
            ConfigurationError("x", key="[2]").within("crls").key, "crls[2]"
        )
        self.assertEqual(ConfigurationError("x").within("pools[0]").key, "pools[0]")
        self.assertEqual(ConfigurationError("x", key="pools").within("").key, "pools")

    def test_inFile(self) -> None:
        """
        When an error gets a file with C{inFile}, an existing file is kept.
        """
        self.assertEqual(ConfigurationError("x").inFile("/a").path, "/a")
        self.assertEqual(ConfigurationError("x", path="/b").inFile("/a").path, "/b")


class LoadConfigTests(ConfigFileMixin, SynchronousTestCase):
    """
    Tests for L{loadConfig}.
    """

    def assertConfigError(self, text: str, expected: str) -> None:
        """
        Loading C{text} raises a L{ConfigurationError} whose message is the
        file's path, C{": "} and C{expected}.
        """
        path = self.writeConfig(text)
        error = self.assertRaises(ConfigurationError, loadConfig, path)
        self.assertEqual(str(error), f"{path}: {expected}")

    def test_valid(self) -> None:
        """
        When the file is valid, every table becomes its frozen class, with
        defaults for the keys not given.
        """
        path = self.writeConfig(VALID)
        config = loadConfig(path)
        folder = os.path.dirname(path)
        self.assertEqual(config.path, path)
        self.assertEqual(
            config.listeners[0],
            ListenerConfig(
                name="mtls",
                endpoint="tcp:8443:interface=127.0.0.1",
                protocol="tls",
                pool="app",
                client_auth="required",
                ca_certificates=(os.path.join(folder, "pki", "ca-bundle.pem"),),
                crls=(os.path.join(folder, "pki", "crls.pem"), "/abs/other.crl"),
                certificates=(
                    CertificateConfig(
                        cert=os.path.join(folder, "pki", "server-chain.pem"),
                        key=os.path.join(os.path.dirname(folder), "keys", "server.key"),
                    ),
                ),
                crl_missing="reject",
                crl_expired="reject",
            ),
        )
        self.assertEqual(
            config.listeners[1], ListenerConfig("plain", "tcp:8080", "tcp", "app")
        )
        self.assertEqual(
            config.pools,
            (
                PoolConfig(
                    name="app",
                    selector="round_robin",
                    members=(
                        MemberConfig("127.0.0.1", 9001, 1),
                        MemberConfig("127.0.0.1", 9002, 3),
                    ),
                    connect_timeout=5.0,
                    max_connect_attempts=3,
                ),
            ),
        )
        self.assertEqual(config.pool("app"), config.pools[0])
        self.assertTrue(config.listeners[0].tls)
        self.assertFalse(config.listeners[1].tls)

    def test_relativePaths(self) -> None:
        """
        When the configuration is loaded through a relative path, file paths
        in it are resolved against the configuration file's folder, not the
        working directory, and stored absolute and normalized.
        """
        path = self.writeConfig(VALID)
        folder = os.path.dirname(path)
        relative = os.path.relpath(path)
        self.assertFalse(os.path.isabs(relative))
        self.assertNotEqual(os.path.dirname(os.path.abspath(relative)), os.getcwd())
        config = loadConfig(relative)
        cwd = os.path.dirname(folder)
        self.assertEqual(config.path, path)
        listener = config.listeners[0]
        self.assertEqual(
            listener.certificates[0].key, os.path.join(cwd, "keys", "server.key")
        )
        self.assertEqual(listener.crls[1], "/abs/other.crl")
        for p in (listener.certificates[0].cert, *listener.ca_certificates, *listener.crls):
            self.assertTrue(os.path.isabs(p), p)

    def test_exampleConfiguration(self) -> None:
        """
        When the shipped C{etc/mtlsproxy.toml} is loaded, it describes the
        demo: one mTLS listener on 127.0.0.1:8443 in front of two backends
        checked over HTTP, with paths into C{demo/pki}, and a status
        endpoint on 127.0.0.1:9180.
        """
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        config = loadConfig(os.path.join(root, "etc", "mtlsproxy.toml"))
        pki = os.path.join(root, "demo", "pki")
        [listener] = config.listeners
        self.assertEqual(
            (listener.name, listener.endpoint, listener.protocol, listener.pool),
            ("mtls", "tcp:8443:interface=127.0.0.1", "tls", "app"),
        )
        self.assertEqual(listener.client_auth, "required")
        self.assertEqual(listener.ca_certificates, (os.path.join(pki, "ca-bundle.pem"),))
        self.assertEqual(listener.crls, (os.path.join(pki, "crls.pem"),))
        self.assertEqual(
            listener.certificates,
            (
                CertificateConfig(
                    os.path.join(pki, "server-chain.pem"), os.path.join(pki, "server.key")
                ),
            ),
        )
        [pool] = config.pools
        self.assertEqual(
            [(m.address, m.port, m.weight) for m in pool.members],
            [("127.0.0.1", 9001, 1), ("127.0.0.1", 9002, 1)],
        )
        assert pool.health_check is not None
        self.assertEqual((pool.health_check.type, pool.health_check.options["path"]), ("http", "/"))
        assert config.status is not None
        self.assertEqual(config.status.endpoint, "tcp:9180:interface=127.0.0.1")

    def test_exampleInDocs(self) -> None:
        """
        When docs/configuration.md shows the example configuration, it is
        the shipped C{etc/mtlsproxy.toml} from its first setting on.
        """
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(root, "etc", "mtlsproxy.toml")) as f:
            shipped = f.read()
        with open(os.path.join(root, "docs", "configuration.md")) as f:
            docs = f.read()
        example = docs.split("## Example", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
        self.assertEqual(example, shipped[shipped.index("# Processes serving"):])

    def test_unknownTopLevelKey(self) -> None:
        """
        When the top-level table has an unknown key, the error names it and
        lists the valid keys.
        """
        self.assertConfigError(
            "listener = 1\n" + VALID,
            f"unknown key 'listener'; expected one of: {keysOf(ProxyConfig)}",
        )

    def test_unknownListenerKey(self) -> None:
        """
        When a listener has an unknown key, the error names the listener's
        key path, the key and the valid keys.
        """
        self.assertConfigError(
            VALID.replace('client_auth = "required"', 'clint_auth = "required"'),
            f"listeners[0]: unknown key 'clint_auth'; expected one of: {LISTENER_KEYS}",
        )

    def test_unknownCertificateKey(self) -> None:
        """
        When a certificate entry has an unknown key, the error names its key
        path.
        """
        self.assertConfigError(
            VALID.replace('cert = "pki', 'chain = "pki'),
            "listeners[0].certificates[0]: unknown key 'chain'; expected one of:"
            f" {keysOf(CertificateConfig)}",
        )

    def test_unknownPoolKey(self) -> None:
        """
        When a pool has an unknown key, the error names the pool's key path.
        """
        self.assertConfigError(
            VALID.replace('name = "app"', 'name = "app"\ntimeout = 3'),
            f"pools[0]: unknown key 'timeout'; expected one of: {keysOf(PoolConfig)}",
        )

    def test_unknownMemberKey(self) -> None:
        """
        When a pool member has an unknown key, the error names the member's
        key path.
        """
        self.assertConfigError(
            VALID.replace("weight = 3", "wieght = 3"),
            "pools[0].members[1]: unknown key 'wieght'; expected one of:"
            f" {keysOf(MemberConfig)}",
        )

    def test_unknownKeyOddName(self) -> None:
        """
        When an unknown key holds a line break, the message stays one line.
        """
        path = self.writeConfig('"a\\nb" = 1\n' + VALID)
        error = self.assertRaises(ConfigurationError, loadConfig, path)
        self.assertEqual(
            str(error), f"{path}: unknown key 'a\\nb'; expected one of: {keysOf(ProxyConfig)}"
        )

    def test_badEnum(self) -> None:
        """
        When a key has a value outside its choices, the error lists the
        choices.
        """
        self.assertConfigError(
            VALID.replace('client_auth = "required"', 'client_auth = "maybe"'),
            'listeners[0].client_auth: expected one of "off", "optional", "required", "passthrough"; got "maybe"',
        )
        self.assertConfigError(
            VALID.replace('protocol = "tls"', 'protocol = "udp"'),
            'listeners[0].protocol: expected one of "tcp", "tls", "https"; got "udp"',
        )
        self.assertConfigError(
            VALID.replace('client_auth = "required"', 'crl_expired = true'),
            'listeners[0].crl_expired: expected one of "reject", "allow"; got boolean true',
        )

    def test_wrongType(self) -> None:
        """
        When a key has a value of the wrong type, the error says what was
        expected and what was found.
        """
        self.assertConfigError(
            VALID.replace('endpoint = "tcp:8080"', "endpoint = 8080"),
            "listeners[1].endpoint: expected a non-empty string; got integer 8080",
        )
        self.assertConfigError(
            VALID.replace('["pki/ca-bundle.pem"]', '"pki/ca-bundle.pem"'),
            "listeners[0].ca_certificates: expected an array of file paths;"
            ' got "pki/ca-bundle.pem"',
        )
        self.assertConfigError(
            VALID.replace('"/abs/other.crl"', "7"),
            "listeners[0].crls[1]: expected a file path; got integer 7",
        )
        self.assertConfigError(
            VALID.replace('cert = "pki/server-chain.pem"', 'cert = ""'),
            'listeners[0].certificates[0].cert: expected a file path; got ""',
        )
        self.assertConfigError(
            VALID.replace("[[pools]]", "[pools]"),
            "pools: expected an array of tables; got a table",
        )
        self.assertConfigError(
            "listeners = [1]\n" + MINIMAL_POOL,
            "listeners[0]: expected a table; got integer 1",
        )

    def test_missingKey(self) -> None:
        """
        When a required key is missing, the error names the table and the
        key.
        """
        self.assertConfigError(
            VALID.replace('endpoint = "tcp:8080"\n', ""),
            "listeners[1]: missing required key 'endpoint'",
        )
        self.assertConfigError(
            VALID.replace("port = 9001\n", ""),
            "pools[0].members[0]: missing required key 'port'",
        )
        self.assertConfigError(
            TCP_LISTENER, "missing required key 'pools'"
        )
        self.assertConfigError("", "missing required key 'listeners'")

    def test_emptyArrays(self) -> None:
        """
        When there are no listeners, no pools or a pool without members, the
        error says at least one is needed.
        """
        self.assertConfigError(
            "listeners = []\n" + MINIMAL_POOL,
            "listeners: at least one [[listeners]] table required",
        )
        self.assertConfigError(
            "pools = []\n" + TCP_LISTENER,
            "pools: at least one [[pools]] table required",
        )
        self.assertConfigError(
            TCP_LISTENER + '[[pools]]\nname = "app"\n',
            "pools[0].members: at least one [[pools.members]] table required",
        )

    def test_ranges(self) -> None:
        """
        When a number is out of range (or a boolean stands for an integer),
        the error gives the range.
        """
        self.assertConfigError(
            VALID.replace("port = 9002", "port = 65536"),
            "pools[0].members[1].port: expected an integer from 1 to 65535; got integer 65536",
        )
        self.assertConfigError(
            VALID.replace("port = 9002", "port = 0"),
            "pools[0].members[1].port: expected an integer from 1 to 65535; got integer 0",
        )
        self.assertConfigError(
            VALID.replace("weight = 3", "weight = 1001"),
            "pools[0].members[1].weight: expected an integer from 0 to 1000; got integer 1001",
        )
        self.assertConfigError(
            VALID.replace("weight = 3", "weight = 1.5"),
            "pools[0].members[1].weight: expected an integer from 0 to 1000; got float 1.5",
        )
        self.assertConfigError(
            VALID.replace("weight = 3", "weight = true"),
            "pools[0].members[1].weight: expected an integer from 0 to 1000; got boolean true",
        )
        self.assertConfigError(
            VALID.replace('name = "app"', 'name = "app"\nconnect_timeout = 0'),
            "pools[0].connect_timeout: expected a number of seconds greater than 0;"
            " got float 0.0",
        )
        self.assertConfigError(
            VALID.replace('name = "app"', 'name = "app"\nconnect_timeout = inf'),
            "pools[0].connect_timeout: expected a number of seconds greater than 0;"
            " got float inf",
        )
        self.assertConfigError(
            VALID.replace('name = "app"', 'name = "app"\nmax_connect_attempts = 0'),
            "pools[0].max_connect_attempts: expected an integer of at least 1; got integer 0",
        )

    def test_weightZero(self) -> None:
        """
        When a member has weight 0, it is accepted (never picked), and an
        integer timeout becomes a float.
        """
        path = self.writeConfig(
            VALID.replace("weight = 3", "weight = 0").replace(
                'name = "app"', 'name = "app"\nconnect_timeout = 2'
            )
        )
        pool = loadConfig(path).pools[0]
        self.assertEqual(pool.members[1].weight, 0)
        self.assertEqual(pool.connect_timeout, 2.0)
        self.assertIsInstance(pool.connect_timeout, float)

    def test_unknownPool(self) -> None:
        """
        When a listener names a pool that is not defined, the error names
        the listener's C{pool} key and the defined pools.
        """
        self.assertConfigError(
            VALID.replace('pool = "app"\nclient_auth', 'pool = "ap"\nclient_auth'),
            "listeners[0].pool: unknown pool 'ap'; defined pools: app",
        )

    def test_duplicateNames(self) -> None:
        """
        When two listeners or two pools have the same name, the error names
        the second and points to the first.
        """
        self.assertConfigError(
            VALID.replace('name = "plain"', 'name = "mtls"'),
            "listeners[1].name: duplicate listener name 'mtls' (also listeners[0].name)",
        )
        self.assertConfigError(
            VALID + MINIMAL_POOL,
            "pools[1].name: duplicate pool name 'app' (also pools[0].name)",
        )

    def test_duplicateMember(self) -> None:
        """
        When a pool lists the same address and port twice, the error names
        the second member.
        """
        self.assertConfigError(
            VALID.replace("port = 9002", "port = 9001"),
            "pools[0].members[1]: duplicate member 127.0.0.1:9001 (same as members[0])",
        )

    def test_badEndpoint(self) -> None:
        """
        When the endpoint is not a server endpoint description Twisted can
        parse, the error quotes it and Twisted's reason.
        """
        self.assertConfigError(
            VALID.replace('"tcp:8080"', '"tcp:http"'),
            'listeners[1].endpoint: expected a server endpoint description such as'
            ' "tcp:8443:interface=127.0.0.1"; "tcp:http" does not parse:'
            " invalid literal for int() with base 10: 'http'",
        )
        self.assertConfigError(
            VALID.replace('"tcp:8080"', '"tcp:8080:interfase=::1"'),
            'listeners[1].endpoint: expected a server endpoint description such as'
            ' "tcp:8443:interface=127.0.0.1"; "tcp:8080:interfase=::1" does not parse:'
            " _parseTCP() got an unexpected keyword argument 'interfase'",
        )
        self.assertConfigError(
            VALID.replace('"tcp:8080"', '"tcp:70000"'),
            "listeners[1].endpoint: port 70000 out of range: expected 0 to 65535",
        )

    def test_unknownEndpointType(self) -> None:
        """
        When the endpoint type is unknown, the error says so.
        """
        problem = endpointProblem("nosuchtype:8080")
        self.assertEqual(
            problem,
            'expected a server endpoint description such as'
            ' "tcp:8443:interface=127.0.0.1"; "nosuchtype:8080" does not parse:'
            " Unknown endpoint type: 'nosuchtype'",
        )

    def test_sslEndpoint(self) -> None:
        """
        When the endpoint is an C{ssl:} one, it is refused: TLS is
        mtlsproxy's job (C{protocol = "tls"}).
        """
        self.assertConfigError(
            VALID.replace('"tcp:8080"', '"ssl:8443"'),
            'listeners[1].endpoint: ssl endpoints are not supported; use a tcp endpoint'
            ' with protocol = "tls" and [[listeners.certificates]], so that mtlsproxy'
            " terminates TLS",
        )

    def test_otherEndpoints(self) -> None:
        """
        When the endpoint is a UNIX socket, IPv6 or systemd description, it
        is accepted without listening or needing systemd's descriptors.
        """
        for description in (
            "unix:/run/mtlsproxy.sock:mode=600",
            "tcp6:8443:interface=\\:\\:1",
            "tcp:0",
            "systemd:domain=INET:index=0",
        ):
            self.assertIsNone(endpointProblem(description), description)

    def test_tlsNeedsCertificates(self) -> None:
        """
        When a C{tls} listener has no certificates, the error says one is
        needed.
        """
        text = VALID[: VALID.index("[[listeners.certificates]]")] + VALID[
            VALID.index("[[listeners]]\nname = \"plain\"") :
        ]
        self.assertConfigError(
            text,
            'listeners[0].certificates: protocol = "tls" needs at least one'
            " [[listeners.certificates]] table (cert and key)",
        )

    def test_clientAuthNeedsCAs(self) -> None:
        """
        When client certificates are asked for but no CA file is given, the
        error names C{ca_certificates}.
        """
        self.assertConfigError(
            VALID.replace('ca_certificates = ["pki/ca-bundle.pem"]\n', "").replace(
                '"required"', '"optional"'
            ),
            'listeners[0].ca_certificates: client_auth = "optional" needs at least'
            " one CA file to verify client certificates with",
        )

    def test_tcpRefusesTLSKeys(self) -> None:
        """
        When a C{tcp} listener has TLS settings, the error names the first
        one; C{client_auth = "off"} and default policies are fine.
        """
        for line, key in (
            ('client_auth = "required"', "client_auth"),
            ('ca_certificates = ["ca.pem"]', "ca_certificates"),
            ('crls = ["crl.pem"]', "crls"),
            ('crl_missing = "allow"', "crl_missing"),
            ('crl_expired = "allow"', "crl_expired"),
            ('certificates = [{cert = "a.pem", key = "a.key"}]', "certificates"),
        ):
            self.assertConfigError(
                VALID.replace('protocol = "tcp"', f'protocol = "tcp"\n{line}'),
                f'listeners[1].{key}: only allowed with protocol = "tls"; this'
                ' listener has protocol = "tcp"',
            )
        path = self.writeConfig(
            VALID.replace(
                'protocol = "tcp"', 'protocol = "tcp"\nclient_auth = "off"\ncrl_missing = "reject"'
            )
        )
        self.assertEqual(loadConfig(path).listeners[1].client_auth, "off")

    def test_invalidTOML(self) -> None:
        """
        When the file is not valid TOML, the error gives the line and
        L{tomllib}'s message.
        """
        self.assertConfigError(
            VALID.replace('endpoint = "tcp:8080"', "endpoint = tcp:8080"),
            "line 16: Invalid value (column 12)",
        )
        self.assertConfigError(
            '[[listeners]]\nname = "x"\nca_certificates = ["a",\n\n',
            "line 3: Invalid value (at end of file)",
        )
        self.assertConfigError(
            'a = 1\na = 2\n',
            "line 2: Cannot overwrite a value (column 6)",
        )

    def test_notUTF8(self) -> None:
        """
        When the file is not UTF-8, the error gives the line.
        """
        path = self.writeConfig(b'[[listeners]]\nname = "caf\xe9"\n')
        error = self.assertRaises(ConfigurationError, loadConfig, path)
        self.assertEqual(str(error), f"{path}: line 2: not valid UTF-8")

    def test_missingFile(self) -> None:
        """
        When the configuration file does not exist, the error names it.
        """
        path = os.path.abspath(self.mktemp())
        error = self.assertRaises(ConfigurationError, loadConfig, path)
        self.assertEqual(
            str(error), f"{path}: cannot read configuration file: No such file or directory"
        )

    def test_directory(self) -> None:
        """
        When the configuration path is a folder, the error says it cannot be
        read.
        """
        path = os.path.dirname(self.writeConfig(VALID))
        error = self.assertRaises(ConfigurationError, loadConfig, path)
        self.assertEqual(str(error), f"{path}: cannot read configuration file: Is a directory")


class ConstructionTests(SynchronousTestCase):
    """
    The configuration classes validate when built directly too.
    """

    def test_listenerValidates(self) -> None:
        """
        When a L{ListenerConfig} is built with a bad value, the error's key
        is the attribute's name.
        """
        error = self.assertRaises(
            ConfigurationError,
            ListenerConfig,
            "x",
            "tcp:1",
            "tcp",
            "app",
            client_auth="sometimes",
        )
        self.assertEqual(
            str(error),
            'client_auth: expected one of "off", "optional", "required", "passthrough"; got "sometimes"',
        )

    def test_proxyValidates(self) -> None:
        """
        When a L{ProxyConfig} refers to an unknown pool, the error names the
        file and the key path.
        """
        pool = PoolConfig("app", members=(MemberConfig("127.0.0.1", 1),))
        listener = ListenerConfig("x", "tcp:1", "tcp", "other")
        error = self.assertRaises(
            ConfigurationError, ProxyConfig, "/p.toml", (listener,), (pool,)
        )
        self.assertEqual(
            str(error), "/p.toml: listeners[0].pool: unknown pool 'other'; defined pools: app"
        )

    def test_frozen(self) -> None:
        """
        When code tries to change a configuration object, it cannot.
        """
        member = MemberConfig("127.0.0.1", 1)
        self.assertRaises(AttributeError, setattr, member, "port", 2)


# ---------------------------------------------------------------------------
# Property: any TOML document gives a ProxyConfig or a ConfigurationError.
# ---------------------------------------------------------------------------


def _tomlString(value: str) -> str:
    """
    A TOML basic string.
    """
    out = []
    for char in value:
        if char == '"' or char == "\\":
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toTOML(value: object) -> str:
    """
    A tiny TOML emitter: C{value} as an inline TOML value.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _tomlString(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toTOML(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_tomlString(k)} = {toTOML(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)  # pragma: no cover


def toDocument(table: dict[str, Any]) -> str:
    """
    A TOML document with C{table} as its top-level table.
    """
    return "".join(f"{_tomlString(k)} = {toTOML(v)}\n" for k, v in table.items())


_scalars = st.one_of(
    st.text(max_size=12),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.booleans(),
    st.datetimes(timezones=st.just(timezone.utc)),
    st.dates(),
    # Values that mean something to the loader, so that examples get deep.
    st.sampled_from(
        [
            "tls", "tcp", "off", "optional", "required", "reject", "allow",
            "app", "tcp:0", "tcp:8443:interface=127.0.0.1", "ssl:443", "tcp:x",
            "unix:/tmp/s", "a.pem", "/abs/b.pem", "round_robin", "127.0.0.1",
            1, 9001, 0, 65536, 1000, 1001, 2.5, -1.0,
        ]
    ),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _mostly(*good: object) -> st.SearchStrategy[Any]:
    """
    Mostly one of the C{good} values, sometimes any TOML value at all.
    """
    return _mostlyFrom(st.sampled_from(good))


def _mostlyFrom(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """
    Mostly a value drawn from C{good}, sometimes any TOML value at all.
    """
    return st.integers(0, 9).flatmap(lambda n: _values if n == 0 else good)


def _table(
    required: dict[str, st.SearchStrategy[Any]],
    optional: dict[str, st.SearchStrategy[Any]],
) -> st.SearchStrategy[dict[str, Any]]:
    """
    Tables with the C{required} keys and some C{optional} ones, now and
    then with a key dropped or an unknown key added.
    """

    def mutate(drawn: tuple[dict[str, Any], str, str, Any]) -> dict[str, Any]:
        table, change, name, value = drawn
        table = dict(table)
        if change == "drop" and table:
            del table[sorted(table)[len(name) % len(table)]]
        elif change == "add":
            table[name] = value
        return table

    return st.tuples(
        st.fixed_dictionaries(required, optional=optional),
        st.sampled_from(["keep"] * 10 + ["drop", "add"]),
        st.text(max_size=6),
        _values,
    ).map(mutate)


_paths = _mostly(["a.pem"], ["a.pem", "/abs/b.pem"], [], "a.pem")
_certificate = _table({"cert": _mostly("a.pem", "/x/b.pem"), "key": _mostly("a.key")}, {})
_listener = _table(
    {
        "name": _mostly("a", "b", "c", "d", "e"),
        "endpoint": _mostly("tcp:0", "tcp:8443:interface=127.0.0.1", "unix:/tmp/s"),
        "protocol": _mostly("tcp", "tls"),
        "pool": _mostly("app", "db"),
    },
    {
        "client_auth": _mostly("off", "optional", "required"),
        "ca_certificates": _paths,
        "crls": _paths,
        "certificates": _mostlyFrom(st.lists(_certificate, max_size=2)),
        "crl_missing": _mostly("reject", "allow"),
        "crl_expired": _mostly("reject", "allow"),
        "handshake_timeout": _mostly(10.0, 1, 0.25, 0, -1.0),
        "idle_timeout": _mostly(300, 0.5, 0, float("inf")),
        "max_connections": _mostly(1, 10000, 0, 1000001, 2.0),
    },
)
_member = _table(
    {"address": _mostly("127.0.0.1", "::1", "backend"), "port": _mostly(1, 9001, 65535, 0)},
    {"weight": _mostly(0, 1, 1000, 1001)},
)
_pool = _table(
    {
        "name": _mostly("app", "db"),
        "members": _mostlyFrom(st.lists(_member, min_size=1, max_size=3)),
    },
    {
        "selector": _mostly("round_robin"),
        "connect_timeout": _mostly(5.0, 1, 0.5, 0),
        "max_connect_attempts": _mostly(1, 3),
    },
)
_document = _table(
    {
        "listeners": _mostlyFrom(st.lists(_listener, min_size=1, max_size=2)),
        "pools": _mostlyFrom(st.lists(_pool, min_size=1, max_size=2)),
    },
    {},
)


class PropertyTests(ConfigFileMixin, SynchronousTestCase):
    """
    Property tests for L{loadConfig}.
    """

    def setUp(self) -> None:
        self.path = self.writeConfig("")

    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(_document)
    def test_anyDocument(self, document: dict[str, Any]) -> None:
        """
        When any TOML document is loaded, the result is a L{ProxyConfig} or
        a one-line L{ConfigurationError} naming the file, never another
        exception.
        """
        text = toDocument(document)
        # The emitter itself must be right, or the property proves little.
        self.assertEqual(tomllib.loads(text), document)
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            config = loadConfig(self.path)
        except ConfigurationError as e:
            message = str(e)
            self.assertTrue(message.startswith(self.path + ": "), message)
            self.assertNotIn("\n", message)
        else:
            self.assertIsInstance(config, ProxyConfig)

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=40))
    def test_anyText(self, text: str) -> None:
        """
        When any text at all is loaded, the result is a L{ProxyConfig} or a
        L{ConfigurationError}.
        """
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            loadConfig(self.path)
        except ConfigurationError as e:
            self.assertNotIn("\n", str(e))

    @given(st.text(max_size=30))
    @settings(deadline=None)
    def test_anyEndpoint(self, description: str) -> None:
        """
        When any string is checked as an endpoint, the answer is L{None} or
        a problem, never an exception.
        """
        problem = endpointProblem(description)
        self.assertIsInstance(problem, (str, type(None)))

