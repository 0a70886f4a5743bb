# -*- test-case-name: tests.test_sni -*-
"""
Choosing a listener's server certificate by the name the client asks for
(Server Name Indication).

Each C{[[listeners.certificates]]} entry answers for the DNS names in its
certificate's subjectAltName: exact names (C{api.example.com}) and
one-label wildcards (C{*.example.com} matches C{api.example.com}, not
C{example.com} nor C{a.b.example.com}), compared case-insensitively.  An
exact name beats a wildcard whatever their order; otherwise the first entry
in the configuration wins.  A client that sends no name, or one no entry
answers for, gets the default entry (C{default = true}, else the first),
unless the listener has C{strict_sni = true}: then an unknown name is
refused with an C{unrecognized_name} alert.

L{SiteTable} is the pure lookup; L{installServerNameCallback} hooks a
decision function into OpenSSL.  What is done with the choice (switching
the connection's context I{and} its verification) is
L{mtlsproxy.tlscontext}'s job.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterable, Optional, TypeVar

from OpenSSL import SSL
from twisted.logger import Logger

__all__ = [
    "SiteTable",
    "installServerNameCallback",
    "nameMatches",
    "normalizeServerName",
]

_Site = TypeVar("_Site")

log = Logger()

_UNRECOGNIZED_NAME = 112
"""
The TLS alert C{unrecognized_name} (RFC 6066, section 3).
"""

_INTERNAL_ERROR = 80
"""
The TLS alert C{internal_error}.
"""


def normalizeServerName(raw: Optional[bytes | str]) -> Optional[str]:
    """
    The server name a client sent, as compared with certificate names: ASCII
    (IDNA names arrive in their C{xn--} form), lower case, without a final
    dot; L{None} for no name or one that is not ASCII.
    """
    if raw is None:
        return None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            return None
    name = raw.strip().rstrip(".").lower()
    return name or None


def nameMatches(pattern: str, name: str) -> bool:
    """
    Does certificate name C{pattern} answer for server name C{name}?

    Both are compared case-insensitively.  A pattern C{*.example.com}
    stands for exactly one leftmost label: it matches C{api.example.com},
    not C{example.com} nor C{a.b.example.com}.  Partial-label wildcards
    (C{api*.example.com}) are not honoured, as in current browsers.
    """
    pattern = pattern.lower().rstrip(".")
    name = name.lower().rstrip(".")
    if not pattern.startswith("*."):
        return "*" not in pattern and pattern == name
    label, _, rest = name.partition(".")
    return bool(label) and bool(rest) and "*" not in rest and rest == pattern[2:]


class SiteTable(Generic[_Site]):
    """
    Which site (certificate entry) answers for which server name.

    @ivar default: The site for clients without a name or with an unknown
        one (when not strict).
    @ivar strict: Refuse unknown names instead of falling back to
        C{default}.
    """

    def __init__(
        self,
        sites: Iterable[tuple[Iterable[str], _Site]],
        default: _Site,
        strict: bool = False,
    ) -> None:
        """
        @param sites: C{(names, site)} in configuration order; C{names} are
            certificate names (exact or C{*.} wildcards).
        """
        self.default = default
        self.strict = strict
        self._exact: dict[str, _Site] = {}
        self._wildcards: dict[str, _Site] = {}
        for names, site in sites:
            for pattern in names:
                pattern = pattern.lower().rstrip(".")
                if pattern.startswith("*."):
                    self._wildcards.setdefault(pattern[2:], site)
                elif "*" not in pattern:
                    self._exact.setdefault(pattern, site)

    def select(self, serverName: Optional[str]) -> Optional[_Site]:
        """
        The site for C{serverName} (already normalized, see
        L{normalizeServerName}): an exact match, else a wildcard match, else
        the default, or L{None} for an unknown name when strict.  No name
        at all always gets the default.
        """
        if serverName is None:
            return self.default
        site = self._exact.get(serverName)
        if site is not None:
            return site
        label, _, rest = serverName.partition(".")
        if label and rest:
            site = self._wildcards.get(rest)
            if site is not None:
                return site
        return None if self.strict else self.default


def installServerNameCallback(
    context: SSL.Context, decide: Callable[[SSL.Connection], bool]
) -> None:
    """
    Call C{decide(connection)} for every ClientHello on C{context}, with or
    without a server name.

    pyOpenSSL's C{set_tlsext_servername_callback} cannot refuse a
    handshake with a chosen alert (it prints a traceback for an exception
    and then refuses); this sets OpenSSL's callback directly through
    pyOpenSSL's binding, as L{mtlsproxy.verify} does for
    C{X509_verify_cert_error_string}.

    @param decide: Returns C{True} to go on, C{False} to refuse the
        handshake with an C{unrecognized_name} alert.  An exception is
        logged and refuses it with C{internal_error}.
    """
    from OpenSSL._util import ffi, lib

    def callback(ssl: object, alert: object, arg: object) -> int:
        try:
            connection = SSL.Connection._reverse_mapping[ssl]  # type: ignore[attr-defined]
            if decide(connection):
                return int(lib.SSL_TLSEXT_ERR_OK)
            alert[0] = _UNRECOGNIZED_NAME  # type: ignore[index]
        except BaseException:
            log.failure("Server name callback failed")
            alert[0] = _INTERNAL_ERROR  # type: ignore[index]
        return int(lib.SSL_TLSEXT_ERR_ALERT_FATAL)

    handle = ffi.callback("int (*)(SSL *, int *, void *)", callback)
    # The context keeps the C callback alive as long as OpenSSL may call it:
    # connections hold their context, and every site context gets one.
    context._mtlsproxyServerNameCallback = handle  # type: ignore[attr-defined]
    lib.SSL_CTX_set_tlsext_servername_callback(context._context, handle)  # type: ignore[attr-defined]
