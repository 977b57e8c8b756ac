"""Weight pushes into a served model (`POST /opd/update_weights`, how `opd train --sampler` keeps the sampler on the
student's weights): only safetensors files under the server's `--weights-root`, only regular files, only tensors that
fit the model exactly and are finite; the model is untouched when anything is refused.
"""

from __future__ import annotations

import stat
from pathlib import Path

import torch
from pydantic import BaseModel
from safetensors import SafetensorError
from safetensors.torch import load_file


class UpdateWeightsRequest(BaseModel):
    """Body of `POST /opd/update_weights`."""

    path: str


class WeightsRefused(ValueError):
    """Weights `load_weights` will not load; the message (file and tensor names) is for the server's log only."""


def weight_files(root: str | Path, path: str | Path) -> list[Path]:
    """The safetensors files `path` names (a file, or every *.safetensors in a directory), each resolved, inside
    `root` (no symlink out of it) and a regular file. Every file is checked before any is opened: opening a FIFO
    would block the server until something writes into it."""
    root = Path(root).resolve()
    path = root / path  # an absolute path replaces root; a relative one is read under it
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError, ValueError) as e:  # absent, a symlink loop, a NUL or an unencodable name
        raise WeightsRefused(f"no safetensors weights at {str(path)!r} ({e})") from None
    if not resolved.is_relative_to(root):
        raise WeightsRefused(f"{str(path)!r} is outside the weights root {str(root)!r}")
    files = sorted(resolved.glob("*.safetensors")) if resolved.is_dir() else [resolved]
    if not files:
        raise WeightsRefused(f"no safetensors weights at {str(path)!r}")
    checked = []
    for f in files:
        real = f.resolve()
        if not real.is_relative_to(root):
            raise WeightsRefused(f"{str(f)!r} links outside the weights root {str(root)!r}")
        try:
            regular = stat.S_ISREG(real.stat().st_mode)
        except OSError as e:
            raise WeightsRefused(f"cannot stat {str(f)!r}: {e}") from None
        if not regular:
            raise WeightsRefused(f"{str(f)!r} is not a regular file")
        checked.append(real)
    return checked


def load_weights(model: torch.nn.Module, path: str | Path, root: str | Path | None = None) -> int:
    """Load safetensors weights (a file, or every *.safetensors in a directory) into `model` in place; return #tensors.

    Only from under `root` (default: `path` itself, for trusted callers), via `weight_files`. The check is strict:
    every tensor must name a model parameter or buffer of the same shape and hold finite values, and every model
    tensor must be given, except a tied one whose twin is given (`save_pretrained` drops the tied `lm_head.weight`).
    Raises WeightsRefused before touching the model when anything does not match. Dtypes are cast to the model's.
    """
    files = weight_files(path if root is None else root, path)
    new: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            new.update(load_file(str(f)))
        except (OSError, SafetensorError) as e:
            raise WeightsRefused(f"cannot read {str(f)!r}: {e}") from None
    own = model.state_dict()
    unexpected = sorted(set(new) - set(own))
    given_ptrs = {own[k].data_ptr() for k in new if k in own}
    missing = sorted(k for k in set(own) - set(new) if own[k].data_ptr() not in given_ptrs)
    wrong = sorted(k for k in new if k in own and new[k].shape != own[k].shape)
    # NaN or inf weights would turn every later answer into NaN log-probs
    nonfinite = sorted(k for k, t in new.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if unexpected or missing or wrong or nonfinite:
        parts = [f"{name}: {keys[:3]}{' ...' if len(keys) > 3 else ''}" for name, keys in
                 (("unexpected", unexpected), ("missing", missing), ("shape mismatch", wrong),
                  ("not finite", nonfinite)) if keys]
        raise WeightsRefused(f"weights at {str(path)!r} do not fit the served model ({'; '.join(parts)})")
    with torch.no_grad():
        for k, tensor in new.items():
            own[k].copy_(tensor)
    return len(new)
