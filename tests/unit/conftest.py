"""Shared helpers: a fake agent that drives the real worker loop over socketpair()."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, List

import pytest

from fake_agent import FakeAgent
from natserve import Server


@pytest.fixture
def start_worker() -> Iterator[Callable[..., FakeAgent]]:
    """Starts the worker loop for one stage of a server; closes every socket afterwards."""
    started: List[FakeAgent] = []

    def start(server: Server, **kwargs: Any) -> FakeAgent:
        agent = FakeAgent(server, **kwargs)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.conn.close()
        agent.thread.join(5)


@pytest.fixture(autouse=True)
def reset_natserve_logging() -> Iterator[None]:
    """Undoes `natserve._logging.configure` (called by launcher and worker entry points)
    so each test's log capture sees natserve's records."""
    yield
    logger = logging.getLogger("natserve")
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
