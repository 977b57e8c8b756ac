"""On-policy distillation between a teacher and a student with different tokenizers (`--cross-tokenizer`).

    text    = student_tokenizer.decode(sampled completion)
    teacher = teacher_prompt(row) + teacher_tokenizer(text) [+ teacher eos]   # the TEACHER's own chat template
    spans   = align_spans(...)      # shortest pieces of text both sides cover with whole tokens (opd.lm.xtok.align)
    loss    = per span, at the span's first student token: D(student events ‖ teacher events)
              + for a span of more than one token on either side: D over {the span's text, anything else}

The teacher's prompt is the prompt row (its text or chat messages) rendered by the teacher's tokenizer and template,
never the student's rendering re-tokenized: a teacher conditioned on another model's template scores every token
of the completion in the wrong context (a biased signal; a test checks that the teacher's scores are those of its
own template).

What is exact and what is approximate, for a divergence D of `opd.losses`:
- Identical tokenizers, canonical samples: every span is one token on each side and every token its own event (when
  no two tokens decode to the same text and the head has no rows beyond the tokenizer), so the loss is the
  same-tokenizer loss (tested). A student sample that is not the teacher's own tokenization of its
  text (BPE can sample "1","2" where it encodes "12") becomes a multi-token span instead.
- Span text probabilities are exact: log P(span) = Σ log p(token | before) over each side's tokens of the span (the
  chain rule). It is the probability of the text *as that token sequence*; other tokenizations of the same text
  (usually negligible for a trained model) are not added. The span term D({text, rest}) compares these exactly, but
  it sees only the sampled text, not the alternatives.
- Event probabilities are exact for each model: P(event) sums that model's own next-token probabilities over the
  event's tokens (`opd.xtok_losses.event_logp`), at the span's first position, where both models have read the same
  text. Whether an event means the same text for both models is the approximation: a shared token text means "this
  text comes next" to both only if both would encode the continuation the same way; a token with no counterpart is
  merged into the event of its longest shared prefix, so its mass is kept, but as a coarser event. With a
  character-level vocabulary on one side every event is "the next character is c", which is the same text event
  for both: exact. Tokens with no shared prefix at all (other scripts, half UTF-8 sequences, special tokens the
  other side lacks) share one `<other>` event, the approximation's weakest part.
- Student positions inside a multi-token span get no event term: their gradient comes through the span's chain-rule
  probability only. A span's loss sits at its first student token, and the loop averages over all of the student's
  completion tokens, as it does the same-tokenizer loss.
We use events instead of ULD's sorted probabilities (which GOLD uses for unmatched tokens): sorting compares the
teacher's k-th most likely token with the student's k-th whatever their texts, a loss that is 0 for any permutation
of the vocabulary; events compare probabilities of the same text wherever a shared prefix exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from opd.chunked import resolve_chunk_size
from opd.lm.data.prompts import PromptSet
from opd.lm.hf.model import final_hidden, lm_head, taken_logp
from opd.lm.xtok.align import Events, align_spans, char_ends, retokenize, teacher_prompt_ids, vocabulary_events
from opd.xtok_losses import event_logp, span_divergence, span_logp


@dataclass
class CrossTokenizerSignal:
    """A cross-tokenizer teacher's grade of a batch: K spans over the student's N completion tokens (in the order
    `mask_BT` lists them), and the teacher's side of each span."""

    span_of_N: torch.Tensor
    """Span id of each student completion token (K for tokens in no span: they get no loss)."""
    first_K: torch.Tensor
    """Index (into N) of each span's first student token, where its loss is put."""
    multi_K: torch.Tensor
    """True where the span has more than one token on either side (it gets the span term)."""
    teacher_span_logp_K: torch.Tensor
    """The teacher's log-probability of each span's text: the chain rule over its tokens of it."""
    teacher_hidden_KD: torch.Tensor
    """The teacher's final hidden state where it predicts the span's first token."""
    teacher_head: Callable[[torch.Tensor], torch.Tensor]
    events: Events

    def per_token(self, divergence, hidden_ND: torch.Tensor, head, targets_N: torch.Tensor,
                  chunk_size: int | None) -> torch.Tensor:
        """The loss of each student completion token [N], differentiable in `hidden_ND`."""
        return cross_tokenizer_loss(divergence, hidden_ND, head, targets_N, self, chunk_size)


