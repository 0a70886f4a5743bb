# -*- test-case-name: tests.test_checks -*-
"""
Reading certificates, private keys and certificate revocation lists from
disk into C{cryptography} objects.

Every function takes the key path of the setting that named the file
(C{listeners[0].crls[1]}) and raises L{ConfigurationError} with that key and
a problem naming the file, so whoever catches it can add the configuration
file and print one line.  Nothing here judges the material (expiry, key
match, signatures); that is L{mtlsproxy.checks}.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, pkcs12

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .config import CertificateConfig

__all__ = [
    "PrivateKey",
    "ServerCertificate",
    "ListenerMaterial",
    "readFile",
    "readPassword",
    "loadCertificates",
    "loadPrivateKey",
    "loadPKCS12",
    "loadServerCertificate",
    "loadCRLs",
    "serverNames",
    "sourceKey",
]

PrivateKey = Union[
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
    dsa.DSAPrivateKey,
]
"""
The private key types a TLS server certificate can have.
"""

_PRIVATE_KEY_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
    dsa.DSAPrivateKey,
)

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.*?-----END X509 CRL-----", re.DOTALL)


@attrs.frozen
class ServerCertificate:
    """
    One server certificate chain and its key, with the client certificate
    trust of its names when it has its own.

    @ivar chain: The certificate first, then its issuers, as sent to clients.
    @ivar key: The private key of C{chain[0]}.
    @ivar cas: The CA certificates that verify client certificates for this
        certificate's names, or L{None} for the listener's.
    @ivar crls: Their CRLs, or L{None} for the listener's.
    """

    chain: tuple[x509.Certificate, ...]
    key: PrivateKey
    cas: Optional[tuple[x509.Certificate, ...]] = None
    crls: Optional[tuple[x509.CertificateRevocationList, ...]] = None

    @property
    def names(self) -> tuple[str, ...]:
        """
        The DNS names the certificate is for (see L{serverNames}).
        """
        return serverNames(self.chain[0])


@attrs.frozen
class ListenerMaterial:
    """
    The loaded and checked cryptographic material of one TLS listener.

    @ivar chain: The first configured server certificate chain, leaf first.
    @ivar key: The private key of C{chain[0]}.
    @ivar cas: The CA certificates client certificates are verified with,
        from all C{ca_certificates} files in order.
    @ivar crls: The CRLs from all C{crls} files in order, each signed by one
        of C{cas}.
    @ivar additional: The further C{[[listeners.certificates]]} after the
        first, in order (for choosing by SNI).
    @ivar entries: All C{[[listeners.certificates]]} in order, the first
        with its own C{cas} and C{crls} if it has them; empty means the
        first is C{chain} and C{key} with the listener's trust, followed by
        C{additional}.
    @ivar sources: The file each certificate and CRL was read from, by
        L{sourceKey}, for messages and expiry reports.
    """

    chain: tuple[x509.Certificate, ...]
    key: PrivateKey
    cas: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...]
    additional: tuple[ServerCertificate, ...] = ()
    entries: tuple[ServerCertificate, ...] = ()
    sources: Mapping[bytes, str] = attrs.field(factory=dict, eq=False, repr=False)

    @property
    def certificates(self) -> tuple[ServerCertificate, ...]:
        """
        All server certificates, in configuration order.
        """
        if self.entries:
            return self.entries
        return (ServerCertificate(self.chain, self.key),) + self.additional

    def trustOf(
        self, certificate: ServerCertificate
    ) -> tuple[tuple[x509.Certificate, ...], tuple[x509.CertificateRevocationList, ...]]:
        """
        The CAs and CRLs that verify client certificates for C{certificate}'s
        names: its own, or the listener's.
        """
        return (
            self.cas if certificate.cas is None else certificate.cas,
            self.crls if certificate.crls is None else certificate.crls,
        )

    def allCRLs(self) -> tuple[x509.CertificateRevocationList, ...]:
        """
        Every CRL of the listener and of its certificates, each once.
        """
        seen: dict[bytes, x509.CertificateRevocationList] = {}
        for crl in self.crls + tuple(c for e in self.certificates for c in (e.crls or ())):
            seen.setdefault(sourceKey(crl), crl)
        return tuple(seen.values())

    def sourceOf(self, item: Union[x509.Certificate, x509.CertificateRevocationList]) -> Optional[str]:
        """
        The file C{item} was read from, if known.
        """
        return self.sources.get(sourceKey(item))


def sourceKey(item: Union[x509.Certificate, x509.CertificateRevocationList]) -> bytes:
    """
    The SHA-256 of a certificate's or CRL's DER encoding: how
    L{ListenerMaterial.sources} knows them.
    """
    return hashlib.sha256(item.public_bytes(Encoding.DER)).digest()


def serverNames(certificate: x509.Certificate) -> tuple[str, ...]:
    """
    The DNS names of a server certificate's subjectAltName, lower case, in
    order (wildcards such as C{*.example.com} as they are); empty if it has
    none.  The subject common name is not used: clients ignore it too.
    """
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(
        name.lower().rstrip(".") for name in extension.value.get_values_for_type(x509.DNSName)
    )


def _reason(error: Exception) -> str:
    """
    The useful part of a C{cryptography} error message, whose later
    sentences point to its FAQ.
    """
    text = str(error).strip() or type(error).__name__
    return text.split(". See https://", 1)[0]


def readFile(path: str, key: str) -> bytes:
    """
    Read a whole file.

    @param key: The key path of the setting that named C{path}.

    @raise ConfigurationError: If the file is missing or unreadable.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigurationError(f"file not found: {path}", key=key) from None
    except OSError as e:
        raise ConfigurationError(
            f"cannot read {path}: {e.strerror or e}", key=key
        ) from None


