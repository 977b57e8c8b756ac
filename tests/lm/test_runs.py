import json

from opd.lm.loop.run_dir import drop_logged_after, flat_config
from opd.lm.hf.model import library_bars


def test_flat_config_joins_nested_names_and_stringifies_what_trackers_refuse():
    assert flat_config({"lr": 0.1, "optim": {"schedule": "cosine", "betas": (0.9, 0.99)}, "data": None}) == {
        "lr": 0.1, "optim.schedule": "cosine", "optim.betas": "(0.9, 0.99)", "data": "None"}


def test_drop_logged_after_keeps_the_last_row_of_each_step_up_to_the_checkpoint(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 1, "v": 1}, {"step": 2, "v": 2}, {"step": 2, "v": 3},
                                                          {"step": 3, "v": 4}]) + '{"step": 4, "v"')
    drop_logged_after(log, 2)
    assert [json.loads(line) for line in log.read_text().splitlines()] == [{"step": 1, "v": 1}, {"step": 2, "v": 3}]


def test_library_bars_follow_progress_datasets_bars_stay_quiet_and_the_settings_come_back():
    import datasets
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()
    for progress in (False, True):
        with library_bars(progress):
            assert hf_logging.is_progress_bar_enabled() == progress and not datasets.is_progress_bar_enabled()
        assert hf_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()


def test_free_cores_counts_the_cores_other_jobs_leave(monkeypatch):
    import os

    import opd.threads as runs

    cores = len(os.sched_getaffinity(0))
    reads = iter(["0.5 0.5 0.5 1/80 99", "0.5 0.5 0.5 3/80 99", "0.5 0.5 0.5 1/80 99"] * 2)

    class FakeLoadavg:
        def __init__(self, path):
            pass

        def read_text(self):
            return next(reads)

    monkeypatch.setattr(runs, "Path", FakeLoadavg)
    assert runs.free_cores(samples=3, interval_s=0) == cores  # the median: nothing else runnable
    reads = iter([f"1 1 1 {cores + 3}/80 99"] * 3)
    assert runs.free_cores(samples=3, interval_s=0) == 1  # more busy tasks than cores: still one thread
