import json

from opd.lm.runs import drop_logged_after, flat_config, library_bars


def test_flat_config_joins_nested_names_and_stringifies_what_trackers_refuse():
    assert flat_config({"lr": 0.1, "optim": {"schedule": "cosine", "betas": (0.9, 0.99)}, "data": None}) == {
        "lr": 0.1, "optim.schedule": "cosine", "optim.betas": "(0.9, 0.99)", "data": "None"}


def test_drop_logged_after_keeps_the_last_row_of_each_step_up_to_the_checkpoint(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 1, "v": 1}, {"step": 2, "v": 2}, {"step": 2, "v": 3},
                                                          {"step": 3, "v": 4}]) + '{"step": 4, "v"')
    drop_logged_after(log, 2)
    assert [json.loads(line) for line in log.read_text().splitlines()] == [{"step": 1, "v": 1}, {"step": 2, "v": 3}]


def test_library_bars_restores_the_previous_setting():
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    with library_bars(False):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
