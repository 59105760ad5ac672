"""Submit a plan of jobs with dependencies: sbatch --dependency=afterok on SLURM, in order elsewhere.

A plan is a list of `PlannedJob`s (a single job, an array of jobs, or a small Python function such
as gathering a results table) whose `after` names earlier entries. On SLURM the whole plan is
queued at once and SLURM starts each job when its dependencies succeeded (`--kill-on-invalid-dep`:
a failure cancels the dependants, never running them on missing inputs).
On `local` and `debug` each entry is waited for before the next one starts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import submitit

from launch.cluster import ClusterOptions, LaunchError, job_ids, make_executor, wait_for
from pretrain.privacy import write_private

logger = logging.getLogger(__name__)

JOBS_FILENAME = "jobs.jsonl"


@dataclass
class PlannedJob:
    """One sbatch submission: `calls` has one callable (a job) or several (an array)."""

    name: str
    calls: list[Callable[[], Any]]
    after: list[str] = field(default_factory=list)
    tasks_per_node: int = 1
    nodes: int = 1
    array: bool = False  # an array even with one element (curation groups, eval cells)
    # written (mode 0600) when the plan is submitted, so a plan refused later leaves no files
    private_files: dict[Path, str] = field(default_factory=dict)


def private_argv(
    lead: Sequence[str], args: Sequence[str], args_file: Path
) -> tuple[list[str], dict[Path, str]]:
    """`[*lead, "@ARGS_FILE"]` and {ARGS_FILE: its text}. The user's arguments (input folders,
    which often name patients) travel in an owner-only file that the stage's argparse reads
    (`fromfile_prefix_chars="@"`), so a job's argv, its submitit pickle and the launch records
    name only that file. Relative paths are made absolute: the job may start elsewhere."""
    args_file = args_file.resolve()
    text = "".join(f"{_resolve_arg(a)}\n" for a in args)
    return [*lead, f"@{args_file}"], {args_file: text}


def _resolve_arg(arg: str) -> str:
    """An existing relative path (or x.npz:split) made absolute; anything else (options,
    overrides, eval's `raw` pixel baseline) unchanged."""
    path = arg.rsplit(":", 1)[0] if ".npz:" in arg else arg
    if arg.startswith("-") or "=" in arg or arg == "raw" or not Path(path).exists():
        return arg
    return str(Path(path).resolve()) + arg[len(path) :]


@dataclass
class Submitted:
    name: str
    jobs: list[submitit.Job]
    results: list[Any] | None = None

    @property
    def ids(self) -> list[str]:
        return [j.job_id for j in self.jobs]


def _record(out_dir: Path, entry: dict[str, Any]) -> None:
    path = out_dir / "launch" / JOBS_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def submit_plan(
    plan: list[PlannedJob],
    opts: ClusterOptions,
    out_dir: Path,
    *,
    wait: bool = False,
    command: str = "",
) -> list[Submitted]:
    """Queue (slurm) or run (local, debug) every job of `plan` in order; returns what was submitted.

    With `wait` (always for local/debug) every job's results are collected and the first failure
    raises LaunchError carrying the job's stderr tail.
    """
    names = [p.name for p in plan]
    if len(set(names)) != len(names):
        raise LaunchError(f"duplicate job names in plan: {names}")
    for planned in plan:
        for path, text in planned.private_files.items():
            write_private(path, text)
    done: dict[str, Submitted] = {}
    sequential = opts.cluster != "slurm"
    for planned in plan:
        missing = [a for a in planned.after if a not in done]
        if missing:
            raise LaunchError(f"{planned.name}: depends on {missing}, which come later in the plan")
        dependency = [i for a in planned.after for i in job_ids(done[a].jobs)] or None
        if sequential:
            dependency = None
        jobs = _submit_one(planned, opts, dependency)
        entry = Submitted(planned.name, jobs)
        done[planned.name] = entry
        _record(
            out_dir,
            {
                "name": planned.name,
                "cluster": opts.cluster,
                "job_ids": entry.ids,
                "after": planned.after,
                "dependency": dependency,
                "tasks_per_node": planned.tasks_per_node,
                "nodes": planned.nodes,
                "time": time.time(),
                "command": command,
                "folder": str(opts.folder),
            },
        )
        logger.info(
            "%s: %s %s%s",
            planned.name,
            "running" if sequential else "queued",
            ", ".join(entry.ids),
            f" after {dependency}" if dependency else "",
        )
        if sequential:
            entry.results = _flatten(wait_for(jobs))
    if wait and not sequential:
        for entry in done.values():
            entry.results = _flatten(wait_for(entry.jobs))
    return list(done.values())


def _flatten(results: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for r in results:
        flat.extend(r if isinstance(r, list) else [r])
    return flat


def _submit_one(
    planned: PlannedJob, opts: ClusterOptions, dependency: list[str] | None
) -> list[submitit.Job]:
    if planned.nodes != opts.nodes:
        opts = replace(opts, nodes=planned.nodes)
    executor = make_executor(
        opts, planned.name, tasks_per_node=planned.tasks_per_node, dependency=dependency
    )
    if len(planned.calls) == 1 and not planned.array:
        return [executor.submit(planned.calls[0])]
    if opts.cluster == "local":  # no scheduler to hold the array back: run it in waves
        jobs: list[submitit.Job] = []
        wave = max(1, opts.array_parallelism)
        for start in range(0, len(planned.calls), wave):
            part = [executor.submit(c) for c in planned.calls[start : start + wave]]
            wait_for(part)
            jobs.extend(part)
        return jobs
    with executor.batch():
        futures = [executor.submit(c) for c in planned.calls]
    return [f for f in futures]
