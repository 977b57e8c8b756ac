"""Prompts and checkers: prompt files and `datasets` into encoded `PromptSet`s, and the checkers that score
completions.
"""
