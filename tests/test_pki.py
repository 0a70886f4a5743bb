# -*- test-case-name: tests.test_pki -*-
"""
Tests for L{mtlsproxy.pki}: the PKI library and the C{mtlsproxy-pki}
command.

Everything is real cryptography: chains are verified by
C{cryptography.x509.verification} and by OpenSSL (through pyOpenSSL) with
strict X.509 checks and CRL checking.
"""

from __future__ import annotations

import io
import ipaddress
import os
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509 import DNSName, IPAddress
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from OpenSSL import crypto
from twisted.trial.unittest import SynchronousTestCase

from mtlsproxy import pki

X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_CERT_REVOKED = 23


def _opensslVerify(
    roots: Sequence[x509.Certificate],
    leaf: x509.Certificate,
    untrusted: Sequence[x509.Certificate] = (),
    crls: Sequence[x509.CertificateRevocationList] = (),
) -> None:
    """
    Verify C{leaf} with OpenSSL under C{X509_V_FLAG_X509_STRICT}, and with
    C{CRL_CHECK | CRL_CHECK_ALL} if C{crls} are given.

    @raise crypto.X509StoreContextError: If OpenSSL rejects the chain.
    """
    store = crypto.X509Store()
    for root in roots:
        store.add_cert(crypto.X509.from_cryptography(root))
    flags = crypto.X509StoreFlags.X509_STRICT
    if crls:
        for crl in crls:
            store.add_crl(crl)
        flags |= crypto.X509StoreFlags.CRL_CHECK | crypto.X509StoreFlags.CRL_CHECK_ALL
    store.set_flags(flags)
    crypto.X509StoreContext(
        store,
        crypto.X509.from_cryptography(leaf),
        [crypto.X509.from_cryptography(c) for c in untrusted],
    ).verify_certificate()


def _signedBy(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    """
    Whether C{crl}'s signature validates against C{issuer}'s public key.
    """
    return crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]


def _extension(cert: x509.Certificate, kind: type[Any]) -> x509.Extension[Any]:
    """
    The extension of type C{kind} of C{cert}.
    """
    return cert.extensions.get_extension_for_class(kind)


class _TestCase(SynchronousTestCase):
    """
    A test case with an assertion for durations measured against a moving
    clock.
    """

    def assertClose(self, actual: float, expected: float, delta: float) -> None:
        """
        Assert C{actual} is within C{delta} of C{expected}.
        """
        if abs(actual - expected) > delta:
            self.fail(f"{actual!r} != {expected!r} within {delta!r}")


class _PKIFixture(_TestCase):
    """
    A root, an intermediate and leaves, built once per test.
    """

    def buildPKI(self, keyType: str = "ec") -> None:
        """
        Build root, intermediate, server and client certificates.
        """
        self.root = pki.createRootCA("Test Root", keyType=keyType)
        self.intermediate = pki.createIntermediateCA(
            self.root, "Test Intermediate", keyType=keyType
        )
        self.server = pki.issueServerCertificate(
            self.intermediate,
            "server.example",
            dnsNames=["server.example", "alt.example"],
            ipAddresses=["127.0.0.1", ipaddress.ip_address("::1")],
            keyType=keyType,
        )
        self.client = pki.issueClientCertificate(
            self.intermediate,
            "alice",
            emailAddresses=["alice@example.com"],
            uris=["spiffe://example.com/alice"],
            keyType=keyType,
        )


class KeyTests(SynchronousTestCase):
    """
    Tests for L{pki.generateKey} and L{pki.keyPEM}.
    """

    def test_ecKeyIsP256(self) -> None:
        """
        When C{"ec"} is asked for, the key is ECDSA on P-256.
        """
        key = pki.generateKey("ec")
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.assertEqual(key.curve.name, "secp256r1")

    def test_rsaKeySize(self) -> None:
        """
        When C{"rsa"} is asked for, the key is RSA of the requested size.
        """
        key = pki.generateKey("rsa", rsaBits=3072)
        assert isinstance(key, rsa.RSAPrivateKey)
        self.assertEqual(key.key_size, 3072)

    def test_unknownKeyType(self) -> None:
        """
        When an unknown key type is asked for, L{ValueError} names it.
        """
        error = self.assertRaises(ValueError, pki.generateKey, "dsa")
        self.assertIn("'dsa'", str(error))

    def test_keyPEMEncrypted(self) -> None:
        """
        When a password is given, the PEM key loads only with that password.
        """
        key = pki.generateKey()
        data = pki.keyPEM(key, b"secret")
        self.assertIn(b"ENCRYPTED PRIVATE KEY", data)
        loaded = serialization.load_pem_private_key(data, b"secret")
        self.assertEqual(pki.keyPEM(loaded), pki.keyPEM(key))  # type: ignore[arg-type]
        self.assertRaises(TypeError, serialization.load_pem_private_key, data, None)

    def test_keyPEMPlain(self) -> None:
        """
        When no password is given, the key is unencrypted PKCS#8.
        """
        data = pki.keyPEM(pki.generateKey())
        self.assertTrue(data.startswith(b"-----BEGIN PRIVATE KEY-----"))


