"""docs/BENCHMARKS.md: the machine a run was measured on, and one section per benchmark.

Each benchmark owns the text between its two markers and rewrites only that,
so benchmarks added later keep their sections when another one runs.
"""

from __future__ import annotations

import os
import platform
import re
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "docs" / "BENCHMARKS.md"

HEADER = """# Benchmarks

Every figure in this file was measured on the machine named in its section by
running `make bench` (which runs `bench/run.py`) there; none is estimated or
copied from elsewhere. Each benchmark rewrites only its own section, between
its `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->` markers, so a
section may be older than another: compare dates and machines before
comparing figures. Run `make bench` again to refresh them on your machine.
"""


def _first(path: str, pattern: str) -> str:
    try:
        text = Path(path).read_text()
    except OSError:
        return "unknown"
    match = re.search(pattern, text, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def machine(pg_settings: dict[str, str]) -> list[tuple[str, str]]:
    """What the figures depend on, as (name, value) rows."""
    mem_kib = _first("/proc/meminfo", r"^MemTotal:\s+(\d+)")
    ram = f"{int(mem_kib) / 2**20:.1f} GiB" if mem_kib.isdigit() else "unknown"
    return [
        # What `nproc` prints: the CPUs this process may run on.
        ("CPUs (nproc)", str(len(os.sched_getaffinity(0)))),
        ("CPU model", _first("/proc/cpuinfo", r"^model name\s*:\s*(.+)$")),
        ("RAM", ram),
        ("PostgreSQL", pg_settings.pop("server_version")),
        *((f"PostgreSQL `{name}`", value) for name, value in pg_settings.items()),
        (
            "Python / Django / psycopg",
            f"{platform.python_version()} / {version('django')} / {version('psycopg')}",
        ),
    ]


def date_utc() -> str:
    """The run's date, formatted as `date -u` prints it."""
    return datetime.now(UTC).strftime("%a %b %d %H:%M:%S UTC %Y")


def section_write(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace benchmark `name`'s section in `path`, or append it; keep everything else."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    section = f"{start}\n{body.strip()}\n{end}\n"
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        # A function replacement, so backslashes in the body stay literal.
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
