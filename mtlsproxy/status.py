# -*- test-case-name: tests.test_status -*-
"""
The status endpoint (C{[status]}): a small twisted.web site for operators
and monitoring.

  - C{GET /status}: JSON: listeners, pools and members (health, last check,
    weight, connections), live connections, certificate and CRL expiry.
  - C{GET /metrics}: the Prometheus text format (L{mtlsproxy.metrics}).
  - C{GET /healthz}: 200 while the process runs.
  - C{GET /readyz}: 200 when every listener listens, every pool has a
    member that may take connections and the proxy is not shutting down;
    503 otherwise, with the reasons.
  - C{POST /members/<pool>/<address>:<port>/drain} and C{.../enable}: take
    a member out of rotation and put it back.  Refused (403) unless the
    endpoint listens on loopback (or a UNIX socket) or requires client
    certificates, and for any request a browser marks as cross-site (an
    C{Origin} header), so a web page cannot drive it.

It is plain HTTP by default, for loopback; with C{cert} and C{key} it is
HTTPS, and with C{client_auth = "required"} it verifies client certificates
with the same checks, contexts and rejection logging as the listeners.

This module also holds what the status page and the metrics report about
certificates: L{expiryReport}.
"""

from __future__ import annotations

import ipaddress
import json
import os
from datetime import datetime, timezone
from typing import Any, Callable, Optional

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from . import __version__
from .config import ProxyConfig
from .errors import ConfigurationError
from .material import ListenerMaterial
from .metrics import renderFor

__all__ = [
    "ExpiryEntry",
    "StatusResource",
    "StatusService",
    "expiryReport",
    "loadStatusMaterial",
    "privateEndpoint",
    "proxyStatus",
    "readiness",
]

SERVER_CERTIFICATE = "server_certificate"
CA_CERTIFICATE = "ca_certificate"
CRL = "crl"


@attrs.frozen
class ExpiryEntry:
    """
    When one certificate or CRL runs out.

    @ivar listener: The listener's name (C{"status"} for the status
        endpoint's own material, C{"pool:<name>"} for a pool's
        C{[pools.tls]} material).
    @ivar kind: C{"server_certificate"}, C{"chain_certificate"},
        C{"client_certificate"} (presented to a pool's members),
        C{"ca_certificate"} or C{"crl"}.
    @ivar subject: The certificate's subject, or the CRL's issuer (RFC
        4514).
    @ivar serial: The certificate's serial number (lowercase hex); L{None}
        for a CRL.
    @ivar expires: The certificate's notAfter or the CRL's nextUpdate (UTC);
        L{None} for a CRL without nextUpdate.
    @ivar file: The file it was read from, if known.
    @ivar pool: The pool's name for C{[pools.tls]} material, else L{None}.
    """

    listener: str
    kind: str
    subject: str
    serial: Optional[str]
    expires: Optional[datetime]
    file: Optional[str] = None
    pool: Optional[str] = None

    def asDict(self, now: datetime) -> dict[str, Any]:
        """
        The entry as JSON-serializable data, with the seconds left at
        C{now}.
        """
        return {
            "listener": self.listener,
            "pool": self.pool,
            "kind": self.kind,
            "subject": self.subject,
            "serial": self.serial,
            "file": self.file,
            "expires": _iso(self.expires),
            "seconds_left": (
                None if self.expires is None else round((self.expires - now).total_seconds())
            ),
        }


def _iso(moment: Optional[datetime]) -> Optional[str]:
    if moment is None:
        return None
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _materialEntries(listener: str, material: ListenerMaterial) -> list[ExpiryEntry]:
    """
    The expiry entries of one listener's material: every server
    certificate chain's leaf, every CA, every CRL.
    """
    entries = []
    for server in material.certificates:
        leaf = server.chain[0]
        entries.append(
            ExpiryEntry(
                listener,
                SERVER_CERTIFICATE,
                leaf.subject.rfc4514_string(),
                f"{leaf.serial_number:x}",
                leaf.not_valid_after_utc,
            )
        )
    for ca in material.cas:
        entries.append(
            ExpiryEntry(
                listener,
                CA_CERTIFICATE,
                ca.subject.rfc4514_string(),
                f"{ca.serial_number:x}",
                ca.not_valid_after_utc,
            )
        )
    for crl in material.crls:
        entries.append(
            ExpiryEntry(listener, CRL, crl.issuer.rfc4514_string(), None, crl.next_update_utc)
        )
    return entries


