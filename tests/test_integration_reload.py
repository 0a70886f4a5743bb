# -*- test-case-name: tests.test_integration_reload -*-
"""
Integration tests for server names, certificate formats, TLS policies, hot
reload and live revocation: the real C{twistd -n mtlsproxy}, echo backends
and pyOpenSSL clients, all on 127.0.0.1, every wait bounded.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from mtlsproxy import pki

from .harness import DemoPKI, EchoBackend, ProxyProcess, waitFor

TLS12 = SSL.TLS1_2_VERSION
TLS13 = SSL.TLS1_3_VERSION
TIMEOUT = 10.0


class LiveClient:
    """
    One TLS client connection kept open across the test: send, read what
    comes back, tell whether the proxy closed it.
    """

    def __init__(
        self,
        port: int,
        trust: str,
        serverName: Optional[bytes] = None,
        cert: Optional[tuple[str, str]] = None,
        version: Optional[int] = None,
        ciphers: Optional[bytes] = None,
    ) -> None:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        if version is not None:
            context.set_min_proto_version(version)
            context.set_max_proto_version(version)
        if ciphers is not None:
            context.set_cipher_list(ciphers)
        context.load_verify_locations(trust)
        context.set_verify(SSL.VERIFY_PEER, lambda *a: a[-1])
        if cert is not None:
            context.use_certificate_chain_file(cert[0])
            context.use_privatekey_file(cert[1])
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.setblocking(False)
        self.conn = SSL.Connection(context, self.sock)
        if serverName is not None:
            self.conn.set_tlsext_host_name(serverName)
        self.conn.set_connect_state()
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                self.conn.do_handshake()
                break
            except SSL.WantReadError:
                if time.monotonic() > deadline:
                    raise TimeoutError("handshake did not finish")
                select.select([self.sock], [], [], 0.05)

    def served(self) -> tuple[str, int]:
        """
        The common name and serial number of the server's certificate.
        """
        certificate = self.conn.get_peer_certificate(as_cryptography=True)
        assert certificate is not None
        [name] = certificate.subject.get_attributes_for_oid(pki.NameOID.COMMON_NAME)
        return str(name.value), int(certificate.serial_number)

    def exchange(self, data: bytes) -> bytes:
        """
        Send C{data} and read until as many bytes came back (the echo).
        Raises L{SSL.Error} or L{ConnectionError} if the proxy refuses or
        closed the connection.
        """
        self.conn.sendall(data)
        received = b""
        deadline = time.monotonic() + TIMEOUT
        while len(received) < len(data):
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {received!r} came back")
            try:
                chunk = self.conn.recv(65536)
            except SSL.WantReadError:
                select.select([self.sock], [], [], 0.05)
                continue
            except SSL.ZeroReturnError:
                raise ConnectionError("closed by the proxy")
            except SSL.SysCallError as e:
                raise ConnectionError(str(e))
            if not chunk:
                raise ConnectionError("closed by the proxy")
            received += chunk
        return received

    def closedByProxy(self, timeout: float = TIMEOUT) -> bool:
        """
        Wait until the proxy ends the connection (close_notify, FIN or
        reset); C{False} if it is still open after C{timeout}.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self.conn.recv(65536):
                    return True
            except SSL.WantReadError:
                select.select([self.sock], [], [], 0.05)
            except (SSL.ZeroReturnError, SSL.SysCallError, SSL.Error, ConnectionError):
                return True
        return False

    def close(self) -> None:
        self.sock.close()


class _Proxy:
    """
    Helpers for a test that runs one proxy.
    """

    mktemp: Any
    addCleanup: Any

    def startProxy(self, configText: str, listeners: int = 1) -> ProxyProcess:
        self.proxy = ProxyProcess(self.dir, configText)
        self.addCleanup(self.proxy.stop)
        self.proxy.start(listeners=listeners)
        return self.proxy

    def makeDir(self) -> str:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        return self.dir

    def write(self, name: str, data: bytes) -> str:
        """
        Write a file atomically (a new file renamed over the old one).
        """
        path = os.path.join(self.dir, name)
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
        return path

    def backends(self, count: int) -> list[EchoBackend]:
        backends = [EchoBackend(f"backend-{n}") for n in range(1, count + 1)]
        for backend in backends:
            self.addCleanup(backend.stop)
        return backends

    def logCount(self, pattern: str) -> int:
        import re

        return len(re.findall(pattern, self.proxy.log()))

    def waitForCount(self, pattern: str, count: int, timeout: float = TIMEOUT) -> None:
        if not waitFor(lambda: self.logCount(pattern) >= count, timeout):
            raise AssertionError(f"{pattern!r} not logged {count} time(s):\n{self.proxy.log()}")


