"""Several processes, one run: the torch.distributed pieces LEGO needs under `torchrun`.

    torchrun --nproc_per_node=2 -m lego device=cpu hydra.run.dir=runs/ddp   # CPU processes, gloo
    torchrun --nproc_per_node=8 -m lego device=cuda model=small             # one GPU each, nccl

    srun --ntasks-per-node=8 --gpus-per-node=8 python -m lego model=small   # Slurm: one task per GPU

`setup()` joins the process group only when torchrun's WORLD_SIZE (or, without it, Slurm's
SLURM_NTASKS) is above 1; otherwise every helper here is the identity (rank 0 of 1) and
single-process runs never touch torch.distributed.
Collectives on CPU tensors go through gloo, gradients of CUDA models through nccl. Training
batches are sharded per rank (`make_loader(rank=, world_size=)`), DistributedDataParallel
averages gradients (`data_parallel`), and the sums behind every reported number are added
over ranks (`all_reduce_sum`, `all_gather_varlen`), so each rank sees the same result.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import inspect
import itertools
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_CPU = torch.device("cpu")  # control collectives: always gloo, never a GPU sync


def launched() -> bool:
    """True when torchrun (WORLD_SIZE), or Slurm's srun without torchrun (SLURM_NTASKS), started this
    process as one of several."""
    return int(os.environ.get("WORLD_SIZE", slurm_env().get("WORLD_SIZE", "1"))) > 1


def slurm_env(environ=os.environ) -> dict:
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from a Slurm task's.

    Empty unless Slurm started this process as a task (SLURM_PROCID and SLURM_NTASKS set) and
    torchrun did not (no WORLD_SIZE: `srun torchrun ...` keeps torchrun's own). MASTER_ADDR and
    MASTER_PORT are kept when set; otherwise the address is the job's first node and the port
    15000 + (job id mod 20000), so every task of a job agrees on both without talking. Start the
    tasks with srun: a batch script's own shell also carries SLURM_PROCID=0, and a plain
    `python -m lego` there with --ntasks above 1 would wait for peers that never come.
    """
    if "WORLD_SIZE" in environ or "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return {}
    nodes = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or "127.0.0.1"
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodes),
            "MASTER_PORT": environ.get("MASTER_PORT") or str(15000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)}


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "gpu[07-09,12],cpu01" -> "gpu07" (what `scontrol show
    hostnames` prints first, without needing scontrol on the node)."""
    head = nodelist.split(",")[0]
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)  # "gpu[07-09" of "gpu[07-09,12]"
    return prefix + ranges.split("-")[0].rstrip("]")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    """Rank 0: the only process that writes files (run dir, checkpoints, history, cache, metrics)."""
    return rank() == 0


def setup() -> bool:
    """Join the process group from torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
    or from a Slurm task's (`slurm_env`, exported as torchrun's names so every reader agrees).

    Does nothing for WORLD_SIZE <= 1 or when already joined; returns True if this call joined.
    The backend holds gloo for CPU tensors, plus nccl for CUDA tensors where CUDA exists, so one
    group serves a CPU run, a GPU run and the CPU-side bookkeeping of a GPU run.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    os.environ.update(slurm_env())
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "cpu:gloo,cuda:nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=60))
    return True


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for_rank(device: torch.device) -> torch.device:
    """Each rank its own GPU (LOCAL_RANK); CPU and single-process devices unchanged."""
    if device.type != "cuda" or not is_distributed():
        return device
    index = local_rank() % torch.cuda.device_count()
    if device.index is not None and device.index != index:
        log.warning("device=%s ignored under torchrun: rank %d uses cuda:%d (LOCAL_RANK)", device, rank(), index)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


# -- sweep jobs side by side (hydra/launcher=joblib) ---------------------------------------------------
@contextlib.contextmanager
def job_slot(lock_dir: Path):
    """The lowest slot number (0, 1, ...) that no other running job holds, held for the `with` block.

    A slot is a file lock in `lock_dir` (the sweep directory's), so jobs in any process of the sweep
    agree, and the kernel frees the slot of a job that dies. n jobs at once hold slots 0..n-1.
    """
    from lego.artifacts import LockBusy, file_lock

    with contextlib.ExitStack() as stack:
        for slot in itertools.count():
            try:
                stack.enter_context(file_lock(Path(lock_dir) / f"slot-{slot}.lock", blocking=False))
                break
            except LockBusy:
                continue
        yield slot


def gpu_for_slot(slot: int, num_gpus: int) -> Optional[int]:
    """The GPU of the job in `slot`: jobs at once spread over the GPUs round-robin; None with fewer
    than 2 GPUs (nothing to choose, the device stays as configured)."""
    return slot % num_gpus if num_gpus > 1 else None


