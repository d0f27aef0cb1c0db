"""``python -m natserve._worker_main SCRIPT [ARGS...]``: the command an agent runs for
each worker process (the launcher writes it into the agent config as ``worker_cmd``).

A module of its own, imported by nothing else in the package: ``python -m`` runs it as
``__main__``, so it must not also be imported under its own name (runpy would warn, and
the process would hold two copies of its globals).
"""

from __future__ import annotations

import sys

from natserve._worker import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
