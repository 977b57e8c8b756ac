"""Run by tests/lm/test_fsdp.py under `accelerate launch --config_file configs/accelerate/fsdp2_cpu.yaml` (2 CPU
processes, the student sharded with FSDP2): train, and write what this process saw to OUT/rank{r}.pt: the config, the
batches it trained on and its metrics (for the single-process replay), and how its student and teacher were held.

    fsdp_check.py STUDENT TEACHER OUT STEPS [--lora]
"""

import sys

import torch
from accelerate import PartialState
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from opd.config import DistillConfig, LoraArgs, OptimArgs, SamplingArgs
from opd.lm import train

student, teacher, out, steps = sys.argv[1:5]
torch.set_num_threads(1)
lora = "--lora" in sys.argv
# lr 1e-2: every weight moves by about that much per update, far above float rounding; with LoRA, also two
# micro-batches per update (under FSDP each one's gradients are reduce-scattered as it ends)
cfg = DistillConfig(student=student, teacher=teacher, steps=int(steps), batch_size=4, train_examples=64,
                    eval_examples=4, eval_every=int(steps), save_every=100, sampling=SamplingArgs(max_new_tokens=6),
                    out_dir=out, progress=False, lora=LoraArgs(r=4) if lora else LoraArgs(),
                    optim=OptimArgs(lr=1e-2, warmup_steps=1, grad_accum=2 if lora else 1))
seen: dict = {"cfg": cfg, "batches": [], "metrics": []}


def recording(student_model, teacher_model, batch, *rest, **kwargs):
    """`accumulate`, keeping the batch this process trained on and how its student and teacher are held."""
    if not seen["batches"]:  # the trained weights as they start (a LoRA adapter's are random), gathered
        seen["start"] = {name: p.full_tensor() for name, p in student_model.named_parameters() if p.requires_grad}
    seen["batches"].append(batch)
    seen["student_dtensor"] = all(isinstance(p, DTensor) for p in student_model.parameters())
    seen["student_local_numel"] = sum(p.to_local().numel() for p in student_model.parameters())
    seen["student_numel"] = sum(p.numel() for p in student_model.parameters())
    model = teacher_model.model
    seen["teacher_plain"] = not any(isinstance(p, DTensor) for p in model.parameters()) and not any(
        isinstance(m, FSDPModule) for m in model.modules())
    seen["teacher_frozen"] = not any(p.requires_grad for p in model.parameters())
    seen["teacher_sum"] = float(sum(p.detach().double().sum() for p in model.parameters()))
    return accumulate(student_model, teacher_model, batch, *rest, **kwargs)


def loading(*args, **kwargs):
    """`load_student`, keeping the trained weights as this process made them (before any sharding)."""
    model = load_student(*args, **kwargs)
    seen["loaded"] = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return model


accumulate, load_student = train.accumulate, train.load_student
train.accumulate, train.load_student = recording, loading  # distill looks them up when it calls them
final = train.distill(cfg, callbacks=[lambda step, model, m: seen["metrics"].append(dict(m))])
state = PartialState()
seen["final_step"] = final["step"]
torch.save(seen, f"{out}/rank{state.process_index}.pt")
state.destroy_process_group()  # as `opd train` does: gloo torn down at interpreter exit can abort (SIGABRT)
