"""Real vLLM servers for the tests and the benchmark's quick mode: tiny models vLLM's CPU backend runs (its attention
needs head_dim >= 32), each served once per process, since a start costs a minute or more."""

from __future__ import annotations

import atexit
import copy
import json
from pathlib import Path

import torch

from opd.lm.remote.vllm import VllmServer, start_vllm
from tests.conftest import tiny_llama

MAX_LEN = 256
GREEDY_DEFAULTS = {"top_k": 1, "repetition_penalty": 1.5, "min_p": 0.2}
"""What the student's generation_config.json says: vLLM applies it to every request field left out, so a sampler
that did not send these fields explicitly would sample greedily."""


def build_models(root: Path, tokenizer) -> dict[str, str]:
    """{'teacher': dir, 'student': dir} under `root` (made once): a 2-layer teacher (hidden 128, head_dim 64) whose
    head is scaled up for peaked distributions, and a 1-layer student (hidden 64, head_dim 32) whose
    generation_config.json asks for greedy decoding."""
    dirs = {"teacher": root / "teacher", "student": root / "student"}
    if not (root / "done").exists():
        teacher = tiny_llama(tokenizer, 128, 2, seed=1, max_pos=MAX_LEN)
        with torch.no_grad():
            teacher.lm_head.weight.mul_(4.0)
        student = tiny_llama(tokenizer, 64, 1, seed=2, max_pos=MAX_LEN)
        for name, model in (("teacher", teacher), ("student", student)):
            model.save_pretrained(dirs[name])
            tokenizer.save_pretrained(dirs[name])
        config = json.loads((dirs["student"] / "generation_config.json").read_text())
        (dirs["student"] / "generation_config.json").write_text(json.dumps({**config, **GREEDY_DEFAULTS}))
        (root / "done").touch()
    return {k: str(v) for k, v in dirs.items()}


def big_vocab_student(root: Path, tokenizer) -> str:
    """A tiny student under `root / "big"` (made once) whose tokenizer is `tokenizer` plus 64 added tokens: a
    vocabulary larger than the servers' models, built locally (no downloaded tokenizer needed)."""
    out = root / "big"
    if not out.exists():
        wide = copy.deepcopy(tokenizer)
        wide.add_tokens([f"<extra_{i}>" for i in range(64)])
        tiny_llama(wide, 64, 1, seed=0, max_pos=MAX_LEN).save_pretrained(out)
        wide.save_pretrained(out)
    return str(out)


_SERVERS: dict[str, VllmServer] = {}


def shared_servers(dirs: dict[str, str]) -> dict[str, VllmServer]:
    """{'teacher': vLLM on the teacher (no dev mode: it cannot take weights), 'student': vLLM on the student in dev
    mode (a --sampler)}; started together on first use (and again if one was killed), killed when the process exits.
    Whoever asks first names the directories; the models are the same for everyone (`build_models`, fixed seeds)."""
    missing = [name for name in ("teacher", "student")
               if name not in _SERVERS or _SERVERS[name].process.poll() is not None]
    started = {name: _start(name, dirs) for name in missing}  # together: the starts overlap
    for server in started.values():
        server.wait()
    _SERVERS.update(started)
    return _SERVERS


def replace_teacher(dirs: dict[str, str]) -> VllmServer:
    """A new teacher server in place of the shared one (after a test killed it)."""
    server = _start("teacher", dirs)
    server.wait()
    _SERVERS["teacher"] = server
    return server


def _start(name: str, dirs: dict[str, str]) -> VllmServer:
    server = start_vllm(dirs[name], max_model_len=MAX_LEN, dev_mode=name == "student", eager=True)
    atexit.register(server.kill)
    return server
