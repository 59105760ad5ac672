"""Cluster flags -> submitit executors (slurm, local, debug), and waiting on the jobs they return.

One set of flags for every stage: the stage decides how many tasks a job has (pretrain: one per GPU
or CPU slot; curation/eval arrays: one), this module turns the rest into sbatch options. Jobs find
the code through PYTHONPATH (set in the job's setup lines), so an uninstalled checkout works too.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import submitit

logger = logging.getLogger(__name__)

CLUSTERS = ("local", "slurm", "debug")
LOCAL_ARRAY_PARALLELISM = 1  # a local task already uses every core
REPO_ROOT = Path(__file__).resolve().parents[1]


class LaunchError(RuntimeError):
    """A launch that cannot go ahead as asked (bad flags, no SLURM, ...)."""


class JobFailed(LaunchError):
    """A submitted job ended without a result; the message carries the job's own error text."""


@dataclass(frozen=True)
class ClusterOptions:
    """Where and with what resources a job runs; `None` leaves SLURM's default."""

    cluster: str = "local"
    folder: Path = Path("launch_logs")
    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # pretrain: None = one per GPU, else 1
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    timeout_min: int = 60
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    comment: str | None = None
    array_parallelism: int = 64
    max_requeues: int = 3
    signal_delay_s: int = 90
    extra_setup: tuple[str, ...] = field(default_factory=tuple)

    def with_tasks(self, tasks_per_node: int, nodes: int | None = None) -> ClusterOptions:
        return replace(
            self, tasks_per_node=tasks_per_node, nodes=self.nodes if nodes is None else nodes
        )


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cluster")
    g.add_argument(
        "--cluster",
        choices=CLUSTERS,
        default="local",
        help="slurm: sbatch through submitit; local: subprocesses on this machine; "
        "debug: in this process (pdb works)",
    )
    g.add_argument(
        "--folder",
        type=Path,
        default=None,
        help="submitit folder for job scripts, pickles and logs (default OUT/launch/submitit)",
    )
    g.add_argument("--partition")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=0)
    g.add_argument(
        "--tasks-per-node",
        type=int,
        default=None,
        help="pretrain ranks per node (default: --gpus-per-node, or 1 on CPU)",
    )
    g.add_argument("--cpus-per-task", type=int, default=None)
    g.add_argument("--mem-gb", type=float, default=None)
    g.add_argument("--timeout-min", type=int, default=60)
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--exclude")
    g.add_argument("--comment")
    g.add_argument(
        "--array-parallelism",
        type=int,
        help="array tasks running at once (default: 64 on SLURM; 1 locally, where each task "
        "already uses every core and several at once only thrash)",
    )
    g.add_argument(
        "--max-requeues",
        type=int,
        default=3,
        help="requeues after preemption/timeout before a job gives up",
    )
    g.add_argument(
        "--signal-delay-s",
        type=int,
        default=90,
        help="seconds before the time limit at which SLURM signals the job (USR2)",
    )
    g.add_argument(
        "--wait",
        action="store_true",
        help="slurm: wait for the jobs and print their results (local/debug always wait)",
    )