def cross_tokenizer_loss(divergence, hidden_ND, head, targets_N, signal: CrossTokenizerSignal,
                         chunk_size: int | None) -> torch.Tensor:
    """Per student token [N]: the event divergence plus (multi-token spans) the span divergence at each span's first
    token, 0 elsewhere (see the module docstring)."""
    n, k, ev = hidden_ND.shape[0], signal.first_K.shape[0], signal.events
    device = hidden_ND.device
    taken_N = hidden_ND.new_zeros(n, dtype=torch.float32)
    student_KE = hidden_ND.new_zeros(k, ev.num_events, dtype=torch.float32)
    pos_of_first = torch.full((n,), -1, dtype=torch.long, device=device)
    pos_of_first[signal.first_K] = torch.arange(k, device=device)
    step = resolve_chunk_size(chunk_size, head, hidden_ND)
    taken_parts, event_parts, event_rows = [], [], []
    for start in range(0, n, step):
        logp = torch.log_softmax(head(hidden_ND[start:start + step]).float(), dim=-1)
        taken_parts.append(logp.gather(1, targets_N[start:start + step, None]).squeeze(1))
        firsts = pos_of_first[start:start + step]
        keep = firsts >= 0
        if keep.any():
            event_parts.append(event_logp(logp[keep], ev.student_V, ev.num_events))
            event_rows.append(firsts[keep])
    if n:
        taken_N = torch.cat(taken_parts)
    if event_parts:
        student_KE = student_KE.index_put((torch.cat(event_rows),), torch.cat(event_parts))
    teacher_KE = teacher_events(signal, ev, step)
    loss_K = divergence(student_KE, teacher_KE)
    student_span_K = span_logp(taken_N, signal.span_of_N, k + 1)[:k]
    span_K = span_divergence(divergence, student_span_K, signal.teacher_span_logp_K)
    loss_K = loss_K + torch.where(signal.multi_K, span_K, torch.zeros_like(span_K))
    return taken_N.new_zeros(n).index_add(0, signal.first_K, loss_K)


@torch.no_grad()
def teacher_events(signal: CrossTokenizerSignal, events: Events, step: int) -> torch.Tensor:
    """The teacher's event log-probs at each span's first position, [K, E]."""
    parts = [event_logp(torch.log_softmax(signal.teacher_head(h).float(), dim=-1), events.teacher_V,
                        events.num_events) for h in signal.teacher_hidden_KD.split(step)]
    return torch.cat(parts) if parts else signal.teacher_hidden_KD.new_zeros(0, events.num_events)


