"""natserve on a NATS server with authentication on: the README's least-privilege file,
verbatim, one user per role. Requests succeed with each role's own user; another user can
neither read replies or work nor forge an answer; an anonymous client cannot connect;
no password ever reaches a log or a command line; TLS (mutual) and nkeys work too."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import re
import secrets
import shutil
import subprocess
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import nats
import nats.errors
import pytest

from harness import EXAMPLES, REPO, Cluster, free_port, http, wait_for_port, wait_ready
from natserve import Client
from natserve._binaries import find
from natserve.errors import UnavailableError

PIPELINE = EXAMPLES / "pipeline.py"
LEAST_PRIVILEGE = REPO / "deploy" / "nats" / "least-privilege.conf"
ROLES = ("ingress", "agent", "client")


@dataclass
class Secured:
    """A nats-server running the least-privilege file, and a pipeline served through it."""

    port: int
    passwords: Dict[str, str]
    base: str = ""

    def url(self, role: str, password: Optional[str] = None) -> str:
        return f"nats://{role}:{password or self.passwords[role]}@127.0.0.1:{self.port}"

    @property
    def anonymous(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


def start_nats(cluster: Cluster, body: str, env: Optional[Dict[str, str]] = None) -> int:
    port = free_port()
    conf = cluster.tmp / "nats.conf"
    conf.write_text(
        f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{cluster.tmp}/js" }}\n{body}'
    )
    cluster.start([find("nats-server"), "-c", str(conf)], "nats", env)
    wait_for_port(port)
    return port


def serve(cluster: Cluster, env: Dict[str, Dict[str, str]], *flags: str) -> str:
    """The two-stage example as an agent process and an ingress process, each given its
    NATS settings only through its environment, as a user would (README)."""
    cluster.app(PIPELINE, "--role", "agent", *flags, name="agent", env=env["agent"])
    port = free_port()
    proc = cluster.app(
        PIPELINE,
        "--role",
        "ingress",
        "--port",
        str(port),
        "--address",
        "127.0.0.1",
        *flags,
        name="ingress",
        env=env["ingress"],
    )
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, proc)
    return base


@pytest.fixture
def secured(cluster: Cluster) -> Iterator[Secured]:
    shutil.copyfile(LEAST_PRIVILEGE, cluster.tmp / "least-privilege.conf")
    passwords = {role: f"pw-{role}-{secrets.token_hex(8)}" for role in ROLES}
    env = {f"NATSERVE_NATS_{r.upper()}_PASSWORD": pw for r, pw in passwords.items()}
    s = Secured(start_nats(cluster, 'include "least-privilege.conf"\n', env), passwords)
    s.base = serve(cluster, {r: {"NATSERVE_NATS": s.url(r)} for r in ("agent", "ingress")})
    yield s


def post(base: str, x: int) -> Any:
    r = http("POST", base + "/inference", json.dumps({"x": x}).encode())
    assert r.status == 200, r
    return r.json()


def nats_log(cluster: Cluster) -> str:
    return (cluster.tmp / "nats.log").read_text(errors="replace")


def command_lines() -> List[str]:
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):  # the process ended meanwhile
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return lines


def test_the_readme_includes_the_least_privilege_file_verbatim() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```text\n# natserve on a secured NATS.*?```", readme, re.DOTALL)
    assert len(blocks) == 1, "the README shows deploy/nats/least-privilege.conf once"
    assert blocks[0][len("```text\n") : -len("```")] == LEAST_PRIVILEGE.read_text()


def test_each_role_with_its_own_user_serves_requests_and_no_secret_is_shown(
    cluster: Cluster, secured: Secured
) -> None:
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda x: post(secured.base, x), range(32)))
    assert [a["y"] for a in answers] == [2 * x for x in range(32)]

    async def through_nats() -> bytes:
        url = secured.url("client")
        async with Client(url, client_id="client", connect_timeout=10) as client:
            return await client.request(b'{"x": 5}', timeout=10)

    assert json.loads(asyncio.run(through_nats()))["y"] == 10

    # A body over the server's 1 MB max_payload goes through the payloads object store,
    # from the ingress and from a client, to the agent, which deletes it.
    large = json.dumps({"x": 3, "pad": "p" * (2 * 1024 * 1024)}).encode()
    r = http("POST", secured.base + "/inference", large, timeout=30)
    assert (r.status, r.json()["y"]) == (200, 6), r  # type: ignore[index]

    async def large_through_nats() -> bytes:
        url = secured.url("client")
        async with Client(url, client_id="client", connect_timeout=10) as client:
            return await client.request(large, timeout=10)

    assert json.loads(asyncio.run(large_through_nats()))["y"] == 6
    # The file grants each role all it needs: the server refused nothing.
    assert "Permissions Violation" not in nats_log(cluster)
    # Passwords are in no log and on no command line (every user can read those).
    cluster.procs[-1].stop()  # the ingress logs its shutdown too
    logs = [p.output() for p in cluster.procs]
    assert any("nats://agent:***@127.0.0.1" in log for log in logs), logs
    for pw in secured.passwords.values():
        assert not [log for log in logs if pw in log]
        assert not [line for line in command_lines() if pw in line]


async def collect_errors(url: str) -> Any:
    errors: List[str] = []

    async def on_error(err: Exception) -> None:
        errors.append(str(err))

    nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False, connect_timeout=5)
    return nc, errors


async def wait_for(errors: List[str], count: int) -> None:
    for _ in range(100):
        if len(errors) >= count:
            return
        await asyncio.sleep(0.05)


def test_other_users_can_neither_read_work_and_replies_nor_forge_answers(
    cluster: Cluster, secured: Secured
) -> None:
    seen: List[str] = []

    async def attack() -> List[str]:
        nc, errors = await collect_errors(secured.url("client"))

        async def forge(msg: Any) -> None:
            # What an anonymous client could do before: answer each request first.
            seen.append(msg.subject)
            reply_to = (msg.headers or {}).get("X-Reply-To")
            if reply_to:
                await nc.publish(reply_to, b'{"forged": true}', headers={"X-Status": "ok"})

        for subject in (
            "natserve.reply.>",
            "natserve.work.>",
            "natserve.work.inference.0",
            "natserve.inbox.agent.>",
            "natserve.inbox.ingress.>",
            "_INBOX.>",
            ">",
        ):
            await nc.subscribe(subject, cb=forge)
        await nc.flush()
        await wait_for(errors, 7)
        # A forged answer straight to a reply subject is refused too.
        await nc.publish(
            "natserve.reply.someingress.somerequest", b"forged", headers={"X-Status": "ok"}
        )
        await nc.flush()
        await wait_for(errors, 8)
        answers = await asyncio.get_running_loop().run_in_executor(
            None, lambda: [post(secured.base, x) for x in range(8)]
        )
        assert [a["y"] for a in answers] == [2 * x for x in range(8)]
        await nc.close()
        return errors

    errors = asyncio.run(attack())
    assert seen == []
    assert len(errors) >= 8, errors
    assert all("permissions violation" in e.lower() for e in errors), errors
    log = nats_log(cluster)
    assert 'Subscription Violation - Subject "natserve.reply.>"' in log, log[-3000:]
    assert 'Publish Violation - Subject "natserve.reply.someingress.somerequest"' in log

    async def ingress_publishes_a_reply() -> List[str]:
        # Only agents answer: not even the ingress user may publish a reply.
        nc, errors = await collect_errors(secured.url("ingress"))
        await nc.publish("natserve.reply.x.y", b"forged", headers={"X-Status": "ok"})
        await nc.flush()
        await wait_for(errors, 1)
        await nc.close()
        return errors

    (error,) = asyncio.run(ingress_publishes_a_reply())
    assert "permissions violation" in error.lower(), error


@pytest.fixture(autouse=True)
def refused_connections_collected() -> Iterator[None]:
    """nats-py leaves the sockets of connections a server refused or cut (these tests do
    both on purpose) open for the garbage collector: collect them at the end of each test
    here, where their ResourceWarnings are expected, rather than in whichever test runs
    next (warnings are errors in this suite)."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def test_anonymous_clients_and_wrong_passwords_cannot_connect(secured: Secured) -> None:
    async def connect(url: str) -> None:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5)
        await nc.close()

    with pytest.raises(nats.errors.Error, match=r"(?i)authorization"):
        asyncio.run(connect(secured.anonymous))
    with pytest.raises(nats.errors.Error, match=r"(?i)authorization"):
        asyncio.run(connect(secured.url("client", "wrong-password")))

    async def natserve_client(url: str) -> None:
        async with Client(url, connect_timeout=5):
            pass

    with pytest.raises(UnavailableError) as err:
        asyncio.run(natserve_client(secured.url("client", "s3cret-but-wrong")))
    assert "nats://client:***@127.0.0.1" in str(err.value)
    assert "s3cret-but-wrong" not in str(err.value)


