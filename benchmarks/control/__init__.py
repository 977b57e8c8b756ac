"""`opd bench control` (`run.py`): the control-side lineage: classic KD, DAgger, Rusu policy distillation,
Actor-Mimic."""