def loadCertificates(path: str, key: str) -> tuple[x509.Certificate, ...]:
    """
    Load the PEM certificates in a file, in file order.

    @param key: The key path of the setting that named C{path}.

    @raise ConfigurationError: If the file cannot be read, holds no
        certificate, or one does not parse.
    """
    data = readFile(path, key)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigurationError(
            f"no PEM certificate (-----BEGIN CERTIFICATE-----) in {path}", key=key
        )
    try:
        return tuple(x509.load_pem_x509_certificates(data))
    except ValueError as e:
        raise ConfigurationError(
            f"cannot parse the certificates in {path}: {_reason(e)}", key=key
        ) from None


def loadPrivateKey(path: str, key: str, password: Optional[bytes] = None) -> PrivateKey:
    """
    Load a PEM private key (PKCS#8, or the traditional RSA and EC formats),
    encrypted or not.

    @param key: The key path of the setting that named C{path}.
    @param password: The password of an encrypted key; ignored for a key
        that is not encrypted.

    @raise ConfigurationError: If the file cannot be read, holds no private
        key, the key is encrypted and C{password} is missing or wrong, or it
        is of a type TLS cannot use.
    """
    data = readFile(path, key)
    if b"PRIVATE KEY-----" not in data:
        raise ConfigurationError(
            f"no PEM private key (-----BEGIN PRIVATE KEY-----) in {path}", key=key
        )
    try:
        try:
            loaded = serialization.load_pem_private_key(data, password=password)
        except TypeError:
            if password is None:
                # cryptography's way of saying "encrypted, and no password given".
                raise ConfigurationError(
                    f"the private key in {path} is encrypted; give its password with"
                    " password_file or password_env in the same [[listeners.certificates]]"
                    " table",
                    key=key,
                ) from None
            # A password for a key that is not encrypted: not needed.
            loaded = serialization.load_pem_private_key(data, password=None)
    except ValueError as e:
        if password is not None and "password" in str(e).lower():
            raise ConfigurationError(
                f"wrong password for the encrypted private key in {path}", key=key
            ) from None
        raise ConfigurationError(
            f"cannot parse the private key in {path}: {_reason(e)}", key=key
        ) from None
    except UnsupportedAlgorithm as e:
        raise ConfigurationError(
            f"cannot parse the private key in {path}: {_reason(e)}", key=key
        ) from None
    return _usableKey(loaded, path, key)


def _usableKey(loaded: object, path: str, key: str) -> PrivateKey:
    """
    Refuse a private key of a type that cannot sign for a TLS certificate.
    """
    if not isinstance(loaded, _PRIVATE_KEY_TYPES):
        raise ConfigurationError(
            f"the private key in {path} is a {type(loaded).__name__}, which cannot"
            " sign for a TLS certificate",
            key=key,
        )
    return loaded


def readPassword(certificate: CertificateConfig, where: str) -> Optional[bytes]:
    """
    The password of a certificate entry's key or PKCS#12 file, from its
    C{password_file} (one line; the final line break is not part of the
    password) or its C{password_env}; L{None} if it has neither.

    @param where: The key path of the C{[[listeners.certificates]]} entry.

    @raise ConfigurationError: If the file cannot be read or the
        environment variable is not set.
    """
    if certificate.password_file is not None:
        data = readFile(certificate.password_file, f"{where}.password_file")
        if data.endswith(b"\r\n"):
            return data[:-2]
        if data.endswith(b"\n"):
            return data[:-1]
        return data
    if certificate.password_env is not None:
        value = os.environb.get(certificate.password_env.encode("utf-8"))
        if value is None:
            raise ConfigurationError(
                f"environment variable {certificate.password_env} is not set",
                key=f"{where}.password_env",
            )
        return value
    return None