def members(backends: list[EchoBackend]) -> str:
    return "".join(
        f'\n[[pools.members]]\naddress = "127.0.0.1"\nport = {b.port}\n' for b in backends
    )


class SNIIntegrationTests(_Proxy, SynchronousTestCase):
    """
    Three names on one port with different client authentication, and a
    strict listener, against the real proxy.
    """

    def setUp(self) -> None:
        d = self.makeDir()
        self.serverRoot = pki.createRootCA("Server Root")
        www = pki.issueServerCertificate(self.serverRoot, "www.example.com", dnsNames=["www.example.com"])
        api = pki.issueServerCertificate(self.serverRoot, "api.example.com", dnsNames=["api.example.com"])
        wild = pki.issueServerCertificate(self.serverRoot, "wild", dnsNames=["*.example.net"])
        apiCA = pki.createRootCA("API Clients")
        partnerCA = pki.createRootCA("Partner Clients")
        for name, issued in (("www", www), ("api", api), ("wild", wild)):
            self.write(f"{name}.pem", pki.certificatePEM(issued.certificate))
            self.write(f"{name}.key", pki.keyPEM(issued.key))
        for name, issued in (
            ("api-client", pki.issueClientCertificate(apiCA, "api-client")),
            ("partner-client", pki.issueClientCertificate(partnerCA, "partner-client")),
        ):
            self.write(f"{name}.pem", pki.certificatePEM(issued.certificate))
            self.write(f"{name}.key", pki.keyPEM(issued.key))
        self.write("api-ca.pem", pki.certificatePEM(apiCA.certificate))
        self.write("api.crl", pki.crlPEM(pki.buildCRL(apiCA)))
        self.write("partner-ca.pem", pki.certificatePEM(partnerCA.certificate))
        self.write("partner.crl", pki.crlPEM(pki.buildCRL(partnerCA)))
        self.trust = self.write("server-root.pem", pki.certificatePEM(self.serverRoot.certificate))
        backends = self.backends(1)
        entries = f"""
[[listeners.certificates]]
cert = "{d}/www.pem"
key = "{d}/www.key"

[[listeners.certificates]]
cert = "{d}/api.pem"
key = "{d}/api.key"
client_auth = "required"
ca_certificates = ["{d}/api-ca.pem"]
crls = ["{d}/api.crl"]

[[listeners.certificates]]
cert = "{d}/wild.pem"
key = "{d}/wild.key"
client_auth = "optional"
ca_certificates = ["{d}/partner-ca.pem"]
crls = ["{d}/partner.crl"]
"""
        self.startProxy(
            f"""
[[listeners]]
name = "sites"
endpoint = "tcp:0:interface=127.0.0.1"
protocol = "tls"
pool = "app"
{entries}
[[listeners]]
name = "strict"
endpoint = "tcp:0:interface=127.0.0.1"
protocol = "tls"
pool = "app"
strict_sni = true
{entries}
[[pools]]
name = "app"
{members(backends)}
""",
            listeners=2,
        )
        self.port = self.proxy.ports["sites"]
        self.strictPort = self.proxy.ports["strict"]

    def client(self, serverName: Optional[bytes], cert: Optional[str] = None, port: Optional[int] = None, version: Optional[int] = None) -> LiveClient:
        files = None if cert is None else (os.path.join(self.dir, f"{cert}.pem"), os.path.join(self.dir, f"{cert}.key"))
        client = LiveClient(port or self.port, self.trust, serverName, files, version)
        self.addCleanup(client.close)
        return client

    def assertServed(self, serverName: Optional[bytes], name: str, cert: Optional[str] = None, **kwargs: Any) -> None:
        for version in (TLS12, TLS13):
            client = self.client(serverName, cert, version=version, **kwargs)
            self.assertEqual(client.served()[0], name)
            self.assertEqual(client.exchange(b"ping"), b"ping")

    def assertRefused(self, serverName: Optional[bytes], cert: Optional[str], reason: str, port: Optional[int] = None) -> None:
        before = self.logCount(rf"\b{reason}\b")
        def attempt() -> None:
            client = self.client(serverName, cert, port, TLS13)
            client.exchange(b"ping")
        self.assertRaises((SSL.Error, ConnectionError, TimeoutError), attempt)
        self.waitForCount(rf"Rejected TLS client .*\b{reason}\b", before + 1)

    def test_names(self) -> None:
        """
        When clients ask for no name, the first name, a wildcard name or an
        unknown name, each gets the right certificate; the names that ask
        for client certificates do so and the others do not.
        """
        self.assertServed(None, "www.example.com")
        self.assertServed(b"www.example.com", "www.example.com")
        self.assertServed(b"unknown.example.org", "www.example.com")
        self.assertServed(b"shop.example.net", "wild")
        self.assertServed(b"shop.example.net", "wild", cert="partner-client")
        self.assertServed(b"api.example.com", "api.example.com", cert="api-client")

    def test_requiredNameRefusals(self) -> None:
        """
        When a client without a certificate, or with one from the other
        name's CA, asks for the name that requires client certificates, it
        is refused, although the port's default name asks for none.
        """
        self.assertRefused(b"api.example.com", None, "no_certificate")
        self.assertRefused(b"api.example.com", "partner-client", "unknown_ca")
        self.assertRefused(b"shop.example.net", "api-client", "unknown_ca")

    def test_strict(self) -> None:
        """
        When the listener is strict, an unknown name gets an
        unrecognized_name alert and the log says unknown_sni; known names
        and clients without a name are served.
        """
        with self.assertRaises(SSL.Error) as raised:
            self.client(b"unknown.example.org", port=self.strictPort)
        self.assertIn("unrecognized name", str(raised.exception))
        self.waitForCount(r"Rejected TLS client .*unknown_sni", 1)
        self.assertEqual(self.client(None, port=self.strictPort).served()[0], "www.example.com")
        self.assertEqual(self.client(b"x.example.net", port=self.strictPort).served()[0], "wild")


