"""Prototype of the overlap lever: the next batch is sampled in a second process while this one trains.

On two cores, one process runs `opd.lm.sampler` on a shared-memory copy of the student while the other scores the
current batch with the teacher and updates the student, so a step costs max(sampling, scoring + update) instead of
their sum. The price is one step of staleness: batch k+1 is sampled with the weights before update k (θ_k) and
trained on at θ_{k+1}. The full-vocabulary divergences are exact at every visited state whatever sampled it, so only
the state distribution is one update old; no importance weight is applied here (the held-out reverse KL after the
same number of steps shows whether that costs anything). The step itself is `opd.lm.train.student_loss`, as in
`distill` (with its teacher from `make_teacher`). Run as the benchmark's `opd_overlap` system.
"""

from __future__ import annotations

import time

import torch


def _sampler_loop(model, requests, results, pad_id, eos_id, max_new_tokens, temperature, seed, threads):
    from opd.lm.sampler import sample_completions

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    while (prompts := requests.get()) is not None:
        results.put(sample_completions(model, prompts, pad_id, eos_id, max_new_tokens, temperature))


def run_opd_pipelined(spec: dict, scratch) -> dict:
    """Train as `spec` says with sampling overlapped; per-step wall time is the time between two updates."""
    import copy

    import torch.multiprocessing as mp

    from benchmarks.perf.worker import max_rss_mb, prompt_order, step_flops, train_prompts
    from opd import flops
    from opd.config import DistillConfig
    from opd.lm.model import load_model, load_tokenizer
    from opd.lm.rollout import encode_prompts, layout
    from opd.lm.train import make_teacher, student_loss

    cfg = DistillConfig(student=spec["student"], teacher=spec["teacher"], loss=spec["loss"], beta=spec["beta"])
    tokenizer = load_tokenizer(spec["student"])
    student = load_model(spec["student"])
    teacher = make_teacher(cfg, student, tokenizer)
    costs = flops.model_cost(student), flops.model_cost(teacher.model)
    train = train_prompts(spec)
    ids = encode_prompts(tokenizer, [e.prompt for e in train], 1 << 30)
    order, B = prompt_order(spec, len(train)), spec["batch_size"]
    prompts = [[ids[i] for i in order[k * B : (k + 1) * B]] for k in range(spec["steps"])]
    opt = torch.optim.AdamW(student.parameters(), lr=spec["lr"], weight_decay=0.0)

    shared = copy.deepcopy(student).eval()
    for p in shared.parameters():
        p.requires_grad_(False).share_memory_()
    ctx = mp.get_context("spawn")  # fork after OpenMP has run can hang
    requests, results = ctx.Queue(), ctx.Queue()
    # the threads are split between the two processes (with one thread in all, each still gets one)
    threads = max(1, spec["threads"] // 2)
    torch.set_num_threads(max(1, spec["threads"] - threads))
    proc = ctx.Process(target=_sampler_loop, daemon=True,
                       args=(shared, requests, results, tokenizer.pad_token_id, tokenizer.eos_token_id,
                             spec["max_new_tokens"], 1.0, spec["seed"], threads))
    proc.start()
    step_s, tokens, step_flops_ = [], [], []
    try:
        requests.put(prompts[0])
        completions = results.get()  # batch 0: sampled with θ_0, before anything overlaps
        if spec["steps"] > 1:
            requests.put(prompts[1])  # batch 1: sampled with θ_0 while batch 0 trains
        student.train()
        t0 = time.perf_counter()
        for k in range(spec["steps"]):
            batch = layout(prompts[k], completions, tokenizer.pad_token_id)
            signal = teacher.score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT)
            loss, _ = student_loss(student, batch, signal, cfg)
            if not torch.isfinite(loss):
                raise RuntimeError(f"loss is {loss.item()} at step {k}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if k + 1 < spec["steps"]:
                completions = results.get()  # batch k+1, sampled with θ_k during this update
                with torch.no_grad():  # the sampler is idle now: give it θ_{k+1} for batch k+2
                    for dst, src in zip(shared.parameters(), student.parameters()):
                        dst.copy_(src)
                if k + 2 < spec["steps"]:
                    requests.put(prompts[k + 2])
            tokens.append(int(batch.mask_BT.sum()))
            lens = batch.attention_mask_BL.sum(1) - batch.mask_BT.sum(1)
            step_flops_.append(step_flops(costs, lens.tolist(), batch.mask_BT.sum(1).tolist()))
            step_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
    finally:
        requests.put(None)
        proc.join(timeout=30)
    sampler_rss = _child_peak_rss_mb()
    return {"peak_rss_mb": max_rss_mb() + sampler_rss, "sampler_peak_rss_mb": sampler_rss, "step_s": step_s,
            "completion_tokens": tokens, "flops": step_flops_, "student": student, "teacher": teacher.model}


def _child_peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