class CertificateTests(_PKIFixture):
    """
    Tests for the shape of the certificates the library issues.
    """

    def setUp(self) -> None:
        self.buildPKI()

    def test_rootIsSelfSignedCA(self) -> None:
        """
        When a root CA is created, it is self-signed with critical
        basicConstraints CA, critical keyUsage keyCertSign and cRLSign, and
        a subject key identifier matching its authority key identifier.
        """
        cert = self.root.certificate
        cert.verify_directly_issued_by(cert)
        bc = _extension(cert, x509.BasicConstraints)
        self.assertTrue(bc.critical)
        self.assertEqual(bc.value, x509.BasicConstraints(ca=True, path_length=None))
        ku = _extension(cert, x509.KeyUsage)
        self.assertTrue(ku.critical)
        self.assertTrue(ku.value.key_cert_sign)
        self.assertTrue(ku.value.crl_sign)
        ski = _extension(cert, x509.SubjectKeyIdentifier).value
        aki = _extension(cert, x509.AuthorityKeyIdentifier).value
        self.assertEqual(aki.key_identifier, ski.digest)
        self.assertEqual(
            cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
            "Test Root",
        )

    def test_rootDefaultValidity(self) -> None:
        """
        When no validity is given for a root, it runs from an hour ago to
        ten years ahead.
        """
        now = datetime.now(timezone.utc)
        cert = self.root.certificate
        self.assertClose(
            (now - cert.not_valid_before_utc).total_seconds(), 3600, delta=60
        )
        self.assertClose(
            (cert.not_valid_after_utc - now).total_seconds(),
            timedelta(days=3650).total_seconds(),
            delta=60,
        )

    def test_explicitValidity(self) -> None:
        """
        When validity is given, it is used; a naive datetime is taken as UTC.
        """
        start = datetime(2030, 1, 1, tzinfo=timezone.utc)
        ca = pki.createRootCA("R", notBefore=start, notAfter=datetime(2031, 1, 1))
        self.assertEqual(ca.certificate.not_valid_before_utc, start)
        self.assertEqual(
            ca.certificate.not_valid_after_utc,
            datetime(2031, 1, 1, tzinfo=timezone.utc),
        )

    def test_validityMustNotBeEmpty(self) -> None:
        """
        When notAfter is before notBefore, L{ValueError} is raised.
        """
        self.assertRaises(
            ValueError,
            pki.createRootCA,
            "R",
            notBefore=datetime(2031, 1, 1, tzinfo=timezone.utc),
            notAfter=datetime(2030, 1, 1, tzinfo=timezone.utc),
        )

    def test_intermediateExtensions(self) -> None:
        """
        When an intermediate is created, it is signed by the root, carries
        path length 0 and an authority key identifier equal to the root's
        subject key identifier.
        """
        cert = self.intermediate.certificate
        cert.verify_directly_issued_by(self.root.certificate)
        self.assertEqual(cert.issuer, self.root.certificate.subject)
        bc = _extension(cert, x509.BasicConstraints)
        self.assertTrue(bc.critical)
        self.assertEqual(bc.value, x509.BasicConstraints(ca=True, path_length=0))
        self.assertTrue(_extension(cert, x509.KeyUsage).critical)
        rootSKI = _extension(self.root.certificate, x509.SubjectKeyIdentifier).value
        aki = _extension(cert, x509.AuthorityKeyIdentifier).value
        self.assertEqual(aki.key_identifier, rootSKI.digest)
        _extension(cert, x509.SubjectKeyIdentifier)

    def test_intermediateUnderPathLengthZeroRefused(self) -> None:
        """
        When a CA with path length 0 is asked to issue a CA, L{ValueError}
        is raised instead of a certificate validators would reject.
        """
        self.assertRaises(
            ValueError, pki.createIntermediateCA, self.intermediate, "Too deep"
        )

    def test_leafCannotIssue(self) -> None:
        """
        When a leaf certificate is used as an issuer, L{ValueError} is raised.
        """
        self.assertRaises(
            ValueError, pki.issueClientCertificate, self.server, "mallory"
        )

    def test_mismatchedIssuerKeyRefused(self) -> None:
        """
        When an issuer's key does not match its certificate, L{ValueError}
        is raised.
        """
        wrong = pki.Issued(certificate=self.root.certificate, key=pki.generateKey())
        self.assertRaises(ValueError, pki.issueServerCertificate, wrong, "x.example")

    def test_serverCertificate(self) -> None:
        """
        When a server certificate is issued, it is an end entity with
        digitalSignature, serverAuth, the DNS and IP names asked for, and
        an authority key identifier.
        """
        cert = self.server.certificate
        cert.verify_directly_issued_by(self.intermediate.certificate)
        bc = _extension(cert, x509.BasicConstraints)
        self.assertTrue(bc.critical)
        self.assertFalse(bc.value.ca)
        ku = _extension(cert, x509.KeyUsage)
        self.assertTrue(ku.critical)
        self.assertTrue(ku.value.digital_signature)
        self.assertFalse(ku.value.key_encipherment)
        self.assertFalse(ku.value.key_cert_sign)
        self.assertEqual(
            list(_extension(cert, x509.ExtendedKeyUsage).value),
            [ExtendedKeyUsageOID.SERVER_AUTH],
        )
        san = _extension(cert, x509.SubjectAlternativeName).value
        self.assertEqual(
            san.get_values_for_type(x509.DNSName), ["server.example", "alt.example"]
        )
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        _extension(cert, x509.AuthorityKeyIdentifier)
        _extension(cert, x509.SubjectKeyIdentifier)

    def test_rsaLeafKeyEncipherment(self) -> None:
        """
        When a leaf has an RSA key, keyUsage adds keyEncipherment.
        """
        leaf = pki.issueServerCertificate(
            self.intermediate, "rsa.example", ["rsa.example"], keyType="rsa"
        )
        ku = _extension(leaf.certificate, x509.KeyUsage).value
        self.assertTrue(ku.digital_signature)
        self.assertTrue(ku.key_encipherment)

    def test_serverDefaultValidity(self) -> None:
        """
        When no validity is given for a server certificate, it runs for 397
        days.
        """
        now = datetime.now(timezone.utc)
        self.assertClose(
            (self.server.certificate.not_valid_after_utc - now).total_seconds(),
            timedelta(days=397).total_seconds(),
            delta=60,
        )

    def test_defaultValidityClampedToIssuer(self) -> None:
        """
        When the issuer expires sooner than the default lifetime, a default
        leaf ends with its issuer.
        """
        end = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=30)
        ca = pki.createRootCA("Short", notAfter=end)
        leaf = pki.issueServerCertificate(ca, "x.example", ["x.example"])
        self.assertEqual(leaf.certificate.not_valid_after_utc, end)

    def test_serverNameFromCommonName(self) -> None:
        """
        When no names are given and the common name is a host name, it
        becomes the subjectAltName.
        """
        leaf = pki.issueServerCertificate(self.intermediate, "only.example")
        san = _extension(leaf.certificate, x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["only.example"])

    def test_badIPAddress(self) -> None:
        """
        When an IP address string does not parse, L{ValueError} is raised.
        """
        self.assertRaises(
            ValueError,
            pki.issueServerCertificate,
            self.intermediate,
            "x",
            ipAddresses=["300.1.1.1"],
        )

    def test_clientCertificate(self) -> None:
        """
        When a client certificate is issued, it has clientAuth and the
        e-mail and URI names asked for.
        """
        cert = self.client.certificate
        self.assertEqual(
            list(_extension(cert, x509.ExtendedKeyUsage).value),
            [ExtendedKeyUsageOID.CLIENT_AUTH],
        )
        san = _extension(cert, x509.SubjectAlternativeName).value
        self.assertEqual(
            san.get_values_for_type(x509.RFC822Name), ["alice@example.com"]
        )
        self.assertEqual(
            san.get_values_for_type(x509.UniformResourceIdentifier),
            ["spiffe://example.com/alice"],
        )

    def test_clientNameFromCommonName(self) -> None:
        """
        When no names are given, an e-mail-like common name becomes an
        rfc822Name and a host-like one a DNS name; anything else gives no
        subjectAltName.
        """
        mail = pki.issueClientCertificate(self.intermediate, "bob@example.com")
        san = _extension(mail.certificate, x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.RFC822Name), ["bob@example.com"])
        host = pki.issueClientCertificate(self.intermediate, "bob")
        san = _extension(host.certificate, x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["bob"])
        other = pki.issueClientCertificate(self.intermediate, "Bob Smith")
        self.assertRaises(
            x509.ExtensionNotFound,
            _extension,
            other.certificate,
            x509.SubjectAlternativeName,
        )

    def test_serialNumbersDiffer(self) -> None:
        """
        When several certificates are issued, their serial numbers are
        random and distinct.
        """
        serials = {
            c.certificate.serial_number
            for c in (self.root, self.intermediate, self.server, self.client)
        }
        self.assertEqual(len(serials), 4)

    def test_pemHelpers(self) -> None:
        """
        When certificates are encoded, chainPEM is the concatenation of
        certificatePEM in order and loads back in that order.
        """
        data = pki.chainPEM([self.server.certificate, self.intermediate.certificate])
        self.assertEqual(
            data,
            pki.certificatePEM(self.server.certificate)
            + pki.certificatePEM(self.intermediate.certificate),
        )
        self.assertEqual(
            x509.load_pem_x509_certificates(data),
            [self.server.certificate, self.intermediate.certificate],
        )


