"""The server phases of the reliability benchmark, against a live `opd serve` over HTTP: fuzz, then load.

`fuzz_server` sends hypothesis-generated malformed requests (`benchmarks/reliability/fuzz.py`) and records every answer
that breaks the rule instead of stopping at the first. `load_test` runs concurrent clients that send what opd's own
clients send (`opd.lm.remote.client`): teacher scoring (prompt_logprobs over prompt + completion, no generation) and short
seeded generations with log-probs, and checks every answer's shape.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import httpx
import numpy as np
from hypothesis import HealthCheck, Phase, given, seed, settings

from benchmarks.reliability.fuzz import Case, Target, cases, judge
from opd.tasks import get_task

SCORE_SEQS = 4
"""Sequences per scoring request (opd's RemoteTeacher sends up to 16 per request, several requests at once)."""
SCORE_TOP_K = 20
"""prompt_logprobs per scoring request (opd's default top_k, and vLLM's default limit)."""
GENERATE_TOKENS = 16
"""max_tokens per generation request."""


def fuzz_server(url: str, target: Target, n_cases: int, seed_: int, progress=None) -> dict:
    """Send `n_cases` generated requests to the server at `url`; count answers by family and status, keep failures."""
    by_kind, statuses, failures = Counter(), Counter(), []
    with httpx.Client(base_url=url, timeout=120.0) as client:

        @seed(seed_)
        @settings(max_examples=n_cases, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=cases(target))
        def one(case: Case) -> None:
            try:
                r = case.send(client)
                status, problem = r.status_code, judge(case, r.status_code, r.content)
            except httpx.HTTPError as e:  # no answer at all: the server crashed or hung up
                status, problem = 0, f"{type(e).__name__}: {e}"
            by_kind[case.kind] += 1
            statuses[status] += 1
            if problem is not None:
                failures.append({"kind": case.kind, "method": case.method, "path": case.path,
                                 "body": (case.body or b"")[:300].decode(errors="replace"), "problem": problem})
            if progress is not None:
                progress.update(1)

        one()
    total = sum(statuses.values())
    return {
        "cases": total,
        "must_fail": sum(n for k, n in by_kind.items() if k != "in_schema"),
        "failures": len(failures),
        "server_errors_5xx": sum(n for s, n in statuses.items() if s >= 500),
        "no_answer": statuses.get(0, 0),
        "status_counts": {str(s): n for s, n in sorted(statuses.items())},
        "family_counts": dict(sorted(by_kind.items())),
        "first_failures": failures[:20],
    }


def _workload(tokenizer, seed_: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, prompt + completion + eos ids) of the arithmetic task's training problems."""
    examples = get_task("arithmetic").examples(512, seed=seed_, split="train")
    prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in examples]
    full = [p + tokenizer(e.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for p, e in zip(prompts, examples)]
    return prompts, full


def _request(rng: random.Random, model: str, prompts, full) -> tuple[str, dict]:
    if rng.random() < 0.5:
        seqs = rng.sample(full, SCORE_SEQS)
        return "score", {"model": model, "prompt": seqs, "max_tokens": 0, "echo": True,
                         "prompt_logprobs": SCORE_TOP_K, "return_token_ids": True}
    return "generate", {"model": model, "prompt": rng.choice(prompts), "max_tokens": GENERATE_TOKENS,
                        "temperature": 1.0, "seed": rng.randrange(2**31), "logprobs": 0, "return_token_ids": True,
                        "return_tokens_as_token_ids": True}


def _check(kind: str, body: dict, answer: dict) -> tuple[str | None, int]:
    """(what is wrong with a 200 answer or None, tokens it scored or generated)."""
    choices = answer.get("choices") or []
    if kind == "score":
        if len(choices) != len(body["prompt"]):
            return f"{len(choices)} choices for {len(body['prompt'])} sequences", 0
        for seq, choice in zip(body["prompt"], sorted(choices, key=lambda c: c["index"])):
            if choice.get("prompt_token_ids") != seq or len(choice.get("prompt_logprobs") or []) != len(seq):
                return "prompt_logprobs do not cover the sequence", 0
        return None, answer["usage"]["prompt_tokens"]
    if len(choices) != 1:
        return f"{len(choices)} choices for one prompt", 0
    ids, logps = choices[0].get("token_ids") or [], (choices[0].get("logprobs") or {}).get("token_logprobs") or []
    if not 0 < len(ids) <= GENERATE_TOKENS or len(logps) != len(ids):
        return f"{len(ids)} tokens with {len(logps)} log-probs", 0
    return None, answer["usage"]["completion_tokens"]


async def _run_load(url: str, model: str, tokenizer, clients: int, seconds: float, seed_: int) -> dict:
    prompts, full = _workload(tokenizer, seed_)
    latencies: dict[str, list[float]] = {"score": [], "generate": []}
    tokens, errors = Counter(), []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits) as http:
        start = time.perf_counter()
        deadline = start + seconds

        async def client(i: int) -> None:
            rng = random.Random(seed_ * 1000 + i)
            while time.perf_counter() < deadline:
                kind, body = _request(rng, model, prompts, full)
                t0 = time.perf_counter()
                try:
                    r = await http.post("/v1/completions", json=body)
                    problem, n = (_check(kind, body, r.json()) if r.status_code == 200
                                  else (f"HTTP {r.status_code}: {r.text[:200]}", 0))
                except (httpx.HTTPError, ValueError) as e:
                    problem, n = f"{type(e).__name__}: {e}", 0
                latencies[kind].append(time.perf_counter() - t0)
                tokens[kind] += n
                if problem is not None:
                    errors.append(f"{kind}: {problem}")

        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - start
    everything = latencies["score"] + latencies["generate"]

    def percentiles(values: list[float]) -> dict:
        return {"p50_ms": round(float(np.percentile(values, 50)) * 1e3, 1),
                "p99_ms": round(float(np.percentile(values, 99)) * 1e3, 1)} if values else {}

    return {
        "clients": clients, "seconds": round(elapsed, 2), "requests": len(everything), "errors": len(errors),
        "first_errors": errors[:10], "requests_per_s": round(len(everything) / elapsed, 1),
        "tokens_per_s": round(sum(tokens.values()) / elapsed, 1),
        "scored_tokens_per_s": round(tokens["score"] / elapsed, 1),
        "generated_tokens_per_s": round(tokens["generate"] / elapsed, 1),
        "latency": percentiles(everything),
        "by_kind": {k: {"requests": len(v), **percentiles(v)} for k, v in latencies.items()},
        "workload": f"half scoring ({SCORE_SEQS} prompt+completion sequences, prompt_logprobs={SCORE_TOP_K}, "
                    f"max_tokens=0), half generation (max_tokens={GENERATE_TOKENS}, temperature 1, logprobs=0)",
    }


def load_test(url: str, model: str, tokenizer, clients: int, seconds: float, seed_: int) -> dict:
    """`clients` concurrent clients, each sending its next request as soon as its last is answered, for `seconds`."""
    return asyncio.run(_run_load(url, model, tokenizer, clients, seconds, seed_))
