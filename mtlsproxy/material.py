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

import re
from typing import Union

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from .errors import ConfigurationError

__all__ = [
    "PrivateKey",
    "ServerCertificate",
    "ListenerMaterial",
    "readFile",
    "loadCertificates",
    "loadPrivateKey",
    "loadCRLs",
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
    One server certificate chain and its key.

    @ivar chain: The certificate first, then its issuers, as sent to clients.
    @ivar key: The private key of C{chain[0]}.
    """

    chain: tuple[x509.Certificate, ...]
    key: PrivateKey


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
    """

    chain: tuple[x509.Certificate, ...]
    key: PrivateKey
    cas: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...]
    additional: tuple[ServerCertificate, ...] = ()

    @property
    def certificates(self) -> tuple[ServerCertificate, ...]:
        """
        All server certificates, the first (default) one first.
        """
        return (ServerCertificate(self.chain, self.key),) + self.additional


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


def loadPrivateKey(path: str, key: str) -> PrivateKey:
    """
    Load an unencrypted PEM private key (PKCS#8, or the traditional RSA and
    EC formats).

    @param key: The key path of the setting that named C{path}.

    @raise ConfigurationError: If the file cannot be read, holds no private
        key, the key is encrypted, or it is of a type TLS cannot use.
    """
    data = readFile(path, key)
    if b"PRIVATE KEY-----" not in data:
        raise ConfigurationError(
            f"no PEM private key (-----BEGIN PRIVATE KEY-----) in {path}", key=key
        )
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography's way of saying "encrypted, and no password given".
        raise ConfigurationError(
            f"the private key in {path} is encrypted; encrypted keys are not"
            " supported, store it unencrypted with restrictive permissions",
            key=key,
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ConfigurationError(
            f"cannot parse the private key in {path}: {_reason(e)}", key=key
        ) from None
    if not isinstance(loaded, _PRIVATE_KEY_TYPES):
        raise ConfigurationError(
            f"the private key in {path} is a {type(loaded).__name__}, which cannot"
            " sign for a TLS certificate",
            key=key,
        )
    return loaded


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