def test_a_refused_password_fails_the_binaries_with_the_url_redacted(secured: Secured) -> None:
    env = {**os.environ, "NATSERVE_NATS": secured.url("ingress", "s3cret-but-wrong")}
    proc = subprocess.run(
        [find("natserve-ingress"), "--port", str(free_port()), "--address", "127.0.0.1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert "nats://ingress:***@127.0.0.1" in proc.stderr, proc.stderr
    assert "authorization" in proc.stderr.lower(), proc.stderr
    assert "s3cret-but-wrong" not in proc.stderr + proc.stdout


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_certificates(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        str(d / "ca-key.pem"),
        "-out",
        str(d / "ca.pem"),
    )
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        ext_file = d / f"{name}.ext"
        ext_file.write_text(ext + "\n")
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(d / f"{name}-key.pem"),
            "-out",
            str(d / f"{name}.csr"),
        )
        openssl(
            "x509",
            "-req",
            "-in",
            str(d / f"{name}.csr"),
            "-CA",
            str(d / "ca.pem"),
            "-CAkey",
            str(d / "ca-key.pem"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(ext_file),
            "-out",
            str(d / f"{name}.pem"),
        )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the certificates")
def test_mutual_tls_with_the_least_privilege_users(cluster: Cluster) -> None:
    d = cluster.tmp
    make_certificates(d)
    shutil.copyfile(LEAST_PRIVILEGE, d / "least-privilege.conf")
    passwords = {role: secrets.token_hex(8) for role in ROLES}
    env = {f"NATSERVE_NATS_{r.upper()}_PASSWORD": pw for r, pw in passwords.items()}
    tls = (
        f'tls {{ cert_file: "{d}/server.pem", key_file: "{d}/server-key.pem", '
        f'ca_file: "{d}/ca.pem", verify: true }}\n'
    )
    secured = Secured(start_nats(cluster, tls + 'include "least-privilege.conf"\n', env), passwords)
    tls_env = {
        "NATSERVE_NATS_TLS_CA": str(d / "ca.pem"),
        "NATSERVE_NATS_TLS_CERT": str(d / "client.pem"),
        "NATSERVE_NATS_TLS_KEY": str(d / "client-key.pem"),
    }
    base = serve(
        cluster, {r: {"NATSERVE_NATS": secured.url(r), **tls_env} for r in ("agent", "ingress")}
    )
    assert post(base, 4)["y"] == 8

    async def through_nats(**tls_files: str) -> bytes:
        async with Client(
            secured.url("client"), client_id="client", connect_timeout=5, **tls_files
        ) as client:
            return await client.request(b'{"x": 6}', timeout=10)

    files = {
        "tls_ca": tls_env["NATSERVE_NATS_TLS_CA"],
        "tls_cert": tls_env["NATSERVE_NATS_TLS_CERT"],
        "tls_key": tls_env["NATSERVE_NATS_TLS_KEY"],
    }
    assert json.loads(asyncio.run(through_nats(**files)))["y"] == 12
    # Without a client certificate the server refuses the connection.
    with pytest.raises(UnavailableError):
        asyncio.run(through_nats(tls_ca=files["tls_ca"]))
    assert "Permissions Violation" not in nats_log(cluster)


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def _encode(prefix: bytes, raw: bytes) -> str:
    import base64

    data = prefix + raw
    return base64.b32encode(data + _crc16(data).to_bytes(2, "little")).decode().rstrip("=")


def make_user_nkey() -> Optional[tuple[str, str]]:
    """A user nkey (seed, public key) in NATS's encoding, or None without `cryptography`."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    except ImportError:
        return None
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    user = 20 << 3  # 'U'
    seed_prefix = bytes([(18 << 3) | (user >> 5), (user & 31) << 3])  # 'S' then 'U'
    return _encode(seed_prefix, raw), _encode(bytes([user]), public)


def test_the_binaries_authenticate_with_an_nkey_seed_file(cluster: Cluster) -> None:
    nkey = make_user_nkey()
    if nkey is None:
        pytest.skip("the cryptography package makes the test's nkey")
    seed, public = nkey
    assert seed.startswith("SU") and public.startswith("U")
    seed_file = cluster.tmp / "agent.nk"
    seed_file.write_text(seed + "\n")
    seed_file.chmod(0o600)
    port = start_nats(cluster, f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
    url = f"nats://127.0.0.1:{port}"
    env = {"NATSERVE_NATS": url, "NATSERVE_NATS_NKEY": str(seed_file)}
    base = serve(cluster, {"agent": env, "ingress": env})
    assert post(base, 7)["y"] == 14
    logs = "".join(p.output() for p in cluster.procs)
    assert seed not in logs and "Authorization Violation" not in logs


def test_every_process_takes_the_same_nats_flags_and_variables() -> None:
    from natserve._nats_options import ENV, FLAGS
    from natserve._settings import build_parser

    helps = {
        name: subprocess.run(
            [find(name), "--help"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
        for name in ("natserve-ingress", "natserve-agent")
    }
    helps["launcher"] = build_parser("app.py").format_help()
    for field, flag in FLAGS.items():
        for process, text in helps.items():
            assert flag in text and ENV[field] in text, (process, flag, ENV[field])
    # A password in NATSERVE_NATS is not echoed by --help.
    env = {**os.environ, "NATSERVE_NATS": "nats://u:s3cret-pw@127.0.0.1:4222"}
    for name in ("natserve-ingress", "natserve-agent"):
        out = subprocess.run([find(name), "--help"], capture_output=True, text=True, env=env)
        assert "s3cret-pw" not in out.stdout + out.stderr, name


def test_a_token_in_the_url_authenticates_every_process(cluster: Cluster) -> None:
    token = f"tok{secrets.token_hex(12)}"
    port = start_nats(cluster, f'authorization {{ token: "{token}" }}\n')
    url = f"nats://{token}@127.0.0.1:{port}"
    base = serve(cluster, {"agent": {"NATSERVE_NATS": url}, "ingress": {"NATSERVE_NATS": url}})
    assert post(base, 9)["y"] == 18

    async def through_nats() -> bytes:
        async with Client(url, connect_timeout=5) as client:
            return await client.request(b'{"x": 1}', timeout=10)

    assert json.loads(asyncio.run(through_nats()))["y"] == 2
    logs = "".join(p.output() for p in cluster.procs)
    assert f"nats://***@127.0.0.1:{port}" in logs
    assert token not in logs
