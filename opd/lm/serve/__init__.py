"""`opd serve`: a Hugging Face model behind vLLM's OpenAI-compatible completions protocol, with
`prompt_logprobs`, hidden states and weight pushes. Only `wire` is imported from outside (by `opd.lm.remote.client`).
"""
