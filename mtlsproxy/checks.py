# -*- test-case-name: tests.test_checks -*-
"""
Start-up checks: everything about a configuration that needs the files it
names or the current time.

L{checkConfiguration} loads every TLS listener's certificates, key, CA
certificates and CRLs (with L{mtlsproxy.material}) and checks that they fit
together: the key belongs to the certificate, the chain is in order and
valid now, each CRL is signed by a configured CA.  Problems that stop the
proxy from working raise L{ConfigurationError}; problems that will start to
matter, or that only some clients will notice, become warnings.

C{mtlsproxy check}, C{twistd mtlsproxy} and a reload run exactly this, so
what C{check} accepts is what the proxy runs.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Sequence

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from .backendtls import BackendTLSMaterial
from .config import CertificateConfig, ListenerConfig, PoolConfig, ProxyConfig
from .errors import ConfigurationError
from .material import (
    ListenerMaterial,
    PrivateKey,
    ServerCertificate,
    loadCertificates,
    loadCRLs,
    loadPrivateKey,
    loadServerCertificate,
    sourceKey,
)

__all__ = [
    "EXPIRY_WARNING",
    "ListenerMaterial",
    "LoadedConfiguration",
    "ServerCertificate",
    "checkConfiguration",
]

EXPIRY_WARNING = timedelta(days=30)
"""
Certificates that expire sooner than this produce a warning.
"""


@attrs.frozen
class LoadedConfiguration:
    """
    A configuration that passed the start-up checks, with its material.

    @ivar config: The configuration.
    @ivar listeners: The material of each C{tls} and C{https} listener, by
        listener name; C{tcp} listeners have no entry.
    @ivar warnings: One line each: problems that do not stop the proxy.
    @ivar backends: The material of each pool with C{[pools.tls]}, by pool
        name.
    """

    config: ProxyConfig
    listeners: dict[str, ListenerMaterial]
    warnings: tuple[str, ...]
    backends: dict[str, BackendTLSMaterial] = attrs.field(factory=dict)


def checkConfiguration(config: ProxyConfig, now: datetime) -> LoadedConfiguration:
    """
    Load and check the material of every listener and the pools' settings
    that depend on installed plugins.

    @param config: A configuration from L{mtlsproxy.config.loadConfig}.
    @param now: The current time (timezone-aware; naive means UTC).

    @raise ConfigurationError: For a missing or unparsable file, a key that
        does not match its certificate, a chain out of order, an expired or
        not yet valid server certificate, a CRL that no configured CA
        signed, or an unknown selector.  The error names the configuration
        file and the key path of the setting.
    """
    now = now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now
    warnings: list[str] = []
    listeners: dict[str, ListenerMaterial] = {}
    soon = timedelta(days=getattr(config, "expiry_warning_days", EXPIRY_WARNING.days))
    try:
        for index, listener in enumerate(config.listeners):
            if listener.protocol in ("tls", "https"):
                listeners[listener.name] = _checkListener(
                    listener, f"listeners[{index}]", now, warnings, soon
                )
        _checkPools(config, warnings)
        backends = {
            pool.name: _checkBackendTLS(pool, f"pools[{index}].tls", now, warnings, soon)
            for index, pool in enumerate(config.pools)
            if pool.tls is not None
        }
    except ConfigurationError as e:
        raise e.inFile(config.path) from None
    return LoadedConfiguration(config, listeners, tuple(warnings), backends)


# ---------------------------------------------------------------------------
# Helpers for messages
# ---------------------------------------------------------------------------


def _when(moment: datetime) -> str:
    """
    A time for a message: C{2026-06-01 12:00:00 UTC}.
    """
    return f"{moment.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC"


def _inDays(delta: timedelta) -> str:
    """
    C{"in 12 days"}, C{"in 1 day"} or C{"within a day"}.
    """
    days = delta.days
    if days < 1:
        return "within a day"
    return f"in {days} day{'' if days == 1 else 's'}"


def _name(name: x509.Name) -> str:
    """
    A distinguished name as RFC 4514 text (C{CN=localhost}).
    """
    return name.rfc4514_string() or "(empty name)"


def _spki(publicKey: object) -> bytes:
    """
    The DER SubjectPublicKeyInfo of a public key: comparable across key
    types.
    """
    return publicKey.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _inChain(number: int, cert: x509.Certificate, leaf: str = "the server certificate") -> str:
    """
    Name a certificate of a chain: the first is C{leaf}, the others are
    numbered from 1 like the file.
    """
    if number == 1:
        return f"{leaf} ({_name(cert.subject)})"
    return f"chain certificate {number} ({_name(cert.subject)})"


@attrs.frozen
class _BackendOwner:
    """
    A pool's C{[pools.tls]} where the helpers below take a listener: whose
    CAs and CRLs they check (for messages) and its CRL policies.
    """

    name: str
    crl_missing: str
    crl_expired: str


def _label(owner: ListenerConfig | _BackendOwner) -> str:
    """
    Whose material a message is about: C{listener 'x'} or C{pool 'x'
    [pools.tls]}.
    """
    if isinstance(owner, _BackendOwner):
        return f"pool {owner.name!r} [pools.tls]"
    return f"listener {owner.name!r}"


def _peers(owner: ListenerConfig | _BackendOwner) -> str:
    """
    Whose certificates the CAs and CRLs of C{owner} verify.
    """
    return "member certificates" if isinstance(owner, _BackendOwner) else "client certificates"


# ---------------------------------------------------------------------------
# Listeners
# ---------------------------------------------------------------------------


def _checkListener(
    listener: ListenerConfig,
    where: str,
    now: datetime,
    warnings: list[str],
    soon: timedelta = EXPIRY_WARNING,
) -> ListenerMaterial:
    """
    Load and check the material of one TLS listener: its certificates, and
    the CAs and CRLs of the listener and of each certificate entry that has
    its own.

    @param where: The listener's key path, C{listeners[0]}.
    @param warnings: Where warnings are appended.
    @param soon: Warn about certificates that expire sooner than this.
    """
    sources: dict[bytes, str] = {}
    servers = [
        _checkServerCertificate(
            listener, certificate, f"{where}.certificates[{index}]", now, warnings, soon, sources
        )
        for index, certificate in enumerate(listener.certificates)
    ]
    cas = _checkCAs(listener, listener.ca_certificates, where, now, warnings, soon, sources)
    crls = _checkCRLs(listener, listener.crls, where, cas, now, warnings, sources)
    listenerCAsUsed = False
    entries = []
    for index, (certificate, server) in enumerate(zip(listener.certificates, servers)):
        clientAuth = listener.certificateSettings(index)[0]
        if certificate.ca_certificates is None and certificate.crls is None:
            listenerCAsUsed = listenerCAsUsed or clientAuth != "off"
            entries.append(server)
            continue
        entryWhere = f"{where}.certificates[{index}]"
        entryCAs = cas
        if certificate.ca_certificates is not None:
            entryCAs = _checkCAs(
                listener, certificate.ca_certificates, entryWhere, now, warnings, soon, sources
            )
        else:
            listenerCAsUsed = listenerCAsUsed or clientAuth != "off"
        crlPaths, crlWhere = (
            (listener.crls, where) if certificate.crls is None else (certificate.crls, entryWhere)
        )
        entryCRLs = _checkCRLs(listener, crlPaths, crlWhere, entryCAs, now, warnings, sources)
        _checkCoverage(
            listener, entryCAs, entryCRLs, warnings, clientAuth, f"certificates[{index}]"
        )
        entries.append(attrs.evolve(server, cas=entryCAs, crls=entryCRLs))
    _checkCoverage(listener, cas, crls, warnings, "on" if listenerCAsUsed else "off")
    first, *others = entries
    return ListenerMaterial(
        first.chain,
        first.key,
        cas,
        crls,
        tuple(others),
        entries=tuple(entries),
        sources=sources,
    )


def _checkCAs(
    listener: ListenerConfig | _BackendOwner,
    paths: Sequence[str],
    where: str,
    now: datetime,
    warnings: list[str],
    soon: timedelta,
    sources: dict[bytes, str],
) -> tuple[x509.Certificate, ...]:
    """
    Load and check the CA certificates of C{paths} (the C{ca_certificates}
    at key path C{where}).
    """
    cas: list[x509.Certificate] = []
    for index, path in enumerate(paths):
        loaded = loadCertificates(path, f"{where}.ca_certificates[{index}]")
        for ca in loaded:
            _checkCA(listener, ca, path, now, warnings, soon)
            sources.setdefault(sourceKey(ca), path)
        cas.extend(loaded)
    return tuple(cas)


def _checkCRLs(
    listener: ListenerConfig | _BackendOwner,
    paths: Sequence[str],
    where: str,
    cas: Sequence[x509.Certificate],
    now: datetime,
    warnings: list[str],
    sources: dict[bytes, str],
) -> tuple[x509.CertificateRevocationList, ...]:
    """
    Load and check the CRLs of C{paths} (the C{crls} at key path C{where}),
    each of which one of C{cas} must have signed.
    """
    crls: list[x509.CertificateRevocationList] = []
    for index, path in enumerate(paths):
        lists = loadCRLs(path, f"{where}.crls[{index}]")
        for number, crl in enumerate(lists, 1):
            label = f"CRL {number} in {path}" if len(lists) > 1 else f"the CRL in {path}"
            _checkCRL(listener, crl, label, cas, f"{where}.crls[{index}]", now, warnings)
            sources.setdefault(sourceKey(crl), path)
        crls.extend(lists)
    return tuple(crls)


def _checkServerCertificate(
    listener: ListenerConfig,
    certificate: CertificateConfig,
    where: str,
    now: datetime,
    warnings: list[str],
    soon: timedelta = EXPIRY_WARNING,
    sources: dict[bytes, str] | None = None,
) -> ServerCertificate:
    """
    Load one server chain and its key (PEM or PKCS#12); check that the key
    belongs to the first certificate, that each certificate was issued by
    the next, and that all of them are valid now.

    @param where: The key path of the C{[[listeners.certificates]]} entry.
    """
    loaded = loadServerCertificate(certificate, where)
    chain, key = loaded.chain, loaded.key
    certPath = certificate.source
    if certificate.pkcs12 is not None:
        keyPath, keyWhere, certWhere = certPath, f"{where}.pkcs12", f"{where}.pkcs12"
    else:
        keyPath, keyWhere, certWhere = str(certificate.key), f"{where}.key", f"{where}.cert"
    _checkKeyMatches(chain, key, certPath, keyPath, keyWhere)
    _checkChainOrder(chain, certPath, certWhere)
    if sources is not None:
        for cert in chain:
            sources.setdefault(sourceKey(cert), certPath)
    _checkValidity(listener, chain, certPath, certWhere, now, warnings, soon)
    _checkServerUsage(listener, chain[0], certPath, warnings)
    return ServerCertificate(chain, key)


def _checkValidity(
    owner: ListenerConfig | _BackendOwner,
    chain: Sequence[x509.Certificate],
    certPath: str,
    where: str,
    now: datetime,
    warnings: list[str],
    soon: timedelta,
    leaf: str = "the server certificate",
) -> None:
    """
    Refuse a chain with a certificate that is not valid now; warn about one
    that expires sooner than C{soon}.

    @param where: The key path of the file's setting.
    @param leaf: What the first certificate is, for messages.
    """
    for number, cert in enumerate(chain, 1):
        which = f"{_inChain(number, cert, leaf)} in {certPath}"
        if cert.not_valid_before_utc > now:
            raise ConfigurationError(
                f"{which} is not valid before {_when(cert.not_valid_before_utc)}",
                key=where,
            )
        if cert.not_valid_after_utc < now:
            raise ConfigurationError(
                f"{which} expired on {_when(cert.not_valid_after_utc)}",
                key=where,
            )
        left = cert.not_valid_after_utc - now
        if left < soon:
            warnings.append(
                f"{_label(owner)}: {which} expires on"
                f" {_when(cert.not_valid_after_utc)}, {_inDays(left)}"
            )


def _checkKeyMatches(
    chain: Sequence[x509.Certificate], key: PrivateKey, certPath: str, keyPath: str, where: str
) -> None:
    """
    Refuse a key that is not the first certificate's, and say so when it
    belongs to another certificate of the file (a chain out of order).
    """
    mine = _spki(key.public_key())
    if _spki(chain[0].public_key()) == mine:
        return
    hint = ""
    for number, cert in enumerate(chain[1:], 2):
        if _spki(cert.public_key()) == mine:
            hint = (
                f"; it matches certificate {number} in that file: put the server"
                " certificate first"
            )
            break
    raise ConfigurationError(
        f"the private key in {keyPath} does not match the certificate"
        f" {_name(chain[0].subject)} in {certPath}{hint}",
        key=where,
    )


def _checkChainOrder(chain: Sequence[x509.Certificate], certPath: str, where: str) -> None:
    """
    Refuse a chain in which a certificate was not issued (name and
    signature) by the one after it: clients are sent the chain as it is.
    """
    for number in range(1, len(chain)):
        child, parent = chain[number - 1], chain[number]
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            raise ConfigurationError(
                f"certificate {number + 1} in {certPath} ({_name(parent.subject)}) did not"
                f" issue certificate {number} ({_name(child.subject)}, issued by"
                f" {_name(child.issuer)}): list the server certificate first, then"
                " each issuer in turn",
                key=where,
            ) from None


def _checkServerUsage(
    listener: ListenerConfig, cert: x509.Certificate, certPath: str, warnings: list[str]
) -> None:
    """
    Warn about a server certificate whose extended key usage does not allow
    TLS servers (a client certificate configured by mistake): clients
    reject it.
    """
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    allowed = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
    if not allowed.intersection(usage):
        warnings.append(
            f"listener {listener.name!r}: the server certificate"
            f" ({_name(cert.subject)}) in {certPath} does not allow TLS server use"
            " (extendedKeyUsage without serverAuth); clients will reject it"
        )


def _checkCA(
    listener: ListenerConfig | _BackendOwner,
    ca: x509.Certificate,
    path: str,
    now: datetime,
    warnings: list[str],
    soon: timedelta = EXPIRY_WARNING,
) -> None:
    """
    Warn about a CA certificate that is not a CA, has expired or expires
    soon: client certificates that chain to it will be rejected.
    """
    which = f"CA certificate {_name(ca.subject)} in {path}"
    try:
        isCA = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        isCA = False
    if not isCA:
        warnings.append(
            f"{_label(listener)}: {which} is not a CA certificate"
            f" (basicConstraints CA:TRUE missing); {_peers(listener)} cannot be"
            " verified with it"
        )
    if ca.not_valid_after_utc < now:
        warnings.append(
            f"{_label(listener)}: {which} expired on"
            f" {_when(ca.not_valid_after_utc)}; {_peers(listener)} issued under"
            " it will be rejected"
        )
    elif ca.not_valid_after_utc - now < soon:
        warnings.append(
            f"{_label(listener)}: {which} expires on"
            f" {_when(ca.not_valid_after_utc)}, {_inDays(ca.not_valid_after_utc - now)}"
        )


def _signs(ca: x509.Certificate, crl: x509.CertificateRevocationList) -> bool:
    """
    Did C{ca} sign C{crl}?
    """
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return False


def _checkCRL(
    listener: ListenerConfig | _BackendOwner,
    crl: x509.CertificateRevocationList,
    label: str,
    cas: Sequence[x509.Certificate],
    where: str,
    now: datetime,
    warnings: list[str],
) -> None:
    """
    Refuse a CRL that no configured CA signed; warn about one that is out
    of date or not valid yet.

    @param label: How to name the CRL: C{"the CRL in /x/crls.pem"}.
    @param where: The key path of the C{crls} entry, C{listeners[0].crls[1]}.
    """
    issuer = _name(crl.issuer)
    namesakes = [ca for ca in cas if ca.subject == crl.issuer]
    if not namesakes:
        configured = "; ".join(_name(ca.subject) for ca in cas) or "none"
        raise ConfigurationError(
            f"{label} was issued by {issuer}, which is not one of the configured"
            f" CA certificates ({configured})",
            key=where,
        )
    if not any(_signs(ca, crl) for ca in namesakes):
        raise ConfigurationError(
            f"{label} names {issuer} as issuer but its signature does not verify"
            f" with that CA's key",
            key=where,
        )
    nextUpdate = crl.next_update_utc
    if nextUpdate is not None and nextUpdate < now:
        if listener.crl_expired == "reject":
            consequence = (
                f'with crl_expired = "reject" {_peers(listener)} it covers are'
                " rejected until it is replaced"
            )
        else:
            consequence = 'it is still used because crl_expired = "allow"'
        warnings.append(
            f"{_label(listener)}: {label} (issuer {issuer}) is past its"
            f" nextUpdate {_when(nextUpdate)}; {consequence}"
        )
    if crl.last_update_utc > now:
        warnings.append(
            f"{_label(listener)}: {label} (issuer {issuer}) is not valid"
            f" before {_when(crl.last_update_utc)}"
        )


def _checkCoverage(
    listener: ListenerConfig | _BackendOwner,
    cas: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList],
    warnings: list[str],
    clientAuth: str | None = None,
    entry: str | None = None,
) -> None:
    """
    Warn about CA material that will not be used, and about CAs without a
    CRL when C{crl_missing = "reject"} makes that reject their clients.

    @param clientAuth: Whether the CAs are used (C{"off"} or anything else);
        default the listener's C{client_auth}.
    @param entry: The certificate entry (C{"certificates[1]"}) whose own
        CAs and CRLs these are, or L{None} for the listener's.
    """
    if clientAuth is None:
        assert isinstance(listener, ListenerConfig)
        clientAuth = listener.client_auth
    owner = _label(listener) + (f" {entry}" if entry else "")
    if clientAuth == "off":
        assert isinstance(listener, ListenerConfig)
        if entry is None and (listener.ca_certificates or listener.crls):
            warnings.append(
                f"{owner}: ca_certificates and crls are not used"
                ' because client_auth = "off"'
            )
        return
    if listener.crl_missing != "reject":
        return
    covered = {crl.issuer for crl in crls}
    for ca in cas:
        if ca.subject not in covered:
            warning = (
                f"{owner}: no CRL is configured for CA"
                f' {_name(ca.subject)}; with crl_missing = "reject" {_peers(listener)}'
                " verified through it are rejected"
            )
            if warning not in warnings:
                warnings.append(warning)


# ---------------------------------------------------------------------------
# Pools
# ---------------------------------------------------------------------------


def _checkPools(config: ProxyConfig, warnings: list[str]) -> None:
    """
    Refuse a selector no installed plugin provides; warn about pools no
    listener uses and pools whose members all have weight 0.
    """
    from .plugins import selectorFactory

    used = {listener.pool for listener in config.listeners}
    used.update(r.pool for listener in config.listeners for r in getattr(listener, "routes", ()))
    for index, pool in enumerate(config.pools):
        try:
            selectorFactory(pool.selector)
        except LookupError as e:
            raise ConfigurationError(
                str(e),
                key=f"pools[{index}].selector",
            ) from None
        if pool.name not in used:
            warnings.append(f"pool {pool.name!r} is not used by any listener")
        if all(member.weight == 0 for member in pool.members):
            warnings.append(
                f"pool {pool.name!r}: every member has weight 0, so no connection"
                " is ever sent to it"
            )


def _checkBackendTLS(
    pool: PoolConfig, where: str, now: datetime, warnings: list[str], soon: timedelta
) -> BackendTLSMaterial:
    """
    Load and check the material of a pool's C{[pools.tls]}: its CAs and
    CRLs as a listener's, and the proxy's client certificate (key matches,
    chain in order, valid now) as a listener's server certificate.

    @param where: The table's key path, C{pools[0].tls}.
    """
    tls = pool.tls
    assert tls is not None
    owner = _BackendOwner(pool.name, tls.crl_missing, tls.crl_expired)
    sources: dict[bytes, str] = {}
    try:
        cas = _checkCAs(owner, tls.ca_certificates, where, now, warnings, soon, sources)
        crls = _checkCRLs(owner, tls.crls, where, cas, now, warnings, sources)
        if crls:
            # Without CRLs revocation is not checked, so none can be missing.
            _checkCoverage(owner, cas, crls, warnings, "on")
        if tls.cert is None or tls.key is None:
            return BackendTLSMaterial(cas, crls, sources=sources)
        chain = loadCertificates(tls.cert, f"{where}.cert")
        key = loadPrivateKey(tls.key, f"{where}.key")
        _checkKeyMatches(chain, key, tls.cert, tls.key, f"{where}.key")
        _checkChainOrder(chain, tls.cert, f"{where}.cert")
        _checkValidity(
            owner, chain, tls.cert, f"{where}.cert", now, warnings, soon, "the client certificate"
        )
    except ConfigurationError as e:
        # The key path has the pool's index; name the pool, too.
        raise ConfigurationError(
            f"pool {pool.name!r}: {e.problem}", e.path, e.key, e.line
        ) from None
    for certificate in chain:
        sources.setdefault(sourceKey(certificate), tls.cert)
    return BackendTLSMaterial(cas, crls, chain, key, sources=sources)
