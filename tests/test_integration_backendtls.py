# -*- test-case-name: tests.test_integration_backendtls -*-
"""
Integration tests for mutual TLS to the backends (C{[pools.tls]}): the real
C{twistd -n mtlsproxy} between a real TLS client and real TLS members on
127.0.0.1 that require a client certificate (Python's C{ssl}, one thread
per connection).

    client --mTLS--> proxy (listener "mtls") --mTLS--> members
"""

from __future__ import annotations

import os
import select
import signal
import socket
import ssl
import threading
import time
from typing import Any, Optional

from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from mtlsproxy import pki

from .harness import DemoPKI, ProxyProcess, clientContext, sha256, tlsConfig, tlsExchange, waitFor


class MemberPKI:
    """
    The members' CA (root and intermediate, with CRLs), member
    certificates, and the proxy's client certificates, written to
    C{directory}.

    Members: C{good} (C{app.internal} and 127.0.0.1), C{revoked} (revoked by
    the intermediate's CRL), C{wrongName} (only C{other.internal}) and
    C{untrusted} (from a root the proxy does not trust).  Proxy client
    certificates: C{proxy} (from the root members trust) and C{stranger}
    (from one they do not).

    @ivar root: The members' root CA.
    @ivar inter: The members' intermediate CA.
    @ivar clients: The CA of the proxy's client certificates.
    @ivar issued: The member certificates by name.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        root = pki.createRootCA("Member Root")
        inter = pki.createIntermediateCA(root, "Member Intermediate")
        other = pki.createRootCA("Stranger Root")
        clients = pki.createRootCA("Proxy Client Root")
        self.root, self.inter, self.clients = root, inter, clients
        self.issued: dict[str, pki.Issued] = {}
        # The CAs a CRL is checked with must be configured: root and intermediate.
        self.write("member-ca.pem", pki.chainPEM([root.certificate, inter.certificate]))
        self.write("proxy-client-ca.pem", pki.certificatePEM(clients.certificate))

        def member(
            name: str, issuer: pki.Issued, chain: list[pki.Issued], **names: Any
        ) -> pki.Issued:
            issued = pki.issueServerCertificate(issuer, "app.internal", **names)
            certificates = [issued.certificate] + [c.certificate for c in chain]
            self.write(f"{name}.pem", pki.chainPEM(certificates))
            self.write(f"{name}.key", pki.keyPEM(issued.key))
            self.issued[name] = issued
            return issued

        good = {"dnsNames": ["app.internal"], "ipAddresses": ["127.0.0.1"]}
        member("good", inter, [inter], **good)
        revoked = member("revoked", inter, [inter], **good)
        member("wrongName", inter, [inter], dnsNames=["other.internal"])
        member("untrusted", other, [], **good)
        self.write(
            "member-crls.pem",
            pki.crlPEM(pki.buildCRL(root)) + pki.crlPEM(pki.buildCRL(inter, [revoked.certificate])),
        )
        for name, issuer in (("proxy", clients), ("stranger", other)):
            issued = pki.issueClientCertificate(issuer, f"mtlsproxy-{name}")
            self.write(f"{name}-client.pem", pki.certificatePEM(issued.certificate))
            self.write(f"{name}-client.key", pki.keyPEM(issued.key))

    def write(self, name: str, data: bytes) -> None:
        with open(self.path(name), "wb") as f:
            f.write(data)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)


class TLSEchoMember:
    """
    A threaded TLS member on 127.0.0.1 that requires a client certificate
    from C{clientCA}, echoes what it receives and, at EOF (the proxy's
    close_notify), appends C{"\\n<name> <byte count>\\n"}, sends its own
    close_notify and closes.

    @ivar accepted: TCP connections accepted.
    @ivar peers: The client certificate subjects of completed handshakes.
    @ivar serverNames: The SNI names received.
    @ivar rejected: The errors of failed handshakes.
    """

    def __init__(
        self, name: str, pkiObj: MemberPKI, certificate: str, clientCA: str = "proxy-client-ca.pem"
    ) -> None:
        self.name = name
        self.accepted = 0
        self.peers: list[str] = []
        self.serverNames: list[Optional[str]] = []
        self.rejected: list[str] = []
        self.received: list[bytes] = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(
            pkiObj.path(f"{certificate}.pem"), pkiObj.path(f"{certificate}.key")
        )
        context.load_verify_locations(pkiObj.path(clientCA))
        context.verify_mode = ssl.CERT_REQUIRED
        context.sni_callback = self._serverName
        self._context = context
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._stopped = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serverName(self, sslObject: object, name: Optional[str], context: object) -> None:
        self.serverNames.append(name)

    def _serve(self) -> None:
        while not self._stopped:
            try:
                raw, _ = self._sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._handle, args=(raw,), daemon=True).start()

    def _handle(self, raw: socket.socket) -> None:
        raw.settimeout(30)
        try:
            conn = self._context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as e:
            self.rejected.append(str(e))
            raw.close()
            return
        certificate: dict[str, Any] = conn.getpeercert() or {}
        names = [name for part in certificate.get("subject", ()) for name in part]
        self.peers.append(next((value for key, value in names if key == "commonName"), "?"))
        total = 0
        received = b""
        try:
            while True:
                data = conn.recv(262144)
                if not data:
                    break
                if len(received) < 64:
                    received += data[: 64 - len(received)]
                total += len(data)
                conn.sendall(data)
            conn.sendall(f"\n{self.name} {total}\n".encode())
            try:
                conn.unwrap()
            except (ssl.SSLError, OSError):
                pass
        except (ssl.SSLError, OSError):
            pass
        finally:
            self.received.append(received)
            raw.close()

    def stop(self) -> None:
        self._stopped = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


class BackendTLSTests(SynchronousTestCase):
    """
    A C{tls} listener with client certificates in front of a pool with
    C{[pools.tls]}.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.clientPKI = DemoPKI(os.path.join(self.dir, "pki"))
        self.memberPKI = MemberPKI(os.path.join(self.dir, "member-pki"))

    def members(
        self, *certificates: str, clientCA: str = "proxy-client-ca.pem"
    ) -> list[TLSEchoMember]:
        members = [
            TLSEchoMember(f"member-{index}", self.memberPKI, certificate, clientCA)
            for index, certificate in enumerate(certificates, 1)
        ]
        for member in members:
            self.addCleanup(member.stop)
        return members

    def startProxy(
        self,
        members: list[TLSEchoMember],
        serverName: Optional[str] = "app.internal",
        clientCertificate: str = "proxy",
        topLevel: str = "",
    ) -> ProxyProcess:
        d = self.memberPKI.directory
        name = f'server_name = "{serverName}"\n' if serverName else ""
        pool = (
            "max_connect_attempts = 3\n"
            "[pools.tls]\n"
            f'ca_certificates = ["{d}/member-ca.pem"]\n'
            f'crls = ["{d}/member-crls.pem"]\n'
            f"{name}"
            f'cert = "{d}/{clientCertificate}-client.pem"\n'
            f'key = "{d}/{clientCertificate}-client.key"\n'
        )
        config = topLevel + tlsConfig(
            self.clientPKI.directory, members, extraPool=pool  # type: ignore[arg-type]
        )
        proxy = ProxyProcess(self.dir, config)
        self.addCleanup(proxy.stop)
        proxy.start()
        return proxy

    def exchange(
        self, proxy: ProxyProcess, payload: bytes = b"hello", timeout: float = 20.0
    ) -> bytes:
        return tlsExchange(
            proxy.ports["mtls"], clientContext(self.clientPKI, "client"), payload, timeout
        )

    def assertLogged(self, proxy: ProxyProcess, member: TLSEchoMember, reason: str) -> None:
        pattern = rf"backend_tls_failed: member 127\.0\.0\.1:{member.port} of pool app: {reason}\b"
        self.assertIsNotNone(
            proxy.waitForLog(pattern), f"no {reason} for {member.port} in:\n{proxy.log()}"
        )

    def test_endToEnd(self) -> None:
        """
        When a client sends bytes through the proxy to a member over mutual
        TLS on both legs, they arrive, the answer written after the
        proxy's close_notify comes back, the member saw the proxy's client
        certificate and the configured server name as SNI.
        """
        [member] = self.members("good")
        proxy = self.startProxy([member])
        answer = self.exchange(proxy, b"ping")
        self.assertEqual(answer, b"ping\nmember-1 4\n")
        self.assertEqual(member.peers, ["mtlsproxy-proxy"])
        self.assertEqual(member.serverNames, ["app.internal"])

    def test_largeTransferIntact(self) -> None:
        """
        When 4 MiB go each way through both TLS legs, every byte arrives
        intact.
        """
        [member] = self.members("good")
        proxy = self.startProxy([member])
        payload = os.urandom(4 * 1024 * 1024)
        answer = self.exchange(proxy, payload, timeout=60.0)
        body, _, trailer = answer.rpartition(b"\n")[0].rpartition(b"\n")
        self.assertEqual(trailer, f"member-1 {len(payload)}".encode())
        self.assertEqual(sha256(body), sha256(payload))

    def test_memberAddressChecked(self) -> None:
        """
        When no server_name is configured, the member's certificate is
        checked against its IP address (127.0.0.1) and no SNI is sent.
        """
        [member] = self.members("good")
        proxy = self.startProxy([member], serverName=None)
        self.assertEqual(self.exchange(proxy), b"hello\nmember-1 5\n")
        self.assertEqual(member.serverNames, [None])

    def assertSkipped(self, certificate: str, reason: str) -> None:
        """
        A member presenting C{certificate} is skipped with C{reason} for a
        good member, which serves; the bad one received no application
        byte.
        """
        bad, good = self.members(certificate, "good")
        proxy = self.startProxy([bad, good])
        for _ in range(2):
            self.assertEqual(self.exchange(proxy), b"hello\nmember-2 5\n")
        self.assertLogged(proxy, bad, reason)
        self.assertGreaterEqual(bad.accepted, 1)
        self.assertEqual(bad.received, [])
        self.assertEqual(bad.peers, [])

    def test_untrustedMemberSkipped(self) -> None:
        """
        When a member's certificate comes from a CA the pool does not trust,
        it is skipped with unknown_ca and the next member serves.
        """
        self.assertSkipped("untrusted", "unknown_ca")

    def test_wrongNameSkipped(self) -> None:
        """
        When a member's certificate is not valid for the server name, it is
        skipped with hostname_mismatch and the next member serves.
        """
        self.assertSkipped("wrongName", "hostname_mismatch")

    def test_revokedMemberSkipped(self) -> None:
        """
        When a member's certificate is revoked by its issuer's CRL, it is
        skipped with revoked and the next member serves.
        """
        self.assertSkipped("revoked", "revoked")

    def test_onlyBadMembers(self) -> None:
        """
        When every member fails verification, the client is closed without
        an answer, and the log names each member's reason and that there
        was no backend.
        """
        untrusted, revoked = self.members("untrusted", "revoked")
        proxy = self.startProxy([untrusted, revoked])
        self.assertEqual(self.exchange(proxy), b"")
        self.assertLogged(proxy, untrusted, "unknown_ca")
        self.assertLogged(proxy, revoked, "revoked")
        noBackend = proxy.waitForLog(r"no backend for .* after 2 attempt\(s\)")
        self.assertIsNotNone(noBackend, proxy.log())
        self.assertEqual(untrusted.received + revoked.received, [])

    def test_memberRejectsProxyCertificate(self) -> None:
        """
        When the proxy presents a client certificate the member does not
        trust, the member rejects the handshake, the proxy logs
        client_certificate_rejected and the client is not served.
        """
        [member] = self.members("good")
        proxy = self.startProxy([member], clientCertificate="stranger")
        self.assertEqual(self.exchange(proxy), b"")
        self.assertLogged(proxy, member, "client_certificate_rejected")
        self.assertTrue(waitFor(lambda: member.rejected), "the member did not reject the proxy")
        self.assertEqual(member.peers, [])
        self.assertEqual(member.received, [])

    def test_reload(self) -> None:
        """
        When the proxy's client certificate is replaced and the proxy gets
        SIGHUP, the member sees the new certificate on the next connection;
        when a new CRL revokes the member and the proxy gets SIGHUP, the
        next connection to it is refused as revoked, without a restart.
        """
        [member] = self.members("good")
        proxy = self.startProxy([member], topLevel="reload_poll_interval = 0\n")
        self.assertEqual(self.exchange(proxy), b"hello\nmember-1 5\n")
        self.assertEqual(member.peers, ["mtlsproxy-proxy"])

        rotated = pki.issueClientCertificate(self.memberPKI.clients, "mtlsproxy-rotated")
        self.memberPKI.write("proxy-client.pem", pki.certificatePEM(rotated.certificate))
        self.memberPKI.write("proxy-client.key", pki.keyPEM(rotated.key))
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGHUP)
        applied = proxy.waitForLog(r"Reloaded .*\(SIGHUP\).*new backend TLS \(cert, key\)")
        self.assertIsNotNone(applied, proxy.log())
        self.assertEqual(self.exchange(proxy), b"hello\nmember-1 5\n")
        self.assertEqual(member.peers, ["mtlsproxy-proxy", "mtlsproxy-rotated"])

        m = self.memberPKI
        m.write(
            "member-crls.pem",
            pki.crlPEM(pki.buildCRL(m.root, crlNumber=2))
            + pki.crlPEM(pki.buildCRL(m.inter, [m.issued["good"].certificate], crlNumber=2)),
        )
        proxy.process.send_signal(signal.SIGHUP)
        applied = proxy.waitForLog(r"Reloaded .*\(SIGHUP\).*new backend TLS \(crls\)")
        self.assertIsNotNone(applied, proxy.log())
        self.assertEqual(self.exchange(proxy), b"")
        self.assertLogged(proxy, member, "revoked")
        self.assertEqual(member.received, [b"hello", b"hello"])

    def test_reloadClosesRevokedMember(self) -> None:
        """
        When a new CRL revokes the member and the proxy gets SIGHUP, the
        client connection relayed to it is closed (the client reads the
        end) and the proxy logs the member, the pool and the client.
        """
        [member] = self.members("good")
        proxy = self.startProxy([member], topLevel="reload_poll_interval = 0\n")
        sock = socket.create_connection(("127.0.0.1", proxy.ports["mtls"]), timeout=20)
        self.addCleanup(sock.close)
        conn = SSL.Connection(clientContext(self.clientPKI, "client"), sock)
        conn.set_connect_state()
        sock.setblocking(False)
        deadline = time.monotonic() + 20

        def retry(f: Any) -> Any:
            while True:
                try:
                    return f()
                except (SSL.WantReadError, SSL.WantWriteError):
                    self.assertLess(time.monotonic(), deadline, proxy.log())
                    select.select([sock], [], [], 0.05)

        retry(conn.do_handshake)
        retry(lambda: conn.sendall(b"hello"))
        self.assertTrue(waitFor(lambda: member.peers), proxy.log())

        m = self.memberPKI
        m.write(
            "member-crls.pem",
            pki.crlPEM(pki.buildCRL(m.root, crlNumber=2))
            + pki.crlPEM(pki.buildCRL(m.inter, [m.issued["good"].certificate], crlNumber=2)),
        )
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGHUP)
        closed = proxy.waitForLog(
            rf"revoked_live: member 127\.0\.0\.1:{member.port} of pool app presents certificate"
            rf" {m.issued['good'].certificate.serial_number:x}"
        )
        self.assertIsNotNone(closed, proxy.log())
        self.assertIsNotNone(proxy.waitForLog(r"Reloaded .*\(SIGHUP\).* 1 revoked connection"), proxy.log())
        received = b""
        try:
            while True:
                data = retry(lambda: conn.recv(4096))
                if not data:
                    break
                received += data
        except (SSL.ZeroReturnError, SSL.SysCallError):
            pass
        self.assertNotIn(b"member-1", received)
