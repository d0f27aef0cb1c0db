"""The agent config the launcher writes, and --stages selection."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from natserve import Server, SSEWorker, Worker
from natserve._agent_config import (
    StageSelectionError,
    agent_config,
    select_stages,
    worker_command,
    write_agent_config,
)
from natserve._launcher import main as launcher_main
from natserve.mixin import MsgpackMixin
from natserve.utils import ParseTarget


class Preprocess(Worker):
    def forward(self, data: Any) -> Any:
        return data


class Inference(Worker):
    def forward(self, data: List[Any]) -> List[Any]:
        return data


class Embed(MsgpackMixin, Worker):
    def forward(self, data: Any) -> Any:
        return data


def make_server() -> Server:
    server = Server()
    server.append_worker(Preprocess, num=2, env=[{"GPU": "0"}, {"GPU": "1"}])
    server.append_worker(Inference, max_batch_size=8, max_wait_time=10, timeout=2.0)
    server.append_worker(Preprocess, route="/v1/embed")
    server.append_worker(Embed, route="/v1/embed", max_batch_size=4)
    return server


def keys(stages: Any) -> List[str]:
    return [f"{s.route}:{s.index}" for s in stages]


def test_config_document_matches_the_protocol() -> None:
    server = make_server()
    cmd = ["/abs/python", "/abs/app.py", "--port", "1"]
    config = agent_config(server.routes, select_stages(server.routes, None), cmd)
    assert config["worker_cmd"] == cmd
    assert [{"route": r["route"], "names": r["names"]} for r in config["routes"]] == [
        {"route": "/inference", "names": ["Preprocess", "Inference"]},
        {"route": "/v1/embed", "names": ["Preprocess", "Embed"]},
    ]
    # Untyped workers: both bodies documented as anything, in their media types.
    assert config["routes"][0]["types"] == {
        "request": {"mime": "application/json", "schema": {}},
        "response": {"mime": "application/json", "schema": {}},
        "components": {},
    }
    assert config["stages"][0] == {
        "route": "/inference",
        "stage": 0,
        "name": "Preprocess",
        "worker": f"{__name__}:Preprocess",
        "num": 2,
        "max_batch_size": 1,
        "max_wait_ms": 0,
        "timeout_ms": 0,
        "env": [{"GPU": "0"}, {"GPU": "1"}],
        "mime": "application/json",
    }
    assert config["stages"][1] == {
        "route": "/inference",
        "stage": 1,
        "name": "Inference",
        "worker": f"{__name__}:Inference",
        "num": 1,
        "max_batch_size": 8,
        "max_wait_ms": 10,
        "timeout_ms": 2000,
        "env": None,
        "mime": "application/json",
    }
    assert config["stages"][3]["mime"] == "application/msgpack"
    assert [(s["route"], s["stage"]) for s in config["stages"]] == [
        ("/inference", 0),
        ("/inference", 1),
        ("/v1/embed", 0),
        ("/v1/embed", 1),
    ]


def test_config_file_is_json(tmp_path: Path) -> None:
    server = make_server()
    config = agent_config(server.routes, select_stages(server.routes, None), ["p"])
    path = write_agent_config(tmp_path / "agent.json", config)
    assert json.loads(path.read_text()) == config


@pytest.mark.parametrize(
    ("selectors", "expected"),
    [
        (None, ["/inference:0", "/inference:1", "/v1/embed:0", "/v1/embed:1"]),
        (["Inference"], ["/inference:1"]),
        (["Preprocess"], ["/inference:0", "/v1/embed:0"]),  # a class name picks every use
        (["/v1/embed:1", "/inference:0"], ["/inference:0", "/v1/embed:1"]),  # stage order kept
        (["Embed", "Embed", "/v1/embed:1"], ["/v1/embed:1"]),
    ],
)
def test_stage_selection(selectors: Any, expected: List[str]) -> None:
    assert keys(select_stages(make_server().routes, selectors)) == expected


@pytest.mark.parametrize("selector", ["Nope", "/inference:2", "/inference", "inference:0"])
def test_unknown_stage_is_an_error_listing_the_known_ones(selector: str) -> None:
    with pytest.raises(StageSelectionError) as info:
        select_stages(make_server().routes, [selector])
    message = str(info.value)
    assert f"unknown stage {selector!r}" in message
    assert "Embed, Inference, Preprocess, /inference:0, /inference:1" in message


def test_filtered_config_lists_all_routes_but_only_hosted_stages() -> None:
    server = make_server()
    config = agent_config(server.routes, select_stages(server.routes, ["Inference"]), ["p"])
    assert len(config["routes"]) == 2
    assert [(s["route"], s["stage"]) for s in config["stages"]] == [("/inference", 1)]


def test_worker_command_imports_this_program_through_natserves_entry_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "argv", ["app.py", "--port", "9", "--mine"])
    assert worker_command() == [
        sys.executable,
        "-m",
        "natserve._worker_main",
        os.path.abspath("app.py"),
        "--port",
        "9",
        "--mine",
    ]


def test_launcher_refuses_an_unknown_stage_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        launcher_main(make_server().routes, ["--stages", "Inference,Missing"])
    assert info.value.code == 64
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("natserve: error: --stages: unknown stage 'Missing' (known: ")


GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "agent_config.json"


def golden_server() -> Server:
    """The service tests/golden/agent_config.json describes, built through the public API.

    Its classes pretend to live where the golden file says (``__main__`` for the
    script's own classes, ``models.text`` for an imported one).
    """

    def located(cls: Any, module: str) -> Any:
        cls.__module__, cls.__qualname__ = module, cls.__name__
        return cls

    class Preprocess(Worker):
        def forward(self, data: Any) -> Any:
            return data

    class Inference(Worker):
        def forward(self, data: List[Any]) -> List[Any]:
            return data

    class Embed(MsgpackMixin, Worker):
        """Types as TypedMsgPackMixin would declare them for a `Text` Struct in, floats out."""

        req_mime_type = "application/msgpack"

        @classmethod
        def get_forward_json_schema(
            cls, target: ParseTarget, ref_template: str
        ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
            if target is ParseTarget.RETURN:
                return {"type": "array", "items": {"type": "number"}}, {}
            text = {
                "title": "Text",
                "type": "object",
                "properties": {"text": {"type": "string"}},
                "required": ["text"],
            }
            return {"$ref": ref_template.format(name="Text")}, {"Text": text}

        def forward(self, data: List[Any]) -> List[Any]:
            return data

    class Chat(SSEWorker):
        def forward(self, data: List[Any]) -> List[Any]:
            return data

    server = Server()
    server.append_worker(located(Preprocess, "__main__"))
    server.append_worker(
        located(Inference, "__main__"),
        num=2,
        max_batch_size=8,
        max_wait_time=10,
        timeout=0.5,
        env=[{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}],
    )
    server.append_worker(
        located(Embed, "models.text"),
        max_batch_size=16,
        max_wait_time=5,
        route=["/v1/embed", "/v2/embed"],
    )
    server.append_worker(located(Chat, "__main__"), max_batch_size=4, route="/v1/chat")
    return server


def test_a_shared_stage_is_hosted_at_its_home_whichever_place_is_named() -> None:
    server = golden_server()
    for selector in ("/v2/embed:0", "/v1/embed:0", "Embed"):
        hosted = select_stages(server.routes, [selector])
        assert [(s.route, s.index) for s in hosted] == [("/v1/embed", 0)], selector
    assert server.routes["/v2/embed"][0].queue == ("/v1/embed", 0)
    assert server.routes["/v1/embed"][0].queue is None


def test_the_python_writer_produces_the_golden_agent_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The Rust loader is tested against the same file: a key renamed on either side fails.
    golden = json.loads(GOLDEN.read_text())
    monkeypatch.setattr(sys, "argv", ["/srv/app.py", "--port", "8000"])
    server = golden_server()
    written = json.loads(
        json.dumps(
            agent_config(server.routes, select_stages(server.routes, None), worker_command())
        )
    )
    assert {k: v for k, v in written.items() if k != "worker_cmd"} == {
        k: v for k, v in golden.items() if k != "worker_cmd"
    }
    assert list(written) == list(golden)
    for ours, theirs in zip(written["stages"], golden["stages"]):
        assert list(ours) == list(theirs)  # same keys, same order
    # worker_cmd: the interpreter, natserve's worker entry point, then the script and its
    # arguments, as the golden file shows them (it names its own interpreter path).
    assert written["worker_cmd"] == [
        sys.executable, "-m", "natserve._worker_main", "/srv/app.py", "--port", "8000",
    ]  # fmt: skip
    assert written["worker_cmd"][1:] == golden["worker_cmd"][1:]
