"""Student rollouts from an inference server: push the student's weights there, sample there, align the log-probs.

`distill` uses this when `--sampler URL` is set: generation, the slow part of on-policy distillation, runs on a
server built for it (`opd serve`, or vLLM started with VLLM_SERVER_DEV_MODE=1, `opd.lm.remote.vllm`) while training
stays here. The server's weights lag the trained ones by up to `sync_every - 1` updates (and differ by float rounding
even right after a push), so each batch carries the sampler's log-prob of every sampled token, and `ratio_metrics`
reports how large the gap is.

How the gap is corrected. With r_t = π_student(x_t | x_<t) / π_sampler(x_t | x_<t) at each sampled token:
- loss=sampled (policy gradient) weights token t's gradient by min(r_t, ratio_clip), detached: truncated importance
  sampling, as in tinker-cookbook's importance-sampling loss and TIS. It corrects which token was taken at t.
- The full-vocabulary divergences are not reweighted. The divergence at position t is computed exactly over every
  next token, so nothing about the token taken at t needs correcting: E[r_t | x_<t] = 1 under the sampler, and a
  weight r_t would only add noise. What stays off-policy is which prefixes x_<t were visited; their exact weight is
  the product of r_s over s < t, whose variance grows with the completion's length (and, with a bf16 server, with the
  float gap alone). Like PPO and truncated IS for the policy gradient, we leave that factor out and keep the sampler
  close instead (sync_every=1 by default), watching `sampler_kl`.

With `overlap`, `opd.lm.rollouts.actors.Ahead` requests step k+1's rollouts while step k trains: one update staler,
never more.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from opd.config import SamplingArgs
from opd.lm.batch import Batch, layout
from opd.lm.hf.model import hf_model, is_peft_model
from opd.lm.remote.client import ServerRefused, check_served_vocabulary, server_kind
from opd.lm.remote.sampler import RemoteSampler
from opd.lm.teachers.base import TeacherUnreachable


def rollout_seed(seed: int, step: int, rank: int, world: int, batch_size: int) -> int:
    """Base seed of one process's server-side rollouts at one step; prompt i is sampled with base + i.

    Unique per (run seed, step, process, prompt), so no two prompts of a run share a random stream, and the same at
    the same step of a resumed run, so it draws the same samples.
    """
    return (((seed * 1_000_003 + step) * world + rank) * batch_size) % 2**62


class ServerRollouts:
    """The student's sampler behind a completions server, and the weight pushes that keep it on the student.

    Weights are written as safetensors under `out_dir/sampler_weights/` and the server is told to load them, so the
    server must see that path (same machine, or a shared filesystem mounted at the same place): `opd serve` through
    its /opd/update_weights, vLLM through its dev-mode /collective_rpc (`opd.lm.remote.vllm.reload_weights`).
    """

    def __init__(self, url: str, out_dir: str | Path, timeout: float = 60.0, max_retries: int = 5,
                 api_key: str | None = None):
        self.url = url
        self.client = RemoteSampler(url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self.root = Path(out_dir).resolve() / "sampler_weights"
        self.version: int | None = None
        """The server's weights version after the last push (counts every load since the server started)."""
        self.kind: str | None = None
        """'opd' (opd serve) or 'vllm', from the server's /v1/models; asked once, by `check` or the first push."""

    def check(self, tokenizer, vocab_size: int) -> None:
        """Before training: the server can take the student's weights and serves the student's vocabulary; a one-line
        ValueError naming the fix otherwise. A server that does not answer is left to the first step, which stops
        with a resumable checkpoint. opd serve's vocabulary is not probed: its first push (before the first step)
        refuses weights of another shape with a clear 400, where vLLM's reload fails with an opaque 500."""
        try:
            card = self.client.client.model_card()
        except TeacherUnreachable:
            return
        self.kind = server_kind(card)
        self.client.model = self.client.model or card["id"]
        if self.kind == "vllm":
            try:
                self.client.client.post("/is_paused", None)  # one of the routes VLLM_SERVER_DEV_MODE=1 opens
            except ServerRefused:
                raise ValueError(f"{self.url} is vLLM without its weight-reload routes, so it cannot sample from the "
                                 "student being trained; restart it with VLLM_SERVER_DEV_MODE=1 in its environment "
                                 "(opd reloads the weights through its /collective_rpc)") from None
            check_served_vocabulary(self.client.client, self.client.model, tokenizer, vocab_size)
        self.client.vocab_size = vocab_size  # rollouts with token ids outside it are refused
        if self.kind not in ("vllm", "opd"):
            raise ValueError(f"{self.url} cannot receive the student's weights (/v1/models says owned_by "
                             f"{self.kind!r}); for --sampler serve the student with `opd serve STUDENT_DIR`, or with "
                             f"vLLM started with VLLM_SERVER_DEV_MODE=1")

    def push(self, student, accelerator, step: int) -> None:
        """Make the server sample from `student`'s current weights. Every process must call this (collectively).

        `accelerator.get_state_dict` gathers the full weights: a collective under FSDP (full state dict, offloaded to
        the CPU of the main process) and DeepSpeed ZeRO-3 (needs `stage3_gather_16bit_weights_on_model_save`), a
        plain unwrapped `state_dict()` under DDP. The main process writes and pushes them; the others wait, so no
        process samples before the server holds the new weights. A LoRA (peft) student is pushed as plain merged
        weights (`opd.lm.hf.lora.merged_state_dict`), which needs every weight whole on the main process: one process
        or DDP, not FSDP/DeepSpeed.
        """
        lora = is_peft_model(student)
        if lora and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ValueError("a LoRA student's weights are merged for the sampler on the main process, which needs "
                             "them unsharded; use DDP (or one process) with --sampler and LoRA, not FSDP/DeepSpeed")
        state = None if lora else accelerator.get_state_dict(student)
        error = None
        if accelerator.is_main_process:
            try:
                if lora:  # the server knows nothing about adapters: it gets the base weights with them folded in
                    from opd.lm.hf.lora import merged_state_dict

                    state = merged_state_dict(student)
                path = self._write(hf_model(student), state, step)
                self.version = self._load(str(path))
                for old in self.root.iterdir():  # the server has copied the weights: older versions can go
                    if old != path:
                        shutil.rmtree(old, ignore_errors=True)
            except Exception as e:  # re-raised below, after the other processes know (else they wait forever)
                error = e
        if accelerator.num_processes > 1:
            flag = torch.tensor([float(error is not None)], device=accelerator.device)
            if accelerator.reduce(flag, "max").item() and error is None:
                raise TeacherUnreachable(f"{self.url} did not take the student's weights (the main process says why)")
        if error is not None:
            raise error

    def _load(self, path: str) -> int:
        """Make the server load the weights in `path`; its new weights version."""
        if self.kind is None:
            self.kind = server_kind(self.client.client.model_card())
        if self.kind == "vllm":
            from opd.lm.remote.vllm import reload_weights

            try:
                return reload_weights(self.client.client, path)
            except ServerRefused as e:
                raise ValueError(f"{self.url} did not reload the student's weights ({e}); start vLLM with "
                                 f"VLLM_SERVER_DEV_MODE=1, on this machine or with {path} on a shared "
                                 "filesystem") from None
        return self.client.update_weights(path)

    def _write(self, model, state: dict, step: int) -> Path:
        # Written under a temporary name and renamed into place: the server never reads a half-written file, and a
        # crash never leaves a partial directory under a final name.
        self.root.mkdir(parents=True, exist_ok=True)
        tmp, final = self.root / f".tmp-{os.getpid()}", self.root / f"step-{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        # save_pretrained drops tied duplicates (safetensors refuses shared tensors) and shards large models; the
        # server loads every *.safetensors in the directory.
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        shutil.rmtree(final, ignore_errors=True)  # a resumed run pushing the step it stopped at
        os.replace(tmp, final)
        return final

    def rollouts(self, prompt_ids: list[list[int]], pad_id: int, sampling: SamplingArgs, seed: int) -> Batch:
        """One completion per prompt from the server; the batch carries the sampler's log-prob of every target."""
        completions, logps = self.client.sample(prompt_ids, sampling.max_new_tokens, sampling.temperature,
                                                sampling.top_p, seed=seed)
        return layout(prompt_ids, completions, pad_id, logps)

    def close(self) -> None:
        """Close the connection pool to the server."""
        self.client.close()


@torch.no_grad()
def ratio_metrics(student_logp_N: torch.Tensor, sampler_logp_N: torch.Tensor, ratio_clip: float) -> dict:
    """How far the sampler's weights are from the trained ones, over the completion tokens of a batch.

    is_ratio_mean: mean of π_student/π_sampler at the sampled tokens (its expectation is 1 however stale the sampler,
    so read it with the two others); is_ratio_clipped: fraction above `ratio_clip`; sampler_kl: the k3 estimate
    E[r - 1 - log r] of KL(sampler ‖ student), >= 0 per token and 0 when the weights agree.
    """
    if not student_logp_N.numel():
        return {}
    log_r_N = student_logp_N.float() - sampler_logp_N.float()
    r_N = log_r_N.exp()
    return {"is_ratio_mean": r_N.mean().item(), "is_ratio_clipped": (r_N > ratio_clip).float().mean().item(),
            "sampler_kl": (r_N - 1 - log_r_N).mean().item()}
