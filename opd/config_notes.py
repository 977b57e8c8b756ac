"""What a config does not do as it seems, said as warnings when a run starts or resumes: flags its configuration
ignores, a warm-up longer than the run, settings a resume changes."""

from __future__ import annotations

import dataclasses

from opd.config import DistillConfig, remote_teacher, teacher_specs, to_dict


def unused_flags(cfg: DistillConfig) -> list[str]:
    """Flags set away from their defaults that do nothing in this configuration, one line each (for a warning)."""
    default = {f.name: f.default for f in dataclasses.fields(DistillConfig)}
    notes = []
    for name, used, why in (
        ("lmbda", cfg.source == "mixture", "only --source mixture reads it"),
        ("skd_top_k", cfg.source == "speculative", "only --source speculative reads it"),
        ("beta", cfg.loss == "jsd", "only --loss jsd reads it"),
        ("alpha", cfg.loss.startswith("skew_"), "only the skew KL losses read it"),
        ("discount", cfg.loss == "sampled", "only --loss sampled reads it"),
        ("top_k", remote_teacher(cfg) and cfg.teacher_payload == "topk",
         "only a remote teacher with --teacher-payload topk reads it"),
        ("teacher_payload", remote_teacher(cfg), "only a remote teacher reads it"),
        ("teacher_column", cfg.teachers is not None, "only --teachers reads it"),
        ("ema_decay", cfg.teacher == "ema", "only --teacher ema reads it"),
        ("allow_tokenizer_mismatch", local_model_teacher(cfg),
         "only a local teacher model (not self, ema, a server or --cross-tokenizer) is checked"),
        ("teacher_dtype", not (cfg.teacher == "self" and cfg.lora.r > 0) and cfg.teacher != "ema",
         "--teacher self with a LoRA student, and --teacher ema, are kept in the student's dtype"),
        ("sync_every", bool(cfg.sampler or cfg.overlap), "only --sampler and --overlap read it"),
        ("ratio_clip", cfg.loss == "sampled" and bool(cfg.sampler or cfg.overlap),
         "only --loss sampled with --sampler or --overlap reads it"),
        ("data_split", cfg.data is not None, "only --data reads it"),
        ("eval_split", cfg.eval_data is not None, "only --eval-data reads it"),
        ("max_turns", cfg.tools is not None, "only --tools reads it"),
    ):
        if not used and getattr(cfg, name) != default[name]:
            notes.append(f"--{name.replace('_', '-')} does nothing here: {why}")
    return notes


def schedule_notes(cfg: DistillConfig) -> list[str]:
    """Settings that do not do what they seem to (a warm-up longer than the run), one line each (for a warning)."""
    if cfg.optim.warmup_steps > cfg.steps:
        return [f"--optim.warmup-steps {cfg.optim.warmup_steps} is longer than the run (--steps {cfg.steps}): the "
                f"learning rate never reaches --optim.lr {cfg.optim.lr}; lower --optim.warmup-steps"]
    return []


def config_changes(saved: dict, cfg) -> list[str]:
    """`field old -> new` for every setting of `cfg` that differs from a run's saved config.json (for --resume)."""
    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield prefix + k, list(v) if isinstance(v, tuple) else v

    old, new = dict(flat(saved)), dict(flat(to_dict(cfg)))
    if isinstance(old.get("report_to"), str):  # one name, or "none", in a config.json from before several trackers
        old["report_to"] = [] if old["report_to"] == "none" else [old["report_to"]]
    ignored = {"resume", "progress", "out_dir", "remote_api_key"}
    return [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if k not in ignored and old.get(k, v) != v]


def local_model_teacher(cfg: DistillConfig) -> bool:
    """Whether a teacher of `cfg` is a model loaded here with its own tokenizer (not self, ema, a server, or a
    --cross-tokenizer one)."""
    models = [cfg.teacher or "", *teacher_specs(cfg.teachers).values()]
    return not cfg.cross_tokenizer and any(m and m not in ("self", "ema") and not m.startswith(("http://", "https://"))
                                           for m in models)
