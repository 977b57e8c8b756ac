"""Where opd caches what it trains or unpacks once (teachers, warm starts, the real models from their wheels, vLLM's
virtualenv): `$OPD_CACHE`, else `~/.cache/opd`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir` if given, else `$OPD_CACHE`, else `~/.cache/opd`."""
    return Path(cache_dir or os.environ.get("OPD_CACHE") or Path.home() / ".cache" / "opd")
