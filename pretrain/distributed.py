"""Process-group setup for one process, torchrun, plain `srun`, or submitit jobs; gather helpers.

The launcher decides where ranks come from; training code only sees `DistEnv`. Order of detection:
torchrun / an exported env (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) > submitit (SUBMITIT_EXECUTOR)
> a `srun` step (SLURM_PROCID inside a job step) > a single process.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)

# below Linux's ephemeral range (32768-60999): a port the kernel gave some client socket cannot
# be bound by rank 0's rendezvous store, and the other ranks would wait on it for the whole timeout
MIN_PORT, MAX_PORT = 20000, 32767


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # single | env | submitit | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _port_for_job(job_id: str) -> int:
    """Every task of a SLURM job derives the same port from the job id without talking."""
    return random.Random(job_id).randint(MIN_PORT, MAX_PORT)


def _int_env(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise RuntimeError(f"environment variable {name} is required for distributed training")
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from exc


def detect_env() -> DistEnv:
    """Ranks, world size and rendezvous address from the environment of the launcher in use."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int_env("WORLD_SIZE")
        return DistEnv(
            rank=_int_env("RANK"),
            world_size=world,
            local_rank=_int_env("LOCAL_RANK", 0),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int_env("MASTER_PORT", 29500),
            source="env",
        )
    if env.get("SUBMITIT_EXECUTOR"):
        import submitit

        job = submitit.JobEnvironment()
        return DistEnv(
            rank=job.global_rank,
            world_size=job.num_tasks,
            local_rank=job.local_rank,
            master_addr=job.hostnames[0],
            master_port=_int_env("MASTER_PORT", _port_for_job(str(job.job_id))),
            source="submitit",
        )
    # A batch script runs outside any step; only an srun step has one process per task.
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        from submitit.slurm.slurm import SlurmJobEnvironment

        job = SlurmJobEnvironment()
        world = _int_env("SLURM_STEP_NUM_TASKS", job.num_tasks)
        return DistEnv(
            rank=job.global_rank,
            world_size=world,
            local_rank=job.local_rank,
            master_addr=job.hostnames[0],
            master_port=_int_env("MASTER_PORT", _port_for_job(str(job.job_id))),
            source="slurm",
        )
    return DistEnv()


def select_device(env: DistEnv, want: str = "auto") -> torch.device:
    """cuda:LOCAL_RANK when GPUs exist (or are asked for), else cpu."""
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    index = env.local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(
    env: DistEnv, device: torch.device, backend: str = "auto", timeout: timedelta | None = None
) -> None:
    """init_process_group over env:// (gloo on CPU, nccl on GPU); a no-op for one process.
    `timeout`: how long a collective waits for the slowest rank (torch's default otherwise)."""
    if not env.distributed or dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    kwargs: dict = {"device_id": device} if backend == "nccl" else {}
    if timeout is not None:
        kwargs["timeout"] = timeout
    dist.init_process_group(
        backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size, **kwargs
    )
    logger.info(
        "process group ready: rank %d/%d (%s, backend %s, master %s:%s)",
        env.rank,
        env.world_size,
        env.source,
        backend,
        env.master_addr,
        env.master_port,
    )


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Python, numpy and torch (all devices) RNGs from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """Distinct streams per rank (augmentations, drop-path) that a restart reproduces."""
    return seed + 1000003 * rank


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def global_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def wait_for_rank0(key: str, timeout: timedelta) -> None:
    """Rank 0 announces `key`; every other rank waits for it, up to `timeout`.

    Through the rendezvous store rather than a collective, so that a wait of hours needs no
    process-group timeout of hours (which would also be every collective's), and so that the
    wait fails at once when rank 0 dies: the store lives in rank 0 and its connection closes.
    A barrier follows (every rank is there by then), so rank 0 cannot finish and take the store
    away before the others have seen the key."""
    if not is_dist():
        return
    store = dist.distributed_c10d._get_default_store()
    if dist.get_rank() == 0:
        store.set(key, "done")
    else:
        store.wait([key], timeout)
    dist.barrier()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """In-place sum over ranks (a no-op for one process)."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """In-place mean over ranks (a no-op for one process)."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def all_reduce_max(tensor: Tensor) -> Tensor:
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


@torch.no_grad()
def concat_all_gather(tensor: Tensor) -> Tensor:
    """Concatenate `tensor` (same shape on every rank) along dim 0; no gradient."""
    if not is_dist():
        return tensor
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate along dim 0 keeping the autograd graph (SimCLR negatives from every rank).

    The backward pass sums the incoming gradients over ranks and returns this rank's slice, so a
    loss averaged over the global batch gets the same gradients as on one process.
    """
    if not is_dist():
        return tensor
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated for the functional collectives, whose backward
        warnings.simplefilter("ignore", FutureWarning)  # needs reduce_scatter (not in gloo)
        return torch.cat(all_gather(tensor.contiguous()), dim=0)