def _entryFrom(item: Any) -> Optional[ExpiryEntry]:
    """
    Read one entry of a reloader's C{expiryReport()}: an L{ExpiryEntry}, or
    any object or mapping with C{listener}, C{kind}, C{subject} (or
    C{issuer}), C{serial}, C{file} and C{expires} (or C{not_after},
    C{notAfter}, C{nextUpdate}), such as L{mtlsproxy.expiry.ExpiryItem}.
    """
    if isinstance(item, ExpiryEntry):
        return item

    def get(*names: str) -> Any:
        for name in names:
            if isinstance(item, dict) and name in item:
                return item[name]
            if hasattr(item, name):
                return getattr(item, name)
        return None

    expires = get("expires", "notAfter", "not_after", "nextUpdate", "next_update")
    if isinstance(expires, str):
        try:
            expires = datetime.fromisoformat(expires.replace("Z", "+00:00"))
        except ValueError:
            expires = None
    if not isinstance(expires, datetime):
        expires = None
    elif expires.tzinfo is None:
        expires = expires.replace(tzinfo=timezone.utc)
    listener = get("listener")
    kind = get("kind")
    subject = get("subject", "issuer")
    if listener is None or kind is None or subject is None:
        return None
    serial = get("serial")
    path = get("file")
    pool = get("pool")
    return ExpiryEntry(
        str(listener),
        str(kind),
        str(subject),
        None if serial is None else str(serial),
        expires,
        None if path is None else str(path),
        None if pool is None else str(pool),
    )


def expiryReport(proxy: Any, now: datetime) -> list[ExpiryEntry]:
    """
    When the certificates and CRLs the proxy uses now run out.

    If the proxy has a reloader with an C{expiryReport()} (the material in
    force after reloads), that is the source for the listeners and the
    pools' C{[pools.tls]}; otherwise the material loaded at start-up
    (C{proxy.loaded.listeners}, C{proxy.loaded.backends}).  The status
    endpoint's own material is added (as listener C{"status"}) unless the
    reloader's report already has it.

    @param proxy: The L{mtlsproxy.service.ProxyService}.
    @param now: The current time (unused by the computation from material;
        a reloader may use it).
    """
    reloader = getattr(proxy, "reloader", None)
    report = getattr(reloader, "expiryReport", None)
    result: list[ExpiryEntry] = []
    if callable(report):
        entries = [_entryFrom(item) for item in report()]
        result.extend(entry for entry in entries if entry is not None)
    else:
        from .expiry import expiryReport as itemsOf

        for name, material in getattr(proxy.loaded, "listeners", {}).items():
            result.extend(_materialEntries(name, material))
        # The pools' [pools.tls] material.
        items = itemsOf({}, now, getattr(proxy.loaded, "backends", {}))
        result.extend(entry for entry in map(_entryFrom, items) if entry is not None)
    statusMaterial = getattr(proxy, "statusMaterial", None)
    # The reloader's report already has it (its expiry monitor warns about
    # it too): adding it again would repeat every series, which a
    # supervisor's OpenMetrics parser refuses, losing the worker's samples.
    if statusMaterial is not None and not any(entry.listener == "status" for entry in result):
        result.extend(_materialEntries("status", statusMaterial))
    return result


def loadStatusMaterial(config: ProxyConfig, now: datetime) -> tuple[Optional[ListenerMaterial], list[str]]:
    """
    Load and check the status endpoint's certificate, key, CAs and CRLs,
    with the listeners' start-up checks.

    @return: The material (L{None} for plain HTTP or no status endpoint)
        and the warnings.
    @raise ConfigurationError: As for a listener, with the key path under
        C{status}.
    """
    from . import checks

    status = config.status
    if status is None or not status.tls:
        return None, []
    warnings: list[str] = []
    try:
        # The listeners' check, on the status endpoint seen as a listener.
        material = checks._checkListener(status.asListener(), "status", now, warnings)
    except ConfigurationError as e:
        key = (e.key or "").replace("status.certificates[0].", "status.")
        raise ConfigurationError(e.problem, e.path or config.path, key or None, e.line) from None
    return material, [w.replace("listener 'status'", "the status endpoint") for w in warnings]


