"""Import guided-diffusion from a local checkout, on the CPU, for the golden-fixture generators.

guided-diffusion (github.com/openai/guided-diffusion, commit 22e0df8) imports ``mpi4py`` and
``blobfile`` at module level although a single-process CPU run touches neither for real. So
that the generators run with nothing but torch and numpy installed, this module puts two
small stand-ins into ``sys.modules`` before importing GD:

* ``mpi4py.MPI.COMM_WORLD`` — a one-rank communicator (rank 0, size 1, ``bcast`` returns its
  argument);
* ``blobfile`` — ``join``/``dirname``/``exists``/``BlobFile`` mapped to the local file system.

and starts a one-process gloo group (``torch.distributed``), which GD's TrainLoop asks for
its world size. Nothing of GD is copied: the checkout's path is an argument.
"""
import os
import sys
import tempfile
import types


def _mpi_stub():
    class _Comm:
        def Get_rank(self):
            return 0

        def Get_size(self):
            return 1

        def bcast(self, value, root=0):
            return value

        def barrier(self):
            pass

    mpi4py = types.ModuleType("mpi4py")
    mpi = types.ModuleType("mpi4py.MPI")
    mpi.COMM_WORLD = _Comm()
    mpi4py.MPI = mpi
    return {"mpi4py": mpi4py, "mpi4py.MPI": mpi}


def _blobfile_stub():
    bf = types.ModuleType("blobfile")
    bf.join = os.path.join
    bf.dirname = os.path.dirname
    bf.basename = os.path.basename
    bf.exists = os.path.exists
    bf.listdir = os.listdir
    bf.isdir = os.path.isdir
    bf.BlobFile = open
    return {"blobfile": bf}


def import_guided_diffusion(checkout):
    """Import the ``guided_diffusion`` package of ``checkout`` (a path) and return it.

    The returned module has the submodules the generators use already imported
    (``unet``, ``gaussian_diffusion``, ``respace``, ``script_util``, ``resample``,
    ``fp16_util``, ``train_util``, ``logger``, ``nn``).
    """
    checkout = os.path.abspath(checkout)
    if not os.path.isfile(os.path.join(checkout, "guided_diffusion", "unet.py")):
        raise SystemExit(f"{checkout} is not a guided-diffusion checkout "
                         "(no guided_diffusion/unet.py)")
    for name, module in {**_mpi_stub(), **_blobfile_stub()}.items():
        sys.modules.setdefault(name, module)
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    import importlib
    gd = importlib.import_module("guided_diffusion")
    for sub in ("unet", "gaussian_diffusion", "respace", "script_util", "resample",
                "fp16_util", "train_util", "logger", "nn"):
        importlib.import_module(f"guided_diffusion.{sub}")
    return gd


def init_single_process_group():
    """A one-rank gloo process group (GD's TrainLoop reads the world size and rank)."""
    import torch.distributed as dist
    if dist.is_initialized():
        return
    store_file = tempfile.NamedTemporaryFile(prefix="gd_golden_store_", delete=False).name
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=0, world_size=1)


def gd_commit(checkout):
    """The checkout's HEAD commit (recorded in every fixture), or 'unknown'."""
    import subprocess
    try:
        return subprocess.check_output(["git", "-C", checkout, "rev-parse", "HEAD"],
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
