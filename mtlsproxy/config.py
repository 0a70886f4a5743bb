# -*- test-case-name: tests.test_config -*-
"""
The configuration file: TOML read with L{tomllib}, turned into frozen attrs
classes.

This module checks structure only: key names, types, allowed values, ranges,
references between tables and the endpoint syntax.  It does not open the
certificate, key and CRL files the configuration names; that is
L{mtlsproxy.checks}.

Every TOML key is an attribute of the same name on one of the classes below,
marked with L{_key}.  L{loadConfig} derives the allowed keys, the required
keys and the nested tables from those fields, so a new setting is one new
attribute (with a default, a validator and documentation in
C{docs/configuration.md}) and nothing else.

Validators raise L{ConfigurationError} with the attribute's own name as the
key; the loader, which knows where each table sits in the file, prefixes the
key path (C{listeners[0]} + C{client_auth}) and adds the file name.  So the
classes validate the same way when built directly in code or tests.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from typing import Any, Callable, Literal, Sequence, TypeVar

import attrs

from .errors import ConfigurationError, describeValue, joinKey
from .policy import DEFAULT_POLICY, POLICIES, TLS_VERSIONS, listenerPolicy, policyProblem

__all__ = [
    "AdminConfig",
    "BackendTLSConfig",
    "CertificateConfig",
    "RouteConfig",
    "ListenerConfig",
    "LoggingConfig",
    "MemberConfig",
    "PoolConfig",
    "ProxyConfig",
    "StatusConfig",
    "loadConfig",
    "endpointProblem",
]

_T = TypeVar("_T")

Protocol = Literal["tcp", "tls", "https"]
ClientAuth = Literal["off", "optional", "required", "passthrough"]
CRLPolicy = Literal["reject", "allow"]

# ---------------------------------------------------------------------------
# How TOML values become attribute values
# ---------------------------------------------------------------------------

_KEY = "mtlsproxy.config"
"""
The attrs metadata key marking an attribute as a TOML key; its value is a
L{_Key}.
"""

_Loader = Callable[[object, str, str], object]
"""
Turns the raw TOML value of a key into what the attrs class receives:
C{(value, keyPath, baseDirectory) -> value}.  Loaders only reshape (resolve
paths, build nested tables); type and value checks are the validators' job,
so a loader passes anything it does not understand through unchanged.
"""


@attrs.frozen
class _Key:
    """
    How one attribute is read from TOML.

    @ivar load: The L{_Loader} for the value.
    @ivar tlsOnly: The key configures TLS: on a C{protocol = "tcp"} listener
        a value other than the default is an error.
    """

    load: _Loader
    tlsOnly: bool = False
    httpsOnly: bool = False


def _plain(value: object, keyPath: str, baseDirectory: str) -> object:
    """
    Take the TOML value as it is.
    """
    return value


def _resolve(value: object, baseDirectory: str) -> object:
    """
    Make a non-empty string path absolute, relative to C{baseDirectory}.
    """
    if isinstance(value, str) and value:
        return os.path.normpath(os.path.join(baseDirectory, value))
    return value


def _path(value: object, keyPath: str, baseDirectory: str) -> object:
    """
    A file path, resolved against the configuration file's folder.
    """
    return _resolve(value, baseDirectory)


def _paths(value: object, keyPath: str, baseDirectory: str) -> object:
    """
    An array of file paths, each resolved like L{_path}.
    """
    if isinstance(value, list):
        return [_resolve(item, baseDirectory) for item in value]
    return value


def _tables(cls: type[Any]) -> _Loader:
    """
    A loader for an array of tables (C{[[listeners]]}), each becoming an
    instance of C{cls}.
    """

    def load(value: object, keyPath: str, baseDirectory: str) -> object:
        if not isinstance(value, list):
            raise ConfigurationError(
                f"expected an array of tables; got {_describe(value)}", key=keyPath
            )
        return tuple(
            _structure(cls, item, f"{keyPath}[{index}]", baseDirectory)
            for index, item in enumerate(value)
        )

    return load


def _healthCheck(value: object, keyPath: str, baseDirectory: str) -> object:
    """
    A C{[pools.health_check]} table, validated against the installed
    health-checker plugins (L{mtlsproxy.health.parseHealthCheck}).
    """
    from .health import parseHealthCheck
    from .plugins import healthCheckerFactoriesByName

    return parseHealthCheck(value, keyPath, healthCheckerFactoriesByName())


def _table(cls: type[Any]) -> _Loader:
    """
    A loader for one table (C{[admin]}), becoming an instance of C{cls}.
    """

    def load(value: object, keyPath: str, baseDirectory: str) -> object:
        return _structure(cls, value, keyPath, baseDirectory)

    return load


def _key(load: _Loader = _plain, tlsOnly: bool = False, httpsOnly: bool = False) -> dict[str, _Key]:
    """
    The attrs C{metadata} that makes an attribute a TOML key.
    """
    return {_KEY: _Key(load, tlsOnly, httpsOnly)}


def _tomlFields(cls: type[Any]) -> list[tuple[attrs.Attribute[Any], _Key]]:
    """
    The attributes of C{cls} that are TOML keys, in declaration order.
    """
    return [(f, f.metadata[_KEY]) for f in attrs.fields(cls) if _KEY in f.metadata]


def _structure(
    cls: type[_T],
    raw: object,
    keyPath: str,
    baseDirectory: str,
    extra: dict[str, object] | None = None,
) -> _T:
    """
    Build a C{cls} from a TOML table.

    @param raw: The table as L{tomllib} returned it (or anything else, which
        is an error).
    @param keyPath: Where the table sits in the file (C{""} for the
        top-level table).
    @param baseDirectory: The folder relative paths are resolved against.
    @param extra: Attributes that are not TOML keys.

    @raise ConfigurationError: For an unknown or missing key or any value a
        validator refuses; the key path is complete, the file is not set.
    """
    if not isinstance(raw, dict):
        raise ConfigurationError(
            f"expected a table; got {_describe(raw)}", key=keyPath or None
        )
    fields = _tomlFields(cls)
    names = [f.name for f, _ in fields]
    for name in raw:
        if name not in names:
            raise ConfigurationError(
                f"unknown key {name!r}; expected one of: {', '.join(names)}",
                key=keyPath or None,
            )
    kwargs: dict[str, object] = dict(extra or {})
    for field, spec in fields:
        if field.name in raw:
            kwargs[field.name] = spec.load(
                raw[field.name], joinKey(keyPath, field.name) or "", baseDirectory
            )
        elif field.default is attrs.NOTHING:
            raise ConfigurationError(
                f"missing required key {field.name!r}", key=keyPath or None
            )
    try:
        return cls(**kwargs)
    except ConfigurationError as e:
        raise e.within(keyPath)


# ---------------------------------------------------------------------------
# Validators and converters
# ---------------------------------------------------------------------------


_describe = describeValue


def _refuse(attribute: attrs.Attribute[Any], expected: str, value: object) -> ConfigurationError:
    """
    The error for an attribute whose value is not what was C{expected}.
    """
    return ConfigurationError(f"expected {expected}; got {_describe(value)}", key=attribute.name)


def _nonEmptyString(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """
    Validate a non-empty string.
    """
    if not isinstance(value, str) or not value:
        raise _refuse(attribute, "a non-empty string", value)


def _oneOf(*choices: str) -> Callable[[object, attrs.Attribute[Any], object], None]:
    """
    A validator for a string that must be one of C{choices}.
    """
    expected = "one of " + ", ".join(json.dumps(c) for c in choices)

    def validate(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value not in choices or not isinstance(value, str):
            raise _refuse(attribute, expected, value)

    return validate


def _integer(low: int, high: int) -> Callable[[object, attrs.Attribute[Any], object], None]:
    """
    A validator for an integer (not a boolean) from C{low} to C{high}.
    """

    def validate(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _refuse(attribute, f"an integer from {low} to {high}", value)

    return validate


def _workersValue(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """
    Validate C{workers}: an integer from 1 to 256, or C{"auto"}.
    """
    if value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise _refuse(attribute, 'an integer from 1 to 256 or "auto"', value)


def _atLeast(low: int) -> Callable[[object, attrs.Attribute[Any], object], None]:
    """
    A validator for an integer (not a boolean) of at least C{low}.
    """

    def validate(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise _refuse(attribute, f"an integer of at least {low}", value)

    return validate


def _toFloat(value: object) -> object:
    """
    Convert a TOML integer (C{timeout = 5}) to a float; leave anything else
    to the validator.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _positiveSeconds(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """
    Validate a finite number of seconds greater than zero.
    """
    if not isinstance(value, float) or not math.isfinite(value) or value <= 0:
        raise _refuse(attribute, "a number of seconds greater than 0", value)


def _toTuple(value: object) -> object:
    """
    Convert a TOML array to a tuple; leave anything else to the validator.
    """
    if isinstance(value, list):
        return tuple(value)
    return value


def _filePaths(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """
    Validate a tuple of non-empty path strings.
    """
    if not isinstance(value, tuple):
        raise _refuse(attribute, "an array of file paths", value)
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise ConfigurationError(
                f"expected a file path; got {_describe(item)}",
                key=f"{attribute.name}[{index}]",
            )


def _filePath(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """
    Validate a non-empty path string.
    """
    if not isinstance(value, str) or not value:
        raise _refuse(attribute, "a file path", value)


def _tuplesOf(
    cls: type[Any], table: str, required: bool = False
) -> Callable[[object, attrs.Attribute[Any], object], None]:
    """
    A validator for a tuple of C{cls} instances (nested tables).

    @param table: The TOML name of the tables, C{"pools.members"}, for the
        message.
    @param required: At least one is needed.
    """

    def validate(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, tuple) or not all(isinstance(v, cls) for v in value):
            raise _refuse(attribute, f"an array of [[{table}]] tables", value)
        if required and not value:
            raise ConfigurationError(
                f"at least one [[{table}]] table required", key=attribute.name
            )

    return validate


# Endpoint descriptions.  Parsing one constructs an endpoint object, which
# needs a reactor; a MemoryReactor keeps the global one out of it.
_SKIP_CONSTRUCTION = frozenset(["systemd"])
"""
Endpoint types whose construction depends on the process environment (the
descriptors systemd passed), not on the description: only their syntax is
checked, so that C{mtlsproxy check} works outside systemd too.
"""


def endpointProblem(description: str) -> str | None:
    """
    Check a Twisted server endpoint description (C{"tcp:8443"}) without
    listening and without the global reactor.

    C{ssl:} descriptions are refused: mtlsproxy terminates TLS itself
    (C{protocol = "tls"}), where client certificates and CRLs are checked.

    @return: L{None} if C{description} is usable, otherwise what is wrong.
    """
    from twisted.internet.endpoints import _parseServer, serverFromString
    from twisted.internet.testing import MemoryReactor

    prefix = description.split(":", 1)[0].lower()
    if prefix == "ssl":
        return (
            'ssl endpoints are not supported; use a tcp endpoint with protocol = "tls"'
            " and [[listeners.certificates]], so that mtlsproxy terminates TLS"
        )
    try:
        # Plugins can raise anything at all from their parsers.
        if prefix in _SKIP_CONSTRUCTION:
            _parseServer(description, None)  # type: ignore[no-untyped-call]
            return None
        endpoint = serverFromString(MemoryReactor(), description)  # type: ignore[no-untyped-call]
    except Exception as e:
        reason = str(e) or type(e).__name__
        return (
            f'expected a server endpoint description such as "tcp:8443:interface=127.0.0.1";'
            f" {json.dumps(description, ensure_ascii=False)} does not parse: {reason}"
        )
    # TCP4ServerEndpoint and TCP6ServerEndpoint accept any integer port and
    # fail only when listening.
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        return f"port {port} out of range: expected 0 to 65535"
    return None


def _endpoint(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """
    Validate a server endpoint description, see L{endpointProblem}.
    """
    _nonEmptyString(instance, attribute, value)
    assert isinstance(value, str)
    problem = endpointProblem(value)
    if problem is not None:
        raise ConfigurationError(problem, key=attribute.name)


def _boolean(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """
    Validate C{true} or C{false}.
    """
    if not isinstance(value, bool):
        raise _refuse(attribute, "true or false", value)


def _names(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """
    Validate a tuple of non-empty ASCII strings (group names, ALPN protocol
    names), each at most 255 bytes.
    """
    if not isinstance(value, tuple):
        raise _refuse(attribute, "an array of strings", value)
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item or not item.isascii() or len(item) > 255:
            raise ConfigurationError(
                f"expected a non-empty ASCII string of at most 255 characters;"
                f" got {_describe(item)}",
                key=f"{attribute.name}[{index}]",
            )


# ---------------------------------------------------------------------------
# The configuration classes
# ---------------------------------------------------------------------------


@attrs.frozen
class CertificateConfig:
    """
    One server certificate of a TLS listener (C{[[listeners.certificates]]}).

    Either C{cert} and C{key} (PEM) or C{pkcs12}.  Clients are given the
    certificate whose subjectAltName DNS names match the server name they
    ask for (SNI); see C{docs/tls-policies.md}.

    @ivar cert: Absolute path of a PEM file: the server certificate first,
        then the intermediates that clients need to build the chain.
    @ivar key: Absolute path of the PEM private key for the certificate,
        encrypted or not.
    @ivar pkcs12: Absolute path of a PKCS#12 file holding the certificate,
        its key and its intermediates, instead of C{cert} and C{key}.
    @ivar password_file: Absolute path of a file holding the password of an
        encrypted C{key} or of C{pkcs12} (one line; a final line break is
        not part of it).
    @ivar password_env: The name of an environment variable holding that
        password instead.
    @ivar default: Give this certificate to clients that send no server
        name or one no certificate matches (at most one per listener;
        without one, the first certificate).
    @ivar client_auth: The listener's C{client_auth} for the names of this
        certificate, or L{None} to use the listener's.
    @ivar ca_certificates: The listener's C{ca_certificates} for the names of
        this certificate, or L{None} to use the listener's.
    @ivar crls: The listener's C{crls} for the names of this certificate, or
        L{None} to use the listener's.
    """

    cert: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_filePath), metadata=_key(_path)
    )
    key: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_filePath), metadata=_key(_path)
    )
    pkcs12: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_filePath), metadata=_key(_path)
    )
    password_file: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_filePath), metadata=_key(_path)
    )
    password_env: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_nonEmptyString), metadata=_key()
    )
    default: bool = attrs.field(default=False, validator=_boolean, metadata=_key())
    client_auth: ClientAuth | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(_oneOf("off", "optional", "required")),
        metadata=_key(),
    )
    ca_certificates: tuple[str, ...] | None = attrs.field(
        default=None,
        converter=_toTuple,
        validator=attrs.validators.optional(_filePaths),
        metadata=_key(_paths),
    )
    crls: tuple[str, ...] | None = attrs.field(
        default=None,
        converter=_toTuple,
        validator=attrs.validators.optional(_filePaths),
        metadata=_key(_paths),
    )

    def __attrs_post_init__(self) -> None:
        """
        Check that the certificate comes from one place, and its password
        from at most one.
        """
        if self.pkcs12 is not None:
            for name in ("cert", "key"):
                if getattr(self, name) is not None:
                    raise ConfigurationError(
                        "pkcs12 replaces cert and key: set either pkcs12, or cert and key",
                        key=name,
                    )
        else:
            for name in ("cert", "key"):
                if getattr(self, name) is None:
                    raise ConfigurationError(
                        f"missing required key {name!r} (or pkcs12 instead of cert and key)"
                    )
        if self.password_file is not None and self.password_env is not None:
            raise ConfigurationError(
                "password_file and password_env are alternatives: set one", key="password_env"
            )

    @property
    def source(self) -> str:
        """
        The file the certificate is read from: C{pkcs12} or C{cert}.
        """
        return self.pkcs12 if self.pkcs12 is not None else str(self.cert)