class FormatsAndPoliciesIntegrationTests(_Proxy, SynchronousTestCase):
    """
    PKCS#12 with passwords from a file and from the environment, an
    encrypted PEM key, and TLS policies, against the real proxy.
    """

    def setUp(self) -> None:
        d = self.makeDir()
        root = pki.createRootCA("Server Root")
        inter = pki.createIntermediateCA(root, "Server Intermediate")
        self.trust = self.write("root.pem", pki.certificatePEM(root.certificate))
        self.issued = {}
        for name in ("p12file", "p12env", "pem", "modern", "compat", "tls13"):
            issued = pki.issueServerCertificate(inter, f"{name}.example", dnsNames=["localhost"])
            self.issued[name] = issued
        self.write("p12file.p12", pki.pkcs12Bytes(self.issued["p12file"], [inter.certificate], b"file-secret"))
        self.write("p12file.password", b"file-secret\n")
        self.write("p12env.p12", pki.pkcs12Bytes(self.issued["p12env"], [inter.certificate], b"env-secret"))
        self.write("pem.pem", pki.chainPEM([self.issued["pem"].certificate, inter.certificate]))
        self.write("pem.key", pki.keyPEM(self.issued["pem"].key, b"pem-secret"))
        self.write("pem.password", b"pem-secret")
        for name in ("modern", "compat", "tls13"):
            self.write(f"{name}.pem", pki.chainPEM([self.issued[name].certificate, inter.certificate]))
            self.write(f"{name}.key", pki.keyPEM(self.issued[name].key))
        os.environ["MTLSPROXY_IT_P12"] = "env-secret"
        self.addCleanup(os.environ.pop, "MTLSPROXY_IT_P12")
        backends = self.backends(1)

        def listener(name: str, entry: str, extra: str = "") -> str:
            return (
                f'[[listeners]]\nname = "{name}"\nendpoint = "tcp:0:interface=127.0.0.1"\n'
                f'protocol = "tls"\npool = "app"\n{extra}\n[[listeners.certificates]]\n{entry}\n'
            )

        self.startProxy(
            listener("p12file", f'pkcs12 = "{d}/p12file.p12"\npassword_file = "{d}/p12file.password"')
            + listener("p12env", f'pkcs12 = "{d}/p12env.p12"\npassword_env = "MTLSPROXY_IT_P12"')
            + listener("pem", f'cert = "{d}/pem.pem"\nkey = "{d}/pem.key"\npassword_file = "{d}/pem.password"')
            + listener("modern", f'cert = "{d}/modern.pem"\nkey = "{d}/modern.key"')
            + listener("compat", f'cert = "{d}/compat.pem"\nkey = "{d}/compat.key"', 'tls_policy = "tls12_compat"')
            + listener("tls13", f'cert = "{d}/tls13.pem"\nkey = "{d}/tls13.key"', 'tls_policy = "tls13_only"')
            + f'[[pools]]\nname = "app"\n{members(backends)}',
            listeners=6,
        )

    def client(self, listener: str, **kwargs: Any) -> LiveClient:
        client = LiveClient(self.proxy.ports[listener], self.trust, b"localhost", **kwargs)
        self.addCleanup(client.close)
        return client

    def test_encryptedMaterial(self) -> None:
        """
        When the certificate comes from a PKCS#12 file (password in a file
        or in the environment) or an encrypted PEM key, clients get it with
        its intermediate and data flows.
        """
        for name in ("p12file", "p12env", "pem"):
            client = self.client(name)
            self.assertEqual(client.served(), (f"{name}.example", self.issued[name].certificate.serial_number))
            self.assertEqual(len(client.conn.get_peer_cert_chain() or []), 2)
            self.assertEqual(client.exchange(b"hello"), b"hello")

    def test_tls13Only(self) -> None:
        """
        When the policy is tls13_only, a TLS 1.2 client is refused with a
        protocol_version alert; TLS 1.3 works.
        """
        with self.assertRaises(SSL.Error) as raised:
            self.client("tls13", version=TLS12)
        self.assertIn("protocol version", str(raised.exception))
        self.assertEqual(self.client("tls13", version=TLS13).exchange(b"x"), b"x")

    def test_cbc(self) -> None:
        """
        When a TLS 1.2 client offers only CBC suites, the default policy
        refuses it and tls12_compat serves it.
        """
        cbc = b"ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384"
        with self.assertRaises(SSL.Error):
            self.client("modern", version=TLS12, ciphers=cbc)
        client = self.client("compat", version=TLS12, ciphers=cbc)
        self.assertEqual(client.conn.get_cipher_name(), "ECDHE-ECDSA-AES128-SHA256")
        self.assertEqual(client.exchange(b"cbc"), b"cbc")


