"""The loop's parts: turning a config into a teacher, prompt sets, checker and actor, and the run
directory's bookkeeping.
"""
