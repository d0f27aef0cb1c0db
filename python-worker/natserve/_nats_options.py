"""How natserve's Python side reaches a secured NATS: credentials, TLS, redaction.

The same settings as the Rust binaries' (``protocol/src/nats.rs``), with one name each:
a user and password (``nats://user:pw@host:4222``) or a token (``nats://token@host:4222``)
in the URL, ``--nats-creds`` / ``NATSERVE_NATS_CREDS`` (a ``.creds`` file),
``--nats-nkey`` / ``NATSERVE_NATS_NKEY`` (a file holding an nkey seed),
``--nats-tls-ca`` / ``NATSERVE_NATS_TLS_CA`` and, for mutual TLS, ``--nats-tls-cert`` and
``--nats-tls-key``. Every URL that goes into a log line or an error goes through
:func:`redact` first.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Tuple

#: The environment variable of each field of :class:`NatsSecurity`.
ENV = {
    "creds": "NATSERVE_NATS_CREDS",
    "nkey": "NATSERVE_NATS_NKEY",
    "tls_ca": "NATSERVE_NATS_TLS_CA",
    "tls_cert": "NATSERVE_NATS_TLS_CERT",
    "tls_key": "NATSERVE_NATS_TLS_KEY",
}
FLAGS = {name: "--nats-" + name.replace("_", "-") for name in ENV}

# scheme://, then the user info up to the last '@' of the authority.
_USERINFO = re.compile(r"(://)([^/?#,'\"`\s]*)@")


def redact(text: str) -> str:
    """``text`` with the password or token of every URL in it replaced by ``***``."""

    def hide(match: re.Match[str]) -> str:
        user, colon, _ = match.group(2).partition(":")
        return f"{match.group(1)}{user + ':***' if colon else '***'}@"

    return _USERINFO.sub(hide, text)


def has_secret(url: str) -> bool:
    """Whether ``url`` carries a password or a token."""
    return redact(url) != url


@dataclass(frozen=True)
class NatsSecurity:
    """Credential files and TLS for one NATS connection (paths; ``None`` = not used)."""

    creds: Optional[str] = None
    nkey: Optional[str] = None
    tls_ca: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None

    def problem(self, url: Optional[str] = None) -> Optional[Tuple[str, str]]:
        """What is wrong with these settings (with ``url``): the flag and why; else None."""
        if (self.tls_cert is None) != (self.tls_key is None):
            flag = "--nats-tls-cert" if self.tls_key is None else "--nats-tls-key"
            return flag, "--nats-tls-cert and --nats-tls-key go together: give both or neither"
        ways = [
            "a password or token in --nats" if url and has_secret(url) else None,
            "--nats-creds" if self.creds else None,
            "--nats-nkey" if self.nkey else None,
        ]
        given = [w for w in ways if w]
        if len(given) > 1:
            return "--nats", f"give one way to authenticate to nats, not {' and '.join(given)}"
        return None

    def env(self) -> Dict[str, str]:
        """The ``NATSERVE_NATS_*`` variables that hand these settings to a child process."""
        return {
            ENV[f.name]: value for f in fields(self) if (value := getattr(self, f.name)) is not None
        }

    def tls_context(self) -> Optional[ssl.SSLContext]:
        """A client TLS context trusting ``tls_ca`` (else the system's) with the client
        certificate, or None when no TLS setting is given."""
        if self.tls_ca is None and self.tls_cert is None:
            return None
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert is not None:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def connect_options(self) -> Dict[str, Any]:
        """Keyword arguments of ``nats.aio.client.Client.connect`` (nats-py) for these
        settings; a user and password or a token in the URL nats-py reads by itself."""
        options: Dict[str, Any] = {}
        if self.creds is not None:
            options["user_credentials"] = self.creds
        if self.nkey is not None:
            options["nkeys_seed"] = self.nkey
        context = self.tls_context()
        if context is not None:
            options["tls"] = context
        return options
