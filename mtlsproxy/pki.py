# -*- test-case-name: tests.test_pki -*-
"""
A small PKI for mutual TLS: certificate authorities, server and client
certificates, certificate revocation lists and PKCS#12 bundles.

The library half builds everything in memory with C{cryptography}; the
certificates are shaped so that both OpenSSL 3/4 with
C{X509_V_FLAG_X509_STRICT} and C{cryptography.x509.verification} accept
them (critical basicConstraints and keyUsage, a subject key identifier on
every certificate and an authority key identifier on every certificate).

The command-line half, L{main}, is the C{mtlsproxy-pki} console script: it
keeps a tiny state directory (one certificate, key and JSON index per CA) and
replaces the hand-run C{openssl} steps of the usual mTLS guides.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Iterable, NoReturn, Sequence, Union

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "PrivateKey",
    "Issued",
    "generateKey",
    "createRootCA",
    "createIntermediateCA",
    "issueServerCertificate",
    "issueClientCertificate",
    "buildCRL",
    "certificatePEM",
    "chainPEM",
    "keyPEM",
    "crlPEM",
    "crlDER",
    "pkcs12Bytes",


]

PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]
"""
The private key types this module generates and signs with.
"""

IPAddressLike = Union[ipaddress.IPv4Address, ipaddress.IPv6Address, str]
"""
An IP address as an L{ipaddress} object or its textual form.
"""

KEY_TYPES = ("ec", "rsa")

ROOT_VALIDITY = timedelta(days=3650)
INTERMEDIATE_VALIDITY = timedelta(days=1825)
LEAF_VALIDITY = timedelta(days=397)
CRL_VALIDITY = timedelta(days=30)
BACKDATE = timedelta(hours=1)

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
)


_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")

# ---------------------------------------------------------------------------
# Library
# ---------------------------------------------------------------------------


@attrs.frozen
class Issued:
    """
    A certificate together with its private key.

    @ivar certificate: The certificate.
    @ivar key: The private key matching C{certificate}'s public key.
    """

    certificate: x509.Certificate
    key: PrivateKey


def generateKey(keyType: str = "ec", rsaBits: int = 2048) -> PrivateKey:
    """
    Generate a new private key.

    @param keyType: C{"ec"} for ECDSA on P-256, C{"rsa"} for RSA.
    @param rsaBits: The modulus size of an RSA key; ignored for EC keys.

    @raise ValueError: If C{keyType} is not one of C{"ec"}, C{"rsa"}.
    """
    if keyType == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if keyType == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=rsaBits)
    raise ValueError(f"unknown key type {keyType!r}; expected 'ec' or 'rsa'")


def _now() -> datetime:
    """
    The current time, timezone-aware UTC.
    """
    return datetime.now(timezone.utc)


def _utc(when: datetime) -> datetime:
    """
    Normalize C{when} to timezone-aware UTC; a naive datetime is taken to be
    UTC already, as C{cryptography} does.
    """
    if when.tzinfo is None:
        return when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc)


def _validity(
    notBefore: datetime | None,
    notAfter: datetime | None,
    lifetime: timedelta,
    issuer: Issued | None = None,
) -> tuple[datetime, datetime]:
    """
    Compute a validity period.  Defaults are one hour back-dated (clock skew)
    and C{lifetime} ahead; a default end is clamped to the issuer's own end so
    a default certificate never outlives its CA.  Explicit values are used as
    given.

    @raise ValueError: If the period ends before it starts.
    """
    now = _now()
    start = _utc(notBefore) if notBefore is not None else now - BACKDATE
    if notAfter is not None:
        end = _utc(notAfter)
    else:
        end = now + lifetime
        if issuer is not None:
            end = min(end, issuer.certificate.not_valid_after_utc)
    if end <= start:
        raise ValueError(f"validity period ends ({end}) before it starts ({start})")
    return start, end


def _name(commonName: str) -> x509.Name:
    """
    A distinguished name holding only C{commonName}.
    """
    if not commonName:
        raise ValueError("common name must not be empty")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)])


def _requireCA(issuer: Issued, pathLengthNeeded: bool = False) -> None:
    """
    Check that C{issuer} may sign certificates (and, if C{pathLengthNeeded},
    CA certificates).

    @raise ValueError: If it may not.
    """
    cert = issuer.certificate
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise ValueError(f"{cert.subject.rfc4514_string()} is not a CA certificate")
    if pathLengthNeeded and bc.path_length == 0:
        raise ValueError(
            f"{cert.subject.rfc4514_string()} has pathLength 0 and may not "
            "issue intermediate CAs"
        )
    if _spki(issuer.key.public_key()) != _spki(cert.public_key()):
        raise ValueError("issuer key does not match issuer certificate")


def _spki(publicKey: object) -> bytes:
    """
    The DER SubjectPublicKeyInfo of a public key, for comparing keys.
    """
    return publicKey.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def _authorityKeyIdentifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """
    The authority key identifier for something signed by C{issuer}: its
    subject key identifier if it has one, else one derived from its key.
    """
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer.public_key()  # type: ignore[arg-type]
        )
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


def _builder(
    subject: x509.Name,
    issuerName: x509.Name,
    key: PrivateKey,
    notBefore: datetime,
    notAfter: datetime,
) -> x509.CertificateBuilder:
    """
    A certificate builder with the fields every certificate shares: names,
    key, random serial, validity and subject key identifier.
    """
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuerName)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(notBefore)
        .not_valid_after(notAfter)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
    )


def _keyUsage(
    digitalSignature: bool = False,
    keyEncipherment: bool = False,
    keyCertSign: bool = False,
    cRLSign: bool = False,
) -> x509.KeyUsage:
    """
    A key usage extension value with only the given bits set.
    """
    return x509.KeyUsage(
        digital_signature=digitalSignature,
        content_commitment=False,
        key_encipherment=keyEncipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=keyCertSign,
        crl_sign=cRLSign,
        encipher_only=False,
        decipher_only=False,
    )


def createRootCA(
    commonName: str,
    keyType: str = "ec",
    notBefore: datetime | None = None,
    notAfter: datetime | None = None,
) -> Issued:
    """
    Create a self-signed root certificate authority.

    The certificate has critical basicConstraints (CA, no path length limit),
    critical keyUsage (digitalSignature, keyCertSign, cRLSign), a subject key
    identifier and a matching authority key identifier.

    @param commonName: The CA's subject common name.
    @param keyType: C{"ec"} or C{"rsa"}, see L{generateKey}.
    @param notBefore: Start of validity; default one hour ago.
    @param notAfter: End of validity; default ten years from now.
    """
    key = generateKey(keyType)
    start, end = _validity(notBefore, notAfter, ROOT_VALIDITY)
    name = _name(commonName)
    cert = (
        _builder(name, name, key, start, end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            _keyUsage(digitalSignature=True, keyCertSign=True, cRLSign=True),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(certificate=cert, key=key)


def createIntermediateCA(
    issuer: Issued,
    commonName: str,
    keyType: str = "ec",
    notBefore: datetime | None = None,
    notAfter: datetime | None = None,
    pathLength: int | None = 0,
) -> Issued:
    """
    Create an intermediate certificate authority signed by C{issuer}.

    @param issuer: The signing CA.
    @param commonName: The new CA's subject common name.
    @param keyType: C{"ec"} or C{"rsa"}.
    @param notBefore: Start of validity; default one hour ago.
    @param notAfter: End of validity; default five years from now, but not
        past the issuer's own end.
    @param pathLength: The basicConstraints path length: C{0} (the default)
        lets this CA issue only leaf certificates, C{None} sets no limit.

    @raise ValueError: If C{issuer} is not a CA or may not issue CAs.
    """
    _requireCA(issuer, pathLengthNeeded=True)
    key = generateKey(keyType)
    start, end = _validity(notBefore, notAfter, INTERMEDIATE_VALIDITY, issuer)
    cert = (
        _builder(_name(commonName), issuer.certificate.subject, key, start, end)
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=pathLength), critical=True
        )
        .add_extension(
            _keyUsage(digitalSignature=True, keyCertSign=True, cRLSign=True),
            critical=True,
        )
        .add_extension(_authorityKeyIdentifier(issuer.certificate), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )
    return Issued(certificate=cert, key=key)


def _issueLeaf(
    issuer: Issued,
    commonName: str,
    usage: x509.ObjectIdentifier,
    names: list[x509.GeneralName],
    keyType: str,
    notBefore: datetime | None,
    notAfter: datetime | None,
) -> Issued:
    """
    Issue an end-entity certificate with one extended key usage and the
    given subject alternative names (none: no SAN extension).
    """
    _requireCA(issuer)
    key = generateKey(keyType)
    start, end = _validity(notBefore, notAfter, LEAF_VALIDITY, issuer)
    builder = (
        _builder(_name(commonName), issuer.certificate.subject, key, start, end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _keyUsage(
                digitalSignature=True,
                keyEncipherment=isinstance(key, rsa.RSAPrivateKey),
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(_authorityKeyIdentifier(issuer.certificate), critical=False)
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(names), critical=False
        )
    return Issued(certificate=builder.sign(issuer.key, hashes.SHA256()), key=key)


def issueServerCertificate(
    issuer: Issued,
    commonName: str,
    dnsNames: Iterable[str] = (),
    ipAddresses: Iterable[IPAddressLike] = (),
    keyType: str = "ec",
    notBefore: datetime | None = None,
    notAfter: datetime | None = None,
) -> Issued:
    """
    Issue a TLS server certificate (extendedKeyUsage serverAuth).

    Clients match the server's name against the subjectAltName only, so if
    neither C{dnsNames} nor C{ipAddresses} is given and C{commonName} looks
    like a host name it is put in the subjectAltName as a DNS name.

    @param issuer: The signing CA.
    @param commonName: The subject common name.
    @param dnsNames: DNS names for the subjectAltName.
    @param ipAddresses: IP addresses (L{ipaddress} objects or strings) for
        the subjectAltName.
    @param keyType: C{"ec"} or C{"rsa"}.
    @param notBefore: Start of validity; default one hour ago.
    @param notAfter: End of validity; default 397 days from now, but not
        past the issuer's own end.

    @raise ValueError: If an IP address does not parse or C{issuer} is not a
        CA.
    """
    dns = list(dnsNames)
    ips = [ipaddress.ip_address(a) if isinstance(a, str) else a for a in ipAddresses]
    if not dns and not ips and _HOSTNAME.match(commonName):
        dns = [commonName]
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names.extend(x509.IPAddress(ip) for ip in ips)
    return _issueLeaf(
        issuer,
        commonName,
        ExtendedKeyUsageOID.SERVER_AUTH,
        names,
        keyType,
        notBefore,
        notAfter,
    )


def issueClientCertificate(
    issuer: Issued,
    commonName: str,
    emailAddresses: Iterable[str] = (),
    uris: Iterable[str] = (),
    dnsNames: Iterable[str] = (),
    keyType: str = "ec",
    notBefore: datetime | None = None,
    notAfter: datetime | None = None,
) -> Issued:
    """
    Issue a TLS client certificate (extendedKeyUsage clientAuth).

    RFC 5280 validators such as C{cryptography.x509.verification} require
    a subjectAltName in end-entity certificates, so if no names are given
    and C{commonName} looks like an e-mail address or a host name, it is put
    in the subjectAltName as such.  Otherwise the certificate has no
    subjectAltName (OpenSSL accepts that; C{ClientVerifier} does not).

    @param issuer: The signing CA.
    @param commonName: The subject common name, the client's identity.
    @param emailAddresses: rfc822Name entries for the subjectAltName.
    @param uris: URI entries (for example SPIFFE IDs) for the subjectAltName.
    @param dnsNames: DNS names for the subjectAltName.
    @param keyType: C{"ec"} or C{"rsa"}.
    @param notBefore: Start of validity; default one hour ago.
    @param notAfter: End of validity; default 397 days from now, but not
        past the issuer's own end.

    @raise ValueError: If C{issuer} is not a CA.
    """
    names: list[x509.GeneralName] = [x509.RFC822Name(e) for e in emailAddresses]
    names.extend(x509.UniformResourceIdentifier(u) for u in uris)
    names.extend(x509.DNSName(d) for d in dnsNames)
    if not names:
        # RFC 5280 path validators such as cryptography.x509.verification
        # insist on a subjectAltName in end-entity certificates.
        if _EMAIL.match(commonName):
            names.append(x509.RFC822Name(commonName))
        elif _HOSTNAME.match(commonName):
            names.append(x509.DNSName(commonName))
    return _issueLeaf(
        issuer,
        commonName,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        names,
        keyType,
        notBefore,
        notAfter,
    )


def buildCRL(
    issuer: Issued,
    revoked: Iterable[tuple[int, datetime] | x509.Certificate] = (),
    lastUpdate: datetime | None = None,
    nextUpdate: datetime | None = None,
    crlNumber: int = 1,
) -> x509.CertificateRevocationList:
    """
    Build a certificate revocation list signed by C{issuer}.

    @param issuer: The CA whose certificates the list is about.
    @param revoked: The revoked certificates, each either a C{(serial,
        revocationDate)} pair or a certificate issued by C{issuer} (revoked
        as of C{lastUpdate}).
    @param lastUpdate: The list's thisUpdate; default one hour ago.
    @param nextUpdate: The list's nextUpdate; default 30 days from now.
    @param crlNumber: The CRLNumber extension, which should grow with every
        list the CA publishes.

    @raise ValueError: If a given certificate was not issued by C{issuer}, or
        C{issuer} is not a CA.
    """
    _requireCA(issuer)
    start, end = _validity(lastUpdate, nextUpdate, CRL_VALIDITY)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.certificate.subject)
        .last_update(start)
        .next_update(end)
        .add_extension(_authorityKeyIdentifier(issuer.certificate), critical=False)
        .add_extension(x509.CRLNumber(crlNumber), critical=False)
    )
    for entry in revoked:
        if isinstance(entry, x509.Certificate):
            if entry.issuer != issuer.certificate.subject:
                raise ValueError(
                    f"certificate {entry.serial_number:x} was issued by "
                    f"{entry.issuer.rfc4514_string()}, not by "
                    f"{issuer.certificate.subject.rfc4514_string()}"
                )
            serial, when = entry.serial_number, start
        else:
            serial, when = entry
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(_utc(when))
            .build()
        )
    return builder.sign(issuer.key, hashes.SHA256())


def certificatePEM(cert: x509.Certificate) -> bytes:
    """
    Encode a certificate as PEM.
    """
    return cert.public_bytes(serialization.Encoding.PEM)


def chainPEM(certs: Iterable[x509.Certificate]) -> bytes:
    """
    Encode certificates, in the given order, as concatenated PEM.
    """
    return b"".join(certificatePEM(c) for c in certs)


def keyPEM(key: PrivateKey, password: bytes | None = None) -> bytes:
    """
    Encode a private key as PKCS#8 PEM, encrypted if C{password} is given.
    """
    encryption: serialization.KeySerializationEncryption
    if password:
        encryption = serialization.BestAvailableEncryption(password)
    else:
        encryption = serialization.NoEncryption()
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def crlPEM(crl: x509.CertificateRevocationList) -> bytes:
    """
    Encode a certificate revocation list as PEM.
    """
    return crl.public_bytes(serialization.Encoding.PEM)


def crlDER(crl: x509.CertificateRevocationList) -> bytes:
    """
    Encode a certificate revocation list as DER.
    """
    return crl.public_bytes(serialization.Encoding.DER)


def pkcs12Bytes(
    issued: Issued,
    chain: Sequence[x509.Certificate] = (),
    password: bytes | None = None,
    friendlyName: bytes | None = None,
) -> bytes:
    """
    Encode a certificate, its key and its chain as a PKCS#12 file, as
    browsers, Java key stores and C{curl --cert-type P12} expect.

    @param issued: The certificate and key.
    @param chain: Further certificates (intermediates, optionally the root).
    @param password: Encrypts the file (AES-256 / PBKDF2); C{None} or empty
        leaves it unencrypted.
    @param friendlyName: The bag's friendly name.
    """
    encryption: serialization.KeySerializationEncryption
    if password:
        encryption = serialization.BestAvailableEncryption(password)
    else:
        encryption = serialization.NoEncryption()
    return pkcs12.serialize_key_and_certificates(
        friendlyName, issued.key, issued.certificate, list(chain) or None, encryption
    )
