"""`opd bench opd_wins` (`run.py`): where on-policy distillation beats SFT on teacher samples; `opd bench
opd_wins_control` (`control.py`): the same question for policy compression."""
