"""Where the benchmarks' results go, and the pieces of writing them that every benchmark shares."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
"""benchmarks/results: each benchmark's JSON, its markdown section (RESULTS.md is built from these) and its plots."""

QUICK_BANNER = "**--quick run: tiny step counts, the numbers below mean nothing.**"


def write(name: str, results: dict, section: Callable[[dict], str], quick: bool, directory: Path) -> None:
    """`results` as `directory`/NAME.json and, after a full run, `section(results)` as NAME.md. A --quick run writes
    NAME_quick.json alone: its numbers mean nothing, so no section of RESULTS.md is made from them."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}{'_quick' if quick else ''}.json").write_text(json.dumps(results, indent=2) + "\n")
    if not quick:
        (directory / f"{name}.md").write_text(section(results))


def quick_banner(quick: bool) -> list[str]:
    """The lines that open a --quick run's markdown section (`QUICK_BANNER` and a blank line; none for a full run)."""
    return [QUICK_BANNER, ""] if quick else []
