import json
import random
import statistics

import pytest

from benchmarks.opd_wins.args import OpdWinsArgs
from benchmarks.opd_wins.report import compare
from benchmarks.opd_wins.run import opd_wins
from opd.lm.recipes.recovery import continuation_accuracy, corrupt, noisy_mix
from opd.lm.recipes.supervised import get_teacher
from opd.tasks import get_task
from opd.tasks.arithmetic import ANSWER_MARKER, solve


def test_corrupt_changes_one_digit_of_a_step_and_keeps_the_true_rest():
    rng = random.Random(0)
    for e in get_task("arithmetic").examples(50, seed=3, split="train"):
        c = corrupt(e, rng)
        true_text, noisy_text = e.prompt + e.completion, c.prompt + c.completion
        diffs = [i for i, (a, b) in enumerate(zip(true_text, noisy_text)) if a != b]
        assert len(true_text) == len(noisy_text) and len(diffs) == 1
        i = diffs[0]
        assert noisy_text[i].isdigit() and true_text[i].isdigit()
        assert len(e.prompt) <= i < len(e.prompt) + e.completion.index(ANSWER_MARKER)  # a step, never the answer
        assert c.prompt == noisy_text[: i + 1] and e.completion.endswith(c.completion) and c.answer == e.answer


def test_noisy_mix_corrupts_the_share_asked_for():
    examples = get_task("arithmetic").examples(200, seed=4, split="train")
    assert noisy_mix(examples, 0.0, seed=0) == examples
    assert all(n.prompt != e.prompt for n, e in zip(noisy_mix(examples, 1.0, seed=0), examples))
    half = sum(n != e for n, e in zip(noisy_mix(examples, 0.5, seed=0), examples))
    assert 70 < half < 130
    with pytest.raises(ValueError, match="corrupt_share"):
        noisy_mix(examples, 1.5, seed=0)


def test_continuation_accuracy_reads_the_answer_from_prefix_and_continuation():
    teacher, tokenizer, _ = get_teacher(progress=False)
    e = solve(4827, 596)
    cut = e.completion.index("ans=") + 5  # the answer already begun in the prefix
    prefixed = [type(e)(prompt=e.prompt + e.completion[:k], completion=e.completion[k:], answer=e.answer)
                for k in (0, 9, cut)]
    assert continuation_accuracy(teacher, tokenizer, prefixed, max_new_tokens=48) == 1.0
    wrong_answer = type(e)(prompt=e.prompt + e.completion[:cut - 1] + "9", completion="", answer=e.answer)
    assert continuation_accuracy(teacher, tokenizer, [wrong_answer], max_new_tokens=48) == 0.0


def _curves(accuracies_by_seed):
    return [{"step": [0, 10], "accuracy": [0.1, a], "val_accuracy": [0.1, a], "flops": [0.0, 1.0],
             "seconds_per_update": 1.0} for a in accuracies_by_seed]


def test_compare_pairs_the_gap_by_seed_and_calls_a_win_only_beyond_the_spread():
    entry = compare("x", 10, {"opd": {"label": "o", "curves": _curves([0.7, 0.8, 0.9])},
                              "sft": {"label": "s", "curves": _curves([0.5, 0.6, 0.6])}})
    assert entry["gap_seeds"] == pytest.approx([0.2, 0.2, 0.3])
    assert entry["gap_mean"] == pytest.approx(0.7 / 3)
    assert entry["seed_spread"] == pytest.approx(0.1)  # the larger sd: OPD's
    assert entry["opd_wins_beyond_spread"] and not entry["sft_wins_beyond_spread"]
    close = compare("x", 10, {"opd": {"label": "o", "curves": _curves([0.55, 0.8])},
                              "sft": {"label": "s", "curves": _curves([0.6, 0.7])}})
    assert not close["opd_wins_beyond_spread"] and not close["sft_wins_beyond_spread"]
    with pytest.raises(ValueError, match="no evaluation at step 5"):
        compare("x", 5, {"opd": {"label": "o", "curves": _curves([0.5])},
                         "sft": {"label": "s", "curves": _curves([0.5])}})


def test_steps_must_be_multiples_of_eval_every(tmp_path):
    with pytest.raises(ValueError, match="multiple of --eval-every"):
        opd_wins(OpdWinsArgs(steps=150, out_dir=str(tmp_path)))


