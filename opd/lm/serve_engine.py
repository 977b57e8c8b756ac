"""The model side of `opd serve`: batched prompt scoring and sampling of a Hugging Face causal LM, request batching.

`run_rows` runs a list of `Row`s (one prompt + its sampling settings each) on the model: one left-padded prefill
forward per chunk, then one KV-cached decode step per generated token for the whole chunk. Each row samples from its
own seeded `torch.Generator`, so a row's tokens do not depend on which other rows share its batch: concurrent and
sequential requests give the same answers (up to float rounding of padded attention).

`BatchingEngine` is the asyncio side: requests put their rows on a queue, one worker collects whatever arrives within
a short window and runs it as one batch in a thread, so the event loop keeps answering while the model works.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import torch

from opd.args import LogprobsMode
from opd.lm.sampler import next_token_logits


@dataclass
class PromptScores:
    """Log-probs of prompt tokens 1..len-1 (entry j-1 is about token j given tokens < j)."""

    taken_logp: torch.Tensor
    """[len-1] log-prob of the prompt token that is actually there."""
    taken_rank: torch.Tensor
    """[len-1] its 1-based rank in the vocabulary (1 + number of strictly more likely tokens), as vLLM counts it."""
    top_ids: torch.Tensor
    """[len-1, k] ids of the k most likely tokens, most likely first."""
    top_logp: torch.Tensor
    """[len-1, k] their log-probs."""


@dataclass(eq=False)
class Row:
    """One sequence to run: a prompt, how to continue it, and (after `run_rows`) what came out."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    logprobs: int | None = None
    """Top-k wanted for each generated token (0: only the sampled token's log-prob); None: no log-probs."""
    prompt_topk: int | None = None
    """Top-k wanted for each prompt token; None: the prompt is not scored."""
    stop_ids: frozenset[int] = frozenset()
    token_ids: list[int] = field(default_factory=list)
    token_logp: list[float] = field(default_factory=list)
    token_top: list[tuple[list[int], list[float]]] = field(default_factory=list)
    prompt_scores: PromptScores | None = None
    finish_reason: str = "length"


def _prompt_scores(logits_LV: torch.Tensor, ids_L: torch.Tensor, k: int) -> PromptScores:
    logp_LV = logits_LV[:-1].float().log_softmax(-1)
    taken_L = logp_LV.gather(-1, ids_L[1:, None])[:, 0]
    rank_L = (logp_LV > taken_L[:, None]).sum(-1) + 1
    top_logp, top_ids = logp_LV.topk(min(k, logp_LV.shape[-1]), dim=-1)
    return PromptScores(taken_L.cpu(), rank_L.cpu(), top_ids.cpu(), top_logp.cpu())


