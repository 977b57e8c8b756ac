"""Checkpoints that survive a crash: safetensors weights + optimiser and RNG state, swapped in atomically.

A checkpoint is a directory `checkpoint/` (the model's `save_pretrained` output, so any HF tool can load it, plus
`trainer_state.json` and `trainer_state.pt`). It is written to a temporary directory first and renamed into place,
so a reader sees either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_JSON = "trainer_state.json"
STATE_PT = "trainer_state.pt"


def rng_state() -> dict:
    """Every RNG a training step draws from (python, numpy, torch CPU, and CUDA when present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | Path, model, tokenizer, step: int, optimizer=None, extra: dict | None = None,
    extra_files: dict[str, object] | None = None, model_state: dict | None = None, optimizer_state: dict | None = None,
) -> Path:
    """Write model (safetensors), tokenizer, optimiser, RNG states and `step` to `path`, atomically.

    `extra_files` maps file names to objects `torch.save`d into the checkpoint; they are written before the swap, so
    a checkpoint that is visible always has them (a file added after the swap would be missing after a crash).
    `model_state` / `optimizer_state`: state dicts already gathered from a sharded (FSDP) model, written instead of
    the model's and the optimizer's own (which hold this process's shards only).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old")
    # A writer killed mid-write leaves its temporary directory (a full copy of the weights) behind: remove those too.
    for stale in final.parent.iterdir():
        if stale.name.startswith(f".{final.name}.tmp-"):
            shutil.rmtree(stale, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, **({} if model_state is None else {"state_dict": model_state}))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if optimizer_state is None and optimizer is not None:
        optimizer_state = optimizer.state_dict()
    torch.save({"optimizer": optimizer_state, "rng": rng_state(), "extra": extra or {}}, tmp / STATE_PT)
    for name, obj in (extra_files or {}).items():
        torch.save(obj, tmp / name)
    (tmp / STATE_JSON).write_text(json.dumps({"step": step, **(extra or {})}, indent=2) + "\n")
    _fsync_tree(tmp)
    # Swap: the previous checkpoint is moved aside (not deleted) until the new one is in place.
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint at `path`, or the previous one if a crash hit between the two renames of a save."""
    final = Path(path)
    old = final.with_name(f".{final.name}.old")
    for p in (final, old):
        if (p / STATE_JSON).exists():
            return p
    return None


def verify_checkpoint(path: str | Path) -> None:
    """Raise a one-line ValueError naming the first damaged file of a checkpoint (weights, adapter, trainer state).

    Reads only what shows damage cheaply: each safetensors header (and that the file is as long as it says) and each
    torch file's zip directory, which sits at its end, so a file cut short fails here instead of deep inside a load.
    """
    import zipfile

    from safetensors import safe_open

    path = Path(path)
    for f in sorted(path.iterdir()):
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as st:  # checks the header and the file's length
                    st.keys()
            elif f.suffix == ".pt":
                with zipfile.ZipFile(f) as z:
                    z.infolist()
            elif f.name == STATE_JSON:
                json.loads(f.read_text())
        except Exception as e:
            other = [p for p in (path.with_name(f".{path.name}.old"),) if p.exists() and p != path]
            alternative = f"; an older checkpoint is in {other[0]}" if other else ""
            raise ValueError(
                f"checkpoint file {f} is damaged ({type(e).__name__}: {' '.join(str(e).split())[:120]}); opd writes "
                f"checkpoints atomically, so a disk fault, a full disk or a copy cut short did this{alternative}; "
                f"restore it from a copy, or delete {path} to start over") from None


def load_trainer_state(path: str | Path, optimizer=None, load_optimizer=None) -> dict:
    """Restore optimiser and RNG states from a checkpoint; returns its JSON state (with `step`).

    `load_optimizer(saved)`: puts the saved optimizer state into the optimizer instead of `optimizer.load_state_dict`
    (the loop's `opd.lm.loop.fsdp.load_optimizer_state`, which also shards it). The file is then mapped rather than
    copied: every process of a sharded run reads the whole state, and those of one machine share one copy in memory.
    """
    path = Path(path)
    blob = torch.load(path / STATE_PT, weights_only=False, mmap=load_optimizer is not None)
    if load_optimizer is not None and blob["optimizer"] is not None:
        load_optimizer(blob["optimizer"])
    elif optimizer is not None and blob["optimizer"] is not None:
        optimizer.load_state_dict(blob["optimizer"])
    set_rng_state(blob["rng"])
    return json.loads((path / STATE_JSON).read_text())


def _fsync(path: Path) -> None:
    """Flush a file or directory entry to disk, so a rename never lands before the data it points to."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        _fsync(p)
    _fsync(path)