class ReloadIntegrationTests(_Proxy, SynchronousTestCase):
    """
    Reloading the running proxy: SIGHUP, file polling (including a
    Kubernetes-style symlink swap), broken files, pool members, live
    revocation.
    """

    def setUp(self) -> None:
        d = self.makeDir()
        self.pki = DemoPKI(os.path.join(d, "pki"))
        self.client2 = pki.issueClientCertificate(self.pki.inter, "client-two")
        self.pki.writeClient("client2", self.client2, [self.pki.inter])
        # The server certificate and key live in a Kubernetes-style secret
        # folder: links through ..data, which an update replaces atomically.
        self.secret = os.path.join(d, "secret")
        self.secretVersion = 0
        self.publishServer(self.pki.server)
        self.backendList = self.backends(3)
        self.startProxy(self.configText(self.backendList[:2]))
        self.port = self.proxy.ports["mtls"]

    def configText(self, backends: list[EchoBackend], weights: Optional[list[int]] = None) -> str:
        weights = weights or [1] * len(backends)
        pool = "".join(
            f'\n[[pools.members]]\naddress = "127.0.0.1"\nport = {b.port}\nweight = {w}\n'
            for b, w in zip(backends, weights)
        )
        p = self.pki.directory
        return f"""
reload_poll_interval = 0.3

[[listeners]]
name = "mtls"
endpoint = "tcp:0:interface=127.0.0.1"
protocol = "tls"
pool = "app"
client_auth = "required"
ca_certificates = ["{p}/ca-bundle.pem"]
crls = ["{p}/crls.pem"]

[[listeners.certificates]]
cert = "{self.secret}/tls.crt"
key = "{self.secret}/tls.key"

[[pools]]
name = "app"
{pool}
"""

    def publishServer(self, issued: pki.Issued) -> None:
        """
        Publish a server certificate the way the kubelet updates a secret
        volume: a new timestamped folder, a new C{..data} link renamed over
        the old one; C{tls.crt} and C{tls.key} are links through C{..data}.
        """
        self.secretVersion += 1
        version = f"..2024_01_0{self.secretVersion}"
        os.makedirs(os.path.join(self.secret, version))
        with open(os.path.join(self.secret, version, "tls.crt"), "wb") as f:
            f.write(pki.chainPEM([issued.certificate, self.pki.inter.certificate]))
        with open(os.path.join(self.secret, version, "tls.key"), "wb") as f:
            f.write(pki.keyPEM(issued.key))
        os.symlink(version, os.path.join(self.secret, "..data_tmp"))
        os.replace(os.path.join(self.secret, "..data_tmp"), os.path.join(self.secret, "..data"))
        for name in ("tls.crt", "tls.key"):
            link = os.path.join(self.secret, name)
            if not os.path.islink(link):
                os.symlink(os.path.join("..data", name), link)

    def renewedServer(self) -> pki.Issued:
        return pki.issueServerCertificate(
            self.pki.inter, "localhost", dnsNames=["localhost"], ipAddresses=["127.0.0.1"]
        )

    def client(self, name: str = "client") -> LiveClient:
        client = LiveClient(
            self.port,
            self.pki.path("root.crt"),
            b"localhost",
            (self.pki.path(f"{name}-chain.pem"), self.pki.path(f"{name}.key")),
        )
        self.addCleanup(client.close)
        return client

    def writeConfig(self, text: str) -> None:
        with open(self.proxy.config + ".tmp", "w") as f:
            f.write(text)
        os.replace(self.proxy.config + ".tmp", self.proxy.config)

    def sighup(self) -> None:
        assert self.proxy.process is not None
        self.proxy.process.send_signal(signal.SIGHUP)

    def test_sighupSwapsCertificateKeepsConnection(self) -> None:
        """
        When the server certificate is replaced and the proxy gets SIGHUP,
        new clients see the new serial while a connection established
        before keeps carrying data across the reload.
        """
        established = self.client()
        oldSerial = self.pki.server.certificate.serial_number
        self.assertEqual(established.served()[1], oldSerial)
        self.assertEqual(established.exchange(b"before"), b"before")
        # Polling is fast in this configuration; stop it from racing SIGHUP
        # by writing the new config (interval 0) first.
        self.writeConfig(self.configText(self.backendList[:2]).replace("reload_poll_interval = 0.3", "reload_poll_interval = 0"))
        self.waitForCount(r"Reloaded .*\(file change\)", 1)
        renewed = self.renewedServer()
        self.publishServer(renewed)
        self.sighup()
        self.waitForCount(r"Reloaded .*\(SIGHUP\)", 1)
        self.assertEqual(self.client().served()[1], renewed.certificate.serial_number)
        self.assertEqual(established.exchange(b"after the reload"), b"after the reload")
        self.assertEqual(established.served()[1], oldSerial)

    def test_kubernetesSwapDetected(self) -> None:
        """
        When the secret volume's C{..data} link is swapped, the poller
        reloads by itself and new clients see the new certificate.
        """
        renewed = self.renewedServer()
        self.publishServer(renewed)
        self.waitForCount(r"Reloaded .*\(file change\)", 1)
        self.assertEqual(self.client().served()[1], renewed.certificate.serial_number)

    def test_brokenFileKeepsOld(self) -> None:
        """
        When the new CRL file is broken, the proxy logs an error naming the
        file and keeps serving with the old material; fixing it reloads.
        """
        good = open(self.pki.path("crls.pem"), "rb").read()
        self.write(os.path.join(self.pki.directory, "crls.pem"), b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n")
        self.waitForCount(r"Reload of .* failed; the running configuration stays in service: .*crls\.pem", 1)
        self.assertIn(self.pki.path("crls.pem"), self.proxy.log())
        self.assertEqual(self.client().exchange(b"still"), b"still")
        self.write(os.path.join(self.pki.directory, "crls.pem"), good + b"\n")
        self.waitForCount(r"Reloaded .*\(file change\)", 1)

    def test_crlReloadClosesRevokedLiveConnection(self) -> None:
        """
        When a reloaded CRL revokes one client's certificate, that client's
        established connection is closed (logged as revoked_live with its
        serial), the other client's goes on, and the revoked client cannot
        connect again.
        """
        revoked = self.client("client")
        other = self.client("client2")
        self.assertEqual(revoked.exchange(b"a"), b"a")
        self.assertEqual(other.exchange(b"b"), b"b")
        self.write(
            os.path.join(self.pki.directory, "crls.pem"),
            pki.crlPEM(pki.buildCRL(self.pki.root, [self.pki.badinter.certificate]))
            + pki.crlPEM(pki.buildCRL(self.pki.inter, [self.pki.revoked.certificate, self.pki.client.certificate], crlNumber=2))
            + pki.crlPEM(pki.buildCRL(self.pki.badinter)),
        )
        self.waitForCount(r"revoked_live", 1)
        self.assertTrue(revoked.closedByProxy())
        serial = format(self.pki.client.certificate.serial_number, "x")
        self.assertRegex(self.proxy.log(), rf"revoked_live: certificate {serial} \(CN=client-ok")
        self.assertEqual(other.exchange(b"still here"), b"still here")
        self.assertEqual(self.logCount("revoked_live"), 1)
        with self.assertRaises((SSL.Error, ConnectionError, TimeoutError)):
            self.client("client").exchange(b"again")

    def test_poolMembers(self) -> None:
        """
        When the configuration adds a member and takes one out, new
        connections go to the new set while a connection to the removed
        member goes on.
        """
        first = self.client()
        first.exchange(b"x")
        before = [b.accepted for b in self.backendList]
        self.writeConfig(self.configText(self.backendList[1:]))
        self.waitForCount(r"Reloaded .*\(file change\)", 1)
        self.assertIn("member 127.0.0.1:%d added" % self.backendList[2].port, self.proxy.log())
        for _ in range(4):
            client = self.client()
            client.exchange(b"y")
            client.close()
        after = [b.accepted - n for b, n in zip(self.backendList, before)]
        self.assertEqual(after[0], 0)
        self.assertEqual(after[1] + after[2], 4)
        self.assertGreater(after[2], 0)
        self.assertEqual(first.exchange(b"still relayed"), b"still relayed")

    def test_restartNeeded(self) -> None:
        """
        When the listener's endpoint changes, the reload says it needs a
        restart and the proxy keeps listening where it was.
        """
        self.writeConfig(self.configText(self.backendList[:2]).replace("tcp:0:interface=127.0.0.1", "tcp:1:interface=127.0.0.1"))
        self.waitForCount(r"this needs a restart", 1)
        self.assertEqual(self.client().exchange(b"same port"), b"same port")


class TrustWithdrawnIntegrationTests(_Proxy, SynchronousTestCase):
    """
    Withdrawn trust against the real proxy: a reload that takes a CA out
    of a listener's C{ca_certificates} (or a pool's C{[pools.tls]}) closes
    the established connections it verified, and only those.
    """

    def setUp(self) -> None:
        d = self.makeDir()
        self.pki = DemoPKI(os.path.join(d, "pki"))
        p = self.pki
        # CA-B: the root of the "untrusted" client, trusted at first.
        p.write("ca-ab.pem", open(p.path("ca-bundle.pem"), "rb").read() + pki.certificatePEM(p.other.certificate))
        p.write("crls-ab.pem", open(p.path("crls.pem"), "rb").read() + pki.crlPEM(pki.buildCRL(p.other)))

    def listenerConfig(self, cas: str, crls: str, backends: list[EchoBackend], extraPool: str = "") -> str:
        p = self.pki.directory
        return f"""
reload_poll_interval = 0.3

[[listeners]]
name = "mtls"
endpoint = "tcp:0:interface=127.0.0.1"
protocol = "tls"
pool = "app"
client_auth = "required"
ca_certificates = [{cas}]
crls = [{crls}]

[[listeners.certificates]]
cert = "{p}/server-chain.pem"
key = "{p}/server.key"

[[pools]]
name = "app"
connect_timeout = 2.0
{extraPool}
{members(backends)}
"""

    def writeConfig(self, text: str) -> None:
        path = self.proxy.config
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)

    def client(self, name: str) -> LiveClient:
        client = LiveClient(
            self.proxy.ports["mtls"],
            self.pki.path("root.crt"),
            b"localhost",
            (self.pki.path(f"{name}-chain.pem"), self.pki.path(f"{name}.key")),
        )
        self.addCleanup(client.close)
        return client

    def test_caRemovedClosesItsClients(self) -> None:
        """
        When the listener's CA bundle loses CA-B and the proxy reloads, the
        client with a certificate from CA-B sees its connection closed and
        the log names the connection, the listener and CA-B; the client
        from CA-A stays connected and still relays bytes; the client from
        CA-B cannot connect again.
        """
        p = self.pki.directory
        backends = self.backends(1)
        self.startProxy(self.listenerConfig(f'"{p}/ca-ab.pem"', f'"{p}/crls-ab.pem"', backends))
        fromB = self.client("untrusted")
        fromA = self.client("client")
        self.assertEqual(fromB.exchange(b"b"), b"b")
        self.assertEqual(fromA.exchange(b"a"), b"a")
        self.writeConfig(self.listenerConfig(f'"{p}/ca-bundle.pem"', f'"{p}/crls.pem"', backends))
        self.waitForCount(r"untrusted_live", 1)
        self.assertTrue(fromB.closedByProxy())
        serial = format(self.pki.other.certificate.serial_number, "x")
        self.assertRegex(
            self.proxy.log(),
            rf"Closing connection \d+ of 127\.0\.0\.1:\d+ on listener mtls: untrusted_live:"
            rf" certificate {serial} \(CN=Untrusted Root, issued by CN=Untrusted Root\) is no"
            r" longer trusted: unable to get local issuer certificate",
        )
        self.waitForCount(r"Reloaded .* 0 revoked connection\(s\) closed, 1 no longer trusted", 1)
        self.assertEqual(fromA.exchange(b"still here"), b"still here")
        self.assertEqual(self.logCount("untrusted_live"), 1)
        with self.assertRaises((SSL.Error, ConnectionError, TimeoutError)):
            self.client("untrusted").exchange(b"again")

    def test_poolCARemovedClosesRelayToItsMember(self) -> None:
        """
        When a pool's C{[pools.tls]} CAs lose the CA of one member and the
        proxy reloads, the client connection relayed to that member is
        closed and the log names the member, the pool and the CA; the
        connection relayed to the other member goes on.
        """
        from .test_integration_backendtls import MemberPKI, TLSEchoMember

        members = MemberPKI(os.path.join(self.dir, "member-pki"))
        rootB = pki.createRootCA("Member Root B")
        interB = pki.createIntermediateCA(rootB, "Member Intermediate B")
        memberB = pki.issueServerCertificate(
            interB, "app.internal", dnsNames=["app.internal"], ipAddresses=["127.0.0.1"]
        )
        members.write("memberB.pem", pki.chainPEM([memberB.certificate, interB.certificate]))
        members.write("memberB.key", pki.keyPEM(memberB.key))
        members.write("member-ca-b.pem", pki.chainPEM([rootB.certificate, interB.certificate]))
        members.write("member-crls-b.pem", pki.crlPEM(pki.buildCRL(rootB)) + pki.crlPEM(pki.buildCRL(interB)))
        memberA = TLSEchoMember("member-a", members, "good")
        memberBServer = TLSEchoMember("member-b", members, "memberB")
        for member in (memberA, memberBServer):
            self.addCleanup(member.stop)
        m = members.directory

        def config(cas: str, crls: str) -> str:
            pool = (
                "[pools.tls]\n"
                f"ca_certificates = [{cas}]\n"
                f"crls = [{crls}]\n"
                'server_name = "app.internal"\n'
                f'cert = "{m}/proxy-client.pem"\n'
                f'key = "{m}/proxy-client.key"\n'
            )
            p = self.pki.directory
            return self.listenerConfig(f'"{p}/ca-bundle.pem"', f'"{p}/crls.pem"', [memberA, memberBServer], pool)  # type: ignore[list-item]

        self.startProxy(
            config(f'"{m}/member-ca.pem", "{m}/member-ca-b.pem"', f'"{m}/member-crls.pem", "{m}/member-crls-b.pem"')
        )
        relayed: dict[str, LiveClient] = {}
        for _ in range(2):
            before = (len(memberA.peers), len(memberBServer.peers))
            client = self.client("client")
            self.assertEqual(client.exchange(b"hello"), b"hello")
            after = (len(memberA.peers), len(memberBServer.peers))
            relayed["a" if after[0] > before[0] else "b"] = client
        self.assertEqual(sorted(relayed), ["a", "b"], self.proxy.log())
        self.writeConfig(config(f'"{m}/member-ca.pem"', f'"{m}/member-crls.pem"'))
        self.waitForCount(rf"untrusted_live: member 127\.0\.0\.1:{memberBServer.port} of pool app", 1)
        self.assertTrue(relayed["b"].closedByProxy())
        self.assertRegex(
            self.proxy.log(),
            rf"presents certificate {memberB.certificate.serial_number:x} \(CN=app\.internal\),"
            rf" whose chain through {rootB.certificate.serial_number:x} \(CN=Member Root B,",
        )
        self.assertEqual(relayed["a"].exchange(b"still relayed"), b"still relayed")
        self.assertEqual(self.logCount("untrusted_live"), 1)


