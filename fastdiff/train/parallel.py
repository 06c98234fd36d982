"""Process group setup and model parallelisation: compile, then FSDP2 per block and at the root.

One process: torch.compile the whole model in place (``Module.compile`` keeps state_dict
keys). Several: torchtitan's order — compile each ResBlock/AttentionBlock, then
``fully_shard`` each block, then the root. Blocks run their
parameters in the low precision of ``--precision`` (MixedPrecisionPolicy, fp32 gradient
reduction); the root keeps fp32 so that the timesteps reaching the sinusoidal embedding are
never rounded to bf16 (t = 999 would become 1000).
"""
import dataclasses
import datetime
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger("fastdiff")


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def setup_distributed(device_pref=""):
    """Initialise torch.distributed when launched by torchrun (NCCL on GPUs, gloo on CPU).

    A plain ``python -m fastdiff.train`` runs as a single process with no process group.
    """
    use_cuda = torch.cuda.is_available() if not device_pref else device_pref == "cuda"
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if use_cuda else None)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def teardown_distributed():
    """Leave the process group together: a rank that destroys it while another is still
    finishing its last collective can abort the job at exit (seen with gloo)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _blocks(model):
    """The modules FSDP2 shards one by one: every ResBlock and AttentionBlock."""
    from fastdiff.models.layers import AttentionBlock, ResBlock
    return [m for m in model.modules() if isinstance(m, (ResBlock, AttentionBlock))]


def parallelize(model, dist_info, precision="fp32", compile=False):
    """Compile and shard ``model`` in place; returns a one-line description for the log."""
    parts = []
    if compile and not dist_info.distributed:
        # One graph for the whole UNet: no FSDP hooks between blocks to break it.
        model.compile(fullgraph=True)
        parts.append("torch.compile whole model (fullgraph)")
    elif compile:
        # Per block, so FSDP2's all-gather hooks stay outside the graphs. Every ResBlock
        # shares one forward: dynamo counts each block shape as a recompile of that code,
        # and an ImageNet-64 UNet has ~21 distinct ResBlock shapes (the default limit is 8).
        import torch._dynamo.config as dynamo_config
        blocks = _blocks(model)
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, len(blocks) + 8)
        dynamo_config.accumulated_recompile_limit = max(
            dynamo_config.accumulated_recompile_limit, 4 * len(blocks))
        for block in blocks:
            block.compile(fullgraph=True)
        parts.append("torch.compile per block (fullgraph)")
    if not dist_info.distributed:
        parts.insert(0, "single process")
        return ", ".join(parts)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    block_policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    for block in _blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=block_policy)
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    parts.insert(0, f"FSDP2 fully_shard per ResBlock/AttentionBlock + root over "
                    f"{dist_info.world_size} ranks ({dist_info.device.type}, "
                    f"block params {precision}, fp32 reduce)")
    return ", ".join(parts)


def all_reduce_sum_(tensor):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag, device):
    """True on every rank when ``flag`` is True on any rank (collective)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