def _sample_step(
    logits_BV: torch.Tensor, rows: list[Row], gens: list[torch.Generator], mode: LogprobsMode
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each row's next token; return (token ids [B], the log-probs to report [B, V])."""
    device = logits_BV.device
    temps_B = torch.tensor([r.temperature for r in rows], device=device)
    top_p_B = torch.tensor([r.top_p for r in rows], device=device)
    # Below vLLM's 1e-5 (its _SAMPLING_EPS) a temperature means greedy, as in vLLM: dividing float32 logits by it
    # can overflow them to inf and the softmax to nan.
    greedy_B = temps_B < 1e-5
    raw_logp_BV = logits_BV.log_softmax(-1)
    probs_BV = (logits_BV / torch.where(greedy_B, 1.0, temps_B)[:, None]).softmax(-1)
    sorted_p_BV, order_BV = probs_BV.sort(-1, descending=True)
    # A token stays in the nucleus while the mass strictly before it is < top_p; the first one always stays.
    keep_sorted_BV = (sorted_p_BV.cumsum(-1) - sorted_p_BV) < top_p_B[:, None]
    keep_sorted_BV[:, 0] = True  # even when a tiny top_p rounds to 0 in float32
    kept_p_BV = sorted_p_BV * keep_sorted_BV
    cdf_BV = kept_p_BV.cumsum(-1)
    # Inverse-CDF sampling with one uniform per row from that row's own generator: batch-independent.
    u_B = torch.tensor([torch.rand((), generator=g).item() for g in gens], device=device)
    pick_B = torch.searchsorted(cdf_BV, (u_B * cdf_BV[:, -1])[:, None], right=True)[:, 0]
    pick_B = torch.minimum(pick_B, keep_sorted_BV.sum(-1) - 1)
    next_B = torch.where(greedy_B, logits_BV.argmax(-1), order_BV.gather(-1, pick_B[:, None])[:, 0])
    if mode == "raw_logprobs":
        return next_B, raw_logp_BV
    # The distribution actually sampled from: tempered, cut to the nucleus (-inf outside), renormalised.
    processed_BV = torch.empty_like(logits_BV).scatter(-1, order_BV, (kept_p_BV / cdf_BV[:, -1:]).log())
    return next_B, torch.where(greedy_B[:, None], raw_logp_BV, processed_BV)


@torch.inference_mode()
def _run_chunk(model: torch.nn.Module, rows: list[Row], score_prompts: bool, mode: LogprobsMode) -> None:
    device = next(model.parameters()).device
    lens = [len(r.prompt_ids) for r in rows]
    B, L = len(rows), max(lens)
    ids_BL = torch.zeros(B, L, dtype=torch.long)
    mask_BL = torch.zeros(B, L, dtype=torch.long)
    for b, r in enumerate(rows):  # left padding, so every row's last prompt token is at position L-1
        ids_BL[b, L - lens[b] :] = torch.tensor(r.prompt_ids)
        mask_BL[b, L - lens[b] :] = 1
    ids_BL, mask_BL = ids_BL.to(device), mask_BL.to(device)
    pos_BL = (mask_BL.cumsum(-1) - 1).clamp(min=0)
    steps = max(r.max_tokens for r in rows)
    out = model(
        input_ids=ids_BL, attention_mask=mask_BL, position_ids=pos_BL, use_cache=steps > 0,
        logits_to_keep=0 if score_prompts else 1,
    )
    for b, r in enumerate(rows):
        if r.prompt_topk is not None:
            r.prompt_scores = _prompt_scores(out.logits[b, L - lens[b] :], ids_BL[b, L - lens[b] :], r.prompt_topk)
    gens = [torch.Generator().manual_seed(r.seed) for r in rows]
    done = [r.max_tokens == 0 for r in rows]
    logits_BV, pos_B1 = out.logits[:, -1].float(), pos_BL[:, -1:]
    # decoding steps through the trunk and a plain head as weight @ hidden.T where the model allows (opd.lm.sampler)
    decode = next_token_logits(model, out.cache) if steps > 0 else None
    for _ in range(steps):
        if all(done):
            break
        next_B, logp_BV = _sample_step(logits_BV, rows, gens, mode)
        kmax = max((r.logprobs or 0) for r in rows)
        top_logp_BK, top_ids_BK = logp_BV.topk(min(kmax, logp_BV.shape[-1]), dim=-1)
        taken_B = logp_BV.gather(-1, next_B[:, None])[:, 0]
        next_list, taken_list = next_B.tolist(), taken_B.tolist()
        top_ids_list, top_logp_list = top_ids_BK.tolist(), top_logp_BK.tolist()
        for b, r in enumerate(rows):
            if done[b]:
                continue
            r.token_ids.append(next_list[b])
            r.token_logp.append(taken_list[b])
            if r.logprobs is not None:
                r.token_top.append((top_ids_list[b][: r.logprobs], top_logp_list[b][: r.logprobs]))
            if next_list[b] in r.stop_ids:
                r.finish_reason, done[b] = "stop", True
            elif len(r.token_ids) == r.max_tokens:
                done[b] = True
        if all(done):
            break
        mask_BL = torch.cat([mask_BL, torch.ones_like(mask_BL[:, :1])], dim=1)
        pos_B1 = pos_B1 + 1
        logits_BV = decode(next_B[:, None], mask_BL, pos_B1).float()


def run_rows(model: torch.nn.Module, rows: list[Row], max_batch_size: int, mode: LogprobsMode) -> None:
    """Run every row on the model (filling its outputs in place), at most `max_batch_size` rows per forward.

    Rows whose prompt must be scored need logits at every position; the others only at the last one, so the two
    kinds go in separate forwards.
    """
    for score_prompts in (True, False):
        group = [r for r in rows if (r.prompt_topk is not None) == score_prompts]
        for start in range(0, len(group), max_batch_size):
            _run_chunk(model, group[start : start + max_batch_size], score_prompts, mode)


@dataclass
class _Job:
    rows: list[Row]
    done: asyncio.Future


class BatchingEngine:
    """Collects the rows of concurrent requests for up to `window_s` and runs them on the model as one batch."""

    def __init__(self, model: torch.nn.Module, max_batch_size: int, window_s: float, mode: LogprobsMode):
        self.model, self.max_batch_size, self.window_s, self.mode = model, max_batch_size, window_s, mode
        self.stats = {"batches": 0, "rows": 0}
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        """Start the worker on the running event loop (the app's startup)."""
        # Queue and lock belong to one event loop, so they are made here, once per app start.
        self.lock = asyncio.Lock()
        """Held while the model runs; weight updates take it too, so no batch sees half-loaded weights."""
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def run(self, rows: list[Row]) -> None:
        """Queue the rows and wait until the model has filled in their outputs."""
        job = _Job(rows, asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        await job.done

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            n_rows, deadline = len(jobs[0].rows), loop.time() + self.window_s
            while n_rows < self.max_batch_size and (left := deadline - loop.time()) > 0:
                try:
                    jobs.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
                n_rows += len(jobs[-1].rows)
            rows = [r for job in jobs for r in job.rows]
            try:
                async with self.lock:
                    await asyncio.to_thread(run_rows, self.model, rows, self.max_batch_size, self.mode)
                self.stats["batches"] += 1
                self.stats["rows"] += len(rows)
                outcome: BaseException | None = None
            except Exception as e:  # the requests of this batch get the error, the worker keeps serving
                outcome = e
            for job in jobs:
                if job.done.done():  # a client that hung up has cancelled its future
                    continue
                if outcome is None:
                    job.done.set_result(None)
                else:
                    job.done.set_exception(outcome)
