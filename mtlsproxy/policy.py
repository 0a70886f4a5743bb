# -*- test-case-name: tests.test_policy -*-
"""
TLS policies: which protocol versions, cipher suites and key exchange
groups a listener accepts.

A listener names a built-in policy (C{tls_policy = "tls12_modern"}, the
default) and may override parts of it with explicit keys (C{min_version},
C{max_version}, C{ciphers}, C{ciphersuites}, C{groups}).  L{POLICIES} is the
table of built-in policies, documented in C{docs/tls-policies.md};
L{listenerPolicy} merges a listener's keys into the L{TLSPolicy} its
contexts are built with (L{mtlsproxy.tlscontext}), and L{policyProblem}
checks at load time that OpenSSL accepts the result, so that a typo in a
cipher name is a configuration error naming the key rather than a failure
when the first client connects.

Nothing here holds state; building a scratch context to check a policy is
the only work done, and only when a configuration is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Mapping, Optional

import attrs

if TYPE_CHECKING:
    from OpenSSL import SSL

__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "TLS_VERSIONS",
    "TLSPolicy",
    "listenerPolicy",
    "policyProblem",
    "setGroups",
]

TLS_VERSIONS: Final = ("1.2", "1.3")
"""
The protocol versions a listener can accept, as written in the
configuration (C{min_version = "1.2"}).  Older versions are not offered.
"""

_AEAD_ECDHE: Final = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

_CBC_SHA2_ECDHE: Final = (
    "ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256:"
    "ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES256-SHA384"
)

_TLS13_SUITES: Final = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"


@attrs.frozen
class TLSPolicy:
    """
    What a listener accepts from clients.

    @ivar name: The policy's name (for logs and status); a built-in name, or
        C{"<built-in>+custom"} when a listener overrides part of one.
    @ivar minVersion: The oldest protocol version, one of L{TLS_VERSIONS}.
    @ivar maxVersion: The newest protocol version, one of L{TLS_VERSIONS}.
    @ivar ciphers: The TLS 1.2 cipher list, an OpenSSL cipher string in the
        server's order of preference.
    @ivar ciphersuites: The TLS 1.3 cipher suites, colon separated, in order
        of preference.
    @ivar groups: The key exchange groups (C{"X25519"}, C{"P-256"}), in
        order of preference; empty for OpenSSL's defaults (which include the
        hybrid post-quantum groups where OpenSSL has them).
    @ivar description: One line for the documentation table.
    """

    name: str
    minVersion: str
    maxVersion: str
    ciphers: str
    ciphersuites: str
    groups: tuple[str, ...] = ()
    description: str = ""


POLICIES: Final[Mapping[str, TLSPolicy]] = {
    "tls13_only": TLSPolicy(
        name="tls13_only",
        minVersion="1.3",
        maxVersion="1.3",
        ciphers=_AEAD_ECDHE,
        ciphersuites=_TLS13_SUITES,
        description="TLS 1.3 only: for clients you control.",
    ),
    "tls12_modern": TLSPolicy(
        name="tls12_modern",
        minVersion="1.2",
        maxVersion="1.3",
        ciphers=_AEAD_ECDHE,
        ciphersuites=_TLS13_SUITES,
        description=(
            "TLS 1.2 and 1.3; TLS 1.2 with ECDHE key exchange and AEAD ciphers only"
            " (the default)."
        ),
    ),
    "tls12_compat": TLSPolicy(
        name="tls12_compat",
        minVersion="1.2",
        maxVersion="1.3",
        ciphers=_AEAD_ECDHE + ":" + _CBC_SHA2_ECDHE,
        ciphersuites=_TLS13_SUITES,
        description=(
            "tls12_modern plus ECDHE with AES-CBC and SHA-256/SHA-384 for older"
            " TLS 1.2 clients; still no RSA key exchange, 3DES, RC4 or SHA-1 suites."
        ),
    ),
}
"""
The built-in policies by name.
"""

DEFAULT_POLICY: Final = "tls12_modern"
"""
The policy of a listener that does not name one.
"""


def listenerPolicy(listener: Any) -> TLSPolicy:
    """
    The policy a listener's contexts are built with: its C{tls_policy} with
    the explicit C{min_version}, C{max_version}, C{ciphers},
    C{ciphersuites} and C{groups} keys, where set, taking precedence.

    @param listener: A L{mtlsproxy.config.ListenerConfig} (or anything with
        those attributes; missing ones count as not set).

    @raise KeyError: If C{tls_policy} names no built-in policy (the
        configuration loader refuses that earlier).
    """
    base = POLICIES[getattr(listener, "tls_policy", DEFAULT_POLICY)]
    overrides: dict[str, Any] = {}
    for attribute, key in (
        ("minVersion", "min_version"),
        ("maxVersion", "max_version"),
        ("ciphers", "ciphers"),
        ("ciphersuites", "ciphersuites"),
        ("groups", "groups"),
    ):
        value = getattr(listener, key, None)
        if value is not None:
            overrides[attribute] = tuple(value) if attribute == "groups" else value
    if not overrides:
        return base
    return attrs.evolve(base, name=f"{base.name}+custom", **overrides)


def setGroups(context: SSL.Context, groups: tuple[str, ...]) -> bool:
    """
    Set the key exchange groups of C{context}, in order of preference.

    pyOpenSSL has no wrapper for C{SSL_CTX_set1_groups_list}; its binding
    has the older name of the same OpenSSL function,
    C{SSL_CTX_set1_curves_list}, which takes the same list (C{"X25519"},
    C{"P-256"}, C{"secp384r1"}, C{"X25519MLKEM768"}, ...).

    @return: Whether OpenSSL accepted every name.
    """
    from OpenSSL._util import lib

    setList = getattr(lib, "SSL_CTX_set1_groups_list", None) or lib.SSL_CTX_set1_curves_list
    return bool(setList(context._context, ":".join(groups).encode("ascii")))  # type: ignore[attr-defined]


def _unmatchedCipher(ciphers: str) -> Optional[str]:
    """
    The first element of an OpenSSL cipher string that matches no cipher
    (a typo OpenSSL would silently skip), or L{None}.  Elements that remove
    or reorder ciphers (C{!x}, C{-x}, C{+x}, C{@STRENGTH}) are not checked.
    """
    from OpenSSL import SSL

    for element in ciphers.replace(",", ":").replace(" ", ":").split(":"):
        if not element or element[0] in "!-+@":
            continue
        scratch = SSL.Context(SSL.TLS_METHOD)
        try:
            scratch.set_cipher_list(element.encode("ascii"))
        except (SSL.Error, UnicodeEncodeError):
            return element
    return None


def policyProblem(policy: TLSPolicy) -> Optional[tuple[str, str]]:
    """
    Check that OpenSSL accepts C{policy}.

    @return: L{None}, or C{(key, problem)}: the configuration key at fault
        (C{"ciphers"}, C{"ciphersuites"}, C{"groups"}, C{"min_version"}) and
        what is wrong with it.
    """
    from OpenSSL import SSL

    if TLS_VERSIONS.index(policy.minVersion) > TLS_VERSIONS.index(policy.maxVersion):
        return (
            "min_version",
            f"min_version {policy.minVersion} is newer than max_version {policy.maxVersion}",
        )
    context = SSL.Context(SSL.TLS_METHOD)
    unmatched = _unmatchedCipher(policy.ciphers)
    if unmatched is not None:
        return ("ciphers", f"no TLS 1.2 cipher matches {unmatched!r}")
    try:
        context.set_cipher_list(policy.ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        return ("ciphers", f"no TLS 1.2 cipher matches {policy.ciphers!r}")
    for suite in policy.ciphersuites.split(":"):
        scratch = SSL.Context(SSL.TLS_METHOD)
        try:
            scratch.set_tls13_ciphersuites(suite.encode("ascii"))
        except (SSL.Error, UnicodeEncodeError):
            return (
                "ciphersuites",
                f"unknown TLS 1.3 cipher suite {suite!r}; OpenSSL knows"
                f" {_TLS13_SUITES.replace(':', ', ')}, TLS_AES_128_CCM_SHA256",
            )
    for group in policy.groups:
        if not setGroups(SSL.Context(SSL.TLS_METHOD), (group,)):
            return (
                "groups",
                f"unknown key exchange group {group!r}; for example X25519, P-256,"
                " P-384, X25519MLKEM768",
            )
    return None
