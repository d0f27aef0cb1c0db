"""Command-line settings of a natserve program: flags, ``NATSERVE_*`` env vars, defaults.

Each flag can also come from the environment variable ``NATSERVE_<NAME>`` (``--max-body-size``
is ``NATSERVE_MAX_BODY_SIZE``); a flag beats its variable, which beats the default. A bad
value exits with status 64 (EX_USAGE, as the Rust binaries do) and one line on stderr
naming the flag. Mosec's flags are accepted too (`MOSEC_FLAGS`): ``--max-request-size``
is ``--max-body-size``, ``--debug`` is ``--log-level debug``, ``--dry-run`` warms every
stage up and exits, and the rest are ignored with a one-line notice saying what natserve
does instead. Any other flag exits 64 naming it (`check_script_flags`), unless the script
parses it itself and lists it in ``NATSERVE_SCRIPT_FLAGS``.

This is the one table of settings: the launcher passes each agent and ingress setting on
to its binary as the same flag, so nothing is reachable only through the environment.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, NoReturn, Optional, Sequence, Tuple

from ._names import NAMESPACE_PATTERN, is_namespace
from ._nats_options import NatsSecurity, redact
from ._version import __version__

ROLES = ("all", "agent", "ingress")
LOG_LEVELS = ("debug", "info", "warning", "error")
STORAGES = ("memory", "file")
#: Most copies JetStream keeps of a stream (``natserve_protocol::replicas::MAX_REPLICAS``).
MAX_REPLICAS = 5

#: Exit status of a bad flag or variable value (sysexits' EX_USAGE), the Rust binaries' too.
EXIT_USAGE = 64

# The Rust binaries keep counts and milliseconds in 64-bit integers.
_MAX_I64 = 2**63 - 1

# What the agent's --prefetch accepts beside "auto": clap's boolish words.
_TRUE = ("true", "yes", "y", "on", "1")
_FALSE = ("false", "no", "n", "off", "0")


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
    max_body_size: int = 10 * 1024 * 1024  # Mosec's --max-request-size default
    log_level: str = "info"
    namespace: str = "natserve"
    max_queue: int = 10_000
    storage: str = "memory"
    replicas: int = 1
    #: "auto" (where it pays, measured), "on" or "off".
    prefetch: str = "auto"
    metrics_address: Optional[str] = None
    heartbeat_ms: int = 2000
    agent_grace_ms: int = 30_000
    ingress_grace_ms: int = 10_000
    max_connections: int = 10_000
    header_read_timeout_ms: int = 30_000
    result_ttl_s: int = 3600
    async_timeout_ms: int = 600_000
    socket_dir: Optional[str] = None
    dry_run: bool = False
    #: Every process's log lines: "text", or "json" (one JSON object per line).
    log_format: str = "text"
    #: Mosec flags given that natserve ignores, for `mosec_flag_notices`.
    mosec_flags: Tuple[str, ...] = ()

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
    """Exits with status 64 after one line on stderr naming ``flag``."""
    line = f"natserve: error: {flag}: {message}".replace("\n", " ")
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse says "argument --port: expected one argument"; keep the flag first.
        message = message.replace("\n", " ")
        if message.startswith("argument "):
            flag, _, rest = message[len("argument ") :].partition(": ")
            fail(flag.split("/")[-1], rest)
        print(f"natserve: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USAGE)


def _int_at_least(minimum: int, maximum: Optional[int] = None) -> Callable[[str], int]:
    def convert(raw: str) -> int:
        if not re.fullmatch(r"\s*[0-9]+\s*", raw):
            raise ValueError(f"invalid int value {raw!r}")
        value = int(raw)
        too_big = maximum is not None and value > maximum
        if value < minimum or too_big:
            # A 64-bit limit is worth naming only to whoever went past it.
            shown = maximum is not None and (too_big or maximum < _MAX_I64)
            upper = f" and <= {maximum}" if shown else ""
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


def _prefetch(raw: str) -> str:
    value = raw.strip().lower()
    if value == "auto":
        return value
    if value in _TRUE:
        return "on"
    if value in _FALSE:
        return "off"
    raise ValueError(f"invalid value {raw!r} (choose from auto, on, off)")


def _socket_address(raw: str) -> str:
    """``IP:PORT`` as Rust's ``SocketAddr`` parses it (``[::1]:9100`` for IPv6)."""
    wanted = "expected IP:PORT, like 0.0.0.0:9100 or [::]:9100"
    host, sep, port = raw.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host, version = host[1:-1], 6
    else:
        version = 4
    try:
        valid = bool(sep) and ipaddress.ip_address(host).version == version
    except ValueError:
        valid = False
    if not valid or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"invalid address {raw!r}: {wanted}")
    return raw.strip()