class VerificationTests(_PKIFixture):
    """
    The issued chains verify with C{cryptography} and with strict OpenSSL.
    """

    def setUp(self) -> None:
        self.buildPKI()

    def test_serverVerifiesWithCryptography(self) -> None:
        """
        When a server chain is checked with C{ServerVerifier}, it verifies
        for each DNS name and IP address it names.
        """
        store = Store([self.root.certificate])
        for subject in (
            DNSName("server.example"),
            DNSName("alt.example"),
            IPAddress(ipaddress.ip_address("127.0.0.1")),
            IPAddress(ipaddress.ip_address("::1")),
        ):
            verifier = PolicyBuilder().store(store).build_server_verifier(subject)
            chain = verifier.verify(
                self.server.certificate, [self.intermediate.certificate]
            )
            self.assertEqual(
                chain,
                [
                    self.server.certificate,
                    self.intermediate.certificate,
                    self.root.certificate,
                ],
            )

    def test_serverWrongNameRejected(self) -> None:
        """
        When a server chain is checked for a name it does not hold,
        C{ServerVerifier} rejects it.
        """
        verifier = (
            PolicyBuilder()
            .store(Store([self.root.certificate]))
            .build_server_verifier(DNSName("other.example"))
        )
        self.assertRaises(
            VerificationError,
            verifier.verify,
            self.server.certificate,
            [self.intermediate.certificate],
        )

    def test_clientVerifiesWithCryptography(self) -> None:
        """
        When a client chain is checked with C{ClientVerifier}, it verifies
        and reports the subjectAltName entries.
        """
        verifier = (
            PolicyBuilder()
            .store(Store([self.root.certificate]))
            .build_client_verifier()
        )
        verified = verifier.verify(
            self.client.certificate, [self.intermediate.certificate]
        )
        self.assertEqual(
            verified.subjects,
            [
                x509.RFC822Name("alice@example.com"),
                x509.UniformResourceIdentifier("spiffe://example.com/alice"),
            ],
        )
        self.assertEqual(verified.chain[-1], self.root.certificate)

    def test_serverCertificateNotAClient(self) -> None:
        """
        When a server certificate is presented as a client certificate,
        C{ClientVerifier} rejects it for lacking clientAuth.
        """
        verifier = (
            PolicyBuilder()
            .store(Store([self.root.certificate]))
            .build_client_verifier()
        )
        self.assertRaises(
            VerificationError,
            verifier.verify,
            self.server.certificate,
            [self.intermediate.certificate],
        )

    def test_untrustedRootRejected(self) -> None:
        """
        When the chain leads to a different root, C{ClientVerifier} rejects
        it.
        """
        other = pki.createRootCA("Other Root")
        verifier = (
            PolicyBuilder().store(Store([other.certificate])).build_client_verifier()
        )
        self.assertRaises(
            VerificationError,
            verifier.verify,
            self.client.certificate,
            [self.intermediate.certificate],
        )

    def test_opensslStrictAcceptsChains(self) -> None:
        """
        When OpenSSL verifies root, intermediate and leaf with
        C{X509_V_FLAG_X509_STRICT}, EC and RSA chains are both accepted.
        """
        for keyType in ("ec", "rsa"):
            self.buildPKI(keyType)
            for leaf in (self.server, self.client):
                _opensslVerify(
                    [self.root.certificate],
                    leaf.certificate,
                    [self.intermediate.certificate],
                )

    def test_opensslRejectsExpired(self) -> None:
        """
        When a leaf has expired, OpenSSL reports error 10.
        """
        leaf = pki.issueClientCertificate(
            self.intermediate,
            "old",
            notBefore=datetime.now(timezone.utc) - timedelta(days=10),
            notAfter=datetime.now(timezone.utc) - timedelta(days=1),
        )
        error = self.assertRaises(
            crypto.X509StoreContextError,
            _opensslVerify,
            [self.root.certificate],
            leaf.certificate,
            [self.intermediate.certificate],
        )
        self.assertEqual(error.errors[0], X509_V_ERR_CERT_HAS_EXPIRED)

    def test_opensslCRLCheckPassesUnrevoked(self) -> None:
        """
        When CRLs for both CAs are in the store and the leaf is not listed,
        OpenSSL with C{CRL_CHECK | CRL_CHECK_ALL} accepts it.
        """
        crls = [pki.buildCRL(self.root), pki.buildCRL(self.intermediate)]
        _opensslVerify(
            [self.root.certificate],
            self.client.certificate,
            [self.intermediate.certificate],
            crls,
        )

    def test_opensslCRLCheckRejectsRevoked(self) -> None:
        """
        When the leaf is listed in its issuer's CRL, OpenSSL with
        C{CRL_CHECK | CRL_CHECK_ALL} fails with error 23.
        """
        crls = [
            pki.buildCRL(self.root),
            pki.buildCRL(self.intermediate, [self.client.certificate]),
        ]
        error = self.assertRaises(
            crypto.X509StoreContextError,
            _opensslVerify,
            [self.root.certificate],
            self.client.certificate,
            [self.intermediate.certificate],
            crls,
        )
        self.assertEqual(error.errors[0], X509_V_ERR_CERT_REVOKED)

    def test_opensslCRLCheckRejectsRevokedIntermediate(self) -> None:
        """
        When the intermediate is listed in the root's CRL, a leaf under it
        fails with error 23 under C{CRL_CHECK_ALL}.
        """
        crls = [
            pki.buildCRL(
                self.root,
                [
                    (
                        self.intermediate.certificate.serial_number,
                        datetime.now(timezone.utc),
                    )
                ],
            ),
            pki.buildCRL(self.intermediate),
        ]
        error = self.assertRaises(
            crypto.X509StoreContextError,
            _opensslVerify,
            [self.root.certificate],
            self.server.certificate,
            [self.intermediate.certificate],
            crls,
        )
        self.assertEqual(error.errors[0], X509_V_ERR_CERT_REVOKED)