# -- collectives (identity in a single process) ------------------------------------------------------
def barrier() -> None:
    """Wait for every rank (an all-reduce on the CPU backend, so it never needs a GPU)."""
    if is_distributed():
        dist.all_reduce(torch.zeros(1, device=_CPU))


def all_reduce_sum(values: Sequence[float]) -> List[float]:
    """Element-wise sums over ranks, in float64; a single process gets `values` back untouched."""
    if not is_distributed():
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_CPU)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_min(value: int) -> int:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_CPU)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


def all_gather_varlen(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `t` (dim 0 may differ per rank), concatenated in rank order, on CPU.

    Lengths are exchanged first; each rank pads to the longest and the padding is cut off again.
    """
    if not is_distributed():
        return t
    t = t.detach().cpu().contiguous()
    n = torch.tensor([t.shape[0]], dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a picklable value)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_CPU)
    return box[0]


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. builds a cache), the other ranks then run it on its files."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


# -- training ------------------------------------------------------------------------------------
def common_steps(num_batches: int, steps: int | None) -> int | None:
    """Batches each rank takes per epoch, the same number on every rank (DDP steps in lockstep).

    `steps` counts batches of the whole epoch, as in a single process; sharded batch by batch,
    that is ceil(steps / world_size) per rank, capped by the rank with the fewest batches.
    A single process gets `steps` back (None: the whole loader).
    """
    if not is_distributed():
        return steps
    per_rank = num_batches if steps is None else min(num_batches, math.ceil(steps / world_size()))
    return all_reduce_min(per_rank)


class _Forward(torch.nn.Module):
    """`fn(model, *batch)` as a module's forward: the one call DistributedDataParallel synchronises."""

    def __init__(self, model: torch.nn.Module, fn: Callable):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *batch):
        return self.fn(self.model, *batch)


def data_parallel(model: torch.nn.Module, fn: Callable, device) -> Callable:
    """`fn(model, *batch)` (a loss), with gradients averaged over ranks by DistributedDataParallel.

    LEGO's losses call the model's pieces (`embed`, `run_layers`, `logits_at`), not its
    `forward`, so DDP wraps the loss itself. Build one per epoch: construction syncs the
    weights from rank 0, which costs about one step's gradient exchange. A single process gets
    `fn` bound to `model`, nothing else.
    """
    if not is_distributed():
        return functools.partial(fn, model)
    device = torch.device(device)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    # Buffers (RoPE tables) are computed, never trained: nothing to broadcast each step. The
    # keyword was renamed in newer torch (the old one warns there).
    ddp = torch.nn.parallel.DistributedDataParallel
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
    return ddp(_Forward(model, fn), device_ids=ids, **{no_sync: False})


def no_sync(step: Callable):
    """The context of a micro-batch whose gradients stay local (gradient accumulation): DDP's `no_sync()` for a
    `data_parallel` step under torch.distributed, nothing in a single process."""
    return step.no_sync() if isinstance(step, torch.nn.parallel.DistributedDataParallel) else contextlib.nullcontext()


# -- Hydra under torchrun -------------------------------------------------------------------------
def hydra_args(args: List[str]) -> List[str]:
    """Command-line overrides so that every rank's Hydra agrees with rank 0's and only rank 0 writes.

    Every rank runs Hydra. `${now:...}` in hydra.run.dir / hydra.sweep.dir is read from rank
    0's clock (broadcast here), so the ranks compose the same run directory even when their
    clocks straddle a second; ranks above 0 write no .hydra/ files and configure no logging
    (see `quiet_logging`), so they add nothing to the run directory.
    """
    if not is_distributed():
        return args
    stamp = broadcast(time.time())
    import hydra.core.utils as hydra_utils

    class RankZeroClock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime.fromtimestamp(stamp, tz)

    hydra_utils.datetime = RankZeroClock  # what Hydra's `now` resolver calls
    if is_main():
        return args
    return [*args, "++hydra.output_subdir=null", "++hydra.job_logging.root=null"]


def agree_run_dir(run_dir) -> None:
    """Fail loudly, on every rank, if this rank composed another run directory than rank 0."""
    if not is_distributed():
        return
    main_dir = broadcast(str(run_dir))
    if all_reduce_sum([main_dir != str(run_dir)])[0]:  # every rank learns that one differs
        raise ValueError(f"hydra.run.dir differs between ranks (rank 0: {main_dir}, rank {rank()}: {run_dir}); "
                         "give it explicitly: hydra.run.dir=<dir>")


def quiet_logging() -> None:
    """Ranks above 0 log warnings and errors only, to stderr, tagged with their rank."""
    if is_main():
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[rank {rank()}][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
