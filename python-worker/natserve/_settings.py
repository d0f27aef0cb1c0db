"""Command-line settings of a natserve program: flags, ``NATSERVE_*`` env vars, defaults.

Each flag can also come from the environment variable ``NATSERVE_<NAME>`` (``--max-body-size``
is ``NATSERVE_MAX_BODY_SIZE``); a flag beats its variable, which beats the default. A bad
value exits with status 2 and one line on stderr naming the flag. Arguments that are not
natserve flags are left alone, so a user's script can parse its own.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, NoReturn, Optional, Sequence, Tuple

from ._names import NAMESPACE_PATTERN, is_namespace
from ._nats_options import NatsSecurity, redact

ROLES = ("all", "agent", "ingress")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Settings:
    """What the launcher (and, for the log level, a worker process) runs with."""

    port: int = 8000
    address: str = "0.0.0.0"
    nats: Optional[str] = None
    nats_creds: Optional[str] = None
    nats_nkey: Optional[str] = None
    nats_tls_ca: Optional[str] = None
    nats_tls_cert: Optional[str] = None
    nats_tls_key: Optional[str] = None
    role: str = "all"
    stages: Optional[Tuple[str, ...]] = None
    timeout: int = 3000
    max_body_size: int = 8 * 1024 * 1024
    log_level: str = "info"
    namespace: str = "natserve"

    @property
    def nats_security(self) -> NatsSecurity:
        return NatsSecurity(
            creds=self.nats_creds,
            nkey=self.nats_nkey,
            tls_ca=self.nats_tls_ca,
            tls_cert=self.nats_tls_cert,
            tls_key=self.nats_tls_key,
        )

    @property
    def runs_agent(self) -> bool:
        return self.role in ("all", "agent")

    @property
    def runs_ingress(self) -> bool:
        return self.role in ("all", "ingress")


def fail(flag: str, message: str) -> NoReturn:
    """Exits with status 2 after one line on stderr naming ``flag``."""
    line = f"natserve: error: {flag}: {message}".replace("\n", " ")
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse says "argument --port: expected one argument"; keep the flag first.
        message = message.replace("\n", " ")
        if message.startswith("argument "):
            flag, _, rest = message[len("argument ") :].partition(": ")
            fail(flag.split("/")[-1], rest)
        print(f"natserve: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def _int_at_least(minimum: int, maximum: Optional[int] = None) -> Callable[[str], int]:
    def convert(raw: str) -> int:
        if not re.fullmatch(r"\s*[0-9]+\s*", raw):
            raise ValueError(f"invalid int value {raw!r}")
        value = int(raw)
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and <= {maximum}" if maximum is not None else ""
            raise ValueError(f"invalid value {raw!r}: must be >= {minimum}{upper}")
        return value

    return convert


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def convert(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"invalid choice {raw!r} (choose from {', '.join(choices)})")
        return value

    return convert


def _token(raw: str) -> str:
    value = raw.strip()
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"invalid value {raw!r}: must be non-empty without spaces")
    return value


def _nats_url(raw: str) -> str:
    value = raw.strip()
    if not value or any(c.isspace() for c in value):
        # The URL may carry a password: the message shows it redacted.
        raise ValueError(f"invalid value {redact(raw)!r}: must be non-empty without spaces")
    return value


def _file(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("invalid value '': expected the path of a file")
    if not os.path.isfile(value) or not os.access(value, os.R_OK):
        raise ValueError(f"{value!r} is not a readable file")
    return value


def _namespace(raw: str) -> str:
    if not is_namespace(raw):
        raise ValueError(f"invalid namespace {raw!r}: must match {NAMESPACE_PATTERN}")
    return raw


def _stage_list(raw: str) -> Tuple[str, ...]:
    items = tuple(part.strip() for part in raw.split(",") if part.strip())
    if not items:
        raise ValueError(f"invalid value {raw!r}: expected a comma-separated list of stages")
    return items


@dataclass(frozen=True)
class _Option:
    flag: str
    convert: Callable[[str], Any]
    help: str
    metavar: str

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    @property
    def env(self) -> str:
        return "NATSERVE_" + self.dest.upper()


_OPTIONS: List[_Option] = [
    _Option("--port", _int_at_least(0, 65535), "HTTP port of the ingress", "PORT"),
    _Option("--address", _token, "HTTP address the ingress binds", "ADDR"),
    _Option(
        "--nats",
        _nats_url,
        "NATS server URL, may carry user:password@ or token@ (set it in the environment "
        "then: a command line is visible to every user); without it a local nats-server "
        "is started",
        "URL",
    ),
    _Option("--nats-creds", _file, "NATS credentials (.creds) file", "FILE"),
    _Option("--nats-nkey", _file, "file holding the nkey seed to authenticate with", "FILE"),
    _Option("--nats-tls-ca", _file, "CA certificate (PEM) of the NATS server; TLS on", "FILE"),
    _Option("--nats-tls-cert", _file, "client certificate (PEM) for mutual TLS", "FILE"),
    _Option("--nats-tls-key", _file, "private key (PEM) of --nats-tls-cert", "FILE"),
    _Option("--role", _choice(ROLES), "what this process runs: all, agent or ingress", "ROLE"),
    _Option(
        "--stages",
        _stage_list,
        "stages this agent hosts: comma list of worker class names or <route>:<index>; "
        "all stages of all routes when unset",
        "LIST",
    ),
    _Option("--timeout", _int_at_least(1), "end-to-end request timeout in ms", "MS"),
    _Option("--max-body-size", _int_at_least(1), "largest request body in bytes", "BYTES"),
    _Option("--log-level", _choice(LOG_LEVELS), "debug, info, warning or error", "LEVEL"),
    _Option("--namespace", _namespace, "prefix of every NATS name this service uses", "NS"),
]


def _default_text(opt: _Option) -> str:
    value = getattr(Settings(), opt.dest)
    return "none" if value is None else str(value)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog or os.path.basename(sys.argv[0]) or "natserve",
        description="Serve the workers of this program over HTTP through NATS JetStream.",
        allow_abbrev=False,
    )
    for opt in _OPTIONS:
        parser.add_argument(
            opt.flag,
            dest=opt.dest,
            default=None,
            metavar=opt.metavar,
            help=f"{opt.help} (default: {_default_text(opt)}; env {opt.env})",
        )
    return parser


def parse_settings(
    argv: Sequence[str], env: Optional[Mapping[str, str]] = None
) -> Tuple[Settings, List[str]]:
    """Settings from ``argv`` and ``env`` (``os.environ`` when None), and the unknown argv."""
    env = os.environ if env is None else env
    parser = build_parser()
    namespace, rest = parser.parse_known_args(list(argv))
    values = {}
    for opt in _OPTIONS:
        raw: Optional[str] = getattr(namespace, opt.dest)
        source = ""
        if raw is None and env.get(opt.env):
            raw, source = env[opt.env], f" (from {opt.env})"
        if raw is None:
            continue
        try:
            values[opt.dest] = opt.convert(raw)
        except ValueError as err:
            fail(opt.flag, f"{err}{source}")
    return Settings(**values), rest
