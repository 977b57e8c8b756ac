"""A completions server (`opd serve`, or vLLM's OpenAI-compatible server) as a teacher and as a rollout sampler.

`RemoteTeacher.score` sends each sequence's token ids with `prompt_logprobs=top_k` and turns vLLM's per-prompt-token
answer into a `TeacherSignal` in target coordinates (entry i >= 1 of `prompt_logprobs` is the distribution over token
i given tokens < i, which is target position i - 1 of the unpadded sequence). `RemoteSampler.sample` generates
completions and returns the sampler's log-prob of each sampled token, for importance-ratio corrections.

Network faults (connection refused, timeouts, 429/5xx) are retried with exponential back-off; when the server stays
unreachable the call raises `TeacherUnreachable`, naming the URL and what to do. Other 4xx answers are not retried:
they raise `ServerRefused` (a RuntimeError) with the server's message.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from opd.lm.teacher import TeacherSignal, TeacherUnreachable

_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
NEUTRAL_SAMPLING = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                    "frequency_penalty": 0.0}
"""Sent with every sampling request: vLLM fills each field a request leaves out from the model's
generation_config.json (`--generation-config auto`, its default), and a top_k or repetition penalty there would make
the samples follow another distribution than the log-probs used for the loss and the importance ratios. top_k=-1 is
vLLM's "no top-k" in every version (0 only in recent ones)."""