class CRLTests(_PKIFixture):
    """
    Tests for L{pki.buildCRL} and its encodings.
    """

    def setUp(self) -> None:
        self.buildPKI()

    def test_crlSignedAndListsSerials(self) -> None:
        """
        When a CRL is built from a certificate and a (serial, date) pair, it
        lists both, carries AKI and CRLNumber, and its signature validates
        against the issuer.
        """
        when = datetime(2025, 5, 1, 12, 0, tzinfo=timezone.utc)
        crl = pki.buildCRL(
            self.intermediate, [self.client.certificate, (1234, when)], crlNumber=7
        )
        self.assertTrue(_signedBy(crl, self.intermediate.certificate))
        self.assertFalse(_signedBy(crl, self.root.certificate))
        self.assertEqual(crl.issuer, self.intermediate.certificate.subject)
        self.assertEqual(
            sorted(r.serial_number for r in crl),
            sorted([self.client.certificate.serial_number, 1234]),
        )
        entry = crl.get_revoked_certificate_by_serial_number(1234)
        assert entry is not None
        self.assertEqual(entry.revocation_date_utc, when)
        self.assertEqual(
            crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number, 7
        )
        aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = _extension(self.intermediate.certificate, x509.SubjectKeyIdentifier).value
        self.assertEqual(aki.key_identifier, ski.digest)

    def test_crlDefaultTimes(self) -> None:
        """
        When no times are given, thisUpdate is an hour ago and nextUpdate
        30 days ahead.
        """
        now = datetime.now(timezone.utc)
        crl = pki.buildCRL(self.root)
        self.assertEqual(len(crl), 0)
        self.assertClose((now - crl.last_update_utc).total_seconds(), 3600, delta=60)
        assert crl.next_update_utc is not None
        self.assertClose(
            (crl.next_update_utc - now).total_seconds(),
            timedelta(days=30).total_seconds(),
            delta=60,
        )

    def test_crlRefusesForeignCertificate(self) -> None:
        """
        When a certificate from another issuer is passed, L{ValueError} is
        raised rather than a CRL entry that would never match.
        """
        self.assertRaises(
            ValueError, pki.buildCRL, self.root, [self.client.certificate]
        )

    def test_crlEncodings(self) -> None:
        """
        When a CRL is encoded as PEM and DER, both load back to it.
        """
        crl = pki.buildCRL(self.intermediate, [self.server.certificate])
        self.assertEqual(x509.load_pem_x509_crl(pki.crlPEM(crl)), crl)
        self.assertEqual(x509.load_der_x509_crl(pki.crlDER(crl)), crl)


