"""A completions server as a teacher: `RemoteTeacher.score` sends each sequence's token ids with
`prompt_logprobs=top_k` and turns vLLM's per-prompt-token answer into a `TeacherSignal` in target coordinates (entry
i >= 1 of `prompt_logprobs` is the distribution over token i given tokens < i, which is target position i - 1 of the
unpadded sequence)."""

from __future__ import annotations

import math

import httpx
import torch

from opd.lm.batch import TeacherSignal
from opd.lm.remote.client import (
    BadAnswer,
    CompletionsClient,
    check_ids,
    check_logp,
    check_served_vocabulary,
    score_shapes,
)
from opd.lm.teachers.base import TeacherUnreachable


def _position_entries(entries: dict, taken_id: int, k: int, url: str = "the server",
                      vocab_size: int | None = None) -> tuple[list[int], list[float], float]:
    """One `prompt_logprobs` entry -> (top-k ids, their log-probs, the taken token's log-prob), each checked.

    vLLM sends the top-k plus the taken token when it is not among them (k + 1 entries); that extra one is left out
    of the top-k. An entry that is not {id: {logprob, rank}}, an id outside [0, vocab_size), a log-prob that is not a
    finite number <= 0: BadAnswer.
    """
    if not isinstance(entries, dict) or str(taken_id) not in entries:
        raise BadAnswer(f"the prompt_logprobs from {url} lack the prompt token {taken_id}; is it vLLM-compatible?")
    try:
        items = [(int(t), e["logprob"], e["rank"]) for t, e in entries.items()]
    except (KeyError, TypeError, ValueError):
        raise BadAnswer(f"{url} sent a prompt_logprobs entry that is not vLLM's {{token id: {{logprob, rank}}}}"
                        ) from None
    check_ids(url, "top-k token id", [t for t, _, _ in items], vocab_size)
    logps = check_logp(url, "a prompt log-prob", [lp for _, lp, _ in items])
    ranks = [r if isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) else None
             for _, _, r in items]
    if None in ranks:
        raise BadAnswer(f"{url} sent a prompt_logprobs rank that is not a number")
    items = [(t, lp, r) for (t, _, _), lp, r in zip(items, logps, ranks)]
    taken = next(lp for t, lp, _ in items if t == taken_id)
    if len(items) > k:
        items = [it for it in items if it[0] != taken_id]
    items.sort(key=lambda it: (it[2], -it[1]))
    return [t for t, _, _ in items[:k]], [lp for _, lp, _ in items[:k]], taken


def _choices(url: str, answers: list[dict], counts: list[int]) -> list[dict]:
    """The choices of each answer in prompt order, checked: a non-empty list of objects with distinct indices, one per
    prompt sent."""
    out = []
    for answer, n in zip(answers, counts):
        choices = answer.get("choices")
        if (not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices)
                or sorted(c.get("index") for c in choices if isinstance(c.get("index"), int)) != list(range(n))):
            got = len(choices) if isinstance(choices, list) else 0
            raise BadAnswer(f"{url} answered {got} choices (or choices without indices 0..{n - 1}) for {n} prompts")
        out.extend(sorted(choices, key=lambda c: c["index"]))
    return out


