"""Speculative knowledge distillation (SKD; Xu et al. 2024): the student proposes, the teacher keeps or replaces.

    each round, for every unfinished row:
        d_1..d_G ~ student, one token at a time over its KV cache                  (G proposals: `block_for`)
        the teacher's logits before each d_i: one forward pass over the block, through the teacher's own KV cache
        keep d_1..d_{j-1}, each within the teacher's top-K at its position; at the first one outside it (d_j) draw
        the teacher's replacement r ~ teacher there, drop d_{j+1}..d_G; the next round starts from r

While the student is weak most of its tokens are replaced and a batch reads like teacher samples (the supervised
end); as it learns, more proposals are accepted and the batch becomes its own samples (on-policy). The loss is then
the run's divergence on these sequences, as for source=student.

Layout: both caches hold the same slots: the prompt, then per round the token the round starts from and the
proposals fed after it (the last proposal is never fed: the next round starts from it or from its replacement). A
rejected proposal's slot stays in the caches as a hole that the attention mask hides and the per-row positions skip,
so rows that advance at different speeds share one batch and nothing is run twice; slots that are holes in every row
at the end are cropped, and finished rows leave the batch (and both caches) at the end of each round.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from opd import flops
from opd.config import DistillConfig, SamplingArgs
from opd.lm.batch import Batch, layout
from opd.lm.data.prompts import PromptSet
from opd.lm.hf.decode import check_sampling, left_pad, next_token_logits, pick_tokens
from opd.lm.hf.model import hf_model, position_ids
from opd.lm.teachers.local import LocalTeacher

BLOCK = 4
"""Most proposals per round (and the first round's): the student drafts up to this many tokens before the teacher
checks them in one pass. Larger blocks cost fewer teacher calls when most proposals are accepted, and more discarded
drafts when few are; later rounds of a batch draft `block_for` the batch's acceptance so far."""


def block_for(acceptance: float, most: int = BLOCK) -> int:
    """The block for rows expected to keep each proposal with probability `acceptance`: the proposals a row keeps
    before its first rejection on average, a / (1 - a), rounded down, between 1 and `most`. Rows run in lockstep, so a
    round costs every row the whole block, and proposals past a row's rejection are drafted for nothing (the
    arithmetic task, batch 32, one thread: 1 is fastest at a = 0.6, 4 at a = 0.95). A function of the batch's own
    draws only, so a resumed run drafts exactly what an uninterrupted one would."""
    if acceptance >= 1.0:
        return most
    return min(most, max(1, int(acceptance / (1.0 - acceptance))))


@dataclass
class Work:
    """What one model computed while sampling, in the units of `opd.flops.forward_flops` (real tokens only)."""

    tokens: int = 0
    """Tokens run through the trunk (discarded proposals included: they were computed)."""
    attended: int = 0
    """Σ over those tokens of the context each one attended to (itself included; holes and padding excluded)."""
    head_positions: int = 0
    """Positions whose logits the head computed."""

    def add(self, attn_BS: torch.Tensor, new: int, heads_per_row: int) -> None:
        """Count a forward pass that fed the last `new` slots of `attn_BS` (the mask over cache + fed slots)."""
        fed_BN = attn_BS[:, -new:].long()
        context_BN = attn_BS.long().cumsum(-1)[:, -new:]
        self.tokens += int(fed_BN.sum())
        self.attended += int((context_BN * fed_BN).sum())
        self.head_positions += heads_per_row * attn_BS.shape[0]

    def flops(self, cost: flops.ModelCost | None) -> float | None:
        """Forward FLOPs of this work (`opd.flops`'s formula); None for a model of unknown size."""
        if cost is None:
            return None
        return (2.0 * cost.trunk_params * self.tokens + 4.0 * cost.n_layers * cost.d_attn * self.attended
                + 2.0 * cost.head_params * self.head_positions)


@dataclass
class SkdCounts:
    """What happened to the student's proposals in one batch."""

    proposals: int = 0
    """Proposals the teacher judged that made it into a completion: each kept token is one (accepted, or replaced)."""
    accepted: int = 0
    """Proposals within the teacher's top-K."""
    replaced: int = 0
    """Proposals outside it, each replaced by a teacher sample."""
    rounds: int = 0
    """Draft-and-verify rounds (teacher passes)."""
    student: Work = field(default_factory=Work)
    teacher: Work = field(default_factory=Work)

    @property
    def acceptance(self) -> float:
        """accepted / proposals."""
        return self.accepted / max(1, self.proposals)


@torch.no_grad()
def speculative_completions(
    student,
    teacher,
    prompt_ids: list[list[int]],
    pad_id: int,
    eos_id: int | None,
    max_new_tokens: int,
    top_k: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    teacher_temperature: float | None = None,
    block: int = BLOCK,
    adaptive: bool = True,
) -> tuple[list[list[int]], SkdCounts]:
    """One SKD completion per prompt, each ending at its first eos (kept) or at `max_new_tokens`; and the counts.

    `student` and `teacher`: Hugging Face causal LMs over the same vocabulary, on the same device. A proposal is
    kept when fewer than `top_k` tokens have a larger teacher logit than it (ties kept: top_k >= V keeps all).
    Proposals are drawn at `temperature`/`top_p` as `opd.lm.hf.decode` draws them, replacements from the teacher at
    `teacher_temperature` (default: `temperature`; 0 is greedy) and `top_p`; both from torch's global RNG.
    `block`: the first round's proposals, and the most of any round; later rounds draft `block_for` the acceptance
    rate of the batch so far (`adaptive`), else `block` each. The block changes the cost, not the distribution: each
    token is still a student draw kept or a teacher draw given the sequence before it.
    """
    check_sampling(prompt_ids, max_new_tokens, temperature, top_p)
    teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
    for name, value, ok in (("top_k", top_k, top_k >= 1), ("block", block, block >= 1),
                            ("teacher_temperature", teacher_temperature, teacher_temperature >= 0)):
        if not ok:
            raise ValueError(f"{name} must be {'>= 0' if name == 'teacher_temperature' else '>= 1'}, got {value}")
    device = next(student.parameters()).device
    ids_BP, attn_BP = left_pad(prompt_ids, pad_id)
    was_training, teacher_was_training = student.training, teacher.training
    student.eval()
    teacher.eval()
    try:
        return _Rounds(student, teacher, ids_BP.to(device), attn_BP.to(device), eos_id, max_new_tokens, top_k,
                       (temperature, teacher_temperature, top_p), block, adaptive).run()
    finally:
        student.train(was_training)
        teacher.train(teacher_was_training)


class _Rounds:
    """The state of one batch between rounds. Shapes: B rows still in the batch, S cache slots, U tokens the round
    starts from (the prompt in the first round, one token after), G proposals this round."""

    def __init__(self, student, teacher, ids_BP, attn_BP, eos_id, max_new_tokens, top_k, temps, block, adaptive):
        self.student, self.teacher, self.eos_id, self.max_new = student, teacher, eos_id, max_new_tokens
        self.top_k, (self.temperature, self.teacher_temperature, self.top_p) = top_k, temps
        self.block, self.adaptive = block, adaptive
        self.s_cache, self.t_cache = DynamicCache(config=student.config), DynamicCache(config=teacher.config)
        self.propose = next_token_logits(student, self.s_cache)  # the plain sampler's own decoding step
        self.counts = SkdCounts()
        self.completions: list[list[int]] = [[] for _ in range(ids_BP.shape[0])]
        self.rows = list(range(ids_BP.shape[0]))  # which prompt each row of the (shrinking) batch belongs to
        self.attn_BS = attn_BP[:, :0]  # the slots both caches hold, 0 at padding and holes
        self.start_BU, self.start_attn_BU, self.start_pos_BU = ids_BP, attn_BP, position_ids(attn_BP)
        self.next_pos_B = self.start_pos_BU[:, -1] + 1  # position of the round's first proposal

    def run(self) -> tuple[list[list[int]], SkdCounts]:
        while self.rows:
            budget = [self.max_new - len(self.completions[r]) for r in self.rows]
            c = self.counts
            G = block_for(c.acceptance, self.block) if self.adaptive and c.proposals else self.block
            G = min(G, max(budget))
            c.rounds += 1
            drafts_BG = self._draft(G)
            teacher_BGV = self._teacher_logits(drafts_BG)
            self._settle(drafts_BG, teacher_BGV, budget)
        return self.completions, self.counts

    def _draft(self, G: int) -> torch.Tensor:
        """The student's G proposals per row, [B, G]: one decoding step each, the first fed the round's start."""
        attn = torch.cat([self.attn_BS, self.start_attn_BU], 1)
        logits_BV = self.propose(self.start_BU, attn, self.start_pos_BU)
        self.counts.student.add(attn, self.start_BU.shape[1], 1)
        drafts = []
        for i in range(G):
            drafts.append(pick_tokens(logits_BV, self.temperature, self.top_p))
            if i + 1 == G:  # the last proposal is fed next round, if it is kept (else its replacement is)
                break
            attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], 1)
            logits_BV = self.propose(drafts[-1][:, None], attn, (self.next_pos_B + i)[:, None])
            self.counts.student.add(attn, 1, 1)
        return torch.stack(drafts, 1)

    def _teacher_logits(self, drafts_BG: torch.Tensor) -> torch.Tensor:
        """The teacher's logits before each proposal, [B, G, V], from one pass over the round's start + d_1..d_{G-1}
        (the same slots the student's cache now holds)."""
        B, G = drafts_BG.shape
        fed_BN = torch.cat([self.start_BU, drafts_BG[:, :-1]], 1)
        attn = torch.cat([self.attn_BS, self.start_attn_BU, self.start_attn_BU.new_ones((B, G - 1))], 1)
        pos_BN = torch.cat([self.start_pos_BU, self.next_pos_B[:, None] + torch.arange(G - 1, device=attn.device)], 1)
        self.attn_BS = attn
        self.counts.teacher.add(attn, fed_BN.shape[1], G)
        return block_logits(self.teacher, self.t_cache, fed_BN, attn, pos_BN, G).float()

    def _settle(self, drafts_BG: torch.Tensor, teacher_BGV: torch.Tensor, budget: list[int]) -> None:
        """Keep, replace, extend the completions; hide the dropped proposals' slots; drop finished rows."""
        B, G = drafts_BG.shape
        drafted_BG1 = teacher_BGV.gather(-1, drafts_BG[..., None])
        kept_BG = (teacher_BGV > drafted_BG1).sum(-1) < self.top_k
        first_out_B = torch.where(kept_BG.all(1), G, (~kept_BG).int().argmax(1))  # j: G when all were kept
        tokens_BG = drafts_BG.clone()
        out = (first_out_B < G).nonzero().squeeze(1)
        if len(out):
            at = first_out_B[out]
            tokens_BG[out, at] = pick_tokens(teacher_BGV[out, at], self.teacher_temperature, self.top_p)
        keep, last, advance = [], [], []
        for b, (row, toks, j) in enumerate(zip(self.rows, tokens_BG.tolist(), first_out_B.tolist())):
            new = toks[:min(j + 1, G)][:budget[b]]
            if self.eos_id in new:
                new = new[:new.index(self.eos_id) + 1]
            self.completions[row].extend(new)
            replaced = int(j < len(new))
            self.counts.proposals += len(new)
            self.counts.replaced += replaced
            self.counts.accepted += len(new) - replaced
            if new[-1] != self.eos_id and len(self.completions[row]) < self.max_new:
                keep.append(b)
                last.append(new[-1])
                advance.append(len(new))
        # proposal slots d_1..d_{G-1}: d_i stays visible only where it was kept (i < j)
        if G > 1:
            self.attn_BS[:, -(G - 1):] = (torch.arange(G - 1, device=self.attn_BS.device) < first_out_B[:, None])
        self._next_round(keep, last, advance, B)

    def _next_round(self, keep: list[int], last: list[int], advance: list[int], B: int) -> None:
        device = self.attn_BS.device
        if len(keep) < B:
            index = torch.tensor(keep, dtype=torch.long, device=device)
            if keep:
                self.s_cache.batch_select_indices(index)
                self.t_cache.batch_select_indices(index)
            self.rows = [self.rows[b] for b in keep]
            self.attn_BS, self.next_pos_B = self.attn_BS[index], self.next_pos_B[index]
        if not self.rows:
            return
        advance_B = torch.tensor(advance, device=device)
        self.start_BU = torch.tensor(last, dtype=torch.long, device=device)[:, None]
        self.start_attn_BU = self.attn_BS.new_ones((len(keep), 1))
        self.start_pos_BU = (self.next_pos_B + advance_B - 1)[:, None]
        self.next_pos_B = self.next_pos_B + advance_B
        # slots hidden in every remaining row at the end of the caches are dead weight for every later pass
        live = self.attn_BS.any(0).nonzero()
        length = int(live[-1]) + 1 if len(live) else 0
        if length < self.attn_BS.shape[1]:  # a negative count: the slots to remove, in every transformers version
            self.s_cache.crop(length - self.attn_BS.shape[1])
            self.t_cache.crop(length - self.attn_BS.shape[1])
            self.attn_BS = self.attn_BS[:, :length]