class HTTPSReloadIntegrationTests(_Proxy, SynchronousTestCase):
    """
    Live revocation on an C{https} listener: a reload whose CRL revokes a
    client closes its keep-alive connections, idle or with a request under
    way, and that request's access line says C{revoked_live}.
    """

    def setUp(self) -> None:
        from .test_integration_http import HTTPBackend, listener, pool

        d = self.makeDir()
        self.pki = DemoPKI(os.path.join(d, "pki"))
        self.pki.writeClient("client2", pki.issueClientCertificate(self.pki.inter, "client-two"), [self.pki.inter])
        backend = self.backend = HTTPBackend("web")
        self.addCleanup(backend.stop)
        self.startProxy(
            "reload_poll_interval = 0.3\n"
            + listener("web", "https", "web", self.pki.directory, "response_timeout = 30")
            + pool("web", [backend.port])
        )

    def connection(self, name: str) -> Any:
        import http.client
        import ssl

        context = ssl.create_default_context(cafile=self.pki.path("root.crt"))
        context.load_cert_chain(self.pki.path(f"{name}-chain.pem"), self.pki.path(f"{name}.key"))
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.proxy.ports["web"], context=context, timeout=TIMEOUT
        )
        self.addCleanup(conn.close)
        return conn

    def get(self, conn: Any, path: str = "/echo") -> int:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return int(response.status)

    def test_crlReloadClosesKeepAliveConnections(self) -> None:
        """
        When a reloaded CRL revokes a client that has two keep-alive
        connections, one idle and one waiting for a slow response, both
        are closed (the waiting request gets no response), the waiting
        request's access line says C{revoked_live}, and another client's
        connection goes on serving requests.
        """
        import threading

        waiting = self.connection("client")
        idle = self.connection("client")
        other = self.connection("client2")
        for conn in (waiting, idle, other):
            self.assertEqual(self.get(conn), 200)
        outcome: list[object] = []

        def slow() -> None:
            try:
                outcome.append(self.get(waiting, "/slow?seconds=4"))
            except Exception as e:
                outcome.append(e)

        thread = threading.Thread(target=slow, daemon=True)
        thread.start()
        # The request is in flight once the backend has it.
        self.assertTrue(waitFor(lambda: "/slow?seconds=4" in self.backend.requests, timeout=TIMEOUT))
        p = self.pki
        self.write(
            os.path.join(p.directory, "crls.pem"),
            pki.crlPEM(pki.buildCRL(p.root, [p.badinter.certificate]))
            + pki.crlPEM(pki.buildCRL(p.inter, [p.revoked.certificate, p.client.certificate], crlNumber=2))
            + pki.crlPEM(pki.buildCRL(p.badinter)),
        )
        self.waitForCount(r"Reloaded .* 2 revoked connection\(s\) closed", 1)
        thread.join(TIMEOUT)
        self.assertEqual(len(outcome), 1)
        self.assertIsInstance(outcome[0], Exception, outcome)
        self.waitForCount(r'"GET /slow\?seconds=4 HTTP/1\.1" None -> \S+ pool=web revoked_live', 1)
        serial = format(p.client.certificate.serial_number, "x")
        self.assertEqual(
            self.logCount(rf"on listener web: revoked_live: certificate {serial} \(CN=client-ok"), 2
        )
        idle.sock.settimeout(TIMEOUT)
        try:
            self.assertEqual(idle.sock.recv(1), b"")
        except TimeoutError:
            self.fail("the idle connection of the revoked client is still open")
        except OSError:
            pass  # closed: a reset or an EOF without close_notify
        self.assertEqual(self.get(other), 200)