def test_quick_benchmark_writes_well_formed_results(tmp_path):
    results_dir = tmp_path / "results"
    opd_wins(OpdWinsArgs(quick=True, out_dir=str(tmp_path / "runs"), results_dir=str(results_dir)))
    results = json.loads((results_dir / "opd_wins_quick.json").read_text())
    assert set(results["regimes"]) == {"long", "plateau", "recovery", "tuned", "harder", "noisy"}
    seeds = results["seeds"]
    for name, entry in results["regimes"].items():
        methods = entry["methods"]
        assert set(methods) == {"opd", "sft"}
        for m in methods.values():
            assert len(m["final_accuracy_seeds"]) == len(seeds)
            assert all(0.0 <= a <= 1.0 for a in m["final_accuracy_seeds"])
            assert m["final_accuracy"] == pytest.approx(statistics.mean(m["final_accuracy_seeds"]))
            assert m["curve"]["step"][-1] == entry["step"] and len(m["curve"]["accuracy_seeds"]) == len(seeds)
        gaps = [o - s for o, s in zip(methods["opd"]["final_accuracy_seeds"], methods["sft"]["final_accuracy_seeds"])]
        assert entry["gap_seeds"] == pytest.approx(gaps)
        assert entry["seed_spread"] == pytest.approx(max(m["final_accuracy_std"] for m in methods.values()))
    # the plateau arms start from the SFT run's checkpoint at plateau_at, with its accuracy there; the long runs went on
    at = results["args"]["plateau_at"]
    assert at < results["args"]["steps"] == results["regimes"]["long"]["step"]
    long_sft = results["regimes"]["long"]["methods"]["sft"]["curve"]
    sft_at = [c[long_sft["step"].index(at)] for c in long_sft["accuracy_seeds"]]
    for m in results["regimes"]["plateau"]["methods"].values():
        assert m["curve"]["step"][0] == at and m["curve"]["step"][-1] == at + results["args"]["extra_steps"]
        assert [c[0] for c in m["curve"]["accuracy_seeds"]] == sft_at
    probe = results["recovery_probe"]
    for name in ("clean teacher", "recovery teacher"):
        assert all(0.0 <= v <= 1.0 for v in probe[name].values())
    assert set(results["sweep"]["chosen"]) == {"opd", "sft"}
    a = results["args"]
    assert results["sweep"]["runs"] == len(a["sweep_lrs"]) * 2 + len(a["sweep_temperatures"])
    # the harder regime runs on its own task, from its own warm start, with SFT on the teacher's samples whenever
    # they are not the true solutions (after two fine-tuning steps they are not)
    harder, setup = results["regimes"]["harder"], results["harder_setup"]
    assert harder["student_start_accuracy"] == setup["warm_start"]["test_accuracy"]
    assert harder["methods"]["opd"]["curve"]["accuracy_seeds"][0][0] == setup["warm_start"]["test_accuracy"]
    assert setup["teacher"]["task"] == "arithmetic-long" and setup["teacher"]["sample_is_true_solution"] < 0.99
    assert harder["sft_source"] == "teacher"
    by_length = harder["accuracy_by_chain_length"]
    assert len(by_length["opd"]) == len(by_length["sft"]) == len(seeds)
    for row in [by_length["warm start"], *by_length["opd"], *by_length["sft"]]:
        assert set(row) <= {"5", "6", "7"} and all(0.0 <= a <= 1.0 for a in row.values())  # 5-7-digit operands
    run_cfg = json.loads((tmp_path / "runs-quick" / "runs" / "harder" / "seed-0" / "sft" / "config.json").read_text())
    assert (run_cfg["task"], run_cfg["source"]) == ("arithmetic-long", "teacher")
    # the noisy regime: its own (shorter-trained) teacher, and a third arm, SFT on that teacher's greedy outputs
    noisy = results["regimes"]["noisy"]
    assert results["noisy_setup"]["teacher"]["steps"] < setup["teacher"]["steps"]
    assert len(noisy["sft_greedy_same_step"]["seeds"]) == len(seeds)
    assert len(noisy["accuracy_by_chain_length"]["sft_greedy"]) == len(seeds)
    greedy_cfg = json.loads((tmp_path / "runs-quick" / "runs" / "noisy" / "seed-0" / "sft_greedy" / "config.json")
                            .read_text())
    assert (greedy_cfg["source"], greedy_cfg["sampling"]["temperature"]) == ("teacher", 0.0)
    assert greedy_cfg["teacher"] != run_cfg["teacher"]
    assert (results_dir / "opd_wins_quick.md").read_text().startswith("## Where on-policy distillation wins")
    assert (results_dir / "opd_wins_quick.png").stat().st_size > 0
    assert (results_dir / "opd_wins_gaps_quick.png").stat().st_size > 0