def _hostPattern(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """
    Validate L{None} or a route's host or SNI pattern (C{"a.example.com"},
    C{"*.example.com"}).
    """
    from .routing import hostPatternProblem

    if value is not None:
        problem = hostPatternProblem(value)
        if problem is not None:
            raise ConfigurationError(problem, key=attribute.name)


def _pathPrefix(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """
    Validate L{None} or a route's path prefix (C{"/v1/"}).
    """
    from .routing import pathPrefixProblem

    if value is not None:
        problem = pathPrefixProblem(value)
        if problem is not None:
            raise ConfigurationError(problem, key=attribute.name)


def _networks(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """
    Validate a tuple of CIDR blocks or addresses (C{"10.0.0.0/8"},
    C{"127.0.0.1"}, C{"::1/128"}).
    """
    import ipaddress

    if not isinstance(value, tuple):
        raise _refuse(attribute, 'an array of CIDR blocks such as ["10.0.0.0/8"]', value)
    for index, item in enumerate(value):
        try:
            if not isinstance(item, str):
                raise ValueError()
            ipaddress.ip_network(item, strict=True)
        except ValueError:
            raise ConfigurationError(
                f'expected a CIDR block such as "10.0.0.0/8" or an address (no host bits'
                f" set after the prefix); got {_describe(item)}",
                key=f"{attribute.name}[{index}]",
            ) from None


@attrs.frozen
class RouteConfig:
    """
    One routing rule of a listener (C{[[listeners.routes]]}), see
    L{mtlsproxy.routing}: traffic that matches all its conditions goes to
    C{pool} instead of the listener's.

    @ivar pool: The pool matching traffic is sent to.
    @ivar host: The request's C{Host}, exact or C{"*.example.com"}
        (C{https} only), or L{None}.
    @ivar path_prefix: Path segments the request path starts with
        (C{https} only), or L{None}.
    @ivar sni: The TLS server name, same syntax as C{host}, or L{None}.
    """

    pool: str = attrs.field(validator=_nonEmptyString, metadata=_key())
    host: str | None = attrs.field(default=None, validator=_hostPattern, metadata=_key())
    path_prefix: str | None = attrs.field(default=None, validator=_pathPrefix, metadata=_key())
    sni: str | None = attrs.field(default=None, validator=_hostPattern, metadata=_key())

    def __attrs_post_init__(self) -> None:
        """
        A route matches on something; the listener's C{pool} is the
        catch-all.
        """
        if self.host is None and self.path_prefix is None and self.sni is None:
            raise ConfigurationError(
                "a route needs at least one of host, path_prefix or sni (the"
                " listener's pool takes everything else)"
            )


@attrs.frozen
class ListenerConfig:
    """
    One listening endpoint (C{[[listeners]]}).

    @ivar name: Unique name, used in logs and in the loaded material.
    @ivar endpoint: Twisted server endpoint description,
        C{"tcp:8443:interface=127.0.0.1"}.
    @ivar protocol: C{"tls"} terminates TLS, C{"tcp"} relays bytes as they
        are.
    @ivar pool: Name of the pool connections are sent to.
    @ivar client_auth: Client certificates: C{"off"} (not asked for),
        C{"optional"} (verified if sent) or C{"required"}.
    @ivar ca_certificates: Absolute paths of PEM files with the CAs that
        issue client certificates.
    @ivar crls: Absolute paths of CRL files (PEM, several per file, or DER).
    @ivar certificates: The server certificates.
    @ivar crl_missing: C{"reject"} or C{"allow"} a client certificate whose
        chain has a CA without a configured CRL.
    @ivar crl_expired: C{"reject"} or C{"allow"} a client certificate
        checked against a CRL past its nextUpdate.
    @ivar strict_sni: Refuse a client whose server name matches none of the
        certificates (alert unrecognized_name) instead of giving it the
        default certificate.
    @ivar tls_policy: The name of a built-in policy in
        L{mtlsproxy.policy.POLICIES}.
    @ivar min_version: C{"1.2"} or C{"1.3"}, instead of the policy's.
    @ivar max_version: C{"1.2"} or C{"1.3"}, instead of the policy's.
    @ivar ciphers: The TLS 1.2 OpenSSL cipher string, instead of the
        policy's.
    @ivar ciphersuites: The TLS 1.3 cipher suites, colon separated, instead
        of the policy's.
    @ivar groups: The key exchange groups in order of preference, instead
        of the policy's.
    @ivar session_tickets: Resume sessions with stateless tickets (a key
        per context; the default, because the server then keeps no memory
        per TLS 1.3 session) rather than the server's session cache.
    @ivar alpn: The application protocols to offer in ALPN, in order of
        preference; empty for no ALPN.
    @ivar close_revoked_connections: When a reload brings a CRL that revokes
        a certificate an established connection was verified with, close
        that connection.
    @ivar handshake_timeout: Seconds from accept for a client to complete its
        TLS handshake (a deadline: bytes do not extend it).
    @ivar idle_timeout: Seconds without a byte either way before a relayed
        connection is closed; also the most a connection may take to close.
    @ivar max_connections: Client connections open at once; at this many the
        listener stops accepting until one closes.
    @ivar routes: Routing rules tried in order before C{pool}
        (L{mtlsproxy.routing}).
    @ivar client_identity_headers: C{https}: how backends are told the
        client certificate: C{"none"}, C{"xfcc"}, C{"rfc9440"}, C{"simple"}
        (L{mtlsproxy.identity}); incoming ones are always removed.
    @ivar xfcc_include_cert: C{https}: add C{Cert=} (the URL-encoded PEM) to
        C{X-Forwarded-Client-Cert}.
    @ivar response_timeout: C{https}: seconds from a completely forwarded
        request to the start of its response (else 504).
    @ivar accept_proxy_protocol: Every connection starts with a PROXY
        header (v1 or v2) from a trusted load balancer.
    @ivar trusted_proxies: The CIDR blocks PROXY headers are accepted from.
    """

    name: str = attrs.field(validator=_nonEmptyString, metadata=_key())
    endpoint: str = attrs.field(validator=_endpoint, metadata=_key())
    protocol: Protocol = attrs.field(validator=_oneOf("tcp", "tls", "https"), metadata=_key())
    pool: str = attrs.field(validator=_nonEmptyString, metadata=_key())
    client_auth: ClientAuth = attrs.field(
        default="off",
        validator=_oneOf("off", "optional", "required", "passthrough"),
        metadata=_key(tlsOnly=True),
    )
    ca_certificates: tuple[str, ...] = attrs.field(
        default=(),
        converter=_toTuple,
        validator=_filePaths,
        metadata=_key(_paths, tlsOnly=True),
    )
    crls: tuple[str, ...] = attrs.field(
        default=(),
        converter=_toTuple,
        validator=_filePaths,
        metadata=_key(_paths, tlsOnly=True),
    )
    certificates: tuple[CertificateConfig, ...] = attrs.field(
        default=(),
        validator=_tuplesOf(CertificateConfig, "listeners.certificates"),
        metadata=_key(_tables(CertificateConfig), tlsOnly=True),
    )
    crl_missing: CRLPolicy = attrs.field(
        default="reject",
        validator=_oneOf("reject", "allow"),
        metadata=_key(tlsOnly=True),
    )
    crl_expired: CRLPolicy = attrs.field(
        default="reject",
        validator=_oneOf("reject", "allow"),
        metadata=_key(tlsOnly=True),
    )
    strict_sni: bool = attrs.field(default=False, validator=_boolean, metadata=_key(tlsOnly=True))
    tls_policy: str = attrs.field(
        default=DEFAULT_POLICY, validator=_oneOf(*POLICIES), metadata=_key(tlsOnly=True)
    )
    min_version: str | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(_oneOf(*TLS_VERSIONS)),
        metadata=_key(tlsOnly=True),
    )
    max_version: str | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(_oneOf(*TLS_VERSIONS)),
        metadata=_key(tlsOnly=True),
    )
    ciphers: str | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(_nonEmptyString),
        metadata=_key(tlsOnly=True),
    )
    ciphersuites: str | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(_nonEmptyString),
        metadata=_key(tlsOnly=True),
    )
    groups: tuple[str, ...] | None = attrs.field(
        default=None,
        converter=_toTuple,
        validator=attrs.validators.optional(_names),
        metadata=_key(tlsOnly=True),
    )
    session_tickets: bool = attrs.field(
        default=True, validator=_boolean, metadata=_key(tlsOnly=True)
    )
    alpn: tuple[str, ...] = attrs.field(
        default=(), converter=_toTuple, validator=_names, metadata=_key(tlsOnly=True)
    )
    close_revoked_connections: bool = attrs.field(
        default=True, validator=_boolean, metadata=_key(tlsOnly=True)
    )
    handshake_timeout: float = attrs.field(
        default=10.0, converter=_toFloat, validator=_positiveSeconds, metadata=_key(tlsOnly=True)
    )
    idle_timeout: float = attrs.field(
        default=300.0, converter=_toFloat, validator=_positiveSeconds, metadata=_key()
    )
    max_connections: int = attrs.field(
        default=10000, validator=_integer(1, 1_000_000), metadata=_key()
    )
    # HTTPS, routes, client identity, PROXY protocol (docs/https.md,
    # docs/client-identity.md).
    routes: tuple[RouteConfig, ...] = attrs.field(
        default=(),
        validator=_tuplesOf(RouteConfig, "listeners.routes"),
        metadata=_key(_tables(RouteConfig)),
    )
    client_identity_headers: str = attrs.field(
        default="none",
        validator=_oneOf("none", "xfcc", "rfc9440", "simple"),
        metadata=_key(httpsOnly=True),
    )
    xfcc_include_cert: bool = attrs.field(
        default=False, validator=_boolean, metadata=_key(httpsOnly=True)
    )
    response_timeout: float = attrs.field(
        default=60.0, converter=_toFloat, validator=_positiveSeconds, metadata=_key(httpsOnly=True)
    )
    accept_proxy_protocol: bool = attrs.field(default=False, validator=_boolean, metadata=_key())
    trusted_proxies: tuple[str, ...] = attrs.field(
        default=(), converter=_toTuple, validator=_networks, metadata=_key()
    )

    def __attrs_post_init__(self) -> None:
        """
        Check the settings that depend on each other.
        """
        _checkLayer7(self)
        if self.protocol == "tcp":
            for field, spec in _tomlFields(type(self)):
                if spec.tlsOnly and getattr(self, field.name) != field.default:
                    raise ConfigurationError(
                        'only allowed with protocol = "tls"; this listener has'
                        ' protocol = "tcp"',
                        key=field.name,
                    )
            return
        if not self.certificates:
            raise ConfigurationError(
                f'protocol = "{self.protocol}" needs at least one [[listeners.certificates]]'
                " table (cert and key)",
                key="certificates",
            )
        self._checkCertificateEntries()
        problem = policyProblem(listenerPolicy(self))
        if problem is not None:
            key, text = problem
            raise ConfigurationError(text, key=key)

    def _checkCertificateEntries(self) -> None:
        """
        Check the client certificate settings each certificate entry ends
        up with, and that at most one entry is the default.
        """
        defaults = [i for i, c in enumerate(self.certificates) if c.default]
        if len(defaults) > 1:
            raise ConfigurationError(
                f"only one certificate may be the default; certificates[{defaults[0]}]"
                f" is already",
                key=f"certificates[{defaults[1]}].default",
            )
        for index, entry in enumerate(self.certificates):
            clientAuth = entry.client_auth or self.client_auth
            cas = self.ca_certificates if entry.ca_certificates is None else entry.ca_certificates
            if clientAuth == "off" or cas:
                continue
            if entry.client_auth is None and entry.ca_certificates is None:
                key = "ca_certificates"
            else:
                key = f"certificates[{index}].ca_certificates"
            raise ConfigurationError(
                f'client_auth = "{clientAuth}" needs at least one CA file'
                " to verify client certificates with",
                key=key,
            )

    def certificateSettings(self, index: int) -> tuple[ClientAuth, tuple[str, ...], tuple[str, ...]]:
        """
        The client certificate settings of certificate entry C{index}: its
        own C{client_auth}, C{ca_certificates} and C{crls} where it sets
        them, the listener's otherwise.
        """
        entry = self.certificates[index]
        return (
            entry.client_auth or self.client_auth,
            self.ca_certificates if entry.ca_certificates is None else entry.ca_certificates,
            self.crls if entry.crls is None else entry.crls,
        )

    @property
    def tls(self) -> bool:
        """
        Does this listener terminate TLS (C{tls} and C{https})?
        """
        return self.protocol in ("tls", "https")