class ServerRefused(RuntimeError):
    """The server answered a 4xx that retrying will not fix; `status` is the HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class CompletionsClient:
    """POSTs JSON to a completions server with timeouts, retries and exponential back-off; thread-safe."""

    def __init__(
        self, base_url: str, api_key: str | None = None, timeout: float = 60.0, max_retries: int = 5,
        backoff: float = 0.5, transport: httpx.BaseTransport | None = None,
    ):
        # Accept both "http://host:port" and the OpenAI-client style "http://host:port/v1".
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.max_retries, self.backoff = max_retries, backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def post(self, path: str, body: dict | None) -> dict:
        """POST `body` to `path` (GET when `body` is None) and return the decoded JSON answer."""
        url = f"{self.base_url}{path}"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
            try:
                response = self._http.get(path) if body is None else self._http.post(path, json=body)
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if response.status_code in _RETRY_STATUS:
                last = f"HTTP {response.status_code}: {_message(response)}"
                continue
            if response.status_code >= 400:
                raise ServerRefused(response.status_code, f"{url} refused the request (HTTP {response.status_code}): "
                                    f"{_message(response)}")
            return response.json()
        raise TeacherUnreachable(
            f"{url} did not answer after {self.max_retries + 1} attempts (last error: {last}); start the server "
            "(`opd serve MODEL_DIR --port PORT`, or vLLM) or fix the URL, or raise the client's timeout/max_retries "
            "(opd train: --remote-timeout, --remote-max-retries)."
        )

    def post_many(self, path: str, bodies: list[dict], max_concurrency: int) -> list[dict]:
        """POST several bodies concurrently (the server batches them); answers in the order of `bodies`."""
        if len(bodies) <= 1 or max_concurrency <= 1:
            return [self.post(path, b) for b in bodies]
        with ThreadPoolExecutor(max_workers=min(max_concurrency, len(bodies))) as pool:
            return list(pool.map(lambda b: self.post(path, b), bodies))

    def model_card(self) -> dict:
        """The first model the server lists at /v1/models; a one-line ValueError when the URL answers but is not an
        OpenAI-compatible server (an HTML page, a 404, a JSON without a model list)."""
        def refuse(why: str) -> ValueError:
            return ValueError(f"{self.base_url} is not an OpenAI-compatible server (GET /v1/models: {why}); pass the "
                              "base URL of vLLM or `opd serve`, e.g. http://127.0.0.1:8000/v1")
        try:
            answer = self.post("/v1/models", None)
        except ServerRefused as e:
            raise refuse(f"HTTP {e.status}") from None
        except ValueError:  # a 200 that is not JSON
            raise refuse("the answer is not JSON") from None
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list) or not data or not isinstance(data[0], dict) or "id" not in data[0]:
            raise refuse("no model list")
        return data[0]

    def served_model(self) -> str:
        """The first model the server lists at /v1/models (what `model=None` resolves to)."""
        return self.model_card()["id"]

    def close(self) -> None:
        self._http.close()


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        return str(err.get("message") or err.get("detail") or err)
    return str(err)


def server_kind(card: dict) -> str:
    """Which server a /v1/models card comes from: 'vllm', 'opd' (opd serve), or whatever its owned_by says."""
    return str(card.get("owned_by") or "unknown")


_PROBE_TEXT = "Hello, world! 4827+596=5423\n"


def check_served_vocabulary(client: CompletionsClient, model: str, tokenizer, vocab_size: int,
                            top_k: int = 1) -> None:
    """Before training: one scoring request with prompt_logprobs=top_k, and (where the server has vLLM's /tokenize)
    the server's tokenization of a probe text, against the student's tokenizer and output vocabulary `vocab_size`.

    Each problem is a one-line ValueError naming the fix: a limit below top_k (vLLM's --max-logprobs), a vocabulary
    smaller (the student's last token id refused) or larger (an id >= vocab_size in the answer) than the student's,
    a tokenizer that splits text differently, a server without vLLM's prompt_logprobs.
    """
    url = client.base_url
    text = _PROBE_TEXT + tokenizer.decode(list(range(min(len(tokenizer), 200))), skip_special_tokens=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    last = len(tokenizer) - 1
    seq = (ids[:16] or [0]) + [last]
    body = {"model": model, "prompt": [seq], "max_tokens": 0, "echo": True, "prompt_logprobs": top_k,
            "return_token_ids": True}
    try:
        answer = client.post("/v1/completions", body)
    except ServerRefused as e:
        if "vocabulary" in str(e):
            raise ValueError(f"{url} serves a model with a smaller vocabulary than the student's (it refused the "
                             f"student's token id {last}: {e}); serve a model that shares the student's "
                             "tokenizer") from None
        if "logprobs" in str(e):
            raise ValueError(f"{url} refused prompt_logprobs={top_k} ({e}); restart it with --max-logprobs {top_k} "
                             f"or more, or lower --top-k to its limit") from None
        raise ValueError(f"{url} refused opd's scoring request ({e}); opd needs vLLM's prompt_logprobs: point it at "
                         f"vLLM or `opd serve`") from None
    choices = answer.get("choices") if isinstance(answer, dict) else None
    entries = (choices[0].get("prompt_logprobs") if choices and isinstance(choices[0], dict) else None) or []
    if len(entries) != len(seq) or not all(isinstance(e, dict) for e in entries[1:]):
        raise ValueError(f"{url} answered a scoring request without vLLM's prompt_logprobs (one per prompt token); "
                         f"point opd at vLLM or `opd serve`")
    served_ids = {int(t) for e in entries[1:] for t in e}
    if max(served_ids) >= vocab_size:
        raise ValueError(f"{url} serves a model with a larger vocabulary than the student's (token id "
                         f"{max(served_ids)} >= {vocab_size}); serve a model that shares the student's tokenizer")
    if (got := min(len(e) for e in entries[1:])) < min(top_k, vocab_size):
        raise ValueError(f"{url} returned {got} log-probs per position for prompt_logprobs={top_k}; raise its "
                         f"limit (vLLM: --max-logprobs {top_k}) or lower --top-k to {got}")
    try:
        served = client.post("/tokenize", {"model": model, "prompt": text, "add_special_tokens": False})
    except ServerRefused:
        return  # no /tokenize (opd serve): the id probe above is what can be checked
    if served.get("tokens") != ids:
        raise ValueError(f"{url} tokenizes text differently from the student's tokenizer (vocabulary of "
                         f"{len(tokenizer)} tokens); serve a model that shares the student's tokenizer")


def _position_entries(entries: dict, taken_id: int, k: int) -> tuple[list[int], list[float], float]:
    """One `prompt_logprobs` entry -> (top-k ids, their log-probs, the taken token's log-prob).

    vLLM sends the top-k plus the taken token when it is not among them (k + 1 entries); that extra one is left out
    of the top-k.
    """
    if str(taken_id) not in entries:
        raise RuntimeError(f"the server's prompt_logprobs lack the prompt token {taken_id}; is it vLLM-compatible?")
    items = [(int(t), e["logprob"], e["rank"]) for t, e in entries.items()]
    if len(items) > k:
        items = [it for it in items if it[0] != taken_id]
    items.sort(key=lambda it: (it[2], -it[1]))
    return [t for t, _, _ in items[:k]], [lp for _, lp, _ in items[:k]], entries[str(taken_id)]["logprob"]


def score_shapes(input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor, mask_BT: torch.Tensor) -> tuple[int, int]:
    """(B, L) of a batch a remote teacher scores; a ValueError naming all three shapes when they do not fit."""
    B, L = input_ids_BL.shape
    if mask_BT.shape != (B, L - 1) or attention_mask_BL.shape != (B, L):
        raise ValueError(
            f"shapes: input_ids {tuple(input_ids_BL.shape)}, attention_mask {tuple(attention_mask_BL.shape)}, "
            f"mask {tuple(mask_BT.shape)}; need [B, L], [B, L], [B, L-1]"
        )
    return B, L


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
        choices = [c for a in answers for c in sorted(a["choices"], key=lambda c: c["index"])]
        if len(choices) != len(seqs):
            raise RuntimeError(f"the server answered {len(choices)} choices for {len(seqs)} sequences")
        for b, seq, start, choice in zip(rows, seqs, starts, choices):
            if choice.get("prompt_token_ids") not in (None, seq):
                raise RuntimeError(f"row {b}: the server re-tokenized the prompt; send token ids to a server that "
                                   "keeps them (vLLM or opd serve)")
            entries = choice.get("prompt_logprobs") or []
            if len(entries) != len(seq):
                raise RuntimeError(f"row {b}: {len(entries)} prompt_logprobs for {len(seq)} tokens")
            row_ids, row_logp, row_taken = [], [], []
            for i in range(1, len(seq)):
                ids, logps, taken = _position_entries(entries[i], seq[i], K)
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


class RemoteSampler:
    """Rollouts from a vLLM-compatible completions server: sampled token ids and the sampler's log-probs of them."""

    def __init__(
        self, base_url: str, model: str | None = None, api_key: str | None = None, timeout: float = 120.0,
        max_retries: int = 5, backoff: float = 0.5, max_concurrency: int = 8,
        transport: httpx.BaseTransport | None = None,
    ):
        self.model, self.max_concurrency = model, max_concurrency
        self.client = CompletionsClient(base_url, api_key, timeout, max_retries, backoff, transport)

    def sample(
        self, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
        seed: int | None = None,
    ) -> tuple[list[list[int]], list[list[float]]]:
        """One completion per prompt: (completion ids, log-prob of each under the sampler).

        One request per prompt, with seed `seed + i` for prompt i: vLLM gives every prompt of a batched request the
        same seed, which would make repeated prompts sample the same completion. The server batches them anyway.
        The log-probs are what the server reports: the model's own (vLLM's and opd serve's default) or, with
        `--logprobs-mode processed_logprobs`, those of the tempered, top-p-cut distribution actually sampled from.
        """
        if self.model is None:
            self.model = self.client.served_model()
        bodies = [
            {"model": self.model, "prompt": ids, "max_tokens": max_new_tokens, "temperature": temperature,
             "top_p": top_p, **NEUTRAL_SAMPLING, "seed": None if seed is None else seed + i, "logprobs": 0,
             "return_token_ids": True, "return_tokens_as_token_ids": True}
            for i, ids in enumerate(prompt_ids)
        ]
        completion_ids, sampling_logp = [], []
        for answer in self.client.post_many("/v1/completions", bodies, self.max_concurrency):
            choice = answer["choices"][0]
            logprobs = choice.get("logprobs") or {}
            ids = choice.get("token_ids")
            if ids is None:  # older vLLM: only "token_id:<id>" strings
                ids = [int(s.removeprefix("token_id:")) for s in logprobs.get("tokens", [])]
            logps = logprobs.get("token_logprobs") or []
            if len(logps) != len(ids):
                raise RuntimeError(f"the server returned {len(ids)} tokens but {len(logps)} log-probs")
            completion_ids.append(list(ids))
            sampling_logp.append([float(lp) for lp in logps])
        return completion_ids, sampling_logp

    def close(self) -> None:
        """Close the connection pool to the server."""
        self.client.close()

    def update_weights(self, path: str) -> int:
        """Make an `opd serve` server load weights from `path` (a safetensors file or dir on ITS disk); new version.

        Raises ValueError when the server has no such endpoint (vLLM) or cannot load the path.
        """
        try:
            return int(self.client.post("/opd/update_weights", {"path": path})["weights_version"])
        except ServerRefused as e:
            if e.status == 404:
                raise ValueError(
                    f"{self.client.base_url} has no /opd/update_weights, so it cannot sample from the student being "
                    "trained; serve the student with `opd serve STUDENT_DIR` for --sampler"
                ) from None
            if e.status == 400:
                raise ValueError(f"{e} (a --sampler server must serve the student's architecture and read {path}: "
                                 "run it on this machine or on a shared filesystem)") from None
            raise