class PKCS12Tests(_PKIFixture):
    """
    Tests for L{pki.pkcs12Bytes}.
    """

    def setUp(self) -> None:
        self.buildPKI()

    def test_roundTripWithPassword(self) -> None:
        """
        When a PKCS#12 file is made with a password, it loads with that
        password into the key, the certificate, the chain and the name.
        """
        data = pki.pkcs12Bytes(
            self.client, [self.intermediate.certificate], b"pw", b"alice"
        )
        key, cert, chain = pkcs12.load_key_and_certificates(data, b"pw")
        self.assertEqual(cert, self.client.certificate)
        self.assertEqual(chain, [self.intermediate.certificate])
        assert key is not None
        self.assertEqual(
            pki.keyPEM(key), pki.keyPEM(self.client.key)  # type: ignore[arg-type]
        )
        loaded = pkcs12.load_pkcs12(data, b"pw")
        self.assertEqual(loaded.cert.friendly_name if loaded.cert else None, b"alice")
        self.assertRaises(ValueError, pkcs12.load_key_and_certificates, data, b"wrong")

    def test_withoutPassword(self) -> None:
        """
        When no password is given, the file loads without one.
        """
        data = pki.pkcs12Bytes(self.server)
        key, cert, chain = pkcs12.load_key_and_certificates(data, None)
        self.assertEqual(cert, self.server.certificate)
        self.assertEqual(chain, [])