def _directory(raw: str) -> str:
    value = raw.strip()
    if not value or "\0" in value:
        raise ValueError(f"invalid directory {raw!r}: must be a non-empty path")
    if os.path.exists(value) and not os.path.isdir(value):
        raise ValueError(f"invalid directory {raw!r}: it exists and is not a directory")
    return value


@dataclass(frozen=True)
class _Option:
    flag: str
    convert: Callable[[str], Any]
    help: str
    metavar: str
    aliases: Tuple[str, ...] = ()

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
    _Option(
        "--max-body-size",
        _int_at_least(1),
        "largest request body in bytes (Mosec's --max-request-size)",
        "BYTES",
        aliases=("--max-request-size",),
    ),
    _Option("--log-level", _choice(LOG_LEVELS), "debug, info, warning or error", "LEVEL"),
    _Option("--namespace", _namespace, "prefix of every NATS name this service uses", "NS"),
    _Option(
        "--max-queue",
        _int_at_least(1, _MAX_I64),
        "agent: most requests a stage's queue holds before new ones get 429",
        "N",
    ),
    _Option("--storage", _choice(STORAGES), "agent: stage queues in memory or file", "KIND"),
    _Option(
        "--replicas",
        _int_at_least(1, MAX_REPLICAS),
        "servers of a JetStream cluster keeping a copy of every queue and bucket (with "
        "--nats naming the cluster's servers)",
        "N",
    ),
    _Option(
        "--prefetch",
        _prefetch,
        "agent: pull each worker's next batch while it runs the current one: auto (where "
        "the measured batch time is short next to a pull), on or off",
        "MODE",
    ),
    _Option(
        "--metrics-address",
        _socket_address,
        "agent: serve its /metrics and /ready on IP:PORT; off when unset",
        "ADDR",
    ),
    _Option(
        "--heartbeat-ms",
        _int_at_least(100, _MAX_I64),
        "agent: how often it refreshes its registration, ms",
        "MS",
    ),
    _Option(
        "--agent-grace-ms",
        _int_at_least(0, _MAX_I64),
        "agent: on SIGTERM, how long running batches may take to finish, ms",
        "MS",
    ),
    _Option(
        "--ingress-grace-ms",
        _int_at_least(0, _MAX_I64),
        "ingress: on SIGTERM, how long in-flight requests may take, ms",
        "MS",
    ),
    _Option(
        "--max-connections",
        _int_at_least(1, _MAX_I64),
        "ingress: most HTTP connections open at once; more wait for a free one",
        "N",
    ),
    _Option(
        "--header-read-timeout-ms",
        _int_at_least(1, _MAX_I64),
        "ingress: close a connection whose request headers are not in by then (slowloris), "
        "idle keep-alive connections too, ms",
        "MS",
    ),
    _Option(
        "--result-ttl-s",
        _int_at_least(1, 7 * 24 * 3600),
        "ingress: how long an asynchronous job's result is kept once finished, s",
        "S",
    ),
    _Option(
        "--async-timeout-ms",
        _int_at_least(1, _MAX_I64),
        "ingress: deadline of an asynchronous job (Prefer: respond-async), ms; at most "
        "--result-ttl-s",
        "MS",
    ),
    _Option(
        "--socket-dir",
        _directory,
        "agent: directory of the workers' Unix sockets; a fresh temporary one when unset",
        "DIR",
    ),
    _Option(
        "--log-format",
        _choice(("text", "json")),
        "every process's log lines: text, or json (one JSON object per line)",
        "FORMAT",
    ),
]


def _default_text(opt: _Option) -> str:
    value = getattr(Settings(), opt.dest)
    if isinstance(value, bool):
        return str(value).lower()
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
            *opt.aliases,
            dest=opt.dest,
            default=None,
            metavar=opt.metavar,
            help=f"{opt.help} (default: {_default_text(opt)}; env {opt.env})",
        )
    _add_mosec_flags(parser)
    # Prints and exits 0 before anything starts.
    parser.add_argument("--version", action="version", version=f"natserve {__version__}")
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
        mosec_env = MOSEC_ENV.get(opt.dest, "")
        if raw is None and env.get(mosec_env):
            raw, source = env[mosec_env], f" (from {mosec_env})"
        if raw is None:
            continue
        try:
            values[opt.dest] = opt.convert(raw)
        except ValueError as err:
            fail(opt.flag, f"{err}{source}")
    given = [flag for flag in MOSEC_FLAGS if getattr(namespace, _mosec_dest(flag)) is not None]
    given += [f for f in ("--debug", "--dry-run") if f not in given and _truthy(env, f)]
    if "--debug" in given and "log_level" not in values:
        values["log_level"] = "debug"
    ttl_s = values.get("result_ttl_s", Settings.result_ttl_s)
    if values.get("async_timeout_ms", Settings.async_timeout_ms) > ttl_s * 1000:
        fail(
            "--async-timeout-ms",
            f"must not exceed --result-ttl-s ({ttl_s} s): a job's pending record must "
            "outlive its deadline",
        )
    if values.get("replicas", 1) > 1 and values.get("nats") is None:
        fail(
            "--replicas",
            "more than one copy needs a JetStream cluster: give its servers with --nats "
            "(the nats-server started without --nats is a single server)",
        )
    values["dry_run"] = "--dry-run" in given
    values["mosec_flags"] = tuple(f for f in given if f not in ("--debug", "--dry-run"))
    return Settings(**values), rest


