"""`opd bench table31`: the survey's Table 3.1 as an experiment (`run.py`), with its capacity and teacher-bias parts."""
