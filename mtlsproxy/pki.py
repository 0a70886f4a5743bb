# -*- test-case-name: tests.test_pki -*-
"""
A small PKI for mutual TLS: certificate authorities, server and client
certificates, certificate revocation lists and PKCS#12 bundles.

The library half builds everything in memory with C{cryptography}; the
certificates are shaped so that both OpenSSL 3/4 with
C{X509_V_FLAG_X509_STRICT} and C{cryptography.x509.verification} accept
them: critical basicConstraints and keyUsage, subject and authority key
identifiers on every certificate, extendedKeyUsage and subjectAltName on
end-entity certificates.

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
from typing import IO, Any, Iterable, NoReturn, Sequence, Union

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
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
    "PKIError",
    "createDemoPKI",
    "main",
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


def _spki(publicKey: CertificatePublicKeyTypes) -> bytes:
    """
    The DER SubjectPublicKeyInfo of a public key, for comparing keys.
    """
    return publicKey.public_bytes(
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


# ---------------------------------------------------------------------------
# Command line: mtlsproxy-pki
# ---------------------------------------------------------------------------

INDEX_FORMAT = 1

_Index = dict[str, Any]
"""
A CA's JSON index, as loaded.
"""

_ENTITY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class PKIError(Exception):
    """
    A failure of a C{mtlsproxy-pki} command, reported as one line on
    standard error with exit status 1.
    """


class _UsageError(Exception):
    """
    Bad command-line arguments: reported with the usage line, exit status 2.
    """

    def __init__(self, usage: str, message: str) -> None:
        super().__init__(message)
        self.usage = usage
        self.message = message


class _ParserExit(Exception):
    """
    The parser finished early (C{--help}) with an exit status.
    """

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """
    An argument parser that raises instead of calling L{sys.exit}, so that
    L{main} can be called from tests and return its exit status.
    """

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self.format_usage(), message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _ParserExit(status)


def _entityName(value: str) -> str:
    """
    Argument type for CA and certificate names: they become file names in
    the state directory, so only letters, digits, C{.}, C{_} and C{-}.
    """
    if not _ENTITY_NAME.match(value):
        raise argparse.ArgumentTypeError(
            f"invalid name {value!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def _positiveInt(value: str) -> int:
    """
    Argument type for a positive number of days.
    """
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _nonNegativeInt(value: str) -> int:
    """
    Argument type for a basicConstraints path length.
    """
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative integer, got {value!r}"
        )
    return number


def _dnsName(value: str) -> str:
    """
    Argument type for a DNS name (ASCII, optionally a leading C{*.}
    wildcard); internationalized names must be given as A-labels.
    """
    if not _HOSTNAME.match(value):
        raise argparse.ArgumentTypeError(
            f"invalid DNS name {value!r} (internationalized names must be "
            "given in their xn-- form)"
        )
    return value


def _ipAddress(value: str) -> str:
    """
    Argument type for an IPv4 or IPv6 address.
    """
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid IP address {value!r}") from None


def _serialText(serial: int) -> str:
    """
    A serial number as upper-case hexadecimal, as C{openssl x509 -serial}
    prints it.
    """
    text = f"{serial:X}"
    return text if len(text) % 2 == 0 else f"0{text}"


@attrs.define
class _StateDirectory:
    """
    The on-disk state of C{mtlsproxy-pki}: for every CA C{NAME.crt},
    C{NAME.key} and C{NAME.index.json}; for every leaf C{NAME.crt},
    C{NAME.key} and C{NAME-chain.pem}; CRLs as C{NAME.crl.pem}.

    @ivar path: The directory.
    @ivar written: Every file written so far, in order, for the report.
    """

    path: Path
    written: list[Path] = attrs.Factory(list)

    def file(self, name: str, suffix: str) -> Path:
        """
        The path of C{name} + C{suffix} in the directory.
        """
        return self.path / f"{name}{suffix}"

    def ensureExists(self) -> None:
        """
        Create the directory (private to its owner) if it does not exist.
        """
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)

    def requireFree(self, *paths: Path) -> None:
        """
        @raise PKIError: If any of C{paths} exists; nothing is overwritten.
        """
        for path in paths:
            if path.exists() or path.is_symlink():
                raise PKIError(f"{path} already exists; refusing to overwrite it")

    def create(self, path: Path, data: bytes, mode: int = 0o644) -> None:
        """
        Write a new file, failing if it exists.
        """
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            raise PKIError(f"{path} already exists; refusing to overwrite it") from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self.written.append(path)

    def replace(self, path: Path, data: bytes, mode: int = 0o644) -> None:
        """
        Write a file atomically, replacing any previous version.
        """
        temporary = path.with_name(f".{path.name}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
        self.written.append(path)

    def read(self, path: Path, what: str) -> bytes:
        """
        Read a file that must exist.

        @param what: What the file is, for the error message.
        """
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise PKIError(f"{what}: {path} not found") from None

    def isCA(self, name: str) -> bool:
        """
        Whether C{name} is a CA created by this tool.
        """
        return self.file(name, ".index.json").exists()

    def loadIndex(self, name: str) -> _Index:
        """
        Load CA C{name}'s index.

        @raise PKIError: If there is no such CA or the index is damaged.
        """
        path = self.file(name, ".index.json")
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise PKIError(f"no CA named {name!r} in {self.path}") from None
        except ValueError as e:
            raise PKIError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            raise PKIError(
                f"{path}: not an mtlsproxy-pki index (format {INDEX_FORMAT})"
            )
        return data

    def saveIndex(self, name: str, index: _Index) -> None:
        """
        Save CA C{name}'s index atomically.
        """
        self.replace(
            self.file(name, ".index.json"),
            (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8"),
        )

    def loadCertificate(self, name: str) -> x509.Certificate:
        """
        Load C{name}'s certificate.
        """
        path = self.file(name, ".crt")
        data = self.read(path, f"certificate of {name!r}")
        try:
            return x509.load_pem_x509_certificate(data)
        except ValueError as e:
            raise PKIError(f"{path}: not a PEM certificate: {e}") from None

    def loadIssued(self, name: str) -> Issued:
        """
        Load C{name}'s certificate and private key.
        """
        cert = self.loadCertificate(name)
        path = self.file(name, ".key")
        data = self.read(path, f"private key of {name!r}")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise PKIError(f"{path}: cannot load private key: {e}") from None
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise PKIError(f"{path}: unsupported key type {type(key).__name__}")
        return Issued(certificate=cert, key=key)

    def loadCA(self, name: str, issuing: bool = True) -> tuple[Issued, _Index]:
        """
        Load CA C{name}: certificate, key and index.

        @param issuing: Whether the CA is about to issue a certificate, which
            a revoked CA may not (it may still sign its CRL).
        """
        index = self.loadIndex(name)
        if issuing:
            self.requireUsable(name, index)
        return self.loadIssued(name), index

    def requireUsable(self, caName: str, index: _Index) -> None:
        """
        Refuse to issue from a CA that its own issuer has revoked.

        @raise PKIError: If C{caName} is recorded as revoked.
        """
        parent = index.get("issuer")
        if not parent:
            return
        for entry in self.loadIndex(parent).get("issued", []):
            if entry.get("name") == caName and entry.get("revoked_at"):
                raise PKIError(
                    f"CA {caName!r} was revoked at {entry['revoked_at']}; "
                    "it cannot issue certificates"
                )

    def intermediatesFrom(self, caName: str) -> list[x509.Certificate]:
        """
        The chain a leaf issued by C{caName} presents after itself: that CA
        and its issuers, up to but excluding the root.
        """
        chain: list[x509.Certificate] = []
        seen: set[str] = set()
        name = caName
        index = self.loadIndex(name)
        while index.get("kind") != "root":
            if name in seen:
                raise PKIError(f"issuer loop at CA {name!r} in {self.path}")
            seen.add(name)
            chain.append(self.loadCertificate(name))
            name = index["issuer"]
            index = self.loadIndex(name)
        return chain

    def findIssued(self, name: str) -> tuple[str, _Index, _Index]:
        """
        Find the index entry for certificate C{name}.

        @return: The issuing CA's name, its index and the entry.
        @raise PKIError: If no CA's index records C{name}.
        """
        for path in sorted(self.path.glob("*.index.json")):
            caName = path.name[: -len(".index.json")]
            index = self.loadIndex(caName)
            for entry in index.get("issued", []):
                if entry.get("name") == name:
                    return caName, index, entry
        if self.isCA(name):
            raise PKIError(
                f"{name!r} is a root CA; a root cannot be revoked, remove it "
                "from the trust stores instead"
            )
        raise PKIError(f"no certificate named {name!r} is recorded in {self.path}")


def _notAfter(days: int | None, issuer: Issued | None) -> datetime | None:
    """
    The end of validity for C{--days}, checked against the issuer's end.

    @raise PKIError: If the certificate would outlive its issuer.
    """
    if days is None:
        return None
    end = _now() + timedelta(days=days)
    if issuer is not None and end > issuer.certificate.not_valid_after_utc:
        raise PKIError(
            f"--days {days} would end after the issuer "
            f"{issuer.certificate.subject.rfc4514_string()} expires "
            f"({issuer.certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ})"
        )
    return end


def _newIndex(name: str, kind: str, issuer: str | None) -> _Index:
    """
    The index of a new CA.
    """
    return {
        "format": INDEX_FORMAT,
        "name": name,
        "kind": kind,
        "issuer": issuer,
        "crl_number": 0,
        "issued": [],
    }


def _record(index: _Index, name: str, kind: str, cert: x509.Certificate) -> None:
    """
    Record a newly issued certificate in its issuer's index.
    """
    index["issued"].append(
        {
            "name": name,
            "kind": kind,
            "serial": _serialText(cert.serial_number),
            "subject": cert.subject.rfc4514_string(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "revoked_at": None,
        }
    )


def _makeRoot(
    state: _StateDirectory,
    name: str,
    commonName: str,
    keyType: str,
    days: int | None,
) -> Issued:
    """
    Create root CA C{name} in C{state}.
    """
    files = [state.file(name, s) for s in (".crt", ".key", ".index.json")]
    state.requireFree(*files)
    root = createRootCA(commonName, keyType=keyType, notAfter=_notAfter(days, None))
    state.create(files[1], keyPEM(root.key), 0o600)
    state.create(files[0], certificatePEM(root.certificate))
    state.saveIndex(name, _newIndex(name, "root", None))
    return root


def _makeIntermediate(
    state: _StateDirectory,
    name: str,
    issuerName: str,
    commonName: str,
    keyType: str,
    days: int | None,
    pathLength: int | None,
) -> Issued:
    """
    Create intermediate CA C{name}, issued by CA C{issuerName}, in C{state}.
    """
    files = [state.file(name, s) for s in (".crt", ".key", ".index.json")]
    state.requireFree(*files)
    issuer, issuerIndex = state.loadCA(issuerName)
    ca = createIntermediateCA(
        issuer,
        commonName,
        keyType=keyType,
        notAfter=_notAfter(days, issuer),
        pathLength=pathLength,
    )
    state.create(files[1], keyPEM(ca.key), 0o600)
    state.create(files[0], certificatePEM(ca.certificate))
    state.saveIndex(name, _newIndex(name, "intermediate", issuerName))
    _record(issuerIndex, name, "intermediate", ca.certificate)
    state.saveIndex(issuerName, issuerIndex)
    return ca


def _makeLeaf(
    state: _StateDirectory,
    name: str,
    issuerName: str,
    kind: str,
    commonName: str,
    keyType: str,
    days: int | None,
    dnsNames: Sequence[str] = (),
    ipAddresses: Sequence[str] = (),
    emailAddresses: Sequence[str] = (),
    uris: Sequence[str] = (),
) -> Issued:
    """
    Issue server or client certificate C{name} from CA C{issuerName} and
    write C{NAME.crt}, C{NAME-chain.pem} and C{NAME.key}.
    """
    files = [state.file(name, s) for s in (".crt", "-chain.pem", ".key")]
    state.requireFree(*files, state.file(name, ".index.json"))
    issuer, issuerIndex = state.loadCA(issuerName)
    intermediates = state.intermediatesFrom(issuerName)
    notAfter = _notAfter(days, issuer)
    if kind == "server":
        leaf = issueServerCertificate(
            issuer,
            commonName,
            dnsNames,
            ipAddresses,
            keyType=keyType,
            notAfter=notAfter,
        )
    else:
        leaf = issueClientCertificate(
            issuer,
            commonName,
            emailAddresses,
            uris,
            dnsNames,
            keyType=keyType,
            notAfter=notAfter,
        )
    state.create(files[2], keyPEM(leaf.key), 0o600)
    state.create(files[0], certificatePEM(leaf.certificate))
    state.create(files[1], chainPEM([leaf.certificate, *intermediates]))
    _record(issuerIndex, name, kind, leaf.certificate)
    state.saveIndex(issuerName, issuerIndex)
    return leaf


def _writeCRL(
    state: _StateDirectory, caName: str, days: int | None, der: bool = False
) -> Path:
    """
    Sign and write C{CA.crl.pem} (and C{CA.crl.der} if C{der}) listing every
    certificate revoked in CA C{caName}'s index, with the next CRL number.
    """
    ca, index = state.loadCA(caName, issuing=False)
    revoked = [
        (int(entry["serial"], 16), datetime.fromisoformat(entry["revoked_at"]))
        for entry in index["issued"]
        if entry.get("revoked_at")
    ]
    number = int(index.get("crl_number", 0)) + 1
    nextUpdate = _now() + timedelta(days=days) if days is not None else None
    crl = buildCRL(ca, revoked, nextUpdate=nextUpdate, crlNumber=number)
    path = state.file(caName, ".crl.pem")
    state.replace(path, crlPEM(crl))
    if der:
        state.replace(state.file(caName, ".crl.der"), crlDER(crl))
    index["crl_number"] = number
    state.saveIndex(caName, index)
    return path


def _revoke(state: _StateDirectory, name: str) -> tuple[str, str]:
    """
    Mark certificate C{name} revoked in its issuer's index and rewrite the
    issuer's CRL.

    @return: The issuer's name and the revoked serial number.
    """
    caName, index, entry = state.findIssued(name)
    if entry.get("revoked_at"):
        raise PKIError(f"{name!r} was already revoked at {entry['revoked_at']}")
    entry["revoked_at"] = _now().replace(microsecond=0).isoformat()
    state.saveIndex(caName, index)
    _writeCRL(state, caName, None)
    return caName, entry["serial"]


def _bundle(state: _StateDirectory, out: Path, cas: Sequence[str], crls: bool) -> None:
    """
    Concatenate the certificates (or CRLs) of CAs C{cas} into C{out}.
    """
    parts = []
    for caName in cas:
        if not state.isCA(caName):
            raise PKIError(f"no CA named {caName!r} in {state.path}")
        if crls:
            parts.append(
                state.read(
                    state.file(caName, ".crl.pem"),
                    f"CRL of {caName!r} (run 'crl --ca {caName}' first)",
                )
            )
        else:
            parts.append(certificatePEM(state.loadCertificate(caName)))
    state.replace(out, b"".join(parts))


DEMO_FILES = (
    "root.crt",
    "root.key",
    "root.index.json",
    "root.crl.pem",
    "intermediate.crt",
    "intermediate.key",
    "intermediate.index.json",
    "intermediate.crl.pem",
    "server.crt",
    "server-chain.pem",
    "server.key",
    "client.crt",
    "client-chain.pem",
    "client.key",
    "revoked-client.crt",
    "revoked-client-chain.pem",
    "revoked-client.key",
    "ca-bundle.pem",
    "crls.pem",
)
"""
The files L{createDemoPKI} writes.
"""


def createDemoPKI(directory: str | os.PathLike[str], keyType: str = "ec") -> list[Path]:
    """
    Create a complete demonstration PKI in C{directory}: root CA C{root};
    intermediate CA C{intermediate}; server certificate C{server} for
    C{localhost}, C{127.0.0.1} and C{::1}; client certificates C{client} and
    C{revoked-client}, the latter revoked; CRLs for both CAs; C{ca-bundle.pem}
    (root then intermediate) and C{crls.pem} (both CRLs).

    @return: The files written, in order.
    @raise PKIError: If any of L{DEMO_FILES} already exists.
    """
    state = _StateDirectory(Path(directory))
    state.ensureExists()
    state.requireFree(*(state.path / f for f in DEMO_FILES))
    _makeRoot(state, "root", "mtlsproxy demo root CA", keyType, None)
    _makeIntermediate(
        state,
        "intermediate",
        "root",
        "mtlsproxy demo intermediate CA",
        keyType,
        None,
        0,
    )
    _makeLeaf(
        state,
        "server",
        "intermediate",
        "server",
        "localhost",
        keyType,
        None,
        dnsNames=["localhost"],
        ipAddresses=["127.0.0.1", "::1"],
    )
    _makeLeaf(state, "client", "intermediate", "client", "client", keyType, None)
    _makeLeaf(
        state,
        "revoked-client",
        "intermediate",
        "client",
        "revoked-client",
        keyType,
        None,
    )
    _revoke(state, "revoked-client")
    _writeCRL(state, "root", None)
    _bundle(state, state.path / "ca-bundle.pem", ["root", "intermediate"], crls=False)
    _bundle(state, state.path / "crls.pem", ["root", "intermediate"], crls=True)
    # Report each file once, in the order it was first written.
    return list(dict.fromkeys(state.written))


def _readPassword(args: argparse.Namespace) -> bytes:
    """
    The PKCS#12 password from C{--password-file} (its first line) or
    C{--password-env}.
    """
    if args.password_file is not None:
        try:
            text = Path(args.password_file).read_bytes()
        except OSError as e:
            raise PKIError(f"cannot read password file: {e}") from None
        password = text.splitlines()[0] if text else b""
        source = f"password file {args.password_file}"
    else:
        value = os.environ.get(args.password_env)
        if value is None:
            raise PKIError(f"environment variable {args.password_env} is not set")
        password = os.fsencode(value)
        source = f"environment variable {args.password_env}"
    if not password:
        raise PKIError(f"{source} holds an empty password")
    return password


def _buildParser() -> _Parser:
    """
    The C{mtlsproxy-pki} argument parser.
    """
    parser = _Parser(
        prog="mtlsproxy-pki",
        description="Create and maintain a small PKI for mutual TLS: CAs, "
        "server and client certificates, CRLs and PKCS#12 bundles.",
    )
    parser.add_argument(
        "--dir",
        required=True,
        metavar="DIR",
        help="state directory (created if missing)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(p: argparse.ArgumentParser, issuer: bool, cn: bool = True) -> None:
        p.add_argument("--name", required=True, type=_entityName, help="file name stem")
        if issuer:
            p.add_argument(
                "--issuer", required=True, type=_entityName, help="issuing CA's name"
            )
        if cn:
            p.add_argument("--cn", help="subject common name")
        p.add_argument("--key-type", choices=KEY_TYPES, default="ec")
        p.add_argument("--days", type=_positiveInt, help="validity in days")

    p = commands.add_parser("root", help="create a self-signed root CA")
    common(p, issuer=False)
    p = commands.add_parser("intermediate", help="create an intermediate CA")
    common(p, issuer=True)
    p.add_argument(
        "--path-length",
        type=_nonNegativeInt,
        default=0,
        help="basicConstraints pathLen (default 0: issues leaves only)",
    )
    p = commands.add_parser("server", help="issue a TLS server certificate")
    common(p, issuer=True)
    p.add_argument(
        "--dns", action="append", default=[], type=_dnsName, help="DNS subjectAltName"
    )
    p.add_argument(
        "--ip", action="append", default=[], type=_ipAddress, help="IP subjectAltName"
    )
    p = commands.add_parser("client", help="issue a TLS client certificate")
    common(p, issuer=True)
    p.add_argument("--email", action="append", default=[], help="e-mail subjectAltName")
    p.add_argument("--uri", action="append", default=[], help="URI subjectAltName")
    p.add_argument(
        "--dns", action="append", default=[], type=_dnsName, help="DNS subjectAltName"
    )

    p = commands.add_parser("pkcs12", help="export a certificate, key and chain")
    p.add_argument("--name", required=True, type=_entityName)
    password = p.add_mutually_exclusive_group(required=True)
    password.add_argument("--password-file", metavar="FILE")
    password.add_argument("--password-env", metavar="VAR")
    p.add_argument("--out", metavar="FILE", help="output file (default DIR/NAME.p12)")

    p = commands.add_parser("revoke", help="revoke a certificate, rewrite its CRL")
    p.add_argument("--name", required=True, type=_entityName)

    p = commands.add_parser("crl", help="write CA.crl.pem")
    p.add_argument("--ca", required=True, type=_entityName)
    p.add_argument("--days", type=_positiveInt, help="nextUpdate in days (default 30)")
    p.add_argument("--der", action="store_true", help="also write CA.crl.der")

    p = commands.add_parser("bundle", help="concatenate CA certificates")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("cas", nargs="+", type=_entityName, metavar="CA")
    p = commands.add_parser("crl-bundle", help="concatenate CAs' CRLs")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("cas", nargs="+", type=_entityName, metavar="CA")

    commands.add_parser("demo", help="create a complete demo PKI")
    for subparser in commands.choices.values():
        subparser.set_defaults(subparser=subparser)
    return parser


def _run(args: argparse.Namespace, out: IO[str]) -> None:
    """
    Carry out one parsed command, writing its report to C{out}.
    """
    state = _StateDirectory(Path(args.dir))
    command = args.command
    if command == "demo":
        for path in createDemoPKI(state.path):
            out.write(f"wrote {path}\n")
        out.write(
            f"revoked-client is revoked; trust {state.path / 'ca-bundle.pem'} "
            f"and check {state.path / 'crls.pem'}\n"
        )
        return
    if command == "server" and not args.dns and not args.ip:
        args.subparser.error("at least one --dns or --ip is required")
    if command in ("root", "intermediate", "server", "client"):
        state.ensureExists()
    if command == "root":
        _makeRoot(state, args.name, args.cn or args.name, args.key_type, args.days)
    elif command == "intermediate":
        _makeIntermediate(
            state,
            args.name,
            args.issuer,
            args.cn or args.name,
            args.key_type,
            args.days,
            args.path_length,
        )
    elif command == "server":
        _makeLeaf(
            state,
            args.name,
            args.issuer,
            "server",
            args.cn or (args.dns + args.ip)[0],
            args.key_type,
            args.days,
            dnsNames=args.dns,
            ipAddresses=args.ip,
        )
    elif command == "client":
        _makeLeaf(
            state,
            args.name,
            args.issuer,
            "client",
            args.cn or args.name,
            args.key_type,
            args.days,
            dnsNames=args.dns,
            emailAddresses=args.email,
            uris=args.uri,
        )
    elif command == "pkcs12":
        issued = state.loadIssued(args.name)
        if state.isCA(args.name):
            chain: list[x509.Certificate] = []
        else:
            chain = x509.load_pem_x509_certificates(
                state.read(state.file(args.name, "-chain.pem"), "chain")
            )[1:]
        target = Path(args.out) if args.out else state.file(args.name, ".p12")
        state.replace(
            target,
            pkcs12Bytes(issued, chain, _readPassword(args), args.name.encode("utf-8")),
            0o600,
        )
    elif command == "revoke":
        caName, serial = _revoke(state, args.name)
        out.write(f"revoked {args.name} (serial {serial}) issued by {caName}\n")
    elif command == "crl":
        _writeCRL(state, args.ca, args.days, args.der)
    elif command == "bundle":
        _bundle(state, Path(args.out), args.cas, crls=False)
    elif command == "crl-bundle":
        _bundle(state, Path(args.out), args.cas, crls=True)
    for path in dict.fromkeys(state.written):
        out.write(f"wrote {path}\n")


def main(
    argv: Sequence[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """
    The C{mtlsproxy-pki} console script.

    @param argv: The arguments, without the program name; default
        C{sys.argv[1:]}.
    @param stdout: Where reports go; default L{sys.stdout}.
    @param stderr: Where errors go; default L{sys.stderr}.

    @return: The exit status: 0 on success, 1 if the command failed, 2 for
        bad arguments.  Errors are one line on C{stderr}, never a traceback.
    """
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    parser = _buildParser()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
        _run(args, out)
    except _ParserExit as e:
        return e.status
    except _UsageError as e:
        err.write(e.usage)
        err.write(f"{parser.prog}: error: {e.message}\n")
        return 2
    except PKIError as e:
        err.write(f"{parser.prog}: error: {e}\n")
        return 1
    except (OSError, ValueError) as e:
        err.write(f"{parser.prog}: error: {e}\n")
        return 1
    return 0