#: Mosec's variables for the settings that mean the same in natserve, read after
#: ``NATSERVE_*`` (``MOSEC_NAMESPACE`` is not: Mosec's namespace prefixes metric names).
MOSEC_ENV: Mapping[str, str] = {
    "port": "MOSEC_PORT",
    "address": "MOSEC_ADDRESS",
    "timeout": "MOSEC_TIMEOUT",
    "log_level": "MOSEC_LOG_LEVEL",
    "max_body_size": "MOSEC_MAX_REQUEST_SIZE",
}


def _truthy(env: Mapping[str, str], flag: str) -> bool:
    """``MOSEC_DEBUG`` / ``MOSEC_DRY_RUN`` set to a true value (Mosec reads them too)."""
    return env.get("MOSEC_" + flag[2:].replace("-", "_").upper(), "").lower() in _TRUE


#: Mosec 0.9's flags that are not natserve's: whether each takes a value, and what
#: natserve does instead. ``--debug`` and ``--dry-run`` are implemented.
MOSEC_FLAGS: Mapping[str, Tuple[bool, str]] = {
    "--path": (True, "natserve's agent keeps worker sockets in --socket-dir"),
    "--capacity": (True, "each stage's queue holds --max-queue requests before 429"),
    "--wait": (True, "set max_wait_time on append_worker (Mosec deprecated --wait too)"),
    "--compression": (
        False,
        "always on: the ingress takes gzip/zstd request bodies and compresses responses "
        "when the client sends Accept-Encoding",
    ),
    "--debug": (False, "same as --log-level debug"),
    "--dry-run": (False, "builds and warms up every stage once, then exits"),
}


def _mosec_dest(flag: str) -> str:
    return "mosec_" + flag[2:].replace("-", "_")


def _add_mosec_flags(parser: argparse.ArgumentParser) -> None:
    for flag, (takes_value, instead) in MOSEC_FLAGS.items():
        kind = {"metavar": "X"} if takes_value else {"action": "store_const", "const": True}
        parser.add_argument(
            flag, dest=_mosec_dest(flag), default=None, help=f"Mosec's; {instead}", **kind
        )


def mosec_flag_notices(settings: Settings) -> List[str]:
    """One line per ignored Mosec flag given, saying what natserve does instead."""
    return [
        f"{flag} is Mosec's and has no effect in natserve: {MOSEC_FLAGS[flag][1]}"
        for flag in settings.mosec_flags
    ]


#: Flags the user's script parses itself (comma-separated; ``*``: every unknown flag).
SCRIPT_FLAGS_ENV = "NATSERVE_SCRIPT_FLAGS"


def check_script_flags(rest: Sequence[str], env: Optional[Mapping[str, str]] = None) -> None:
    """Exits 64 naming the first flag in ``rest`` that is neither natserve's nor Mosec's
    nor listed in ``NATSERVE_SCRIPT_FLAGS``; plain arguments (no leading ``-``) pass."""
    env = os.environ if env is None else env
    allowed = {f.strip() for f in env.get(SCRIPT_FLAGS_ENV, "").split(",") if f.strip()}
    if "*" in allowed:
        return
    for arg in rest:
        if arg == "--":
            return  # what follows is the script's, as argparse has it
        if not arg.startswith("-") or arg == "-" or re.fullmatch(r"-[0-9.]+", arg):
            continue
        flag = arg.split("=", 1)[0]
        if flag not in allowed:
            fail(
                flag,
                "unknown flag: not one of natserve's or Mosec's (see --help); if your "
                f"script parses it itself, list it in {SCRIPT_FLAGS_ENV} "
                f"(like {SCRIPT_FLAGS_ENV}={flag}, or * for every unknown flag)",
            )