class CrossTokenizerTeacher:
    """A local teacher with its own tokenizer: re-tokenizes each student completion and grades it span by span.

    `prompts` are the rows the loop draws from; each one's teacher prompt is rendered once here, with the teacher's
    template, and found again by the student prompt ids a batch row starts with.
    """

    def __init__(self, model, student_tok, teacher_tok, prompts: PromptSet, student_vocab: int,
                 chunk_size: int | None = None):
        if teacher_tok.eos_token_id is None or student_tok.eos_token_id is None:
            raise ValueError("--cross-tokenizer needs an end-of-sequence token in both tokenizers")
        self.model = model.eval().requires_grad_(False)
        self.student_tok, self.teacher_tok, self.chunk_size = student_tok, teacher_tok, chunk_size
        teacher_vocab = model.get_output_embeddings().weight.shape[0]
        self.events = vocabulary_events(student_tok, teacher_tok, student_vocab, teacher_vocab)
        self.prompts = teacher_prompts(prompts, teacher_tok)

    @torch.no_grad()
    def score(self, input_ids_BL, attention_mask_BL, mask_BT) -> CrossTokenizerSignal:
        rows = [self._row(ids_L, att_L, m_T)
                for ids_L, att_L, m_T in zip(input_ids_BL.tolist(), attention_mask_BL.tolist(), mask_BT.tolist())]
        device = input_ids_BL.device
        pad = self.teacher_tok.pad_token_id if self.teacher_tok.pad_token_id is not None else 0
        width = max(len(r.teacher_ids) for r in rows)
        ids_BL = torch.full((len(rows), width), pad, dtype=torch.long)
        att_BL = torch.zeros((len(rows), width), dtype=torch.long)
        tmask_BT = torch.zeros((len(rows), width - 1), dtype=torch.bool)
        for b, r in enumerate(rows):  # left padding, as the student's batches
            off = width - len(r.teacher_ids)
            ids_BL[b, off:], att_BL[b, off:] = torch.tensor(r.teacher_ids), 1
            tmask_BT[b, off + r.prompt_len - 1:] = True
        ids_BL, att_BL, tmask_BT = ids_BL.to(device), att_BL.to(device), tmask_BT.to(device)
        hidden_BTD = final_hidden(self.model, ids_BL, att_BL)[:, :-1]
        head = lm_head(self.model)
        t_taken_BT = taken_logp(hidden_BTD, head, ids_BL[:, 1:], tmask_BT, self.chunk_size)
        return self._signal(rows, width, hidden_BTD, t_taken_BT, head, device)

    def _row(self, ids_L: list[int], att_L: list[int], mask_T: list[bool]) -> "_Row":
        """One batch row's text, teacher ids and spans."""
        first = mask_T.index(True) if any(mask_T) else len(mask_T)
        prompt = tuple(i for i, a in zip(ids_L[:first + 1], att_L[:first + 1]) if a)
        completion = [i for i, m in zip(ids_L[1:], mask_T) if m]
        if prompt not in self.prompts:
            raise ValueError("a batch row's prompt is not among the prompts the cross-tokenizer teacher was built "
                             "with; build it with the prompt set the loop draws from")
        t_prompt = self.prompts[prompt]
        eos = bool(completion) and completion[-1] == self.student_tok.eos_token_id
        body = completion[:-1] if eos else completion
        text = self.student_tok.decode(body, clean_up_tokenization_spaces=False)
        t_body = retokenize(self.teacher_tok, text) if text else []
        spans = align_spans(char_ends(self.student_tok, body, text, "student"),
                            char_ends(self.teacher_tok, t_body, text, "teacher"), len(text)) if text else []
        if eos:  # the two end-of-sequence tokens: a one-token span of their own
            spans.append((len(body), len(body) + 1, len(t_body), len(t_body) + 1))
        t_completion = t_body + ([self.teacher_tok.eos_token_id] if eos else [])
        return _Row(list(t_prompt) + t_completion, len(t_prompt), len(completion), spans)

    def _signal(self, rows, width, hidden_BTD, t_taken_BT, head, device) -> CrossTokenizerSignal:
        """Index lists of the spans, flattened over the batch, and the teacher's side of each span."""
        span_of, first, multi, t_b, t_t, t_span = [], [], [], [], [], []
        n, k = 0, 0
        total_spans = sum(len(r.spans) for r in rows)
        for b, r in enumerate(rows):
            off = width - len(r.teacher_ids) + r.prompt_len - 1  # target index of the teacher's first completion token
            row_span = [total_spans] * r.student_len
            for s0, s1, t0, t1 in r.spans:
                row_span[s0:s1] = [k] * (s1 - s0)
                first.append(n + s0)
                multi.append(s1 - s0 > 1 or t1 - t0 > 1)
                t_b += [b] * (t1 - t0)
                t_t += range(off + t0, off + t1)
                t_span += [k] * (t1 - t0)
                k += 1
            span_of += row_span
            n += r.student_len
        as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        t_b, t_t, t_span = as_long(t_b), as_long(t_t), as_long(t_span)
        starts = torch.ones_like(t_span, dtype=torch.bool)  # each span's first teacher token
        starts[1:] = t_span[1:] != t_span[:-1]
        return CrossTokenizerSignal(
            span_of_N=as_long(span_of), first_K=as_long(first),
            multi_K=torch.tensor(multi, dtype=torch.bool, device=device),
            teacher_span_logp_K=t_taken_BT.new_zeros(k, dtype=torch.float32).index_add(
                0, t_span, t_taken_BT[t_b, t_t].float()),  # the chain rule over each span's teacher tokens
            teacher_hidden_KD=hidden_BTD[t_b[starts], t_t[starts]], teacher_head=head, events=self.events)


@dataclass
class _Row:
    teacher_ids: list[int]
    prompt_len: int
    student_len: int
    spans: list[tuple[int, int, int, int]]


def teacher_prompts(prompts: PromptSet, teacher_tok) -> dict[tuple[int, ...], list[int]]:
    """Student prompt ids -> the same row's prompt in the teacher's tokens and template. One line if two rows the
    student sees alike would reach the teacher differently (a student template that drops what the teacher's keeps)."""
    table: dict[tuple[int, ...], list[int]] = {}
    for i, (ids, row) in enumerate(zip(prompts.prompt_ids, prompts.rows)):
        key, ours = tuple(ids), teacher_prompt_ids(teacher_tok, row)
        if table.setdefault(key, ours) != ours:
            raise ValueError(f"prompt row {i} renders like an earlier row for the student but differently for the "
                             f"teacher; the cross-tokenizer teacher could not tell them apart: make the rows distinct")
    return table


def cross_tokenizer_teacher(spec: str, cfg, student, student_tok, prompts: PromptSet | None,
                            device) -> CrossTokenizerTeacher:
    """The `--cross-tokenizer` teacher of `spec` (a local model directory or hub id)."""
    from opd.lm.hf.model import load_model, load_tokenizer

    if prompts is None:
        raise ValueError("--cross-tokenizer renders each prompt with the teacher's template: pass the prompt set")
    model = load_model(spec, dtype=cfg.teacher_dtype, device=device)
    return CrossTokenizerTeacher(model, student_tok, load_tokenizer(spec), prompts,
                                 student.get_output_embeddings().weight.shape[0], cfg.chunk_size)