def _memberStatus(member: Any, now: float) -> dict[str, Any]:
    """
    One member's entry in C{/status}.
    """
    lastCheck = getattr(member, "lastCheck", None)
    check: Optional[dict[str, Any]] = None
    if lastCheck is not None:
        result, when = lastCheck
        check = {
            "healthy": getattr(result, "healthy", None),
            "reason": getattr(result, "reason", None),
            "inconclusive": getattr(result, "inconclusive", False),
            "time": _iso(datetime.fromtimestamp(when, timezone.utc)),
        }
    return {
        "member": member.hostPort,
        "address": member.address,
        "port": member.port,
        "weight": member.weight,
        "healthy": member.healthy,
        "draining": member.draining,
        "ejected": member.ejected(now),
        "available": member.available(now),
        "active_connections": member.activeConnections,
        "total_connections": getattr(member, "totalConnections", None),
        "failed_connections": getattr(member, "failedConnections", None),
        "last_check": check,
    }


def _selectorName(proxy: Any, poolName: str, pool: Any) -> str:
    """
    The configured selector name of a pool (C{round_robin}), or the
    selector's class name if the configuration does not say.
    """
    try:
        return str(proxy.loaded.config.pool(poolName).selector)
    except (AttributeError, KeyError):
        return type(getattr(pool, "selector", None)).__name__


def _listenerAddress(listener: Any) -> Optional[str]:
    port = getattr(listener, "port", None)
    if port is None:
        return None
    address = port.getHost()
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"


def proxyStatus(proxy: Any, clock: Any) -> dict[str, Any]:
    """
    Everything C{GET /status} reports, as JSON-serializable data.

    @param proxy: The L{mtlsproxy.service.ProxyService}.
    @param clock: Provides C{seconds()}.
    """
    now = clock.seconds()
    moment = datetime.fromtimestamp(now, timezone.utc)
    connections = proxy.connections.snapshot()
    byListener: dict[str, int] = {name: 0 for name in proxy.listeners}
    for info in connections:
        byListener[info.listener] = byListener.get(info.listener, 0) + 1
    listeners = []
    for name, listener in proxy.listeners.items():
        config = listener.listenerConfig
        listeners.append(
            {
                "name": name,
                "protocol": config.protocol,
                "endpoint": config.endpoint,
                "address": _listenerAddress(listener),
                "listening": getattr(listener, "port", None) is not None,
                "pool": config.pool,
                "client_auth": getattr(config, "client_auth", None),
                "active_connections": byListener.get(name, 0),
            }
        )
    pools = []
    for name, pool in proxy.pools.items():
        members = [_memberStatus(member, now) for member in pool.members]
        pools.append(
            {
                "name": name,
                "selector": _selectorName(proxy, name, pool),
                "available_members": sum(1 for m in members if m["available"]),
                "failing_open": getattr(pool, "failingOpen", False),
                "members": members,
            }
        )
    expiry = expiryReport(proxy, moment)
    started = getattr(proxy, "startedAt", None)
    ready, problems = readiness(proxy, now)
    return {
        "version": __version__,
        "time": _iso(moment),
        "state": "draining" if getattr(proxy, "draining", False) else "running",
        "ready": ready,
        "problems": problems,
        "uptime_seconds": None if started is None else round(now - started, 3),
        "listeners": listeners,
        "pools": pools,
        "connections": {
            "active": len(connections),
            "by_listener": byListener,
        },
        "certificates": [e.asDict(moment) for e in expiry if e.kind != CRL],
        "crls": [e.asDict(moment) for e in expiry if e.kind == CRL],
    }


def readiness(proxy: Any, now: Optional[float] = None) -> tuple[bool, list[str]]:
    """
    Is the proxy ready for traffic?  Every listener listening, at least one
    available member (healthy, not ejected, not draining, weight above 0)
    in every pool, and not shutting down.

    @return: C{(ready, problems)}, one line per problem.
    """
    problems = []
    if getattr(proxy, "draining", False):
        problems.append("shutting down")
    for name, listener in proxy.listeners.items():
        if getattr(listener, "port", None) is None:
            problems.append(f"listener {name} is not listening")
    for name, pool in proxy.pools.items():
        if not any(member.available(now) for member in pool.members):
            problems.append(f"pool {name} has no available member")
    return (not problems, problems)


# ---------------------------------------------------------------------------
# The web resources
# ---------------------------------------------------------------------------


def _json(request: Request, code: int, data: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(data, indent=2, sort_keys=False).encode("utf-8") + b"\n"


class _Status(Resource):
    isLeaf = True

    def __init__(self, proxy: Any, clock: Any) -> None:
        super().__init__()
        self.proxy = proxy
        self.clock = clock

    def render_GET(self, request: Request) -> bytes:
        return _json(request, 200, proxyStatus(self.proxy, self.clock))


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, registry: Any) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        data, contentType = renderFor(
            self.registry, accept.decode("latin-1") if accept is not None else None
        )
        request.setHeader(b"content-type", contentType.encode("ascii"))
        return data


