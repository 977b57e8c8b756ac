"""Other loops built from the parts: the RL baseline, the supervised arithmetic teacher and warm start,
continual learning, and the recovery experiment.
"""
