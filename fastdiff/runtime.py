"""What every entry point sets up the same way: the process group, the "fastdiff" logger and
the precision's autocast.

A neutral module: the CLIs (``fastdiff.train``, ``fastdiff.sample``, ``fastdiff.evaluate``),
the trainer and the sampling library import it, and it imports nothing from fastdiff, so no
entry point has to reach into another one's module for its setup.
"""
import contextlib
import dataclasses
import datetime
import logging
import os
import sys

import torch
import torch.distributed as dist

log = logging.getLogger("fastdiff")

# --precision → the autocast dtype (fp32: none). The one place this map is written.
_LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("fp32", "bf16", "fp16")


def low_precision_dtype(precision):
    """torch.bfloat16 / torch.float16 for "bf16" / "fp16"; None for "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return _LOW_PRECISION.get(precision)


def autocast(precision, device_type):
    """The autocast context of ``precision`` on ``device_type`` (a null context for fp32)."""
    dtype = low_precision_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


# ----------------------------------------------------------------------------- processes
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


def local_tensor(t):
    """This rank's shard of a DTensor (FSDP2 parameters, gradients, optimizer state), or the
    tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(t):
    """The whole tensor of a DTensor shard (a collective: every rank calls it), or the tensor
    itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(tensor):
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag, device):
    """True on every rank when ``flag`` is True on any rank (collective)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# ------------------------------------------------------------------------------- logging
def setup_logging(log_dir, is_main):
    """The "fastdiff" logger: messages on stdout (rank 0 at INFO, others WARNING only), and
    with ``log_dir`` a timestamped copy in ``log_dir/log.txt`` on rank 0."""
    log.handlers.clear()
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(out)
    if is_main and log_dir:
        fh = logging.FileHandler(os.path.join(log_dir, "log.txt"))
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(fh)


@contextlib.contextmanager
def logger_restored():
    """Leave the "fastdiff" logger as found (a CLI's main() may be called in-process):
    handlers added inside are closed, level and propagation put back."""
    saved = (list(log.handlers), log.level, log.propagate)
    try:
        yield log
    finally:
        for h in log.handlers:
            if h not in saved[0]:
                h.close()
        log.handlers[:], log.level, log.propagate = saved


def run_cli(prog, body, argv=None, errors=(ValueError,)):
    """An entry point's ``main``: ``body(argv)`` with the logger restored afterwards; an
    expected error (bad flags, a checkpoint or data that does not fit: ``errors``) becomes
    one line ``{prog}: error: ...`` on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    with logger_restored():
        try:
            return body(argv)
        except errors as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
