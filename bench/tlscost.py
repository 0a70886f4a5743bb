# -*- test-case-name: tests.test_bench -*-
"""
What one server-side mutual-TLS handshake costs in OpenSSL alone: the
"OpenSSL limit" that a proxy's handshakes per CPU-second are compared with.

Client and server talk through memory BIOs in this one process; only the CPU
time spent inside the server's handshake calls is counted (no sockets, no
event loop, no application).  Two servers are measured:

  - C{pyopenssl}: the context mtlsproxy itself builds
    (L{mtlsproxy.tlscontext.buildServerContext}: client certificate required,
    CRLs with C{CRL_CHECK | CRL_CHECK_ALL}), on pyOpenSSL's OpenSSL;
  - C{stdlib}: Python's C{ssl} module with the same certificates, CA file,
    CRLs and C{VERIFY_CRL_CHECK_CHAIN}, on the OpenSSL Python was built with
    (on Debian the system's, the one HAProxy and stunnel use).

The client side is the load generator's (L{bench.loadgen.clientContext}):
X25519 only, certificate chain presented, no resumption.

Run as C{python bench/tlscost.py PKI_DIRECTORY [COUNT]}; prints one JSON line.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable

from OpenSSL import SSL

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loadgen import clientContext  # noqa: E402


def _pump(source: Any, sink: Any) -> None:
    try:
        data = source.bio_read(1 << 20)
    except SSL.WantReadError:
        return
    sink.bio_write(data)


def _pyOpenSSLServer(pki: str) -> Callable[[], SSL.Connection]:
    from mtlsproxy.checks import checkConfiguration
    from mtlsproxy.config import loadConfig
    from mtlsproxy.tlscontext import serverContextFactory

    config = loadConfig(os.path.join(pki, "tlscost.toml"))
    loaded = checkConfiguration(config, datetime.now(timezone.utc))
    listener = config.listeners[0]
    factory = serverContextFactory(listener, loaded.listeners[listener.name])

    def new() -> SSL.Connection:
        connection = factory.serverConnectionForTLS(None)  # type: ignore[arg-type]
        connection.set_accept_state()
        return connection

    return new


def measurePyOpenSSL(pki: str, count: int) -> dict[str, Any]:
    """
    Server CPU per handshake with mtlsproxy's own context.
    """
    newServer = _pyOpenSSLServer(pki)
    client = clientContext({"chain": os.path.join(pki, "client-chain.pem"), "key": os.path.join(pki, "client.key")})
    assert client is not None
    serverCPU = 0.0
    version = cipher = None
    for i in range(count + 20):
        server = newServer()
        peer = SSL.Connection(client, None)
        peer.set_connect_state()
        spent = 0.0
        for _ in range(8):
            try:
                peer.do_handshake()
            except SSL.WantReadError:
                pass
            _pump(peer, server)
            started = time.process_time()
            try:
                server.do_handshake()
                done = True
            except SSL.WantReadError:
                done = False
            # Tickets and alerts the server writes count too.
            try:
                server.recv(1)
            except (SSL.WantReadError, SSL.ZeroReturnError):
                pass
            spent += time.process_time() - started
            _pump(server, peer)
            if done and server.get_peer_certificate() is not None:
                break
        else:
            raise RuntimeError("pyOpenSSL handshake did not complete")
        if i >= 20:
            serverCPU += spent
        version, cipher = server.get_protocol_version_name(), server.get_cipher_name()
    perHandshake = serverCPU / count
    return {
        "openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        "usPerHandshake": perHandshake * 1e6,
        "handshakesPerCPUSecond": 1.0 / perHandshake,
        "version": version,
        "cipher": cipher,
    }


def measureStdlib(pki: str, count: int) -> dict[str, Any]:
    """
    Server CPU per handshake on Python's C{ssl} (the system OpenSSL).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(os.path.join(pki, "server-chain.pem"), os.path.join(pki, "server.key"))
    context.load_verify_locations(os.path.join(pki, "ca.pem"))
    context.load_verify_locations(os.path.join(pki, "crls.pem"))
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    client = clientContext({"chain": os.path.join(pki, "client-chain.pem"), "key": os.path.join(pki, "client.key")})
    assert client is not None
    serverCPU = 0.0
    version = cipher = None
    for i in range(count + 20):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        server = context.wrap_bio(incoming, outgoing, server_side=True)
        peer = SSL.Connection(client, None)
        peer.set_connect_state()
        spent = 0.0
        for _ in range(8):
            try:
                peer.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                incoming.write(peer.bio_read(1 << 20))
            except SSL.WantReadError:
                pass
            started = time.process_time()
            try:
                server.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            spent += time.process_time() - started
            pending = outgoing.read()
            if pending:
                peer.bio_write(pending)
            if done:
                break
        else:
            raise RuntimeError("ssl handshake did not complete")
        if i >= 20:
            serverCPU += spent
        version, cipher = server.version(), server.cipher()[0]
    perHandshake = serverCPU / count
    return {
        "openssl": ssl.OPENSSL_VERSION,
        "usPerHandshake": perHandshake * 1e6,
        "handshakesPerCPUSecond": 1.0 / perHandshake,
        "version": version,
        "cipher": cipher,
    }


def main() -> None:
    """
    Measure both servers and print the result as JSON.
    """
    pki = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 500
    print(json.dumps({"pyopenssl": measurePyOpenSSL(pki, count), "stdlib": measureStdlib(pki, count)}))


if __name__ == "__main__":
    main()