def _checkLayer7(listener: ListenerConfig) -> None:
    """
    Check the HTTPS, routing, PROXY protocol and passthrough settings that
    depend on each other or on C{protocol}.
    """
    if listener.protocol != "https":
        for field, spec in _tomlFields(type(listener)):
            if spec.httpsOnly and getattr(listener, field.name) != field.default:
                raise ConfigurationError(
                    f'only allowed with protocol = "https"; this listener has'
                    f' protocol = "{listener.protocol}"',
                    key=field.name,
                )
    for index, route in enumerate(listener.routes):
        if listener.protocol == "tcp":
            raise ConfigurationError(
                'routes need protocol = "tls" (by sni) or "https" (by host, path_prefix, sni)',
                key=f"routes[{index}]",
            )
        if listener.protocol == "tls":
            for name in ("host", "path_prefix"):
                if getattr(route, name) is not None:
                    raise ConfigurationError(
                        f'{name} needs protocol = "https"; a "tls" listener routes by sni only',
                        key=f"routes[{index}].{name}",
                    )
    if listener.accept_proxy_protocol and not listener.trusted_proxies:
        raise ConfigurationError(
            "accept_proxy_protocol = true needs trusted_proxies: the addresses of the"
            " load balancers that may send PROXY headers",
            key="trusted_proxies",
        )
    if listener.trusted_proxies and not listener.accept_proxy_protocol:
        raise ConfigurationError(
            "only used with accept_proxy_protocol = true", key="trusted_proxies"
        )
    if (
        listener.protocol == "https"
        and listener.client_auth == "passthrough"
        and listener.client_identity_headers == "none"
    ):
        raise ConfigurationError(
            'client_auth = "passthrough" lets the backend decide, so it must be told:'
            ' set client_identity_headers to "xfcc", "rfc9440" or "simple"',
            key="client_identity_headers",
        )


