"""The bench's two load generators, wrk's ``check.lua`` and the JetStream floor
(``scheduler/examples/floor.rs``), print the ``BENCH_JSON`` line ``load.parse_run`` reads:
every field it reads must be in both, or a full bench run fails at its first floor row."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
READER = REPO / "tests" / "bench" / "load.py"
WRITERS = [REPO / "tests" / "bench" / "check.lua", REPO / "scheduler" / "examples" / "floor.rs"]


def fields_read() -> set:
    return set(re.findall(r'd\["(\w+)"\]', READER.read_text()))


def fields_written(source: Path) -> set:
    # The format string, not a comment naming the line: it starts with its first field
    # and ends with its last, `socket_errors`, in both writers.
    part = next(p for p in source.read_text().split("BENCH_JSON")[1:] if "requests" in p[:16])
    fmt = part[: part.index("socket_errors") + len("socket_errors") + 4]
    return set(re.findall(r'\\?"(\w+)\\?":', fmt))


def test_parse_run_reads_fields_both_writers_print() -> None:
    read = fields_read()
    assert {"requests", "p99_us", "max_us"} <= read, read
    for source in WRITERS:
        written = fields_written(source)
        assert read <= written, (source.name, sorted(read - written))
