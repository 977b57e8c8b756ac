"""Who acts: the actors that produce a step's batch (data, the student, a local or remote teacher, a mixture,
`--overlap`) and the rollout engines behind them (in-process, a sampler server, a sampler process, SKD).
"""