@attrs.frozen
class MemberConfig:
    """
    One backend server of a pool (C{[[pools.members]]}).

    @ivar address: Host name or IP address.
    @ivar port: TCP port, 1 to 65535.
    @ivar weight: Share of new connections relative to the other members,
        0 to 1000; 0 means never picked.
    """

    address: str = attrs.field(validator=_nonEmptyString, metadata=_key())
    port: int = attrs.field(validator=_integer(1, 65535), metadata=_key())
    weight: int = attrs.field(default=1, validator=_integer(0, 1000), metadata=_key())


@attrs.frozen
class BackendTLSConfig:
    """
    Mutual TLS to the members of a pool (C{[pools.tls]}); see
    C{docs/backend-tls.md} and L{mtlsproxy.backendtls}.

    @ivar ca_certificates: Absolute paths of PEM files with the CAs that
        issue the members' certificates (the only trust anchors).
    @ivar crls: Absolute paths of CRL files of those CAs; without any,
        revocation is not checked.
    @ivar server_name: The name the members' certificates must be valid
        for, also sent as SNI; L{None} for each member's address.
    @ivar cert: Absolute path of the proxy's client certificate chain (PEM,
        leaf first), or L{None} to present none.
    @ivar key: Absolute path of its PEM private key (required with C{cert}).
    @ivar min_version: The oldest TLS version used, C{"1.2"} or C{"1.3"}.
    @ivar crl_missing: C{"reject"} or C{"allow"} a member certificate whose
        chain has a CA without a configured CRL (when C{crls} are set).
    @ivar crl_expired: C{"reject"} or C{"allow"} a member certificate
        checked against a CRL past its nextUpdate.
    @ivar close_revoked_connections: When a reload brings a CRL that revokes
        a certificate of a member's chain, close the established
        connections to that member (and their clients' sides).
    """

    ca_certificates: tuple[str, ...] = attrs.field(
        converter=_toTuple, validator=_filePaths, metadata=_key(_paths)
    )
    crls: tuple[str, ...] = attrs.field(
        default=(), converter=_toTuple, validator=_filePaths, metadata=_key(_paths)
    )
    server_name: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_nonEmptyString), metadata=_key()
    )
    cert: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_filePath), metadata=_key(_path)
    )
    key: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_filePath), metadata=_key(_path)
    )
    min_version: str = attrs.field(default="1.2", validator=_oneOf("1.2", "1.3"), metadata=_key())
    crl_missing: CRLPolicy = attrs.field(
        default="reject", validator=_oneOf("reject", "allow"), metadata=_key()
    )
    crl_expired: CRLPolicy = attrs.field(
        default="reject", validator=_oneOf("reject", "allow"), metadata=_key()
    )
    close_revoked_connections: bool = attrs.field(
        default=True, validator=_boolean, metadata=_key()
    )

    def __attrs_post_init__(self) -> None:
        """
        Check the settings that depend on each other.
        """
        if not self.ca_certificates:
            raise ConfigurationError(
                "at least one CA file is needed to verify the members' certificates"
                " (the system's CAs are never used)",
                key="ca_certificates",
            )
        if (self.cert is None) != (self.key is None):
            missing = "key" if self.key is None else "cert"
            raise ConfigurationError(
                "cert and key go together: the client certificate and its private key",
                key=missing,
            )


