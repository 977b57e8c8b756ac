"""A full-vocabulary teacher behind `opd serve`: its final hidden states over the wire, its LM head once.

A top-k remote teacher (`opd.lm.remote.teacher.RemoteTeacher`) sends k log-probs per token, and the divergences see the
rest of the vocabulary as one tail bucket. `HiddenStateTeacher` asks `opd serve`'s `/opd/hidden_states` for the
teacher's final hidden states instead (D numbers per graded token, e.g. 960 for SmolLM2-360M, against a 49k vocabulary)
and fetches its LM head from `/opd/lm_head` once; its `TeacherSignal` then carries `hidden_BTD` and `head`, exactly what
a `LocalTeacher` gives, and the trainer computes the exact full-vocabulary divergence chunk by chunk (`opd.fused`). Wire
format and the server's checks: `opd.lm.serve.hidden`. vLLM has no such endpoint: against vLLM use the top-k payload.

Only the graded span of each row crosses the wire: the sequence is sent up to its last completion target, and the
server answers from its first one (prompt-only positions, never read by the loss, are left at 0 in `hidden_BTD`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import httpx
import torch

from opd.lm.batch import TeacherSignal
from opd.lm.hf.model import taken_logp
from opd.lm.remote.client import BadAnswer, CompletionsClient, ServerRefused, score_shapes
from opd.lm.serve.wire import WireDtype, apply_head, decode_array, wire_bytes

_HEAD_PIECE_BYTES = 32 * 2**20
"""About how many bytes of head weight one `/opd/lm_head` answer carries (a 49k x 960 float32 head: 6 requests)."""

_HIDDEN_REQUEST_BYTES = 64 * 2**20
"""Most bytes of hidden states one `/opd/hidden_states` answer carries (`opd serve --max-response-bytes` is 512 MB):
long sequences of a wide model go in fewer per request than `seqs_per_request`."""


def _decoded(url: str, obj, dtype: WireDtype, what: str) -> torch.Tensor:
    """`decode_array(obj, dtype)`, refused (BadAnswer) when it is not an encoded array or holds NaN or inf."""
    try:
        values = decode_array(obj, dtype)
    except (KeyError, TypeError, ValueError):  # not {"shape", "data"}, bad base64, a shape that does not fit
        raise BadAnswer(f"{url} sent {what} that are not a base64 {dtype} array with its shape") from None
    if not bool(torch.isfinite(values).all()):
        raise BadAnswer(f"{url} sent {what} holding NaN or inf")
    return values


class HiddenStateTeacher:
    """A teacher behind `opd serve` that sends final hidden states; `score` returns them with the teacher's head.

    `dtype` is the wire precision of the hidden states and the head: float32 (exact) or float16 (half the bytes,
    ~5e-4 relative error). `with_taken_logp=False` skips the teacher's log-prob of the taken tokens (only the
    sampled and SFT losses read it), as `LocalTeacher` does.
    """

    def __init__(
        self, base_url: str, model: str | None = None, api_key: str | None = None, timeout: float = 60.0,
        max_retries: int = 5, backoff: float = 0.5, seqs_per_request: int = 16, max_concurrency: int = 4,
        dtype: WireDtype = "float32", chunk_size: int | None = None, with_taken_logp: bool = True,
        transport: httpx.BaseTransport | None = None,
    ):
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype={dtype!r}: the hidden-state payload is float32 or float16")
        self.model, self.dtype, self.chunk_size, self.with_taken_logp = model, dtype, chunk_size, with_taken_logp
        self.seqs_per_request, self.max_concurrency = seqs_per_request, max_concurrency
        self.client = CompletionsClient(base_url, api_key, timeout, max_retries, backoff, transport)
        self._head: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._head_device: torch.device | None = None
        self._hidden_size = 0

    def close(self) -> None:
        """Close the connection pool to the server."""
        self.client.close()

    def _get(self, path: str) -> dict:
        try:
            return self.client.post(path, None)
        except ServerRefused as e:
            if e.status in (404, 405):
                raise ValueError(f"{self.client.base_url} has no {path.split('?')[0]}: the hidden-state teacher needs "
                                 "an `opd serve` teacher; for vLLM use the top-k payload (--teacher-payload topk)"
                                 ) from None
            raise

    def vocab_size(self) -> int:
        """Rows of the served model's LM head (one small request; the server checks the head can be sent)."""
        return int(self._get(f"/opd/lm_head?start=0&stop=0&dtype={self.dtype}")["vocab_size"])

    def check_student(self, student) -> None:
        """Refuse a student whose vocabulary is not the teacher's, before any training step."""
        vs, vt = student.get_output_embeddings().weight.shape[0], self.vocab_size()
        if vs != vt:
            raise ValueError(f"the teacher server's vocabulary has {vt} tokens but the student's {vs}; distil between "
                             "models that share a tokenizer")

    def head(self, device: torch.device | str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
        """The teacher's LM head (hidden [N, D] -> logits [N, V], its logit scaling and soft-capping included),
        downloaded once in pieces and kept on `device`."""
        device = torch.device(device)
        if self._head is not None and self._head_device == device:
            return self._head
        url = f"{self.client.base_url}/opd/lm_head"
        first = self._get(f"/opd/lm_head?start=0&stop=0&dtype={self.dtype}")
        V, D = first.get("vocab_size"), first.get("hidden_size")
        if not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n < 2**31 for n in (V, D)):
            raise BadAnswer(f"{url} sent no usable vocab_size and hidden_size")
        step = max(1, _HEAD_PIECE_BYTES // (4 * D))
        weights, biases = [], []
        for start in range(0, V, step):
            piece = self._get(f"/opd/lm_head?start={start}&stop={min(V, start + step)}&dtype={self.dtype}")
            weights.append(_decoded(url, piece.get("weight"), self.dtype, "head weights"))
            if piece.get("bias") is not None:
                biases.append(_decoded(url, piece["bias"], self.dtype, "head bias"))
        spec = {"weight": torch.cat(weights).to(device), "bias": torch.cat(biases).to(device) if biases else None,
                "logit_scale": first.get("logit_scale"),
                "final_logit_softcapping": first.get("final_logit_softcapping")}
        for key in ("logit_scale", "final_logit_softcapping"):
            if spec[key] is not None and not (isinstance(spec[key], (int, float)) and math.isfinite(spec[key])):
                raise BadAnswer(f"{url} sent a {key} that is not a finite number")
        if spec["weight"].shape != (V, D):
            raise BadAnswer(f"{url} sent a head of shape {tuple(spec['weight'].shape)}, not [{V}, {D}]")
        if spec["logit_scale"] is None and spec["final_logit_softcapping"] is None:
            # a plain nn.Linear: what opd.fused and opd.chunked run fastest
            linear = torch.nn.Linear(D, V, bias=spec["bias"] is not None, device=device).requires_grad_(False)
            linear.weight.copy_(spec["weight"])
            if spec["bias"] is not None:
                linear.bias.copy_(spec["bias"])
            self._head = linear
        else:
            self._head = lambda h: apply_head(h, spec)
        self._head_device, self._hidden_size = device, D
        return self._head

    def score(
        self, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor, mask_BT: torch.Tensor
    ) -> TeacherSignal:
        """Final hidden states [B, T, D] at every graded position (0 elsewhere), the head, and the taken tokens'
        log-probs when `with_taken_logp`. Padding (left or right) is stripped using `attention_mask_BL`."""
        B, L = score_shapes(input_ids_BL, attention_mask_BL, mask_BT)
        device = input_ids_BL.device
        head = self.head(device)
        rows, seqs, starts, offsets = self._graded_spans(input_ids_BL, attention_mask_BL, mask_BT)
        if self.model is None:
            self.model = self.client.served_model()
        bodies = [
            {"model": self.model, "sequences": [seqs[j] for j in group], "start": [starts[j] for j in group],
             "dtype": self.dtype}
            for group in self._groups(seqs, starts)
        ]
        answers = self.client.post_many("/opd/hidden_states", bodies, self.max_concurrency)
        url = f"{self.client.base_url}/opd/hidden_states"
        data = []
        for a, body in zip(answers, bodies):
            rows_a = a.get("data")
            n = len(body["sequences"])
            if (not isinstance(rows_a, list) or not all(isinstance(d, dict) for d in rows_a)
                    or sorted(d.get("index") for d in rows_a if isinstance(d.get("index"), int)) != list(range(n))):
                raise BadAnswer(f"{url} answered {len(rows_a) if isinstance(rows_a, list) else 0} hidden-state rows "
                                f"(or rows without indices 0..{n - 1}) for {n} sequences")
            data.extend(sorted(rows_a, key=lambda d: d["index"]))
        D = self._hidden_size
        hidden_BTD = torch.zeros(B, L - 1, D, device=device)
        for b, seq, s0, offset, d in zip(rows, seqs, starts, offsets, data):
            states = _decoded(url, d.get("hidden"), self.dtype, "hidden states")
            if states.shape != (len(seq) - s0, D):
                raise BadAnswer(f"row {b}: {url} sent hidden states of shape {tuple(states.shape)}, not "
                                f"[{len(seq) - s0}, {D}]")
            hidden_BTD[b, offset + s0 : offset + len(seq)] = states.to(device)
        taken = None
        if self.with_taken_logp:
            taken = taken_logp(hidden_BTD, head, input_ids_BL[:, 1:], mask_BT, self.chunk_size)
        return TeacherSignal(taken_logp_BT=taken, hidden_BTD=hidden_BTD, head=head)

    def _groups(self, seqs: list[list[int]], starts: list[int]) -> list[list[int]]:
        """Consecutive sequence indices per request: at most `seqs_per_request`, and at most _HIDDEN_REQUEST_BYTES of
        answer unless one sequence alone is more."""
        groups, size = [], 0
        for j, (seq, s0) in enumerate(zip(seqs, starts)):
            row = wire_bytes((len(seq) - s0) * self._hidden_size, self.dtype)
            if not groups or len(groups[-1]) == self.seqs_per_request or size + row > _HIDDEN_REQUEST_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(j)
            size += row
        return groups

    @staticmethod
    def _graded_spans(input_ids_BL, attention_mask_BL, mask_BT):
        """(rows, each one's sequence up to its last target, its first target's position in it, the padded
        position of its first token): only what the loss reads is requested."""
        rows, seqs, starts, offsets = [], [], [], []
        mask_BT = mask_BT.bool().cpu()
        for b in range(input_ids_BL.shape[0]):
            pos = attention_mask_BL[b].nonzero()[:, 0].cpu()
            targets = mask_BT[b].nonzero()[:, 0]
            if not len(targets):
                continue
            if len(pos) and pos[-1] - pos[0] + 1 != len(pos):
                raise ValueError(f"row {b}: attention_mask has holes; only left or right padding is supported")
            first, last = int(targets[0]), int(targets[-1])
            if not len(pos) or first < int(pos[0]) or last + 1 > int(pos[-1]):
                raise ValueError("mask_BT marks a target without context (padding or a row's first token); fix the "
                                 "mask")
            offset = int(pos[0])
            rows.append(b)
            seqs.append(input_ids_BL[b, offset : last + 1].tolist())
            starts.append(first - offset)
            offsets.append(offset)
        return rows, seqs, starts, offsets