class _Healthz(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"


class _Readyz(Resource):
    isLeaf = True

    def __init__(self, proxy: Any, clock: Any) -> None:
        super().__init__()
        self.proxy = proxy
        self.clock = clock

    def render_GET(self, request: Request) -> bytes:
        ready, problems = readiness(self.proxy, self.clock.seconds())
        request.setResponseCode(200 if ready else 503)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if ready:
            return b"ready\n"
        return ("not ready: " + "; ".join(problems) + "\n").encode("utf-8")


def controlRefusal(request: Request, controlAllowed: Callable[[], bool]) -> Optional[bytes]:
    """
    The answer that refuses a member-control request (C{POST
    /members/<pool>/<address>:<port>/drain} or C{/enable}), or L{None} when
    it may go on: control needs a loopback endpoint or client certificates
    (C{controlAllowed}), no C{Origin} header (a web page in a browser on the
    same host), and a well-formed path.  One process and a supervisor
    (L{mtlsproxy.fanin}) check it here, the same way.
    """
    if not controlAllowed():
        return _json(
            request,
            403,
            {"error": "member control is off here: member_control = false, or neither a loopback"
                      " endpoint nor client certificates"},
        )
    if request.getHeader(b"origin") is not None:
        return _json(request, 403, {"error": "cross-origin requests are refused"})
    path = request.postpath or []
    if len(path) != 3 or path[2] not in (b"drain", b"enable"):
        return _json(
            request, 404, {"error": "expected /members/<pool>/<address>:<port>/drain or /enable"}
        )
    return None


class _Members(Resource):
    """
    C{POST /members/<pool>/<address>:<port>/drain} and C{.../enable}.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, proxy: Any, controlAllowed: Callable[[], bool]) -> None:
        super().__init__()
        self.proxy = proxy
        self.controlAllowed = controlAllowed

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"allow", b"POST")
        return _json(request, 405, {"error": "use POST"})

    def render_POST(self, request: Request) -> bytes:
        refusal = controlRefusal(request, self.controlAllowed)
        if refusal is not None:
            return refusal
        path = [segment.decode("utf-8", "replace") for segment in request.postpath or []]
        poolName, where, action = path
        pool = self.proxy.pools.get(poolName)
        if pool is None:
            return _json(request, 404, {"error": f"no pool {poolName!r}"})
        member = next((m for m in pool.members if m.hostPort == where), None)
        if member is None:
            return _json(request, 404, {"error": f"pool {poolName!r} has no member {where!r}"})
        self.log.info(
            "Status API: {action} pool {pool} member {member} (from {client})",
            action=action,
            pool=poolName,
            member=where,
            client=_peerText(request),
        )
        if action == "drain":
            member.drain()
        else:
            member.enable()
        return _json(request, 200, _memberStatus(member, member.clock.seconds()))


def _peerText(request: Request) -> str:
    peer = request.getClientAddress()
    host = getattr(peer, "host", None)
    return str(peer) if host is None else f"{host}:{getattr(peer, 'port', '')}"


class StatusResource(Resource):
    """
    The root of the status site: C{status}, C{metrics}, C{healthz},
    C{readyz} and C{members}.
    """

    def __init__(
        self, proxy: Any, registry: Any, clock: Any, controlAllowed: Callable[[], bool]
    ) -> None:
        """
        @param proxy: The L{mtlsproxy.service.ProxyService}.
        @param registry: The C{CollectorRegistry} C{/metrics} renders.
        @param clock: Provides C{seconds()}.
        @param controlAllowed: Tells whether C{POST /members/...} may act.
        """
        super().__init__()
        self.putChild(b"status", _Status(proxy, clock))
        self.putChild(b"metrics", _Metrics(registry))
        self.putChild(b"healthz", _Healthz())
        self.putChild(b"readyz", _Readyz(proxy, clock))
        self.putChild(b"members", _Members(proxy, controlAllowed))

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"mtlsproxy status: /status /metrics /healthz /readyz\n"


def isLocal(address: Any) -> bool:
    """
    Is C{address} (a listening port's C{getHost()}) reachable from this
    machine only: a loopback IP address or a UNIX socket?
    """
    host = getattr(address, "host", None)
    if host is None:
        return hasattr(address, "name")  # UNIXAddress
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class _QuietSite(Site):
    noisy = False

    def log(self, request: http.Request) -> None:
        """
        No access log line per request: scrapes every few seconds would
        drown the proxy's own events.
        """


def privateEndpoint(path: str) -> str:
    """
    The server endpoint description of a worker's private status socket at
    C{path}: a UNIX socket only its owner may connect to (the directory the
    supervisor makes is private too, see L{mtlsproxy.workers}).  No lock
    file: the supervisor removes a dead worker's socket before starting it
    again.
    """
    escaped = path.replace("\\", "\\\\").replace(":", "\\:")
    return f"unix:{escaped}:mode=600:lockfile=0"


class StatusService(Service):
    """
    Serves the status site on the configured endpoint.

    Three sites are built this way: a single process's (the configured
    endpoint, L{StatusResource}); a worker's private one (C{endpoint}: plain
    HTTP on a UNIX socket, for its supervisor only); and the supervisor's
    (the configured endpoint, C{resource}: the fan-in of
    L{mtlsproxy.fanin}), so that TLS and client certificates are set up in
    one place.

    @ivar port: The listening port once listening, else L{None}.
    @ivar controlAllowed: Whether member control (drain, enable) is served:
        set once listening, from C{member_control}, the address and the TLS
        settings.
    @ivar private: Whether this is a worker's private socket.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        proxy: Any,
        registry: Any,
        statusConfig: Any,
        material: Optional[ListenerMaterial] = None,
        *,
        endpoint: Optional[str] = None,
        resource: Optional[Callable[[Callable[[], bool]], Resource]] = None,
    ) -> None:
        """
        @param proxy: The L{mtlsproxy.service.ProxyService} the default site
            reports on (unused with C{resource}).
        @param registry: The C{CollectorRegistry} of the default site's
            C{/metrics} (unused with C{resource}).
        @param statusConfig: The C{[status]} table.
        @param material: The TLS material for HTTPS (L{loadStatusMaterial}).
        @param endpoint: Listen on this endpoint description, in plain HTTP,
            instead of the configured one and its TLS settings: a worker's
            private socket (L{privateEndpoint}).
        @param resource: Makes the site's root from a callable that tells
            whether member control is allowed, instead of
            L{StatusResource}.
        """
        self.setName("status")
        self._reactor = reactor
        self.config = statusConfig
        self.private = endpoint is not None
        self._endpoint = endpoint if endpoint is not None else statusConfig.endpoint
        self.controlAllowed = False
        allowed = lambda: self.controlAllowed  # noqa: E731
        self.resource = (
            resource(allowed) if resource is not None else StatusResource(proxy, registry, reactor, allowed)
        )
        self.factory: Any = _QuietSite(self.resource)
        if statusConfig.tls and not self.private:
            from .tlscontext import serverContextFactory
            from .tlsproto import HalfCloseTLSFactory
            from .verify import logHandshakeFailure

            assert material is not None
            self.factory = HalfCloseTLSFactory(
                serverContextFactory(statusConfig.asListener(), material, clock=reactor),
                False,
                self.factory,
                clock=reactor,
                handshakeFailed=logHandshakeFailure,
            )
        self.port: Optional[IListeningPort] = None

    def startService(self) -> None:
        Service.startService(self)
        endpoint = serverFromString(self._reactor, self._endpoint)
        endpoint.listen(self.factory).addCallbacks(self._listened, self._failed)

    def _listened(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        if self.private:
            self.controlAllowed = True
            self.log.info(
                "Private status socket for the supervisor at {path}",
                path=os.fsdecode(getattr(address, "name", None) or self._endpoint),
            )
            return
        self.controlAllowed = self.config.member_control and (
            isLocal(address) or (self.config.tls and self.config.client_auth == "required")
        )
        host = getattr(address, "host", None)
        where = str(address) if host is None else (
            f"[{host}]:{getattr(address, 'port', '')}"
            if ":" in host
            else f"{host}:{getattr(address, 'port', '')}"
        )
        self.log.info(
            "Status endpoint ({scheme}) listening on {address}; member control {control}",
            scheme="https" if self.config.tls else "http",
            address=where,
            control=(
                "enabled" if self.controlAllowed
                else "disabled (member_control = false)" if not self.config.member_control
                else "disabled (not loopback, no client certificates)"
            ),
        )

    def _failed(self, failure: Any) -> None:
        self.log.failure(
            "Status endpoint could not listen on {endpoint}", failure, endpoint=self._endpoint
        )
        if self.private:
            # A worker keeps proxying; its supervisor reports it as not
            # answering.
            return
        if self._reactor.running:
            self._reactor.stop()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        return port.stopListening() or succeed(None)  # type: ignore[return-value]
