"""A completions server as the student's sampler: `RemoteSampler.sample` generates completions and returns the
sampler's log-prob of each sampled token, for importance-ratio corrections."""

from __future__ import annotations

import httpx

from opd.lm.remote.client import NEUTRAL_SAMPLING, BadAnswer, CompletionsClient, ServerRefused, check_ids, check_logp


class RemoteSampler:
    """Rollouts from a vLLM-compatible completions server: sampled token ids and the sampler's log-probs of them."""

    def __init__(
        self, base_url: str, model: str | None = None, api_key: str | None = None, timeout: float = 120.0,
        max_retries: int = 5, backoff: float = 0.5, max_concurrency: int = 8,
        transport: httpx.BaseTransport | None = None,
    ):
        self.model, self.max_concurrency = model, max_concurrency
        self.client = CompletionsClient(base_url, api_key, timeout, max_retries, backoff, transport)
        self.vocab_size: int | None = None
        """The student's vocabulary, when known: `sample` refuses token ids outside it."""

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
        url = f"{self.client.base_url}/v1/completions"
        for answer in self.client.post_many("/v1/completions", bodies, self.max_concurrency):
            choices = answer.get("choices")
            if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
                raise BadAnswer(f"{url} answered {len(choices) if isinstance(choices, list) else 0} choices for one "
                                "prompt")
            logprobs = choices[0].get("logprobs") or {}
            ids = choices[0].get("token_ids")
            try:
                if ids is None:  # older vLLM: only "token_id:<id>" strings
                    ids = [int(s.removeprefix("token_id:")) for s in logprobs.get("tokens", [])]
                logps = logprobs.get("token_logprobs") or []
                ids, logps = list(ids), list(logps)
            except (AttributeError, TypeError, ValueError):
                raise BadAnswer(f"{url} sent a completion without vLLM's token ids and token_logprobs") from None
            if len(logps) != len(ids) or len(ids) > max_new_tokens:
                raise BadAnswer(f"{url} returned {len(ids)} tokens and {len(logps)} log-probs for max_tokens="
                                f"{max_new_tokens}")
            completion_ids.append(check_ids(url, "a sampled token id", ids, self.vocab_size))
            sampling_logp.append(check_logp(url, "a sampled token's log-prob", logps))
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
            if e.status == 403:
                raise ValueError(f"{e} (start the sampler with `opd serve STUDENT_DIR --weights-root DIR`, DIR holding "
                                 f"{path}: e.g. the run's OUT_DIR/sampler_weights)") from None
            if e.status == 400:
                raise ValueError(f"{e} (a --sampler server must serve the student's architecture and read {path}: "
                                 "run it on this machine or on a shared filesystem)") from None
            raise
