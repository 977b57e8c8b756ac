"""Remote teachers and samplers: HTTP to any OpenAI-compatible server (vLLM or `opd serve`), the top-k and
hidden-state teachers, the student's sampler server, and starting a real vLLM.
"""