@attrs.frozen
class PoolConfig:
    """
    A group of backend servers (C{[[pools]]}).

    @ivar name: Unique name that listeners refer to.
    @ivar selector: Name of the backend selector plugin that picks a member
        for each connection.
    @ivar members: The backend servers, at least one.
    @ivar connect_timeout: Seconds to wait for a backend connection.
    @ivar max_connect_attempts: Members tried for one client connection
        before giving up.
    @ivar tls: Mutual TLS to the members (C{[pools.tls]}), or L{None} for
        plain TCP.
    @ivar proxy_protocol: C{"none"}, C{"v1"} or C{"v2"}: the PROXY header
        written first on every connection to a member.
    @ivar proxy_protocol_certificate: Add the client certificate (DER) to
        the v2 header, in TLV 0xE0.
    """

    name: str = attrs.field(validator=_nonEmptyString, metadata=_key())
    selector: str = attrs.field(
        default="round_robin", validator=_nonEmptyString, metadata=_key()
    )
    members: tuple[MemberConfig, ...] = attrs.field(
        default=(),
        validator=_tuplesOf(MemberConfig, "pools.members", required=True),
        metadata=_key(_tables(MemberConfig)),
    )
    connect_timeout: float = attrs.field(
        default=5.0, converter=_toFloat, validator=_positiveSeconds, metadata=_key()
    )
    max_connect_attempts: int = attrs.field(
        default=3, validator=_atLeast(1), metadata=_key()
    )
    health_check: Any = attrs.field(default=None, metadata=_key(_healthCheck))
    all_unhealthy: str = attrs.field(
        default="reject", validator=_oneOf("reject", "use_all"), metadata=_key()
    )
    eject_after: int = attrs.field(default=5, validator=_atLeast(0), metadata=_key())
    eject_backoff: float = attrs.field(
        default=30.0, converter=_toFloat, validator=_positiveSeconds, metadata=_key()
    )
    eject_backoff_max: float = attrs.field(
        default=300.0, converter=_toFloat, validator=_positiveSeconds, metadata=_key()
    )
    tls: BackendTLSConfig | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.instance_of(BackendTLSConfig)),
        metadata=_key(_table(BackendTLSConfig)),
    )
    proxy_protocol: str = attrs.field(
        default="none", validator=_oneOf("none", "v1", "v2"), metadata=_key()
    )
    proxy_protocol_certificate: bool = attrs.field(
        default=False, validator=_boolean, metadata=_key()
    )

    def __attrs_post_init__(self) -> None:
        """
        Refuse the same backend twice: members are told apart by address
        and port.  Check the passive ejection settings together.
        """
        if self.proxy_protocol_certificate and self.proxy_protocol != "v2":
            raise ConfigurationError(
                'only allowed with proxy_protocol = "v2" (a v1 header has no room for it)',
                key="proxy_protocol_certificate",
            )
        if self.proxy_protocol != "none" and getattr(self, "tls", None) is not None:
            raise ConfigurationError(
                "a PROXY protocol header to members over TLS ([pools.tls]) is not"
                " supported yet",
                key="proxy_protocol",
            )
        from .health import PassiveEjectionConfig

        PassiveEjectionConfig(
            eject_after=self.eject_after,
            eject_backoff=self.eject_backoff,
            eject_backoff_max=self.eject_backoff_max,
        )
        seen: dict[tuple[str, int], int] = {}
        for index, member in enumerate(self.members):
            where = (member.address, member.port)
            if where in seen:
                raise ConfigurationError(
                    f"duplicate member {member.address}:{member.port}"
                    f" (same as members[{seen[where]}])",
                    key=f"members[{index}]",
                )
            seen[where] = index


