"""`opd bench xtok` (`run.py`): distillation across tokenizers, on the task models and on a real pair."""
