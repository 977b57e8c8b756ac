"""Distillation across tokenizers (`--cross-tokenizer`): a teacher with its own tokenizer, aligned to the
student's completion by character spans; the pure span losses live in `opd.xtok_losses`.
"""