class CommandTests(_TestCase):
    """
    Tests for the C{mtlsproxy-pki} command through L{pki.main}.
    """

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())

    def runCommand(self, *argv: str, expect: int = 0) -> tuple[str, str]:
        """
        Run the command with C{--dir} and C{argv}, check its exit status and
        that it printed no traceback.

        @return: Its standard output and standard error.
        """
        out, err = io.StringIO(), io.StringIO()
        code = pki.main(["--dir", str(self.dir), *argv], stdout=out, stderr=err)
        self.assertNotIn("Traceback", err.getvalue())
        self.assertEqual(code, expect, (out.getvalue(), err.getvalue()))
        return out.getvalue(), err.getvalue()

    def cert(self, name: str) -> x509.Certificate:
        """
        Load C{NAME.crt} from the state directory.
        """
        return x509.load_pem_x509_certificate((self.dir / f"{name}.crt").read_bytes())

    def crl(self, name: str) -> x509.CertificateRevocationList:
        """
        Load C{NAME.crl.pem} from the state directory.
        """
        return x509.load_pem_x509_crl((self.dir / f"{name}.crl.pem").read_bytes())

    def assertPrivate(self, path: Path) -> None:
        """
        Assert C{path} is readable by its owner only.
        """
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)

    def makeCAs(self) -> None:
        """
        Create root CA C{root} and intermediate C{inter} via the command.
        """
        self.runCommand("root", "--name", "root", "--cn", "CLI Root")
        self.runCommand("intermediate", "--name", "inter", "--issuer", "root")

    def test_rootWritesFiles(self) -> None:
        """
        When a root is created, its certificate, a 0600 key and an index
        are written and reported.
        """
        out, _ = self.runCommand(
            "root", "--name", "root", "--cn", "CLI Root", "--key-type", "rsa"
        )
        for suffix in (".crt", ".key", ".index.json"):
            self.assertIn(str(self.dir / f"root{suffix}"), out)
        self.assertPrivate(self.dir / "root.key")
        cert = self.cert("root")
        self.assertEqual(cert.subject.rfc4514_string(), "CN=CLI Root")
        self.assertIsInstance(cert.public_key(), rsa.RSAPublicKey)

    def test_serverChainAndKey(self) -> None:
        """
        When a server certificate is issued by an intermediate, NAME.crt is
        the leaf, NAME-chain.pem is the leaf then the intermediate (not the
        root), NAME.key matches and is 0600, and the chain verifies for the
        names given.
        """
        self.makeCAs()
        self.runCommand(
            "server",
            "--name",
            "web",
            "--issuer",
            "inter",
            "--dns",
            "a.example",
            "--dns",
            "b.example",
            "--ip",
            "127.0.0.1",
            "--days",
            "10",
        )
        leaf = self.cert("web")
        chain = x509.load_pem_x509_certificates(
            (self.dir / "web-chain.pem").read_bytes()
        )
        self.assertEqual(chain, [leaf, self.cert("inter")])
        self.assertPrivate(self.dir / "web.key")
        key = serialization.load_pem_private_key(
            (self.dir / "web.key").read_bytes(), None
        )
        spki = (
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
        self.assertEqual(
            key.public_key().public_bytes(*spki), leaf.public_key().public_bytes(*spki)
        )
        self.assertEqual(leaf.subject.rfc4514_string(), "CN=a.example")
        self.assertClose(
            (leaf.not_valid_after_utc - datetime.now(timezone.utc)).total_seconds(),
            timedelta(days=10).total_seconds(),
            delta=60,
        )
        verifier = (
            PolicyBuilder()
            .store(Store([self.cert("root")]))
            .build_server_verifier(IPAddress(ipaddress.ip_address("127.0.0.1")))
        )
        verifier.verify(chain[0], chain[1:])
        _opensslVerify([self.cert("root")], chain[0], chain[1:])

    def test_leafFromRootHasShortChain(self) -> None:
        """
        When a leaf is issued directly by a root, its chain file holds only
        the leaf.
        """
        self.runCommand("root", "--name", "root")
        self.runCommand(
            "client", "--name", "c", "--issuer", "root", "--email", "c@example.com"
        )
        chain = x509.load_pem_x509_certificates((self.dir / "c-chain.pem").read_bytes())
        self.assertEqual(chain, [self.cert("c")])

    def test_clientNames(self) -> None:
        """
        When a client certificate is issued with --cn, --email and --uri,
        they appear in the certificate and it verifies as a client.
        """
        self.makeCAs()
        self.runCommand(
            "client",
            "--name",
            "alice",
            "--issuer",
            "inter",
            "--cn",
            "Alice",
            "--email",
            "alice@example.com",
            "--uri",
            "spiffe://example.com/alice",
        )
        leaf = self.cert("alice")
        self.assertEqual(leaf.subject.rfc4514_string(), "CN=Alice")
        verified = (
            PolicyBuilder()
            .store(Store([self.cert("root")]))
            .build_client_verifier()
            .verify(leaf, [self.cert("inter")])
        )
        self.assertEqual(
            verified.subjects,
            [
                x509.RFC822Name("alice@example.com"),
                x509.UniformResourceIdentifier("spiffe://example.com/alice"),
            ],
        )

    def test_pkcs12PasswordFile(self) -> None:
        """
        When a PKCS#12 file is exported with --password-file, it is 0600 and
        loads with the file's first line into leaf, key and chain.
        """
        self.makeCAs()
        self.runCommand("client", "--name", "alice", "--issuer", "inter")
        passwordFile = self.dir / "pw.txt"
        passwordFile.write_bytes(b"s3cret\n")
        out = self.dir / "alice-export.p12"
        self.runCommand(
            "pkcs12",
            "--name",
            "alice",
            "--password-file",
            str(passwordFile),
            "--out",
            str(out),
        )
        self.assertPrivate(out)
        key, cert, chain = pkcs12.load_key_and_certificates(out.read_bytes(), b"s3cret")
        self.assertEqual(cert, self.cert("alice"))
        self.assertEqual(chain, [self.cert("inter")])
        assert key is not None
        self.assertEqual(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            (self.dir / "alice.key").read_bytes(),
        )

    def test_pkcs12PasswordEnv(self) -> None:
        """
        When a PKCS#12 file is exported with --password-env and no --out, it
        is written to DIR/NAME.p12 and loads with the variable's value.
        """
        self.makeCAs()
        self.runCommand(
            "server", "--name", "web", "--issuer", "inter", "--dns", "web.example"
        )
        self.patch(os, "environ", {**os.environ, "MTLSPROXY_TEST_PW": "pw-from-env"})
        self.runCommand(
            "pkcs12", "--name", "web", "--password-env", "MTLSPROXY_TEST_PW"
        )
        _, cert, _ = pkcs12.load_key_and_certificates(
            (self.dir / "web.p12").read_bytes(), b"pw-from-env"
        )
        self.assertEqual(cert, self.cert("web"))

    def test_pkcs12PasswordProblems(self) -> None:
        """
        When the password is missing, empty or unset, the export fails with
        a one-line error: exit 2 for a missing option, 1 otherwise.
        """
        self.makeCAs()
        self.runCommand("client", "--name", "alice", "--issuer", "inter")
        self.runCommand("pkcs12", "--name", "alice", expect=2)
        empty = self.dir / "empty"
        empty.write_bytes(b"")
        _, err = self.runCommand(
            "pkcs12", "--name", "alice", "--password-file", str(empty), expect=1
        )
        self.assertIn("empty password", err)
        self.patch(os, "environ", {})
        _, err = self.runCommand(
            "pkcs12", "--name", "alice", "--password-env", "NOPE", expect=1
        )
        self.assertEqual(
            err, "mtlsproxy-pki: error: environment variable NOPE is not set\n"
        )
        self.assertFalse((self.dir / "alice.p12").exists())

    def test_serialTextPadded(self) -> None:
        """
        When a serial number is printed, it is upper-case hexadecimal padded
        to whole bytes, as C{openssl x509 -serial} prints it, whatever its
        leading nibble.
        """
        self.assertEqual(pki._serialText(0xA3A4), "A3A4")
        self.assertEqual(pki._serialText(0xA3A), "0A3A")
        self.assertEqual(pki._serialText(0x1), "01")

    def test_revokeThenCRL(self) -> None:
        """
        When a client certificate is revoked, its issuer's CRL is rewritten
        listing its serial, signed by the issuer, and the index records it;
        a later 'crl' keeps listing it with a higher CRL number.
        """
        self.makeCAs()
        self.runCommand("client", "--name", "alice", "--issuer", "inter")
        self.runCommand("client", "--name", "bob", "--issuer", "inter")
        serial = self.cert("alice").serial_number
        out, _ = self.runCommand("revoke", "--name", "alice")
        self.assertIn(f"serial {pki._serialText(serial)}", out)
        crl = self.crl("inter")
        self.assertTrue(_signedBy(crl, self.cert("inter")))
        self.assertEqual([r.serial_number for r in crl], [serial])
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        self.runCommand("crl", "--ca", "inter", "--days", "7")
        crl = self.crl("inter")
        self.assertEqual([r.serial_number for r in crl], [serial])
        self.assertEqual(
            crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number,
            number + 1,
        )
        assert crl.next_update_utc is not None
        self.assertClose(
            (crl.next_update_utc - datetime.now(timezone.utc)).total_seconds(),
            timedelta(days=7).total_seconds(),
            delta=60,
        )
        index = pki._StateDirectory(self.dir).loadIndex("inter")
        entries = {e["name"]: e for e in index["issued"]}
        self.assertIsNotNone(entries["alice"]["revoked_at"])
        self.assertIsNone(entries["bob"]["revoked_at"])
        self.assertEqual(entries["alice"]["serial"], pki._serialText(serial))

    def test_revokeIntermediate(self) -> None:
        """
        When an intermediate is revoked, the root's CRL lists it.
        """
        self.makeCAs()
        self.runCommand("revoke", "--name", "inter")
        self.assertEqual(
            [r.serial_number for r in self.crl("root")],
            [self.cert("inter").serial_number],
        )

    def test_revokedCACannotIssue(self) -> None:
        """
        When an intermediate has been revoked, issuing from it fails with
        exit 1, but it can still sign its CRL.
        """
        self.makeCAs()
        self.runCommand("revoke", "--name", "inter")
        _, err = self.runCommand(
            "client", "--name", "late", "--issuer", "inter", expect=1
        )
        self.assertIn("'inter' was revoked", err)
        self.assertFalse((self.dir / "late.key").exists())
        self.runCommand("crl", "--ca", "inter")

    def test_revokeErrors(self) -> None:
        """
        When revoking twice, revoking a root or an unknown name, the command
        fails with exit 1 and a one-line reason.
        """
        self.makeCAs()
        self.runCommand("client", "--name", "alice", "--issuer", "inter")
        self.runCommand("revoke", "--name", "alice")
        _, err = self.runCommand("revoke", "--name", "alice", expect=1)
        self.assertIn("already revoked", err)
        _, err = self.runCommand("revoke", "--name", "root", expect=1)
        self.assertIn("is a root CA", err)
        _, err = self.runCommand("revoke", "--name", "nobody", expect=1)
        self.assertEqual(
            err,
            f"mtlsproxy-pki: error: no certificate named 'nobody' is recorded in {self.dir}\n",
        )

    def test_crlDER(self) -> None:
        """
        When 'crl --der' is run, the same CRL is also written as DER.
        """
        self.runCommand("root", "--name", "root")
        out, _ = self.runCommand("crl", "--ca", "root", "--der")
        self.assertIn(str(self.dir / "root.crl.der"), out)
        self.assertEqual(
            x509.load_der_x509_crl((self.dir / "root.crl.der").read_bytes()),
            self.crl("root"),
        )

    def test_emptyCRL(self) -> None:
        """
        When a CA has revoked nothing, 'crl' still writes a valid, empty CRL.
        """
        self.runCommand("root", "--name", "root")
        out, _ = self.runCommand("crl", "--ca", "root")
        self.assertIn(str(self.dir / "root.crl.pem"), out)
        crl = self.crl("root")
        self.assertEqual(len(crl), 0)
        self.assertTrue(_signedBy(crl, self.cert("root")))

    def test_bundles(self) -> None:
        """
        When 'bundle' and 'crl-bundle' are run, they concatenate the CAs'
        certificates and CRLs in the order given.
        """
        self.makeCAs()
        self.runCommand("crl", "--ca", "root")
        self.runCommand("crl", "--ca", "inter")
        bundle = self.dir / "b.pem"
        self.runCommand("bundle", "--out", str(bundle), "inter", "root")
        self.assertEqual(
            x509.load_pem_x509_certificates(bundle.read_bytes()),
            [self.cert("inter"), self.cert("root")],
        )
        crls = self.dir / "c.pem"
        self.runCommand("crl-bundle", "--out", str(crls), "root", "inter")
        self.assertEqual(
            crls.read_bytes(),
            (self.dir / "root.crl.pem").read_bytes()
            + (self.dir / "inter.crl.pem").read_bytes(),
        )

    def test_bundleErrors(self) -> None:
        """
        When a bundle names a leaf or a CA without a CRL, it fails with
        exit 1 and writes nothing.
        """
        self.makeCAs()
        self.runCommand("client", "--name", "alice", "--issuer", "inter")
        out = self.dir / "b.pem"
        _, err = self.runCommand("bundle", "--out", str(out), "root", "alice", expect=1)
        self.assertIn("no CA named 'alice'", err)
        _, err = self.runCommand("crl-bundle", "--out", str(out), "root", expect=1)
        self.assertIn("run 'crl --ca root' first", err)
        self.assertFalse(out.exists())

    def test_failures(self) -> None:
        """
        When the issuer is unknown, a name is taken or --days outlives the
        issuer, the command fails with exit 1 and one error line.
        """
        _, err = self.runCommand(
            "server", "--name", "s", "--issuer", "nope", "--dns", "x", expect=1
        )
        self.assertEqual(
            err, f"mtlsproxy-pki: error: no CA named 'nope' in {self.dir}\n"
        )
        self.runCommand("root", "--name", "root", "--days", "30")
        _, err = self.runCommand("root", "--name", "root", expect=1)
        self.assertIn("already exists", err)
        _, err = self.runCommand(
            "client", "--name", "c", "--issuer", "root", "--days", "31", expect=1
        )
        self.assertIn("would end after the issuer", err)
        self.assertFalse((self.dir / "c.key").exists())

    def test_usageErrors(self) -> None:
        """
        When arguments are bad, the command exits 2 with the usage and an
        error line naming the problem, and creates nothing.
        """
        cases = [
            ((), "required"),
            (("root",), "--name"),
            (("root", "--name", "../escape"), "invalid name"),
            (("root", "--name", "r", "--key-type", "dsa"), "invalid choice"),
            (("root", "--name", "r", "--days", "0"), "positive integer"),
            (("server", "--name", "s", "--issuer", "r"), "--dns or --ip"),
            (("server", "--name", "s", "--issuer", "r", "--ip", "1.2.3"), "invalid IP"),
            (
                ("server", "--name", "s", "--issuer", "r", "--dns", "bad name"),
                "invalid DNS",
            ),
            (("frobnicate",), "invalid choice"),
        ]
        for argv, message in cases:
            out, err = io.StringIO(), io.StringIO()
            args = ["--dir", str(self.dir), *argv] if argv else []
            code = pki.main(args, stdout=out, stderr=err)
            self.assertEqual(code, 2, argv)
            lines = err.getvalue().splitlines()
            self.assertTrue(lines[0].startswith("usage: mtlsproxy-pki"), argv)
            self.assertTrue(lines[-1].startswith("mtlsproxy-pki: error: "), argv)
            self.assertIn(message, lines[-1], argv)
            self.assertEqual(out.getvalue(), "")
        self.assertFalse(self.dir.exists())

    def test_help(self) -> None:
        """
        When --help is given, usage goes to standard output and the exit
        status is 0.
        """
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(pki.main(["--help"], stdout=out, stderr=err), 0)
        self.assertIn("demo", out.getvalue())
        self.assertEqual(err.getvalue(), "")


class DemoTests(SynchronousTestCase):
    """
    Tests for the C{demo} subcommand.
    """

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.out = io.StringIO()
        self.err = io.StringIO()
        code = pki.main(
            ["--dir", str(self.dir), "demo"], stdout=self.out, stderr=self.err
        )
        self.assertEqual(code, 0, self.err.getvalue())

    def load(self, name: str) -> bytes:
        """
        Read a file of the demo.
        """
        return (self.dir / name).read_bytes()

    def test_layout(self) -> None:
        """
        When the demo runs, it writes and reports every documented file,
        keys readable by their owner only.
        """
        self.assertEqual(
            sorted(p.name for p in self.dir.iterdir()), sorted(pki.DEMO_FILES)
        )
        for name in pki.DEMO_FILES:
            self.assertIn(f"wrote {self.dir / name}\n", self.out.getvalue())
            if name.endswith(".key"):
                self.assertEqual(stat.S_IMODE((self.dir / name).stat().st_mode), 0o600)

    def test_bundles(self) -> None:
        """
        When the demo runs, ca-bundle.pem is root then intermediate and
        crls.pem holds each CA's CRL, each signed by its CA.
        """
        root = x509.load_pem_x509_certificate(self.load("root.crt"))
        inter = x509.load_pem_x509_certificate(self.load("intermediate.crt"))
        self.assertEqual(
            x509.load_pem_x509_certificates(self.load("ca-bundle.pem")), [root, inter]
        )
        self.assertEqual(
            self.load("crls.pem"),
            self.load("root.crl.pem") + self.load("intermediate.crl.pem"),
        )
        rootCRL = x509.load_pem_x509_crl(self.load("root.crl.pem"))
        interCRL = x509.load_pem_x509_crl(self.load("intermediate.crl.pem"))
        self.assertTrue(_signedBy(rootCRL, root))
        self.assertTrue(_signedBy(interCRL, inter))
        self.assertEqual(len(rootCRL), 0)
        revoked = x509.load_pem_x509_certificate(self.load("revoked-client.crt"))
        self.assertEqual([r.serial_number for r in interCRL], [revoked.serial_number])

    def test_serverNames(self) -> None:
        """
        When the demo runs, the server certificate is for localhost,
        127.0.0.1 and ::1 and verifies for each with C{ServerVerifier}.
        """
        root = x509.load_pem_x509_certificate(self.load("root.crt"))
        chain = x509.load_pem_x509_certificates(self.load("server-chain.pem"))
        for subject in (
            DNSName("localhost"),
            IPAddress(ipaddress.ip_address("127.0.0.1")),
            IPAddress(ipaddress.ip_address("::1")),
        ):
            PolicyBuilder().store(Store([root])).build_server_verifier(subject).verify(
                chain[0], chain[1:]
            )

    def test_opensslWithCRLs(self) -> None:
        """
        When OpenSSL checks the demo's chains against ca-bundle.pem and
        crls.pem with strict and CRL checks, server and client pass and
        revoked-client fails with error 23.
        """
        root = x509.load_pem_x509_certificate(self.load("root.crt"))
        crls = [
            x509.load_pem_x509_crl(self.load("root.crl.pem")),
            x509.load_pem_x509_crl(self.load("intermediate.crl.pem")),
        ]
        for name in ("server", "client"):
            chain = x509.load_pem_x509_certificates(self.load(f"{name}-chain.pem"))
            _opensslVerify([root], chain[0], chain[1:], crls)
        chain = x509.load_pem_x509_certificates(self.load("revoked-client-chain.pem"))
        error = self.assertRaises(
            crypto.X509StoreContextError,
            _opensslVerify,
            [root],
            chain[0],
            chain[1:],
            crls,
        )
        self.assertEqual(error.errors[0], X509_V_ERR_CERT_REVOKED)

    def test_clientVerifiesWithCryptography(self) -> None:
        """
        When the demo's client certificate is checked with
        C{ClientVerifier}, it verifies.
        """
        root = x509.load_pem_x509_certificate(self.load("root.crt"))
        chain = x509.load_pem_x509_certificates(self.load("client-chain.pem"))
        PolicyBuilder().store(Store([root])).build_client_verifier().verify(
            chain[0], chain[1:]
        )

    def test_secondRunRefused(self) -> None:
        """
        When the demo runs again into the same directory, it fails with
        exit 1 and leaves the existing files alone.
        """
        before = {name: self.load(name) for name in pki.DEMO_FILES}
        err = io.StringIO()
        code = pki.main(
            ["--dir", str(self.dir), "demo"], stdout=io.StringIO(), stderr=err
        )
        self.assertEqual(code, 1)
        self.assertIn("already exists", err.getvalue())
        self.assertEqual({name: self.load(name) for name in pki.DEMO_FILES}, before)


class ConsoleScriptTests(SynchronousTestCase):
    """
    The module works as the C{mtlsproxy-pki} console script, which calls
    C{sys.exit(main())}.
    """

    def test_exitStatus(self) -> None:
        """
        When run as a process, success exits 0 and a failure exits 1 with
        one error line and no traceback.
        """
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": root}
        script = "import sys; from mtlsproxy.pki import main; sys.exit(main())"
        directory = self.mktemp()
        ok = subprocess.run(
            [sys.executable, "-c", script, "--dir", directory, "root", "--name", "r"],
            capture_output=True,
            env=env,
        )
        self.assertEqual(ok.returncode, 0, ok.stderr)
        self.assertTrue(os.path.exists(os.path.join(directory, "r.crt")))
        bad = subprocess.run(
            [sys.executable, "-c", script, "--dir", directory, "crl", "--ca", "nope"],
            capture_output=True,
            env=env,
        )
        self.assertEqual(bad.returncode, 1)
        self.assertEqual(
            bad.stderr,
            f"mtlsproxy-pki: error: no CA named 'nope' in {directory}\n".encode(),
        )
