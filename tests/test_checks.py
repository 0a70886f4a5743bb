"""
Tests for L{mtlsproxy.checks} and L{mtlsproxy.material}.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from typing import Callable, Sequence

from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from mtlsproxy import pki
from mtlsproxy.checks import (
    ListenerMaterial,
    LoadedConfiguration,
    ServerCertificate,
    checkConfiguration,
)
from mtlsproxy.config import loadConfig
from mtlsproxy.errors import ConfigurationError
from mtlsproxy.material import loadCertificates, loadCRLs, loadPrivateKey

NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
DAY = timedelta(days=1)


class TestPKI:
    """
    A root CA, an intermediate CA, a server certificate and a CRL from
    each CA, all with validity periods around L{NOW}.
    """

    def __init__(self) -> None:
        self.root = pki.createRootCA(
            "Test Root", notBefore=NOW - 365 * DAY, notAfter=NOW + 3650 * DAY
        )
        self.intermediate = pki.createIntermediateCA(
            self.root, "Test Intermediate", notBefore=NOW - 365 * DAY, notAfter=NOW + 1825 * DAY
        )
        self.server = self.serverCertificate(NOW - DAY, NOW + 365 * DAY)
        self.rootCRL = self.crl(self.root)
        self.intermediateCRL = self.crl(self.intermediate)

    def serverCertificate(self, notBefore: datetime, notAfter: datetime) -> pki.Issued:
        """
        Issue a server certificate for C{localhost} from the intermediate.
        """
        return pki.issueServerCertificate(
            self.intermediate, "localhost", notBefore=notBefore, notAfter=notAfter
        )

    def crl(
        self,
        issuer: pki.Issued,
        lastUpdate: datetime = NOW - DAY,
        nextUpdate: datetime = NOW + 7 * DAY,
    ) -> x509.CertificateRevocationList:
        """
        Build an empty CRL of C{issuer}.
        """
        return pki.buildCRL(issuer, lastUpdate=lastUpdate, nextUpdate=nextUpdate)


_SHARED: list[TestPKI] = []


def sharedPKI() -> TestPKI:
    """
    One L{TestPKI} for all tests: they only read it.
    """
    if not _SHARED:
        _SHARED.append(TestPKI())
    return _SHARED[0]


def when(moment: datetime) -> str:
    """
    A time as the messages print it.
    """
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


class CheckTestsMixin:
    """
    Write the test PKI and configuration files into a fresh folder.
    """

    mktemp: Callable[[], str]

    def setUpFiles(self) -> None:
        """
        Write the standard files: C{server-chain.pem}, C{server.key},
        C{ca-bundle.pem} (root and intermediate), C{crls.pem} (both CRLs).
        """
        self.pki = sharedPKI()
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        p = self.pki
        self.serverChain = self.write(
            "server-chain.pem", pki.chainPEM([p.server.certificate, p.intermediate.certificate])
        )
        self.serverKey = self.write("server.key", pki.keyPEM(p.server.key))
        self.caBundle = self.write(
            "ca-bundle.pem", pki.chainPEM([p.root.certificate, p.intermediate.certificate])
        )
        self.crls = self.write(
            "crls.pem", pki.crlPEM(p.rootCRL) + pki.crlPEM(p.intermediateCRL)
        )

    def write(self, name: str, data: bytes) -> str:
        """
        Write a file into the test folder and return its path.
        """
        path = os.path.join(self.folder, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def configText(
        self,
        cert: str | None = None,
        key: str | None = None,
        cas: Sequence[str] | None = None,
        crls: Sequence[str] | None = None,
        clientAuth: str = "required",
        extra: str = "",
        pools: str = "",
    ) -> str:
        """
        A configuration with one TLS listener using the given files
        (default: the standard ones) and one pool.
        """
        return f"""\
[[listeners]]
name = "mtls"
endpoint = "tcp:8443"
protocol = "tls"
pool = "app"
client_auth = "{clientAuth}"
ca_certificates = {json.dumps(list(cas if cas is not None else [self.caBundle]))}
crls = {json.dumps(list(crls if crls is not None else [self.crls]))}
{extra}
[[listeners.certificates]]
cert = {json.dumps(cert or self.serverChain)}
key = {json.dumps(key or self.serverKey)}

