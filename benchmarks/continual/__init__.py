"""`opd bench continual` (`run.py`): personalisation by self-distillation, and forgetting over a task sequence."""
