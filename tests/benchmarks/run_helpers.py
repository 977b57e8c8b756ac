"""What a benchmark's run directory recorded, so that a quick test can tell which method each arm ran: a benchmark
whose arms swapped their source, loss or teacher would still write well-formed numbers."""

import json
from pathlib import Path


def run_config(run_dir) -> dict:
    """The resolved config the run wrote into its directory (`opd.config.save_config`)."""
    return json.loads((Path(run_dir) / "config.json").read_text())


def run_metrics(run_dir) -> list[dict]:
    """The run's logged steps, in order."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def fields(config: dict, *names: str) -> dict:
    """The named fields of `config`: `assert fields(cfg, *want) == want` shows every field that differs."""
    return {k: config[k] for k in names}
