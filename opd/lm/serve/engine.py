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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from opd.args import LogprobsMode
from opd.lm.hf.decode import next_token_logits


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
    """One sequence to run: a prompt, how to continue it, and (after `run_rows`) what came out.

    The sampling fields follow vLLM's `SamplingParams`; the neutral value of each turns it off."""

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
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 = off (vLLM's -1 is mapped to 0 by the protocol)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely one's (after temperature)."""
    repetition_penalty: float = 1.0
    """HF/vLLM: a token seen in the prompt or the output has its logit divided by this when positive, multiplied
    when negative."""
    presence_penalty: float = 0.0
    """OpenAI/vLLM: subtracted from the logit of every token already generated (output tokens only)."""
    frequency_penalty: float = 0.0
    """OpenAI/vLLM: subtracted once per earlier occurrence in the output."""
    logit_bias: dict[int, float] | None = None
    """Added to the logits of these token ids before anything else."""
    min_tokens: int = 0
    """Stop tokens are masked out (and stop strings not checked) until this many tokens are generated."""
    stop_strings: tuple[str, ...] = ()
    detokenize: Callable[[list[int]], str] | None = None
    """Generated ids -> text, to find `stop_strings` (set whenever they are)."""
    include_stop_str: bool = False
    """Keep the stop string at the end of the text (vLLM's include_stop_str_in_output)."""
    token_ids: list[int] = field(default_factory=list)
    token_logp: list[float] = field(default_factory=list)
    token_top: list[tuple[list[int], list[float]]] = field(default_factory=list)
    prompt_scores: PromptScores | None = None
    finish_reason: str = "length"
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the row (None: the EOS token, or no stop)."""
    text_end: int | None = None
    """Where the text is cut when a stop string ended the row (characters of `detokenize(token_ids)`)."""

    def processes_logits(self) -> bool:
        """Whether anything changes the logits before temperature (so greedy is not the raw argmax)."""
        return bool(self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
                    or self.logit_bias or len(self.token_ids) < self.min_tokens)


def _prompt_scores(logits_LV: torch.Tensor, ids_L: torch.Tensor, k: int) -> PromptScores:
    logp_LV = logits_LV[:-1].float().log_softmax(-1)
    taken_L = logp_LV.gather(-1, ids_L[1:, None])[:, 0]
    rank_L = (logp_LV > taken_L[:, None]).sum(-1) + 1
    top_logp, top_ids = logp_LV.topk(min(k, logp_LV.shape[-1]), dim=-1)
    return PromptScores(taken_L.cpu(), rank_L.cpu(), top_ids.cpu(), top_logp.cpu())


class _History:
    """What the penalties read: which tokens each row has seen (prompt and output) and how often it generated each.
    Built only when some row of the chunk has a penalty: two [B, V] buffers."""

    def __init__(self, rows: list[Row], vocab: int, device: torch.device):
        self.seen_BV = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
        for b, r in enumerate(rows):
            self.seen_BV[b, torch.tensor(r.prompt_ids, device=device)] = True
        self.counts_BV = torch.zeros(len(rows), vocab, device=device)

    def add(self, next_B: torch.Tensor) -> None:
        self.seen_BV.scatter_(1, next_B[:, None], True)
        self.counts_BV.scatter_add_(1, next_B[:, None], torch.ones_like(next_B[:, None], dtype=torch.float))


def _penalised(logits_BV: torch.Tensor, rows: list[Row], history: _History | None) -> torch.Tensor:
    """The logits after logit bias, min_tokens and the penalties, in vLLM's order (bias and min_tokens first)."""
    if not any(r.processes_logits() for r in rows):
        return logits_BV
    logits_BV = logits_BV.clone()
    for b, r in enumerate(rows):
        if r.logit_bias:
            ids = torch.tensor(list(r.logit_bias), device=logits_BV.device)
            logits_BV[b, ids] += torch.tensor(list(r.logit_bias.values()), device=logits_BV.device)
        if len(r.token_ids) < r.min_tokens and r.stop_ids:
            logits_BV[b, torch.tensor(sorted(r.stop_ids), device=logits_BV.device)] = float("-inf")
    if history is not None:
        rep_B1 = torch.tensor([r.repetition_penalty for r in rows], device=logits_BV.device)[:, None]
        penalised_BV = torch.where(logits_BV > 0, logits_BV / rep_B1, logits_BV * rep_B1)
        logits_BV = torch.where(history.seen_BV, penalised_BV, logits_BV)
        freq_B1 = torch.tensor([r.frequency_penalty for r in rows], device=logits_BV.device)[:, None]
        pres_B1 = torch.tensor([r.presence_penalty for r in rows], device=logits_BV.device)[:, None]
        logits_BV = logits_BV - freq_B1 * history.counts_BV - pres_B1 * (history.counts_BV > 0)
    # A penalty far from 1 can push a logit past float32's range; an infinite one would make the softmax NaN.
    finite = torch.finfo(logits_BV.dtype)
    return logits_BV.clamp(finite.min, finite.max)


def _sample_step(
    logits_BV: torch.Tensor, rows: list[Row], gens: list[torch.Generator], mode: LogprobsMode,
    history: _History | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each row's next token; return (token ids [B], the log-probs to report [B, V]).

    The order is vLLM's: logit bias, min_tokens and penalties; greedy takes the argmax there; otherwise temperature,
    min_p, top-k, then top-p on what top-k left (renormalised). `raw_logprobs` reports the model's own distribution,
    before all of it; `processed_logprobs` the one actually sampled from (for a greedy row: after the penalties)."""
    device = logits_BV.device
    temps_B = torch.tensor([r.temperature for r in rows], device=device)
    top_p_B = torch.tensor([r.top_p for r in rows], device=device)
    # Below vLLM's 1e-5 (its _SAMPLING_EPS) a temperature means greedy, as in vLLM: dividing float32 logits by it
    # can overflow them to inf and the softmax to nan.
    greedy_B = temps_B < 1e-5
    raw_logp_BV = logits_BV.log_softmax(-1)
    logits_BV = _penalised(logits_BV, rows, history)
    probs_BV = (logits_BV / torch.where(greedy_B, 1.0, temps_B)[:, None]).softmax(-1)
    min_p_B = torch.tensor([r.min_p for r in rows], device=device)
    if bool((min_p_B > 0).any()):
        probs_BV = probs_BV * (probs_BV >= min_p_B[:, None] * probs_BV.amax(-1, keepdim=True))
    sorted_p_BV, order_BV = probs_BV.sort(-1, descending=True)
    V = logits_BV.shape[-1]
    top_k_B = torch.tensor([r.top_k if 0 < r.top_k < V else V for r in rows], device=device)
    keep_sorted_BV = torch.arange(V, device=device)[None, :] < top_k_B[:, None]
    kept_p_BV = sorted_p_BV * keep_sorted_BV
    # A token stays in the nucleus while the mass strictly before it is < top_p of what min_p and top-k left; the
    # first one always stays, even when a tiny top_p rounds to 0 in float32.
    limit_B1 = top_p_B[:, None] * kept_p_BV.sum(-1, keepdim=True)
    keep_sorted_BV &= (kept_p_BV.cumsum(-1) - kept_p_BV) < limit_B1
    keep_sorted_BV[:, 0] = True
    kept_p_BV = sorted_p_BV * keep_sorted_BV
    cdf_BV = kept_p_BV.cumsum(-1)
    # Inverse-CDF sampling with one uniform per row from that row's own generator: batch-independent.
    u_B = torch.tensor([torch.rand((), generator=g).item() for g in gens], device=device)
    pick_B = torch.searchsorted(cdf_BV, (u_B * cdf_BV[:, -1])[:, None], right=True)[:, 0]
    pick_B = torch.minimum(pick_B, keep_sorted_BV.sum(-1) - 1)
    next_B = torch.where(greedy_B, logits_BV.argmax(-1), order_BV.gather(-1, pick_B[:, None])[:, 0])
    if mode == "raw_logprobs":
        return next_B, raw_logp_BV
    # The distribution actually sampled from: processed, tempered, cut (-inf outside), renormalised.
    processed_BV = torch.empty_like(logits_BV).scatter(-1, order_BV, (kept_p_BV / cdf_BV[:, -1:]).log())
    return next_B, torch.where(greedy_B[:, None], logits_BV.log_softmax(-1), processed_BV)


def _find_stop(row: Row, scanned: int) -> tuple[tuple[str, int] | None, int]:
    """((the stop string, where it starts in the row's text) or None, the text's length). Only the text after
    character `scanned` minus the string's length is searched (a stop string may straddle earlier tokens); the
    earliest occurrence wins."""
    text = row.detokenize(row.token_ids)
    found = [(i, s) for s in row.stop_strings if (i := text.find(s, max(0, scanned - len(s) + 1))) >= 0]
    if not found:
        return None, len(text)
    start, stop = min(found)
    return (stop, start), len(text)


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
    # decoding steps through the trunk and a plain head as weight @ hidden.T where the model allows (opd.lm.hf.decode)
    decode = next_token_logits(model, out.cache) if steps > 0 else None
    penalties = any(r.repetition_penalty != 1.0 or r.presence_penalty or r.frequency_penalty for r in rows)
    history = _History(rows, logits_BV.shape[-1], logits_BV.device) if penalties and steps > 0 else None
    scanned = [0] * B  # characters of each row's text already searched for stop strings
    for _ in range(steps):
        if all(done):
            break
        next_B, logp_BV = _sample_step(logits_BV, rows, gens, mode, history)
        if history is not None:
            history.add(next_B)
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
            hit = None
            if r.stop_strings and next_list[b] not in r.stop_ids:
                hit, scanned[b] = _find_stop(r, scanned[b])
                hit = hit if len(r.token_ids) >= r.min_tokens else None  # vLLM checks none before min_tokens
            if next_list[b] in r.stop_ids:
                r.finish_reason, done[b] = "stop", True
            elif hit is not None:
                r.finish_reason, r.stop_reason, done[b] = "stop", hit[0], True
                r.text_end = hit[1] + (len(hit[0]) if r.include_stop_str else 0)
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


class Busy(RuntimeError):
    """More rows wait for the model than the server takes (`max_queued`); answered with 503 and Retry-After."""


class BatchingEngine:
    """Collects the rows of concurrent requests for up to `window_s` and runs them on the model as one batch."""

    def __init__(self, model: torch.nn.Module, max_batch_size: int, window_s: float, mode: LogprobsMode,
                 max_queued: int | None = None):
        self.model, self.max_batch_size, self.window_s, self.mode = model, max_batch_size, window_s, mode
        self.max_queued = max_queued
        """Most rows waiting in the queue (None: no bound); a request that would pass it is refused with `Busy`."""
        self.queued = 0
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
        """Queue the rows and wait until the model has filled in their outputs; `Busy` when the queue is full."""
        if self.max_queued is not None and self.queued + len(rows) > self.max_queued and self.queued:
            # a request larger than the bound alone still runs when nothing waits: it would otherwise never run
            raise Busy(f"{self.queued} sequences are waiting for the model (at most {self.max_queued}); retry later")
        job = _Job(rows, asyncio.get_running_loop().create_future())
        self.queued += len(rows)
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
            self.queued -= sum(len(job.rows) for job in jobs)
            # a client that hung up while its job waited has cancelled it (`opd.lm.serve.app`): its rows are not run
            jobs = [job for job in jobs if not job.done.done()]
            if not jobs:
                continue
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
