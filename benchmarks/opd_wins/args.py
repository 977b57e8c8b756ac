"""The arguments of `opd bench opd_wins` (`OpdWinsArgs`), what `--quick` overrides, and the regimes it knows."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OpdWinsArgs:
    """The benchmark; the defaults are the full run whose numbers are in RESULTS.md."""

    quick: bool = False
    """Plumbing check: overrides the sizes with `QUICK`, runs in `out_dir`-quick, writes opd_wins_quick.*."""
    parts: tuple[str, ...] = ("long", "plateau", "recovery", "sweep", "tuned", "harder", "noisy")
    """Which parts to run (leave one out to skip it): the long runs always; sweep: the validation sweep alone;
    tuned: the sweep and then every seed at the chosen settings; the others as in the module docstring."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds (prompt order, sampling) of every regime; all start from the one warm start, as in the quickstart."""
    steps: int = 1000
    """Updates of each method in the long regime."""
    plateau_at: int | None = 600
    """Plateau regime: the SFT run's step the branches start from (None: `steps`)."""
    extra_steps: int = 200
    """Plateau regime: updates of OPD or of more SFT after the SFT run's `steps`."""
    eval_every: int = 100
    """Updates between evaluations (test and validation); the regimes' step counts must be multiples of it."""
    eval_examples: int = 200
    """Held-out (test) problems per evaluation, as in Table 3.1."""
    val_examples: int = 200
    """Validation problems (training split, not among the training prompts) per evaluation."""
    batch_size: int = 32
    """Sequences per update (the quickstart's)."""
    lr: float = 1e-3
    """Learning rate of both methods (the quickstart's; AdamW, 10 warm-up steps, constant)."""
    sft_source: str = "data"
    """Where SFT's completions come from: "data" (the true solutions) or "teacher" (sampled from the teacher at
    temperature 1, as the quickstart does). The task teacher's samples are the true solutions (300 of 300 training
    problems; every run re-measures it on the probe problems, `sample_is_true_solution`, and fails below
    `min_sample_match`), so both are SFT on teacher samples; "data" skips the teacher's token-by-token generation,
    most of an SFT update's time here."""
    min_sample_match: float = 0.99
    """With sft_source="data": the least share of the teachers' samples that must equal the true solution."""
    max_new_tokens: int = 56
    """Longest completion (the quickstart's)."""
    warm_start_steps: int = 1500
    """The quickstart's warm start: at most this many SFT steps on ground truth, stopping at 20 % training accuracy."""
    warm_start_seed: int = 0
    """Seed of the one warm start."""
    recovery_steps: int = 200
    """Updates of each method under the recovery teacher."""
    teacher_steps: int = 150
    """Fine-tuning steps that turn the task teacher into the recovery teacher."""
    teacher_batch_size: int = 64
    """Examples per fine-tuning step."""
    teacher_lr: float = 1e-3
    """Peak learning rate of the fine-tuning (warm-up, cosine decay)."""
    corrupt_share: float = 0.5
    """Share of the fine-tuning examples with one wrong digit in their context (the rest stay clean)."""
    probe_examples: int = 500
    """Test problems for the teachers' recovery measurements (clean accuracy, continuation from wrong prefixes)."""
    sweep_seed: int = 0
    """The one seed of the sweep."""
    sweep_steps: int = 200
    """Updates per sweep run; the choice is the best validation accuracy at this step."""
    sweep_lrs: tuple[float, ...] = (1e-3, 3e-3)
    """Learning rates tried for each method (at temperature 1)."""
    sweep_temperatures: tuple[float, ...] = (0.5,)
    """OPD sampling temperatures tried besides 1 (at the default learning rate)."""
    tuned_steps: int = 200
    """Updates of the tuned regime's runs (every seed, both methods at their chosen values)."""
    harder_task: str = "arithmetic-long"
    """Harder and noisy regimes: the task (a registered one with the arithmetic task's alphabet, so the tokenizer is
    shared)."""
    harder_steps: int = 600
    """Harder regime: updates of each method."""
    noisy_steps: int = 300
    """Noisy regime: updates of each arm."""
    noisy_teacher_steps: int = 300
    """Noisy regime: the teacher's fine-tuning steps on the longer problems (a teacher stopped halfway)."""
    harder_max_new_tokens: int = 96
    """Harder and noisy regimes: longest completion (a 7-digit problem's solution is 76 characters)."""
    harder_teacher_steps: int = 600
    """Harder regime: fine-tuning steps that extend the task teacher to the longer problems (batch and lr as the
    recovery teacher's; 300 left it at 0.72 held-out accuracy: the noisy regime's teacher)."""
    harder_warm_steps: int = 1000
    """Harder and noisy regimes (one shared warm start): most fine-tuning steps that extend the quickstart's warm start
    to the longer problems."""
    harder_warm_lr: float = 3e-3
    """Peak learning rate of that fine-tuning (warm-up, cosine decay over `harder_warm_steps`)."""
    harder_warm_target: float = 0.2
    """That fine-tuning stops once the student writes this share of 200 training problems exactly."""
    out_dir: str = "runs/opd_wins"
    """Run directories: teacher/, warm-start/, runs/."""
    results_dir: str = "benchmarks/results"
    """Where opd_wins.json, opd_wins.md and the plots go."""
    threads: int = 1
    """torch CPU threads per process."""
    workers: int = 2
    """Runs in parallel, one process each."""


QUICK = dict(seeds=(0, 1), steps=4, plateau_at=2, extra_steps=2, eval_every=2, eval_examples=8, val_examples=8,
             batch_size=4,
             warm_start_steps=3, recovery_steps=2, teacher_steps=2, teacher_batch_size=8, probe_examples=8,
             sweep_steps=2, sweep_lrs=(1e-3, 3e-3), sweep_temperatures=(), tuned_steps=2, harder_steps=2,
             noisy_steps=2, harder_max_new_tokens=24, harder_teacher_steps=2, noisy_teacher_steps=1,
             harder_warm_steps=2, workers=1)
"""What `--quick` overrides."""
PARTS = ("long", "plateau", "recovery", "sweep", "tuned", "harder", "noisy")