def _optionalFilePath(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """
    Validate L{None} or a non-empty path string.
    """
    if value is not None:
        _filePath(instance, attribute, value)


def _nonNegativeSeconds(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """
    Validate a finite number of seconds, 0 or more.
    """
    if not isinstance(value, float) or not math.isfinite(value) or value < 0:
        raise _refuse(attribute, "a number of seconds, 0 or more", value)


@attrs.frozen
class AdminConfig:
    """
    The SSH admin console (C{[admin]}), see C{docs/admin.md}.

    @ivar authorized_keys: Absolute path of an OpenSSH C{authorized_keys}
        file: the public keys that may log in (any user name).
    @ivar endpoint: Twisted server endpoint description; loopback by
        default.
    @ivar host_key: Absolute path of the server's SSH host key, generated
        (Ed25519, mode 0600) at the first start if missing; L{None} means
        C{admin_host_key} in the configuration file's folder.
    @ivar password_file: Absolute path of a file of C{user:bcrypt-hash}
        lines that may also log in with a password; L{None} (the default)
        allows keys only.
    """

    authorized_keys: str = attrs.field(validator=_filePath, metadata=_key(_path))
    endpoint: str = attrs.field(
        default="tcp:2222:interface=127.0.0.1", validator=_endpoint, metadata=_key()
    )
    host_key: str | None = attrs.field(
        default=None, validator=_optionalFilePath, metadata=_key(_path)
    )
    password_file: str | None = attrs.field(
        default=None, validator=_optionalFilePath, metadata=_key(_path)
    )


@attrs.frozen
class StatusConfig:
    """
    The HTTP status, metrics and control endpoint (C{[status]}), see
    C{docs/operations.md}.

    Plain HTTP by default (meant for loopback); with C{cert} and C{key} it
    is HTTPS, and with C{client_auth = "required"} it asks for client
    certificates verified exactly like a listener's.

    @ivar endpoint: Twisted server endpoint description; loopback by
        default.
    @ivar cert: Absolute path of the PEM certificate chain for HTTPS, or
        L{None} for plain HTTP.
    @ivar key: Absolute path of the PEM private key of C{cert}.
    @ivar client_auth: As a listener's C{client_auth}.
    @ivar ca_certificates: As a listener's C{ca_certificates}.
    @ivar crls: As a listener's C{crls}.
    @ivar crl_missing: As a listener's C{crl_missing}.
    @ivar crl_expired: As a listener's C{crl_expired}.
    @ivar member_control: Whether C{POST /members/...} (drain, enable) is
        served at all.  Even when true it is served only on a loopback
        endpoint or one that requires client certificates; false turns it
        off there too (a host whose other local users must not drain
        members).
    """

    endpoint: str = attrs.field(
        default="tcp:9100:interface=127.0.0.1", validator=_endpoint, metadata=_key()
    )
    cert: str | None = attrs.field(default=None, validator=_optionalFilePath, metadata=_key(_path))
    key: str | None = attrs.field(default=None, validator=_optionalFilePath, metadata=_key(_path))
    client_auth: ClientAuth = attrs.field(
        default="off", validator=_oneOf("off", "optional", "required"), metadata=_key()
    )
    ca_certificates: tuple[str, ...] = attrs.field(
        default=(), converter=_toTuple, validator=_filePaths, metadata=_key(_paths)
    )
    crls: tuple[str, ...] = attrs.field(
        default=(), converter=_toTuple, validator=_filePaths, metadata=_key(_paths)
    )
    crl_missing: CRLPolicy = attrs.field(
        default="reject", validator=_oneOf("reject", "allow"), metadata=_key()
    )
    crl_expired: CRLPolicy = attrs.field(
        default="reject", validator=_oneOf("reject", "allow"), metadata=_key()
    )
    member_control: bool = attrs.field(default=True, validator=_boolean, metadata=_key())

    def __attrs_post_init__(self) -> None:
        """
        Check the settings that depend on each other.
        """
        if (self.cert is None) != (self.key is None):
            raise ConfigurationError(
                "cert and key go together: set both for HTTPS, neither for plain HTTP",
                key="key" if self.key is None else "cert",
            )
        if self.cert is None:
            for name in ("client_auth", "ca_certificates", "crls"):
                if getattr(self, name) != attrs.fields_dict(StatusConfig)[name].default:
                    raise ConfigurationError(
                        "only allowed with cert and key (HTTPS)", key=name
                    )
        elif self.client_auth != "off" and not self.ca_certificates:
            raise ConfigurationError(
                f'client_auth = "{self.client_auth}" needs at least one CA file'
                " to verify client certificates with",
                key="ca_certificates",
            )

    @property
    def tls(self) -> bool:
        """
        Is the status endpoint HTTPS?
        """
        return self.cert is not None

    def asListener(self) -> ListenerConfig:
        """
        The same TLS settings as a C{ListenerConfig} named C{"status"}, so
        that the listeners' start-up checks, TLS contexts and client
        certificate verification serve the status endpoint too.

        @raise ValueError: If the endpoint is not HTTPS.
        """
        if self.cert is None or self.key is None:
            raise ValueError("the status endpoint has no cert and key")
        return ListenerConfig(
            name="status",
            endpoint=self.endpoint,
            protocol="tls",
            pool="status",
            client_auth=self.client_auth,
            ca_certificates=self.ca_certificates,
            crls=self.crls,
            certificates=(CertificateConfig(cert=self.cert, key=self.key),),
            crl_missing=self.crl_missing,
            crl_expired=self.crl_expired,
        )


@attrs.frozen
class LoggingConfig:
    """
    Where the log goes and in what shape (C{[logging]}), see
    C{docs/operations.md}.  twistd's own C{--logfile} and the C{twistd
    mtlsproxy --log-format} option take precedence.

    @ivar format: C{"text"} (human-readable lines) or C{"json"} (one JSON
        object per line).
    @ivar file: Absolute path of the log file, or L{None} for twistd's
        default (standard output with C{-n}, else C{twistd.log}).
    @ivar level: The least level logged: C{"debug"} (everything,
        including an event per connection that ended without close_notify
        and the like), C{"info"} (the default: access lines, start-up,
        reloads, health changes), C{"warn"} or C{"error"}.
    """

    format: Literal["text", "json"] = attrs.field(
        default="text", validator=_oneOf("text", "json"), metadata=_key()
    )
    level: Literal["debug", "info", "warn", "error"] = attrs.field(
        default="info", validator=_oneOf("debug", "info", "warn", "error"), metadata=_key()
    )
    file: str | None = attrs.field(default=None, validator=_optionalFilePath, metadata=_key(_path))


@attrs.frozen
class ProxyConfig:
    """
    The whole configuration file.

    @ivar path: Absolute path of the file it was read from (for messages and
        reloading); not a TOML key.
    @ivar listeners: The listeners, at least one, names unique.
    @ivar pools: The pools, at least one, names unique.
    @ivar admin: The SSH admin console (C{[admin]}), or L{None} for none.
    @ivar status: The status and metrics endpoint (C{[status]}), or L{None}
        for none.
    @ivar logging: Log format and file (C{[logging]}).
    @ivar drain_timeout: Seconds that established connections are given to
        finish on shutdown (SIGTERM) before they are closed.
    @ivar reload_poll_interval: Seconds between checks of the configuration
        file and the files it names for changed content (a change reloads
        them, see C{docs/reload.md}); 0 turns polling off (SIGHUP still
        reloads).
    @ivar expiry_warning_days: Certificates and CRLs that expire within this
        many days are logged as warnings at start-up, on reload and daily.
    @ivar workers: How many worker processes serve the listeners (an
        integer from 1 to 256, or C{"auto"}, the default, for one per CPU
        core); 1 runs everything in the twistd process itself, and so does
        C{"auto"} on a machine with one core (see
        C{docs/performance.md} and L{mtlsproxy.workers}).
    """

    path: str = attrs.field(validator=attrs.validators.instance_of(str))
    listeners: tuple[ListenerConfig, ...] = attrs.field(
        validator=_tuplesOf(ListenerConfig, "listeners", required=True),
        metadata=_key(_tables(ListenerConfig)),
    )
    pools: tuple[PoolConfig, ...] = attrs.field(
        validator=_tuplesOf(PoolConfig, "pools", required=True),
        metadata=_key(_tables(PoolConfig)),
    )
    admin: AdminConfig | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.instance_of(AdminConfig)),
        metadata=_key(_table(AdminConfig)),
    )
    status: StatusConfig | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.instance_of(StatusConfig)),
        metadata=_key(_table(StatusConfig)),
    )
    logging: LoggingConfig = attrs.field(
        factory=LoggingConfig,
        validator=attrs.validators.instance_of(LoggingConfig),
        metadata=_key(_table(LoggingConfig)),
    )
    drain_timeout: float = attrs.field(
        default=30.0, converter=_toFloat, validator=_nonNegativeSeconds, metadata=_key()
    )
    reload_poll_interval: float = attrs.field(
        default=5.0, converter=_toFloat, validator=_nonNegativeSeconds, metadata=_key()
    )
    expiry_warning_days: int = attrs.field(
        default=30, validator=_integer(0, 3650), metadata=_key()
    )
    workers: int | str = attrs.field(default="auto", validator=_workersValue, metadata=_key())

    def __attrs_post_init__(self) -> None:
        """
        Check names and references across tables.
        """
        try:
            _unique("listeners", [listener.name for listener in self.listeners], "listener")
            _unique("pools", [pool.name for pool in self.pools], "pool")
            pools = [pool.name for pool in self.pools]
            for index, listener in enumerate(self.listeners):
                if listener.pool not in pools:
                    raise ConfigurationError(
                        f"unknown pool {listener.pool!r}; defined pools: {', '.join(pools)}",
                        key=f"listeners[{index}].pool",
                    )
            _checkRoutePools(self)
        except ConfigurationError as e:
            raise e.inFile(self.path) from None

    def pool(self, name: str) -> PoolConfig:
        """
        The pool called C{name}.

        @raise KeyError: If there is none.
        """
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)


