"""``--dry-run`` (Mosec's flag): build each stage's worker once and warm it up, then exit.

It runs in the launcher's own process, one stage after another, with the stage's first
``env`` dict applied while its worker is built: nothing is started, no NATS is needed.
Unlike a served worker, a warm-up that raises fails the dry run (exit 1), whatever
``strict_warmup`` says: finding that out is what a dry run is for. Mosec also pipes the
first stage's example through the later stages; natserve warms each stage with its own.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Dict, Iterator, Mapping, Optional, Sequence

from ._stage import StageSpec
from ._worker import build_worker, warm_up

logger = logging.getLogger("natserve.launcher")


@contextmanager
def _env(extra: Optional[Dict[str, str]]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in extra or {}}
    os.environ.update(extra or {})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def dry_run(routes: Mapping[str, Sequence[StageSpec]]) -> int:
    """0 when every stage builds and warms up, else 1 (each failure logged)."""
    failed = 0
    for route, stages in routes.items():
        for stage in stages:
            label = f"{route}:{stage.index} {stage.name}"
            start = time.monotonic()
            try:
                with _env(stage.env[0] if stage.env else None):
                    worker = build_worker(
                        stage.worker,
                        worker_id=1,
                        stage=stage.index,
                        max_batch_size=stage.max_batch_size,
                    )
                    count = warm_up(worker, strict=True)
            except Exception:
                logger.exception("dry run: %s failed", label)
                failed += 1
                continue
            logger.info(
                "dry run: %s ok (%d warm-up examples, %.3f s)",
                label,
                count,
                time.monotonic() - start,
            )
    return 1 if failed else 0
