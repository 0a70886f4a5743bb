# -*- test-case-name: tests.test_bench -*-
"""
The benchmark's "naive Twisted portforward": Twisted's own
L{twisted.protocols.portforward.ProxyFactory} behind a Twisted TLS server port
(C{reactor.listenSSL}), one listener per route, and nothing else.

    python bench/naive.py CONFIG.json

C{CONFIG.json} (written by C{bench/run.py}'s C{Naive} proxy)::

    {"routes": {"echo": [listenPort, backendPort], ...},
     "serverChain": PEM, "serverKey": PEM, "ca": PEM, "crls": PEM}

It does the same TLS job as the other proxies measured: a pyOpenSSL context
with the server chain and key, a client certificate required
(C{VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT}, no Python verify callback:
OpenSSL's own verification), the CA file, the CRLs added to the store with
C{CRL_CHECK | CRL_CHECK_ALL}, TLS 1.2 minimum; no access log.  Session
resumption is OpenSSL's default for a server (stateless TLS 1.3 tickets, like
mtlsproxy's default), with a session id context set.

Its purpose is a floor: what Twisted's per-connection machinery (accepting,
the TLS protocol wrapper, C{connectTCP} to the backend, relaying, closing)
costs without any of mtlsproxy's features (policies, identities, routing,
pools, health, limits, metrics, access logs, half-close), so the benchmark
can say how much of mtlsproxy's per-handshake CPU is Twisted's, not ours.

Two changes to stock C{portforward}, neither a feature: C{TCP_NODELAY} on
both sides (as mtlsproxy and HAProxy set it; without it Nagle's algorithm
holds the first echo behind the unacknowledged session tickets until the
client's delayed ACK, some 40 ms, and the handshake rate would measure that
wait instead of CPU), and no log line per backend connection (the client
factory's "Starting factory"/"Stopping factory" lines).

It is a baseline, B{not a secure proxy}: C{portforward.ProxyServer} connects
to the backend as soon as the TCP connection is accepted, before the TLS
handshake (and so before the client certificate is verified) has completed.
No data reaches the backend before the handshake succeeds (the TLS wrapper
delivers application data only after it), but every client, even one
refused, costs the backend a connection.
"""

from __future__ import annotations

import json
import re
import sys

from cryptography import x509
from OpenSSL import SSL
from OpenSSL.crypto import X509StoreFlags
from twisted.internet import reactor
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.protocols import portforward
from zope.interface import implementer


@implementer(IOpenSSLContextFactory)
class ContextFactory:
    """
    One pyOpenSSL server context, built once; Twisted asks for it per
    connection (C{getContext}).
    """

    def __init__(self, config: dict[str, str]) -> None:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.use_certificate_chain_file(config["serverChain"])
        ctx.use_privatekey_file(config["serverKey"])
        ctx.check_privatekey()
        ctx.load_verify_locations(config["ca"])
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
        store = ctx.get_cert_store()
        assert store is not None
        with open(config["crls"], "rb") as f:
            pem = f.read()
        for block in re.findall(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", pem, re.S):
            store.add_crl(x509.load_pem_x509_crl(block))
        store.set_flags(X509StoreFlags.CRL_CHECK | X509StoreFlags.CRL_CHECK_ALL)
        # Without a session id context, OpenSSL refuses to resume a session
        # when it verifies clients.
        ctx.set_session_id(b"bench-naive")
        self.context = ctx

    def getContext(self) -> SSL.Context:
        return self.context


class Client(portforward.ProxyClient):
    """
    Twisted's C{ProxyClient} (the backend side) with C{TCP_NODELAY}.
    """

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
        super().connectionMade()


class ClientFactory(portforward.ProxyClientFactory):
    """
    Twisted's C{ProxyClientFactory}, quiet: without the "Starting factory"
    and "Stopping factory" lines it logs for every connection.
    """

    protocol = Client
    noisy = False


class Server(portforward.ProxyServer):
    """
    Twisted's C{ProxyServer} (the client side) with C{TCP_NODELAY}.
    """

    clientProtocolFactory = ClientFactory

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]
        super().connectionMade()


def main(argv: list[str]) -> None:
    with open(argv[1]) as f:
        config = json.load(f)
    # Errors go to standard output (the benchmark's output.log); no line per
    # connection (ClientFactory): no access log.
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    contextFactory = ContextFactory(config)
    for name, (port, backend) in config["routes"].items():
        factory = portforward.ProxyFactory("127.0.0.1", backend)
        factory.protocol = Server
        reactor.listenSSL(port, factory, contextFactory, backlog=4096, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv)