def _checkRoutePools(config: ProxyConfig) -> None:
    """
    Refuse a route to an unknown pool, and a C{client_auth = "passthrough"}
    C{tls} listener with a pool that would not tell its backends the
    verification result (C{proxy_protocol = "v2"} does).
    """
    pools = {pool.name: pool for pool in config.pools}
    for index, listener in enumerate(config.listeners):
        for number, route in enumerate(listener.routes):
            if route.pool not in pools:
                raise ConfigurationError(
                    f"unknown pool {route.pool!r}; defined pools: {', '.join(pools)}",
                    key=f"listeners[{index}].routes[{number}].pool",
                )
        if listener.protocol == "tls" and listener.client_auth == "passthrough":
            for name in [listener.pool] + [route.pool for route in listener.routes]:
                if pools[name].proxy_protocol != "v2":
                    raise ConfigurationError(
                        f'client_auth = "passthrough" on a tls listener lets the backend'
                        f' decide, so it must be told: pool {name!r} needs'
                        f' proxy_protocol = "v2"',
                        key=f"listeners[{index}].client_auth",
                    )


def _unique(table: str, names: Sequence[str], what: str) -> None:
    """
    Refuse a name used twice in C{table}.
    """
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in seen:
            raise ConfigurationError(
                f"duplicate {what} name {name!r} (also {table}[{seen[name]}].name)",
                key=f"{table}[{index}].name",
            )
        seen[name] = index