[[pools]]
name = "app"
[[pools.members]]
address = "127.0.0.1"
port = 9001
{pools}"""

    def writeConfig(self, text: str) -> str:
        """
        Write a configuration file into the test folder.
        """
        return self.write("proxy.toml", text.encode("utf-8"))


class CheckConfigurationTests(CheckTestsMixin, SynchronousTestCase):
    """
    Tests for L{checkConfiguration}.
    """

    def setUp(self) -> None:
        self.setUpFiles()

    def check(self, now: datetime = NOW, **kwargs: object) -> LoadedConfiguration:
        """
        Write a configuration (see L{configText}), load and check it.
        """
        self.configPath = self.writeConfig(self.configText(**kwargs))  # type: ignore[arg-type]
        return checkConfiguration(loadConfig(self.configPath), now)

    def assertCheckError(self, expected: str, now: datetime = NOW, **kwargs: object) -> None:
        """
        Checking the configuration fails with the message C{expected}
        after the configuration file's path.
        """
        error = self.assertRaises(ConfigurationError, self.check, now, **kwargs)
        self.assertEqual(str(error), f"{self.configPath}: {expected}")

    def test_valid(self) -> None:
        """
        When all material fits together, the loaded configuration holds the
        chain (server certificate first), the key, the CAs and the CRLs in
        file order, and there are no warnings.
        """
        loaded = self.check()
        p = self.pki
        [material] = loaded.listeners.values()
        self.assertEqual(list(loaded.listeners), ["mtls"])
        self.assertEqual(material.chain, (p.server.certificate, p.intermediate.certificate))
        self.assertEqual(
            pki.keyPEM(material.key),  # type: ignore[arg-type]
            pki.keyPEM(p.server.key),
        )
        self.assertEqual(material.cas, (p.root.certificate, p.intermediate.certificate))
        self.assertEqual(material.crls, (p.rootCRL, p.intermediateCRL))
        self.assertEqual(material.additional, ())
        self.assertEqual(
            material.certificates, (ServerCertificate(material.chain, material.key),)
        )
        self.assertEqual(loaded.warnings, ())
        self.assertEqual(loaded.config.path, self.configPath)

    def test_naiveNow(self) -> None:
        """
        When C{now} has no time zone, it is taken as UTC.
        """
        self.assertEqual(self.check(now=NOW.replace(tzinfo=None)).warnings, ())

    def test_tcpListener(self) -> None:
        """
        When a listener is plain TCP, it has no material.
        """
        path = self.writeConfig(
            '[[listeners]]\nname = "plain"\nendpoint = "tcp:1"\nprotocol = "tcp"\n'
            'pool = "app"\n[[pools]]\nname = "app"\n'
            '[[pools.members]]\naddress = "a"\nport = 1\n'
        )
        loaded = checkConfiguration(loadConfig(path), NOW)
        self.assertEqual(loaded.listeners, {})

    def test_severalCertificates(self) -> None:
        """
        When a listener has several certificates, the first is the default
        and the others are in C{additional}.
        """
        other = self.pki.serverCertificate(NOW - DAY, NOW + 100 * DAY)
        otherChain = self.write("other.pem", pki.certificatePEM(other.certificate))
        otherKey = self.write("other.key", pki.keyPEM(other.key))
        loaded = self.check(
            extra=f"[[listeners.certificates]]\ncert = {json.dumps(otherChain)}\n"
            f"key = {json.dumps(otherKey)}\n"
        )
        material = loaded.listeners["mtls"]
        self.assertEqual(material.chain[0], other.certificate)
        [additional] = material.additional
        self.assertEqual(additional.chain[0], self.pki.server.certificate)

    def test_keyMismatch(self) -> None:
        """
        When the key does not belong to the server certificate, the error
        names the key setting and both files.
        """
        otherKey = self.write("other.key", pki.keyPEM(pki.generateKey()))
        self.assertCheckError(
            f"listeners[0].certificates[0].key: the private key in {otherKey} does"
            f" not match the certificate CN=localhost in {self.serverChain}",
            key=otherKey,
        )

    def test_keyMatchesLaterCertificate(self) -> None:
        """
        When the key belongs to a later certificate of the chain file, the
        error says to put the server certificate first.
        """
        p = self.pki
        reversedChain = self.write(
            "reversed.pem", pki.chainPEM([p.intermediate.certificate, p.server.certificate])
        )
        self.assertCheckError(
            f"listeners[0].certificates[0].key: the private key in {self.serverKey}"
            f" does not match the certificate CN=Test Intermediate in {reversedChain};"
            " it matches certificate 2 in that file: put the server certificate first",
            cert=reversedChain,
        )

    def test_chainOutOfOrder(self) -> None:
        """
        When a certificate of the chain was not issued by the next one, the
        error names both.
        """
        p = self.pki
        chain = self.write(
            "bad-chain.pem", pki.chainPEM([p.server.certificate, p.root.certificate])
        )
        self.assertCheckError(
            f"listeners[0].certificates[0].cert: certificate 2 in {chain} (CN=Test Root)"
            " did not issue certificate 1 (CN=localhost, issued by CN=Test Intermediate):"
            " list the server certificate first, then each issuer in turn",
            cert=chain,
        )

    def test_foreignCRL(self) -> None:
        """
        When a CRL was issued by a CA that is not configured, the error names
        the C{crls} entry, the file and the issuer.
        """
        foreign = pki.createRootCA("Foreign CA", notBefore=NOW - DAY, notAfter=NOW + 10 * DAY)
        path = self.write("foreign.crl.pem", pki.crlPEM(self.pki.crl(foreign)))
        self.assertCheckError(
            f"listeners[0].crls[1]: the CRL in {path} was issued by CN=Foreign CA,"
            " which is not one of the configured CA certificates (CN=Test Root;"
            " CN=Test Intermediate)",
            crls=[self.crls, path],
        )

    def test_badCRLSignature(self) -> None:
        """
        When a CRL names a configured CA as issuer but another key signed it,
        the error says the signature does not verify.
        """
        impostor = pki.createRootCA("Test Root", notBefore=NOW - DAY, notAfter=NOW + 10 * DAY)
        path = self.write(
            "impostor.crl",
            pki.crlPEM(self.pki.intermediateCRL) + pki.crlPEM(self.pki.crl(impostor)),
        )
        self.assertCheckError(
            f"listeners[0].crls[0]: CRL 2 in {path} names CN=Test Root as issuer but"
            " its signature does not verify with that CA's key",
            crls=[path],
        )

    def test_derCRL(self) -> None:
        """
        When a CRL file is DER, it is recognized and loaded.
        """
        root = self.write("root.crl", pki.crlDER(self.pki.rootCRL))
        intermediate = self.write("intermediate.crl", pki.crlDER(self.pki.intermediateCRL))
        material = self.check(crls=[root, intermediate]).listeners["mtls"]
        self.assertEqual(material.crls, (self.pki.rootCRL, self.pki.intermediateCRL))

    def test_expiredServerCertificate(self) -> None:
        """
        When the server certificate has expired, the error names the
        certificate setting, the file and the date.
        """
        server = self.pki.serverCertificate(NOW - 100 * DAY, NOW - 10 * DAY)
        chain = self.write("expired.pem", pki.certificatePEM(server.certificate))
        key = self.write("expired.key", pki.keyPEM(server.key))
        self.assertCheckError(
            f"listeners[0].certificates[0].cert: the server certificate (CN=localhost)"
            f" in {chain} expired on {when(NOW - 10 * DAY)}",
            cert=chain,
            key=key,
        )

    def test_expiredIntermediate(self) -> None:
        """
        When an intermediate in the chain has expired, the error names it by
        its position in the file.
        """
        p = self.pki
        intermediate = pki.createIntermediateCA(
            p.root, "Old Intermediate", notBefore=NOW - 100 * DAY, notAfter=NOW - DAY
        )
        server = pki.issueServerCertificate(
            intermediate, "localhost", notBefore=NOW - 10 * DAY, notAfter=NOW + 100 * DAY
        )
        chain = self.write(
            "old-chain.pem", pki.chainPEM([server.certificate, intermediate.certificate])
        )
        key = self.write("old.key", pki.keyPEM(server.key))
        self.assertCheckError(
            f"listeners[0].certificates[0].cert: chain certificate 2 (CN=Old Intermediate)"
            f" in {chain} expired on {when(NOW - DAY)}",
            cert=chain,
            key=key,
        )

    def test_notYetValid(self) -> None:
        """
        When the server certificate is not valid yet, that is an error.
        """
        server = self.pki.serverCertificate(NOW + DAY, NOW + 10 * DAY)
        chain = self.write("future.pem", pki.certificatePEM(server.certificate))
        key = self.write("future.key", pki.keyPEM(server.key))
        self.assertCheckError(
            f"listeners[0].certificates[0].cert: the server certificate (CN=localhost)"
            f" in {chain} is not valid before {when(NOW + DAY)}",
            cert=chain,
            key=key,
        )

    def test_expiringSoon(self) -> None:
        """
        When the server certificate expires within 30 days, there is a
        warning naming the listener, the file and the date.
        """
        server = self.pki.serverCertificate(NOW - DAY, NOW + 10 * DAY)
        chain = self.write(
            "soon.pem", pki.chainPEM([server.certificate, self.pki.intermediate.certificate])
        )
        key = self.write("soon.key", pki.keyPEM(server.key))
        loaded = self.check(cert=chain, key=key)
        self.assertEqual(
            loaded.warnings,
            (
                f"listener 'mtls': the server certificate (CN=localhost) in {chain}"
                f" expires on {when(NOW + 10 * DAY)}, in 10 days",
            ),
        )

    def test_expiredCRL(self) -> None:
        """
        When a CRL is past its nextUpdate, there is a warning naming the
        file and saying what C{crl_expired} will do.
        """
        stale = self.pki.crl(self.pki.intermediate, NOW - 10 * DAY, NOW - DAY)
        path = self.write("stale.crl", pki.crlPEM(self.pki.rootCRL) + pki.crlPEM(stale))
        self.assertEqual(
            self.check(crls=[path]).warnings,
            (
                f"listener 'mtls': CRL 2 in {path} (issuer CN=Test Intermediate) is past"
                f" its nextUpdate {when(NOW - DAY)}; with crl_expired = \"reject\" client"
                " certificates it covers are rejected until it is replaced",
            ),
        )
        self.assertEqual(
            self.check(crls=[path], extra='crl_expired = "allow"').warnings,
            (
                f"listener 'mtls': CRL 2 in {path} (issuer CN=Test Intermediate) is past"
                f' its nextUpdate {when(NOW - DAY)}; it is still used because'
                ' crl_expired = "allow"',
            ),
        )

    def test_missingCRL(self) -> None:
        """
        When a configured CA has no CRL and C{crl_missing = "reject"}, there
        is a warning; with C{"allow"} there is none.
        """
        root = self.write("root.crl", pki.crlPEM(self.pki.rootCRL))
        self.assertEqual(
            self.check(crls=[root]).warnings,
            (
                "listener 'mtls': no CRL is configured for CA CN=Test Intermediate;"
                ' with crl_missing = "reject" client certificates verified through it'
                " are rejected",
            ),
        )
        self.assertEqual(self.check(crls=[root], extra='crl_missing = "allow"').warnings, ())

    def test_clientAuthOff(self) -> None:
        """
        When client certificates are off but CA files are configured, they
        are still checked and a warning says they are unused.
        """
        self.assertEqual(
            self.check(clientAuth="off").warnings,
            (
                "listener 'mtls': ca_certificates and crls are not used because"
                ' client_auth = "off"',
            ),
        )
        self.assertEqual(self.check(clientAuth="off", cas=[], crls=[]).warnings, ())

    def test_notACA(self) -> None:
        """
        When a CA file holds a certificate that is not a CA, there is a
        warning.
        """
        bundle = self.write(
            "with-leaf.pem",
            pki.chainPEM([self.pki.root.certificate, self.pki.intermediate.certificate])
            + pki.certificatePEM(self.pki.server.certificate),
        )
        self.assertIn(
            f"listener 'mtls': CA certificate CN=localhost in {bundle} is not a CA"
            " certificate (basicConstraints CA:TRUE missing); client certificates"
            " cannot be verified with it",
            self.check(cas=[bundle]).warnings,
        )

    def test_clientCertificateAsServer(self) -> None:
        """
        When the server certificate only allows client authentication, there
        is a warning.
        """
        client = pki.issueClientCertificate(
            self.pki.intermediate, "client", notBefore=NOW - DAY, notAfter=NOW + 100 * DAY
        )
        chain = self.write("client.pem", pki.certificatePEM(client.certificate))
        key = self.write("client.key", pki.keyPEM(client.key))
        self.assertEqual(
            self.check(cert=chain, key=key).warnings,
            (
                f"listener 'mtls': the server certificate (CN=client) in {chain} does"
                " not allow TLS server use (extendedKeyUsage without serverAuth);"
                " clients will reject it",
            ),
        )

    def test_missingFiles(self) -> None:
        """
        When a certificate, key, CA or CRL file does not exist, the error
        names the setting and the file.
        """
        missing = os.path.join(self.folder, "missing.pem")
        self.assertCheckError(
            f"listeners[0].certificates[0].cert: file not found: {missing}", cert=missing
        )
        self.assertCheckError(
            f"listeners[0].certificates[0].key: file not found: {missing}", key=missing
        )
        self.assertCheckError(
            f"listeners[0].ca_certificates[1]: file not found: {missing}",
            cas=[self.caBundle, missing],
        )
        self.assertCheckError(f"listeners[0].crls[0]: file not found: {missing}", crls=[missing])

    def test_garbageFiles(self) -> None:
        """
        When a file does not hold what its setting expects, the error says
        so.
        """
        garbage = self.write("garbage", b"hello\n")
        self.assertCheckError(
            "listeners[0].certificates[0].cert: no PEM certificate"
            f" (-----BEGIN CERTIFICATE-----) in {garbage}",
            cert=garbage,
        )
        self.assertCheckError(
            "listeners[0].certificates[0].key: no PEM private key"
            f" (-----BEGIN PRIVATE KEY-----) in {garbage}",
            key=garbage,
        )
        self.assertCheckError(
            f"listeners[0].crls[0]: {garbage} holds neither PEM CRLs"
            " (-----BEGIN X509 CRL-----) nor a valid DER CRL",
            crls=[garbage],
        )
        keyAsCRL = self.write("key-as-crl.pem", pki.keyPEM(self.pki.server.key))
        self.assertCheckError(
            f"listeners[0].crls[0]: no PEM CRL (-----BEGIN X509 CRL-----) in {keyAsCRL}",
            crls=[keyAsCRL],
        )

    def test_encryptedKey(self) -> None:
        """
        When the key is encrypted and no password is configured, the error
        says how to give one.
        """
        key = self.write("encrypted.key", pki.keyPEM(self.pki.server.key, b"secret"))
        self.assertCheckError(
            f"listeners[0].certificates[0].key: the private key in {key} is encrypted;"
            " give its password with password_file or password_env in the same"
            " [[listeners.certificates]] table",
            key=key,
        )

    def test_unknownSelector(self) -> None:
        """
        When a pool names a selector no plugin provides, the error names the
        pool's C{selector} key and the installed selectors.
        """
        text = self.configText().replace('name = "app"', 'name = "app"\nselector = "random"')
        path = self.writeConfig(text)
        error = self.assertRaises(ConfigurationError, checkConfiguration, loadConfig(path), NOW)
        self.assertTrue(
            str(error).startswith(
                f"{path}: pools[0].selector: unknown selector 'random'; available: "
            ),
            str(error),
        )
        self.assertIn("round_robin", str(error))

    def test_poolWarnings(self) -> None:
        """
        When a pool is not used by any listener, or all its members have
        weight 0, there is a warning.
        """
        loaded = self.check(
            pools='weight = 0\n[[pools]]\nname = "spare"\n[[pools.members]]\n'
            'address = "127.0.0.1"\nport = 9002\n'
        )
        self.assertEqual(
            loaded.warnings,
            (
                "pool 'app': every member has weight 0, so no connection is ever sent to it",
                "pool 'spare' is not used by any listener",
            ),
        )


class MaterialTests(CheckTestsMixin, SynchronousTestCase):
    """
    Tests for the loaders of L{mtlsproxy.material}.
    """

    def setUp(self) -> None:
        self.setUpFiles()

    def test_certificates(self) -> None:
        """
        When a PEM file holds several certificates, all are returned in file
        order.
        """
        self.assertEqual(
            loadCertificates(self.caBundle, "k"),
            (self.pki.root.certificate, self.pki.intermediate.certificate),
        )

    def test_brokenCertificate(self) -> None:
        """
        When a PEM certificate block does not parse, the error names the
        file and the key path given.
        """
        path = self.write(
            "broken.pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        )
        error = self.assertRaises(ConfigurationError, loadCertificates, path, "a.b[0]")
        self.assertEqual(error.key, "a.b[0]")
        self.assertTrue(
            str(error).startswith(f"a.b[0]: cannot parse the certificates in {path}: "),
            str(error),
        )

    def test_keyWithCertificate(self) -> None:
        """
        When the key file also holds a certificate, the key is found.
        """
        path = self.write(
            "combined.pem",
            pki.certificatePEM(self.pki.server.certificate) + pki.keyPEM(self.pki.server.key),
        )
        key = loadPrivateKey(path, "k")
        self.assertEqual(
            pki.keyPEM(key), pki.keyPEM(self.pki.server.key)  # type: ignore[arg-type]
        )

    def test_rsaKey(self) -> None:
        """
        When the key is an RSA key in the traditional format, it loads.
        """
        from cryptography.hazmat.primitives import serialization

        key = pki.generateKey("rsa")
        path = self.write(
            "rsa.key",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            ),
        )
        self.assertEqual(
            loadPrivateKey(path, "k").public_key().public_numbers(),  # type: ignore[union-attr]
            key.public_key().public_numbers(),
        )

    def test_unusableKeyType(self) -> None:
        """
        When the key is of a type that cannot sign (X25519), it is refused.
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import x25519

        path = self.write(
            "x25519.key",
            x25519.X25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        error = self.assertRaises(ConfigurationError, loadPrivateKey, path, "k")
        self.assertEqual(
            str(error),
            f"k: the private key in {path} is a X25519PrivateKey, which cannot sign"
            " for a TLS certificate",
        )

    def test_severalPEMCRLs(self) -> None:
        """
        When a PEM file holds several CRLs with text around them, all are
        returned in file order.
        """
        path = self.write(
            "crls.txt",
            b"root:\n" + pki.crlPEM(self.pki.rootCRL) + b"\nintermediate:\n"
            + pki.crlPEM(self.pki.intermediateCRL) + b"end\n",
        )
        self.assertEqual(loadCRLs(path, "k"), (self.pki.rootCRL, self.pki.intermediateCRL))

    def test_brokenPEMCRL(self) -> None:
        """
        When one PEM CRL block does not parse, the error gives its number.
        """
        path = self.write(
            "broken.crl",
            pki.crlPEM(self.pki.rootCRL)
            + b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        )
        error = self.assertRaises(ConfigurationError, loadCRLs, path, "k")
        self.assertTrue(
            str(error).startswith(f"k: cannot parse CRL 2 in {path}: "), str(error)
        )

    def test_unreadable(self) -> None:
        """
        When a path is a folder, the error says it cannot be read.
        """
        error = self.assertRaises(ConfigurationError, loadCertificates, self.folder, "k")
        self.assertEqual(str(error), f"k: cannot read {self.folder}: Is a directory")

    def test_materialDefaults(self) -> None:
        """
        When L{ListenerMaterial} is built with the contract's four fields,
        C{additional} is empty.
        """
        p = self.pki
        material = ListenerMaterial((p.server.certificate,), p.server.key, (), ())
        self.assertEqual(material.additional, ())