class _Health(BaseHTTPRequestHandler):
    """
    A member that answers C{/healthz} and C{/hello} with 200, anything
    else with 404.
    """

    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        if self.path in ("/healthz", "/hello"):
            body = f"ok {self.path}\n".encode()
            self.send_response(200)
        else:
            body = b"not found\n"
            self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class HealthCheckReloadIntegrationTests(_Proxy, SynchronousTestCase):
    """
    A reload fixes a wrong C{http} health check path on the real proxy.
    """

    def setUp(self) -> None:
        self.makeDir()
        self.member = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
        self.member.daemon_threads = True
        threading.Thread(target=self.member.serve_forever, daemon=True).start()
        self.addCleanup(self.member.server_close)
        self.addCleanup(self.member.shutdown)
        self.memberPort = self.member.server_address[1]

    def configText(self, path: str) -> str:
        return f"""
reload_poll_interval = 0

[[listeners]]
name = "plain"
endpoint = "tcp:0:interface=127.0.0.1"
protocol = "tcp"
pool = "app"

[[pools]]
name = "app"
connect_timeout = 2.0

[[pools.members]]
address = "127.0.0.1"
port = {self.memberPort}

[pools.health_check]
type = "http"
path = "{path}"
interval = 0.3
timeout = 0.3
jitter = 0.0
healthy_threshold = 1
unhealthy_threshold = 1
"""

    def request(self) -> bytes:
        """
        C{GET /hello} through the proxy: everything that comes back before
        the connection closes.
        """
        with socket.create_connection(("127.0.0.1", self.proxy.ports["plain"]), timeout=TIMEOUT) as s:
            s.sendall(b"GET /hello HTTP/1.0\r\nHost: app\r\n\r\n")
            received = b""
            while True:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                received += chunk
            return received

    def test_fixedPathMakesMemberHealthy(self) -> None:
        """
        When the health check's path is wrong, the member is unhealthy and
        clients are refused (no_healthy_member); when the path is fixed in
        the file and the proxy gets SIGHUP, the reload applies the new
        check (no restart needed), the member becomes healthy and clients
        are served.
        """
        self.startProxy(self.configText("/wrong"))
        member = f"127.0.0.1:{self.memberPort}"
        self.waitForCount(rf"member {member} is now unhealthy: HTTP status 404", 1)
        self.assertEqual(self.request(), b"")
        self.waitForCount(r"no_healthy_member", 1)
        with open(self.proxy.config + ".tmp", "w") as f:
            f.write(self.configText("/healthz"))
        os.replace(self.proxy.config + ".tmp", self.proxy.config)
        assert self.proxy.process is not None
        self.proxy.process.send_signal(signal.SIGHUP)
        self.waitForCount(r"Reloaded .*\(SIGHUP\)", 1)
        self.assertRegex(
            self.proxy.log(),
            r"Reloaded .*\(SIGHUP\): 1 change\(s\) applied \(pool 'app': health checks"
            r" \(path \"/wrong\" -> \"/healthz\"\)\), 0 need a restart",
        )
        self.waitForCount(rf"member {member} is now healthy: HTTP 200", 1)
        self.assertIn(b"ok /hello", self.request())
        self.assertEqual(self.logCount("this needs a restart"), 0)