class RemoteTeacher:
    """A teacher behind a vLLM-compatible completions server; `score` returns top-k log-probs per target.

    `model=None` uses the first model the server lists at /v1/models.
    """

    def __init__(
        self, base_url: str, model: str | None = None, top_k: int = 20, api_key: str | None = None,
        timeout: float = 60.0, max_retries: int = 5, backoff: float = 0.5, seqs_per_request: int = 16,
        max_concurrency: int = 4, transport: httpx.BaseTransport | None = None,
    ):
        if top_k < 1:
            raise ValueError(f"top_k={top_k}: need at least 1 (vLLM's default limit is 20, --max-logprobs)")
        self.model, self.top_k = model, top_k
        self.seqs_per_request, self.max_concurrency = seqs_per_request, max_concurrency
        self.client = CompletionsClient(base_url, api_key, timeout, max_retries, backoff, transport)
        self.vocab_size: int | None = None
        """The student's vocabulary, once `check` ran: `score` refuses top-k ids outside it."""

    def check(self, tokenizer, vocab_size: int) -> None:
        """Before training: the URL is an OpenAI-compatible server that scores with prompt_logprobs=top_k over the
        student's vocabulary (`check_served_vocabulary`); a one-line ValueError naming the fix otherwise. A server
        that does not answer is left to the first step, which stops with a resumable checkpoint."""
        try:
            card = self.client.model_card()
        except TeacherUnreachable:
            return
        self.model = self.model or card["id"]
        check_served_vocabulary(self.client, self.model, tokenizer, vocab_size, self.top_k)
        self.vocab_size = vocab_size

    def close(self) -> None:
        """Close the connection pool to the server."""
        self.client.close()

    def score(
        self, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor, mask_BT: torch.Tensor
    ) -> TeacherSignal:
        """Top-k and taken-token log-probs of every target; positions without a real context+token hold -inf / id 0.

        Padding (left or right) is stripped using `attention_mask_BL`; rows with no completion target are not sent.
        """
        B, L = score_shapes(input_ids_BL, attention_mask_BL, mask_BT)
        K = self.top_k
        taken_BT = torch.full((B, L - 1), float("-inf"))
        top_ids_BTK = torch.zeros(B, L - 1, K, dtype=torch.long)
        top_logp_BTK = torch.full((B, L - 1, K), float("-inf"))
        rows, seqs, starts = [], [], []
        for b in range(B):
            pos = attention_mask_BL[b].nonzero()[:, 0]
            if len(pos) and pos[-1] - pos[0] + 1 != len(pos):
                raise ValueError(f"row {b}: attention_mask has holes; only left or right padding is supported")
            if len(pos) >= 2 and bool(mask_BT[b].any()):
                rows.append(b)
                seqs.append(input_ids_BL[b, pos].tolist())
                starts.append(int(pos[0]))
        if self.model is None:
            self.model = self.client.served_model()
        bodies = [
            # echo + max_tokens=0 is vLLM's "score the prompt, generate nothing" request.
            {"model": self.model, "prompt": seqs[i : i + self.seqs_per_request], "max_tokens": 0, "echo": True,
             "prompt_logprobs": K, "return_token_ids": True}
            for i in range(0, len(seqs), self.seqs_per_request)
        ]
        answers = self.client.post_many("/v1/completions", bodies, self.max_concurrency)
        url = f"{self.client.base_url}/v1/completions"
        choices = _choices(url, answers, [len(b["prompt"]) for b in bodies])
        for b, seq, start, choice in zip(rows, seqs, starts, choices):
            if choice.get("prompt_token_ids") not in (None, seq):
                raise BadAnswer(f"row {b}: {url} re-tokenized the prompt; send token ids to a server that keeps them "
                                "(vLLM or opd serve)")
            entries = choice.get("prompt_logprobs") or []
            if not isinstance(entries, list) or len(entries) != len(seq):
                raise BadAnswer(f"row {b}: {url} sent {len(entries)} prompt_logprobs for {len(seq)} tokens")
            row_ids, row_logp, row_taken = [], [], []
            for i in range(1, len(seq)):
                ids, logps, taken = _position_entries(entries[i], seq[i], K, url, self.vocab_size)
                row_ids.append(ids + [0] * (K - len(ids)))  # a vocabulary smaller than K gives fewer entries
                row_logp.append(logps + [float("-inf")] * (K - len(ids)))
                row_taken.append(taken)
            span = slice(start, start + len(seq) - 1)
            taken_BT[b, span] = torch.tensor(row_taken)
            top_ids_BTK[b, span] = torch.tensor(row_ids, dtype=torch.long)
            top_logp_BTK[b, span] = torch.tensor(row_logp)
        if self.vocab_size is not None and int(top_ids_BTK.max()) >= self.vocab_size:
            raise ValueError(f"{self.client.base_url} sent token id {int(top_ids_BTK.max())}, outside the student's "
                             f"vocabulary of {self.vocab_size}; serve a model that shares the student's tokenizer")
        if bool((mask_BT.cpu().bool() & taken_BT.isinf()).any()):
            raise ValueError("mask_BT marks a target without context (padding or a row's first token); fix the mask")
        device = input_ids_BL.device
        return TeacherSignal(
            taken_logp_BT=taken_BT.to(device), topk_ids_BTK=top_ids_BTK.to(device),
            topk_logp_BTK=top_logp_BTK.to(device),
        )
