"""Run by tests/lm/test_distributed.py under `accelerate launch --num_processes 2`: train, then check that every
process ends with the same weights (gradients were averaged) and write what it saw to OUT/rank{r}.json."""

import json
import sys

import torch
from accelerate import PartialState

from opd.config import DistillConfig, LoraArgs, OptimArgs, SamplingArgs
from opd.lm.train import distill

student, teacher, out, steps = sys.argv[1:5]
torch.set_num_threads(1)
lora = LoraArgs(r=4) if "--lora" in sys.argv else LoraArgs()  # with LoRA, also two micro-batches per update
mine = {}
final = distill(DistillConfig(student=student, teacher=teacher, steps=int(steps), batch_size=4, train_examples=64,
                              eval_examples=4, eval_every=0, save_every=2, sampling=SamplingArgs(max_new_tokens=6),
                              out_dir=out, progress=False, resume="--resume" in sys.argv, lora=lora,
                              optim=OptimArgs(grad_accum=2 if lora.r else 1),
                              # micro-batches by tokens: each process cuts its own rows into its own number of them
                              max_tokens_per_microbatch=28 if "--budget" in sys.argv else None),
                callbacks=[lambda step, model, m: mine.update(model=model, micro=m.get("micro_batches"))])
state = PartialState()
checksum = float(sum(p.detach().double().sum() for p in mine["model"].parameters()))
with open(f"{out}/rank{state.process_index}.json", "w") as f:
    json.dump({"final_step": final["step"], "checksum": checksum, "loss": final["loss"], "micro": mine["micro"]}, f)
state.destroy_process_group()  # as `opd train` does: gloo torn down at interpreter exit can abort (SIGABRT)