def _orderChain(
    leaf: x509.Certificate, others: Sequence[x509.Certificate]
) -> tuple[x509.Certificate, ...]:
    """
    C{leaf}, then each issuer in turn found among C{others}, leaving out a
    self-signed root (clients have their own) and certificates that are not
    in the leaf's chain.  PKCS#12 files do not promise any order.
    """
    chain = [leaf]
    remaining = list(others)
    while True:
        child = chain[-1]
        for candidate in remaining:
            if candidate.subject != child.issuer or candidate == child:
                continue
            try:
                child.verify_directly_issued_by(candidate)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                continue
            remaining.remove(candidate)
            if candidate.subject != candidate.issuer:
                chain.append(candidate)
                break
            return tuple(chain)
        else:
            return tuple(chain)


def loadPKCS12(
    path: str, key: str, password: Optional[bytes]
) -> tuple[tuple[x509.Certificate, ...], PrivateKey]:
    """
    Load the certificate, its private key and its intermediates from a
    PKCS#12 file.

    @param key: The key path of the setting that named C{path}.
    @param password: The file's password, or L{None}.

    @return: The chain (certificate first, then each issuer found in the
        file, without a self-signed root) and the key.

    @raise ConfigurationError: If the file cannot be read, is not PKCS#12,
        the password is missing or wrong, or it lacks the certificate or
        the key.
    """
    data = readFile(path, key)
    try:
        bundle = pkcs12.load_pkcs12(data, password)
    except ValueError as e:
        try:
            # Is it PKCS#12 at all?  An unencrypted file loads without one.
            pkcs12.load_pkcs12(data, None)
        except ValueError as unencrypted:
            if "deserialize" in str(unencrypted).lower() and "deserialize" in str(e).lower():
                raise ConfigurationError(f"{path} is not a PKCS#12 file", key=key) from None
            if password is None:
                raise ConfigurationError(
                    f"the PKCS#12 file {path} is encrypted; give its password with"
                    " password_file or password_env in the same [[listeners.certificates]]"
                    " table",
                    key=key,
                ) from None
            raise ConfigurationError(
                f"wrong password for the PKCS#12 file {path}", key=key
            ) from None
        # It was not encrypted after all: a password is not needed.
        bundle = pkcs12.load_pkcs12(data, None)
    if bundle.cert is None:
        raise ConfigurationError(f"the PKCS#12 file {path} holds no certificate", key=key)
    if bundle.key is None:
        raise ConfigurationError(f"the PKCS#12 file {path} holds no private key", key=key)
    leaf = bundle.cert.certificate
    chain = _orderChain(leaf, [c.certificate for c in bundle.additional_certs])
    return chain, _usableKey(bundle.key, path, key)


def loadServerCertificate(certificate: CertificateConfig, where: str) -> ServerCertificate:
    """
    Load the chain and key of one C{[[listeners.certificates]]} entry: from
    C{cert} and C{key} (PEM) or from C{pkcs12}, with the password from
    C{password_file} or C{password_env}.  Matching key and certificate is
    not checked here; see L{mtlsproxy.checks}.

    @param where: The key path of the entry, C{listeners[0].certificates[1]}.

    @raise ConfigurationError: Naming the key path of the setting at fault.
    """
    password = readPassword(certificate, where)
    if certificate.pkcs12 is not None:
        chain, key = loadPKCS12(certificate.pkcs12, f"{where}.pkcs12", password)
        return ServerCertificate(chain, key)
    assert certificate.cert is not None and certificate.key is not None
    chain = loadCertificates(certificate.cert, f"{where}.cert")
    return ServerCertificate(chain, loadPrivateKey(certificate.key, f"{where}.key", password))


def loadCRLs(path: str, key: str) -> tuple[x509.CertificateRevocationList, ...]:
    """
    Load the certificate revocation lists in a file: one or several PEM
    C{X509 CRL} blocks, or one DER CRL (recognized by the absence of PEM
    markers).

    @param key: The key path of the setting that named C{path}.

    @raise ConfigurationError: If the file cannot be read or holds no CRL,
        or one does not parse.
    """
    data = readFile(path, key)
    if b"-----BEGIN" not in data:
        try:
            return (x509.load_der_x509_crl(data),)
        except ValueError:
            # Without PEM markers it can only be DER; cryptography's ASN.1
            # parse error says nothing a user can act on.
            raise ConfigurationError(
                f"{path} holds neither PEM CRLs (-----BEGIN X509 CRL-----) nor a"
                " valid DER CRL",
                key=key,
            ) from None
    blocks = _PEM_CRL.findall(data)
    if not blocks:
        raise ConfigurationError(
            f"no PEM CRL (-----BEGIN X509 CRL-----) in {path}", key=key
        )
    crls = []
    for number, block in enumerate(blocks, 1):
        try:
            crls.append(x509.load_pem_x509_crl(block))
        except ValueError as e:
            raise ConfigurationError(
                f"cannot parse CRL {number} in {path}: {_reason(e)}", key=key
            ) from None
    return tuple(crls)

