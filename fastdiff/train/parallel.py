"""Model parallelisation: compile, then FSDP2 per block and at the root.

One process: torch.compile the whole model in place (``Module.compile`` keeps state_dict
keys). Several: torchtitan's order — compile each ResBlock/AttentionBlock, then
``fully_shard`` each block, then the root. Blocks run their
parameters in the low precision of ``--precision`` (MixedPrecisionPolicy, fp32 gradient
reduction); the root keeps fp32 so that the timesteps reaching the sinusoidal embedding are
never rounded to bf16 (t = 999 would become 1000).
"""
import logging

import torch

# Process-group setup lives in fastdiff.runtime (shared by every entry point); these names
# stay importable from here for existing callers.
from fastdiff.runtime import (DistInfo, all_reduce_sum_, any_rank,  # noqa: F401
                              low_precision_dtype, setup_distributed, teardown_distributed)

log = logging.getLogger("fastdiff")


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
    low = low_precision_dtype(precision)
    block_policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    for block in _blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=block_policy)
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    parts.insert(0, f"FSDP2 fully_shard per ResBlock/AttentionBlock + root over "
                    f"{dist_info.world_size} ranks ({dist_info.device.type}, "
                    f"block params {precision}, fp32 reduce)")
    return ", ".join(parts)
