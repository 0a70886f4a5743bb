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

from .config import ListenerConfig, ProxyConfig
from .errors import ConfigurationError
from .material import (
    ListenerMaterial,
    PrivateKey,
    ServerCertificate,
    loadCertificates,
    loadCRLs,
    loadPrivateKey,
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
    @ivar listeners: The material of each C{protocol = "tls"} listener, by
        listener name; C{tcp} listeners have no entry.
    @ivar warnings: One line each: problems that do not stop the proxy.
    """

    config: ProxyConfig
    listeners: dict[str, ListenerMaterial]
    warnings: tuple[str, ...]


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
    try:
        for index, listener in enumerate(config.listeners):
            if listener.protocol == "tls":
                listeners[listener.name] = _checkListener(
                    listener, f"listeners[{index}]", now, warnings
                )
        _checkPools(config, warnings)
    except ConfigurationError as e:
        raise e.inFile(config.path) from None
    return LoadedConfiguration(config, listeners, tuple(warnings))


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


def _inChain(number: int, cert: x509.Certificate) -> str:
    """
    Name a certificate of a server chain: the first is I{the server
    certificate}, the others are numbered from 1 like the file.
    """
    if number == 1:
        return f"the server certificate ({_name(cert.subject)})"
    return f"chain certificate {number} ({_name(cert.subject)})"


# ---------------------------------------------------------------------------
# Listeners
# ---------------------------------------------------------------------------


def _checkListener(
    listener: ListenerConfig, where: str, now: datetime, warnings: list[str]
) -> ListenerMaterial:
    """
    Load and check the material of one TLS listener.

    @param where: The listener's key path, C{listeners[0]}.
    @param warnings: Where warnings are appended.
    """
    servers = [
        _checkServerCertificate(
            listener,
            certificate.cert,
            certificate.key,
            f"{where}.certificates[{index}]",
            now,
            warnings,
        )
        for index, certificate in enumerate(listener.certificates)
    ]
    cas: list[x509.Certificate] = []
    for index, path in enumerate(listener.ca_certificates):
        loaded = loadCertificates(path, f"{where}.ca_certificates[{index}]")
        for ca in loaded:
            _checkCA(listener, ca, path, now, warnings)
        cas.extend(loaded)
    crls: list[x509.CertificateRevocationList] = []
    for index, path in enumerate(listener.crls):
        lists = loadCRLs(path, f"{where}.crls[{index}]")
        for number, crl in enumerate(lists, 1):
            label = f"CRL {number} in {path}" if len(lists) > 1 else f"the CRL in {path}"
            _checkCRL(listener, crl, label, cas, f"{where}.crls[{index}]", now, warnings)
        crls.extend(lists)
    _checkCoverage(listener, cas, crls, warnings)
    first, *others = servers
    return ListenerMaterial(first.chain, first.key, tuple(cas), tuple(crls), tuple(others))


def _checkServerCertificate(
    listener: ListenerConfig,
    certPath: str,
    keyPath: str,
    where: str,
    now: datetime,
    warnings: list[str],
) -> ServerCertificate:
    """
    Load one server chain and its key; check that the key belongs to the
    first certificate, that each certificate was issued by the next, and
    that all of them are valid now.

    @param where: The key path of the C{[[listeners.certificates]]} entry.
    """
    chain = loadCertificates(certPath, f"{where}.cert")
    key = loadPrivateKey(keyPath, f"{where}.key")
    _checkKeyMatches(chain, key, certPath, keyPath, f"{where}.key")
    _checkChainOrder(chain, certPath, f"{where}.cert")
    for number, cert in enumerate(chain, 1):
        which = f"{_inChain(number, cert)} in {certPath}"
        if cert.not_valid_before_utc > now:
            raise ConfigurationError(
                f"{which} is not valid before {_when(cert.not_valid_before_utc)}",
                key=f"{where}.cert",
            )
        if cert.not_valid_after_utc < now:
            raise ConfigurationError(
                f"{which} expired on {_when(cert.not_valid_after_utc)}",
                key=f"{where}.cert",
            )
        left = cert.not_valid_after_utc - now
        if left < EXPIRY_WARNING:
            warnings.append(
                f"listener {listener.name!r}: {which} expires on"
                f" {_when(cert.not_valid_after_utc)}, {_inDays(left)}"
            )
    _checkServerUsage(listener, chain[0], certPath, warnings)
    return ServerCertificate(chain, key)


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
    listener: ListenerConfig,
    ca: x509.Certificate,
    path: str,
    now: datetime,
    warnings: list[str],
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
            f"listener {listener.name!r}: {which} is not a CA certificate"
            " (basicConstraints CA:TRUE missing); client certificates cannot be"
            " verified with it"
        )
    if ca.not_valid_after_utc < now:
        warnings.append(
            f"listener {listener.name!r}: {which} expired on"
            f" {_when(ca.not_valid_after_utc)}; client certificates issued under"
            " it will be rejected"
        )
    elif ca.not_valid_after_utc - now < EXPIRY_WARNING:
        warnings.append(
            f"listener {listener.name!r}: {which} expires on"
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
    listener: ListenerConfig,
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
                'with crl_expired = "reject" client certificates it covers are'
                " rejected until it is replaced"
            )
        else:
            consequence = 'it is still used because crl_expired = "allow"'
        warnings.append(
            f"listener {listener.name!r}: {label} (issuer {issuer}) is past its"
            f" nextUpdate {_when(nextUpdate)}; {consequence}"
        )
    if crl.last_update_utc > now:
        warnings.append(
            f"listener {listener.name!r}: {label} (issuer {issuer}) is not valid"
            f" before {_when(crl.last_update_utc)}"
        )


def _checkCoverage(
    listener: ListenerConfig,
    cas: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList],
    warnings: list[str],
) -> None:
    """
    Warn about CA material that will not be used, and about CAs without a
    CRL when C{crl_missing = "reject"} makes that reject their clients.
    """
    if listener.client_auth == "off":
        if listener.ca_certificates or listener.crls:
            warnings.append(
                f"listener {listener.name!r}: ca_certificates and crls are not used"
                ' because client_auth = "off"'
            )
        return
    if listener.crl_missing != "reject":
        return
    covered = {crl.issuer for crl in crls}
    for ca in cas:
        if ca.subject not in covered:
            warnings.append(
                f"listener {listener.name!r}: no CRL is configured for CA"
                f' {_name(ca.subject)}; with crl_missing = "reject" client'
                " certificates verified through it are rejected"
            )


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