def options_from_args(args: argparse.Namespace, out_dir: Path) -> ClusterOptions:
    """Validate the flags (errors name the flag) and fill the defaults that depend on OUT."""
    checks = [
        (args.nodes >= 1, "--nodes must be >= 1"),
        (args.gpus_per_node >= 0, "--gpus-per-node must be >= 0"),
        (args.tasks_per_node is None or args.tasks_per_node >= 1, "--tasks-per-node must be >= 1"),
        (args.timeout_min >= 1, "--timeout-min must be >= 1"),
        (args.max_requeues >= 0, "--max-requeues must be >= 0"),
        (
            args.array_parallelism is None or args.array_parallelism >= 1,
            "--array-parallelism must be >= 1",
        ),
        (
            args.cluster == "slurm" or args.nodes == 1,
            f"--cluster {args.cluster} runs on one node: use --nodes 1",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise LaunchError(message)
    folder = args.folder if args.folder is not None else out_dir / "launch" / "submitit"
    return ClusterOptions(
        cluster=args.cluster,
        folder=Path(folder).resolve(),
        partition=args.partition,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        timeout_min=args.timeout_min,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        exclude=args.exclude,
        comment=args.comment,
        array_parallelism=args.array_parallelism
        or (64 if args.cluster == "slurm" else LOCAL_ARRAY_PARALLELISM),
        max_requeues=args.max_requeues,
        signal_delay_s=args.signal_delay_s,
    )


def pythonpath() -> str:
    """The checkout first, then whatever the caller had: jobs import launch/pretrain/... from it."""
    current = os.environ.get("PYTHONPATH", "")
    return str(REPO_ROOT) + (os.pathsep + current if current else "")


def _mem(mem_gb: float) -> str:
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


def make_executor(
    opts: ClusterOptions,
    name: str,
    *,
    tasks_per_node: int = 1,
    dependency: list[str] | None = None,
) -> submitit.Executor:
    """An executor for one kind of job; `dependency`: job ids that must succeed first (slurm)."""
    opts.folder.mkdir(parents=True, exist_ok=True)
    folder = opts.folder / "%j"
    setup = [f"export PYTHONPATH={pythonpath()}", *opts.extra_setup]
    if opts.cluster == "debug":
        return submitit.DebugExecutor(folder)
    if opts.cluster == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=opts.max_requeues)
        executor.update_parameters(
            timeout_min=opts.timeout_min,
            tasks_per_node=tasks_per_node,
            nodes=1,
            gpus_per_node=opts.gpus_per_node,
            signal_delay_s=min(opts.signal_delay_s, 30),
            setup=setup,
        )
        return executor
    if opts.cluster != "slurm":
        raise LaunchError(f"unknown cluster {opts.cluster!r}; choose from {CLUSTERS}")
    try:
        executor = submitit.SlurmExecutor(folder, max_num_timeout=opts.max_requeues)
    except RuntimeError as exc:  # no srun on PATH
        raise LaunchError(
            f"--cluster slurm: {exc} (tests/slurm/cluster.sh start runs one here)"
        ) from exc
    params: dict[str, Any] = dict(
        job_name=f"medssl-{name}",
        time=opts.timeout_min,
        nodes=opts.nodes,
        ntasks_per_node=tasks_per_node,
        setup=setup,
        signal_delay_s=opts.signal_delay_s,
        array_parallelism=opts.array_parallelism,
    )
    optional = {
        "partition": opts.partition,
        "cpus_per_task": opts.cpus_per_task,
        "gpus_per_node": opts.gpus_per_node or None,
        "account": opts.account,
        "qos": opts.qos,
        "constraint": opts.constraint,
        "exclude": opts.exclude,
        "comment": opts.comment,
        "mem": None if opts.mem_gb is None else _mem(opts.mem_gb),
        "dependency": f"afterok:{':'.join(raw_job_id(j) for j in dependency)}"
        if dependency
        else None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    if dependency:  # a failed dependency cancels this job instead of leaving it pending forever
        params["additional_parameters"] = {"kill-on-invalid-dep": "yes"}
    executor.update_parameters(**params)
    return executor


def raw_job_id(job_id: str) -> str:
    """'123_4' (array task) -> '123': afterok on the array id waits for every task."""
    return str(job_id).split("_", 1)[0]


def job_ids(jobs: list[submitit.Job]) -> list[str]:
    return sorted({raw_job_id(j.job_id) for j in jobs})


def wait_for(
    jobs: list[submitit.Job], poll_s: float = 1.0, timeout_s: float | None = None
) -> list[Any]:
    """Results of every job (all tasks), failing with the job's own error text.

    Polls the result files and, for SLURM, `sacct` (force-checked: submitit's default check interval
    grows to minutes, and a job killed before writing a result would otherwise be waited on forever).
    """
    start = time.monotonic()
    pending = list(jobs)
    while pending:
        pending = [j for j in pending if not _finished(j)]
        if not pending:
            break
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            ids = ", ".join(f"{j.job_id} ({_state(j)})" for j in pending)
            raise JobFailed(f"jobs {ids} not finished after {timeout_s:.0f} s")
        time.sleep(poll_s)
    results = []
    for job in jobs:
        try:
            results.append(job.results() if job.num_tasks > 1 else job.result())
        except Exception as exc:  # submitit wraps the job's traceback in its own error types
            raise JobFailed(f"job {job.job_id} failed:\n{exc}") from exc
    return results


def _state(job: submitit.Job) -> str:
    """The scheduler's word for a job (RUNNING, PENDING, ...): a timeout says whether it waited
    for resources or hung."""
    try:
        return str(job.state)
    except Exception as exc:  # the scheduler could not be asked
        return f"state unknown: {exc}"


def _finished(job: submitit.Job) -> bool:
    if isinstance(job, submitit.DebugJob):
        return True  # runs when its result is asked for
    tasks = range(job.num_tasks)
    if all(job.task(t).paths.result_pickle.exists() for t in tasks):
        return True
    if isinstance(job, submitit.SlurmJob):
        return job.done(force_check=True)
    return job.done()
