"""`opd bench robotics`: the robotics rows of the seed as simulated analogues on gymnasium (MISSION rows 11, 12, 17, 18).

    opd bench robotics                    # full: 3 seeds, about an hour on 2 cores
    opd bench robotics --quick            # seconds: tiny step counts, checks that everything runs
    opd bench robotics --sections rpd --merge   # redo one part, keep the others

Each part lives in its own module (`<part>.py` next to this file) with one function
`run(quick: bool, seeds: int, workers: int, out_dir: Path) -> tuple[dict, str]`: the part's json section and its
markdown (tables, plot links); plots go to `out_dir` as `robotics_<part>*.png`. This file runs the parts asked for and
writes benchmarks/results/robotics.json and robotics.md.
"""

from __future__ import annotations

import importlib
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tyro

PARTS = ("sim_to_real", "rldg", "rpd", "interpretable")
"""json section name → module `benchmarks.robotics.<name>`."""


@dataclass(frozen=True)
class RoboticsBenchArgs:
    """What `opd bench robotics` runs."""

    quick: bool = False
    """Tiny step counts (for tests): checks the pipeline, the numbers mean nothing."""
    seeds: int = 3
    """Seeds per configuration."""
    workers: int = 2
    """Parallel worker processes (one thread each)."""
    out_dir: str = "benchmarks/results"
    """Where robotics.json, robotics.md and the PNG plots go."""
    sections: tuple[str, ...] = PARTS
    """Which parts to run (any of sim_to_real, rldg, rpd, interpretable)."""
    merge: bool = False
    """Keep the other sections of an existing robotics.json in `out_dir` and replace only the ones run now."""
    other_load: str = "nothing else"
    """What else ran on the machine meanwhile (recorded per part: the wall times depend on it)."""


def _part(name: str):
    return importlib.import_module(f"benchmarks.robotics.{name}")


def robotics_bench_main(args: RoboticsBenchArgs) -> dict:
    """Run the parts in `args.sections`, write robotics.json and robotics.md, return the json."""
    unknown = set(args.sections) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown --sections {sorted(unknown)}; choose from {', '.join(PARTS)}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_dir = out / "robotics.json", out / "robotics_parts"
    data = json.loads(json_path.read_text()) if args.merge and json_path.exists() else {}
    md_dir.mkdir(exist_ok=True)
    for name in args.sections:
        start = time.time()
        section, markdown = _part(name).run(args.quick, args.seeds, args.workers, out)
        section["wall_seconds"] = time.time() - start
        section["other_load"] = args.other_load  # parts may be rerun alone (--merge), each under its own load
        data[name] = section
        (md_dir / f"{name}.md").write_text(f"{markdown.strip()}\n\n`opd bench robotics --sections {name}`, "
                                           f"{time.strftime('%Y-%m-%d')}, {args.seeds} seeds: "
                                           f"{section['wall_seconds'] / 60:.1f} min; also running: {args.other_load}.\n")
    data["meta"] = {"args": asdict(args), "machine": platform.processor() or platform.machine(),
                    "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    json_path.write_text(json.dumps(data, indent=1))
    parts = [f"## Robotics analogues: sim-to-real, RLDG, RPD, interpretable policies\n\n"
             f"`opd bench robotics{' --quick' if args.quick else ''}` on 2 CPU cores ({data['meta']['machine']}); "
             f"each part's date, wall time and what else ran are under its table.\n"]  # fmt: skip
    parts += [(md_dir / f"{name}.md").read_text() for name in PARTS if (md_dir / f"{name}.md").exists()]
    (out / "robotics.md").write_text("\n".join(parts))
    return data


if __name__ == "__main__":
    robotics_bench_main(tyro.cli(RoboticsBenchArgs))
