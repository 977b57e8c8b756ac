"""`opd bench robotics` (`run.py`): simulated analogues of the robotics rows, one module per part."""