# ---------------------------------------------------------------------------
# Reading the file
# ---------------------------------------------------------------------------

_TOML_POSITION = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)$")


def _syntaxError(error: tomllib.TOMLDecodeError, text: str, path: str) -> ConfigurationError:
    """
    Turn L{tomllib}'s message, C{"Invalid value (at line 3, column 10)"},
    into C{"<file>: line 3: Invalid value (column 10)"}.
    """
    message = str(error)
    match = _TOML_POSITION.search(message)
    if match is None:
        return ConfigurationError(f"invalid TOML: {message}", path=path)
    problem = message[: match.start()]
    if match.group(1) is not None:
        return ConfigurationError(
            f"{problem} (column {match.group(2)})", path=path, line=int(match.group(1))
        )
    return ConfigurationError(
        f"{problem} (at end of file)", path=path, line=text.rstrip().count("\n") + 1
    )


def loadConfig(path: str) -> ProxyConfig:
    """
    Read and validate a configuration file.

    Relative file paths in it are resolved against the folder of C{path}.
    The certificate, key and CRL files are not opened here; see
    L{mtlsproxy.checks.checkConfiguration}.

    @param path: The TOML file.

    @raise ConfigurationError: If the file cannot be read, is not TOML, or
        does not describe a valid configuration.  The error names the file
        (absolute) and the key path.
    """
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigurationError(
            f"cannot read configuration file: {e.strerror or e}", path=path
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigurationError("not valid UTF-8", path=path, line=line) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _syntaxError(e, text, path) from None
    try:
        return _structure(ProxyConfig, raw, "", os.path.dirname(path), {"path": path})
    except ConfigurationError as e:
        raise e.inFile(path) from None
