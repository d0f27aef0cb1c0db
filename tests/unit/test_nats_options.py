"""NATS credentials and TLS on the Python side: redaction, checks, and what nats-py and
the launcher's children get."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from natserve import Client
from natserve._nats_options import NatsSecurity, has_secret, redact
from natserve._settings import parse_settings


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("nats://u:s3cret@h:4222", "nats://u:***@h:4222"),
        ("nats://t0ken@h:4222/x", "nats://***@h:4222/x"),
        ("nats://h:4222", "nats://h:4222"),
        ("nats://a:x@h1:1, tls://b:y@h2:2", "nats://a:***@h1:1, tls://b:***@h2:2"),
        ("error 'nats://u:p@ss@h:x' here", "error 'nats://u:***@h:x' here"),
    ],
)
def test_redact_hides_every_password_and_token(text: str, shown: str) -> None:
    assert redact(text) == shown
    assert has_secret(text) == (text != shown)


def test_security_settings_become_child_env_and_nats_py_options(tmp_path: Path) -> None:
    security = NatsSecurity(creds="/c.creds", tls_ca=None)
    assert security.env() == {"NATSERVE_NATS_CREDS": "/c.creds"}
    assert security.connect_options() == {"user_credentials": "/c.creds"}
    assert NatsSecurity(nkey="/seed").connect_options() == {"nkeys_seed": "/seed"}
    assert NatsSecurity().connect_options() == {} and NatsSecurity().env() == {}
    assert NatsSecurity().problem("nats://u:p@h:1") is None


def test_security_problems_name_the_flag() -> None:
    assert NatsSecurity(tls_cert="c").problem() == (
        "--nats-tls-cert",
        "--nats-tls-cert and --nats-tls-key go together: give both or neither",
    )
    flag, why = NatsSecurity(nkey="k").problem("nats://u:p@h:1") or ("", "")
    assert flag == "--nats" and "a password or token in --nats and --nats-nkey" in why


def test_launcher_settings_read_the_nats_files_from_flags_and_env(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    settings, rest = parse_settings(
        ["--nats-tls-ca", str(ca)], env={"NATSERVE_NATS_CREDS": str(ca)}
    )
    assert settings.nats_security == NatsSecurity(creds=str(ca), tls_ca=str(ca))
    assert rest == []


def test_a_bad_nats_url_is_reported_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--nats", "nats://u:s3cret@h:1 x"], env={})
    err = capsys.readouterr().err
    assert "nats://u:***@h:1" in err and "s3cret" not in err


def test_client_checks_its_security_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        Client("nats://h:1", tls_cert="c")
    with pytest.raises(ValueError, match="not credentials in nats_url and nkey"):
        Client("nats://u:p@h:1", nkey="seed")
    with pytest.raises(ValueError, match="client_id"):
        Client("nats://h:1", client_id="a.b")
    assert Client("nats://h:1", client_id="client").reply_prefix == "natserve.reply.client"
    for bad in (0, 6, True, "3"):
        with pytest.raises(ValueError, match="replicas must be an int from 1 to 5"):
            Client("nats://a:1,nats://b:1", replicas=bad)  # type: ignore[arg-type]
    Client("nats://a:1,nats://b:1,nats://c:1", replicas=3)


def test_client_tls_context_trusts_the_given_ca(tmp_path: Path) -> None:
    missing = NatsSecurity(tls_ca=str(tmp_path / "missing.pem"))
    with pytest.raises((OSError, ssl.SSLError)):
        missing.tls_context()
    assert NatsSecurity().tls_context() is None
