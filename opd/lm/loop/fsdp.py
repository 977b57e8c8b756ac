"""FSDP2 students: shard the student across a run's processes, gather its weights where one process needs them whole
(sampling, evaluation, checkpoints), and save and restore its sharded optimizer state.

Ask for it with an accelerate config that says `distributed_type: FSDP` and `fsdp_version: 2`
(configs/accelerate/fsdp2_cpu.yaml). On GPUs accelerate shards the student itself (`Accelerator.prepare`). On CPUs it
ignores those settings and would fall back to DDP, so `shard` applies torch's `fully_shard` with the same settings
(transformer-layer or size-based auto wrap, reshard after forward). Either way the engine is torch's FSDP2: every
parameter is a DTensor holding this process's shard, all-gathered for each layer's forward and backward.

The teacher is never sharded: every process holds a frozen full copy (as TRL's GKD trainer does, TRL #2580). It has
no gradients or optimizer state to split, only weights, and sharding those would cost an all-gather per layer in
every forward pass; a teacher too large for one device belongs on a server (--teacher http://...).
"""

from __future__ import annotations

import contextlib
import os

import accelerate
import torch

from opd.lm.hf.model import hf_model, unwrap


class Accelerator(accelerate.Accelerator):
    """accelerate's Accelerator, whose `get_state_dict` (the weight push to a --sampler server) also gathers a student
    that `shard` sharded: accelerate, which left FSDP out on CPUs, would return this process's shards."""

    def get_state_dict(self, model, unwrap=True):
        if is_sharded(model) and self.distributed_type != accelerate.DistributedType.FSDP:
            return full_state_dict(model)
        return super().get_state_dict(model, unwrap)


def fsdp_requested() -> bool:
    """Whether `accelerate launch` was given an FSDP config (it passes it on in the environment)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_version() -> int:
    """The FSDP version the launch config asks for (accelerate's default when it names none: 1)."""
    return int(os.environ.get("FSDP_VERSION", "1"))


def is_sharded(model) -> bool:
    """Whether `model` (through any wrapper) holds FSDP2-sharded parameters."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


def shard(model, opt: torch.optim.Optimizer, mixed_precision: str = "no") -> None:
    """Shard `model` in place with torch's `fully_shard` as the launch config's fsdp_* settings say, and point `opt`
    at the sharded parameters (`fully_shard` replaces each parameter with a DTensor one)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = unwrap(model)
    plugin = FullyShardedDataParallelPlugin()  # reads the fsdp_* settings accelerate launch put in the environment
    plugin.set_auto_wrap_policy(hf_model(model))  # the layer classes: the config's, or the model's _no_split_modules
    wraps = fsdp2_prepare_auto_wrap_policy(plugin, hf_model(model))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision == "bf16" \
        else MixedPrecisionPolicy()
    names = {id(p): name for name, p in model.named_parameters()}
    inner = list(model.modules())[1:]
    for module in reversed(inner):  # children before their parents, as fully_shard needs
        if wraps is not None and wraps(module):
            fully_shard(module, reshard_after_forward=plugin.reshard_after_forward, mp_policy=mp)
    # The root (embeddings, final norm, LM head) stays gathered after the forward: the losses evaluate the LM head on
    # a few hundred positions at a time after the model's forward has returned (opd.chunked).
    fully_shard(model, reshard_after_forward=False, mp_policy=mp)
    sharded = dict(model.named_parameters())
    for group in opt.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]


@torch.no_grad()
def broadcast_from_main(model) -> None:
    """Make every process's copy of `model` the main process's, before it is sharded (DDP does this when it wraps a
    model; FSDP2 does not): weights a process initialises at random, such as a new LoRA adapter's A matrices (each
    process seeds its own RNG), would otherwise differ, and FSDP would stitch each weight from all of them."""
    import torch.distributed as dist

    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


@torch.no_grad()
def first_forward(model, device) -> None:
    """Run one token through a sharded `model`'s root, on every process. FSDP sets up what its processes share at
    the root's first forward; sampling calls the decoder trunk directly (`opd.lm.hf.decode`), which would leave that
    undone, and `unsharded` could not reset the forward order its passes record."""
    if is_sharded(model):
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
        # The root is not resharded after a forward (`shard`), and until it is, the model's parameters are its
        # gathered tensors rather than the shards the optimizer holds (loading optimizer state matches them by name).
        unwrap(model).reset_iter_state()


@contextlib.contextmanager
def unsharded(model):
    """Inside, a sharded `model` holds every weight whole on every process (one all-gather per layer on entering),
    and its forward passes run no collectives; resharded on the way out. Every process must enter together. A model
    that is not sharded passes through untouched.

    What needs this: sampling, where each process runs as many forward passes as its own completions need (a
    collective per pass would hang when the counts differ), and the held-out evaluation. The cost is a whole copy of
    the student per process while inside, as with DeepSpeed ZeRO-3's gathered generation.
    """
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in unwrap(model).modules() if isinstance(m, FSDPModule)]
    if not modules:
        yield
        return
    root, inner = modules[0], modules[1:]  # the root is never resharded after forward (`shard`; accelerate's own)
    kept = [reshards_after_forward(m) for m in inner]
    for m in inner:
        m.set_reshard_after_forward(False, recurse=False)
    for m in modules:
        m.unshard()
    try:
        yield
    finally:
        for m, value in zip(inner, kept):
            m.set_reshard_after_forward(value, recurse=False)
        # reshards every group and forgets the forward order these passes recorded (backward prefetching reads it)
        root.reset_iter_state()


def reshards_after_forward(module) -> bool:
    """An FSDP module's reshard-after-forward setting; torch has a setter (`set_reshard_after_forward`), no getter,
    so this reads the property that setter writes (torch 2.13)."""
    return any(group._reshard_after_forward for group in module._get_fsdp_state()._fsdp_param_groups)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole weights of a sharded `model`, on the main process's CPU (the other processes get {}); every process
    must call this."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model, opt) -> dict:
    """The whole optimizer state of a sharded `model`, keyed by parameter name, on the main process's CPU (the other
    processes get {}); every process must call this.

    Gathered rather than saved per process: one file next to the gathered weights that the HF directory needs
    anyway, which resumes under any sharding or none (FSDP with other settings, DDP), at the cost of the whole
    optimizer state in the main process's memory while saving.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap(model), inner_optimizer(opt),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, opt, saved: dict) -> None:
    """Load into `opt` an optimizer state saved whole: keyed by parameter name (`full_optimizer_state`) or by position
    (`optimizer.state_dict()` of one process or DDP). A sharded `model`'s processes each keep their own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    by_position = any(isinstance(i, int) for group in saved["param_groups"] for i in group["params"])
    if by_position and not is_sharded(model):
        opt.load_state_dict(saved)
        return
    if by_position:  # positions follow the optimizer's parameters, which are the trainable ones in model order
        names = [name for name, p in unwrap(model).named_parameters() if p.requires_grad]
        saved = {"state": {names[i]: s for i, s in saved["state"].items()},
                 "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(unwrap(model), inner_optimizer(opt), saved,
                             options=StateDictOptions(full_state_dict=True))


def inner_optimizer(opt) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's `AcceleratedOptimizer` (or `opt` itself)."""
    return getattr(opt, "optimizer", opt)