def block_logits(model, cache, ids_BN: torch.Tensor, attn_BS: torch.Tensor, pos_BN: torch.Tensor, n: int):
    """Logits [B, n, V] at the last `n` fed positions of a forward pass of `ids_BN` through `cache` (the model's own
    head and logit post-processing; `attn_BS` covers the cache's slots and the fed ones)."""
    params = inspect.signature(hf_model(model).forward).parameters
    # transformers 5 names the argument `cache`; older models and releases `past_key_values`
    extra = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}
    if "logits_to_keep" in params:
        extra["logits_to_keep"] = n
    out = model(input_ids=ids_BN, attention_mask=attn_BS, position_ids=pos_BN, **extra)
    return out.logits[:, -n:]


class SpeculativeActor:
    """source=speculative: each step's batch is SKD's interleaved sampling (the student proposes, a local teacher
    keeps or replaces); `step_metrics` reports the last batch's acceptance and the FLOPs both models spent on it."""

    source = "student"  # the sequences are the student's, with the teacher's corrections

    def __init__(self, student, teacher_model, prompts: PromptSet, pad_id: int, eos_id: int | None,
                 sampling: SamplingArgs, top_k: int, block: int = BLOCK):
        self.student, self.teacher_model, self.prompts, self.pad_id, self.eos_id = (
            student, teacher_model, prompts, pad_id, eos_id)
        self.s, self.top_k, self.block = sampling, top_k, block
        self.costs = flops.model_cost(student), flops.model_cost(teacher_model)
        self.last: SkdCounts | None = None

    def choose(self, rng: torch.Generator) -> str:
        return self.source

    def sync(self, student, step: int) -> None:
        pass  # samples from the student being trained itself

    def rollouts(self, draw) -> Batch:
        prompt_ids = [self.prompts.prompt_ids[i] for i in draw.rows]
        completions, self.last = speculative_completions(
            self.student, self.teacher_model, prompt_ids, self.pad_id, self.eos_id, self.s.max_new_tokens,
            self.top_k, self.s.temperature, self.s.top_p, block=self.block)
        # Not build_batch: a completion cut by max_new_tokens stays as sampled, without an eos it never produced.
        return layout(prompt_ids, completions, self.pad_id)

    def step_metrics(self) -> dict:
        """The last batch's acceptance rate and counts, and what sampling it cost: the student's drafting
        (discarded proposals included) as flops_sample, the teacher's verification passes as flops_teacher_generate."""
        c = self.last
        return {"skd_acceptance": c.acceptance, "skd_proposals": c.proposals, "skd_replacements": c.replaced,
                "skd_rounds": c.rounds, "flops_sample": c.student.flops(self.costs[0]),
                "flops_teacher_generate": c.teacher.flops(self.costs[1])}

    def close(self) -> None:
        pass


def speculative_actor(cfg: DistillConfig, student, teacher, prompts: PromptSet, pad_id: int,
                      eos_id: int | None) -> SpeculativeActor:
    """source=speculative's actor for `cfg`; refuses a teacher that is not one local model."""
    if not isinstance(teacher, LocalTeacher):
        raise ValueError(f"--source speculative needs a local teacher model to check the student's proposals; this "
                         f"teacher is a {type(teacher).__name__}; pass a model directory or hub id as --teacher (with "
                         f"a LoRA student, --teacher self is not one: pass its base model's directory)")
    vocab = student.get_output_embeddings().weight.shape[0]
    if cfg.skd_top_k >= vocab:
        print(f"opd: warning: --skd-top-k {cfg.skd_top_k} is at least the vocabulary's {vocab} tokens: every proposal "
              f"is kept, and this is on-policy distillation (source=student) at a teacher pass per block more",
              file=sys.stderr)
    return SpeculativeActor(student, teacher.model, prompts, pad_id, eos_id, cfg.sampling, cfg.skd_top_k)
