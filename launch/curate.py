"""Curation at cluster scale: the embedding step as an array over shard groups, optionally the
near-duplicate and decontamination searches as arrays over slices of the queries, then the global
steps (merging, connected components, retrieval or balancing, writing) as one job that depends on
the arrays.

  python -m launch curate --config FILE pool=SHARDS output_dir=DIR [key=value ...]
      [--embed-groups N] [--global-tasks M]

The stage arguments are those of `python -m curation run`; they travel in an owner-only file,
OUT/private/launch-curate.args (the pool and eval sets can name patients), read as @ARGS, and the
launcher adds to each job:
  array task G:  python -m curation run @ARGS embed.groups=N --step embed --group G
  with M:        python -m curation run @ARGS ... global_tasks=M --step near --task I    (I < M)
                 python -m curation run @ARGS ... global_tasks=M --step decontam --task I
  global job:    python -m curation run @ARGS embed.groups=N [global_tasks=M] --step global
                 (M ranks with balance.kmeans=exact: the hierarchical k-means spread over them)
(and, with bootstrap.enabled, a first `--step bootstrap` job that trains the embedding model once).
Group G is a pure function of (the sorted pool shards, G, N), so a requeued task redoes exactly its
own group, and the global job merges the N groups, refusing (naming them) when any is missing.
N (`--embed-groups`, else the config's embed.groups, else 4) is fixed when queueing: the shards are
only listed when the tasks run, so the array can be queued before ingest ends (groups beyond the
number of shards are empty).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from launch.cluster import ClusterOptions, LaunchError
from launch.jobs import StageJob
from launch.submit import PlannedJob, private_argv

DEFAULT_GROUPS = 4


def curate_config(stage_args: Sequence[str]):
    """The composed curation config (keys and types checked now; data paths when the jobs run)."""
    from curation.run import DEFAULT_CONFIG
    from pretrain.config import ConfigError, load_config, split_overrides

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    try:
        known, rest = parser.parse_known_args(list(stage_args))
    except SystemExit as exc:
        raise LaunchError("curate: --config needs a file") from exc
    overrides, unknown = split_overrides(rest)
    if unknown:
        raise LaunchError(
            f"curate: unexpected arguments {unknown}; give --config FILE, key=value settings "
            "(pool=SHARDS output_dir=DIR ...) and --embed-groups N (the launcher adds --step/--group)"
        )
    try:
        return load_config(DEFAULT_CONFIG, known.config, overrides)
    except ConfigError as exc:
        raise LaunchError(f"curate config: {exc}") from exc


def plan_curate(
    stage_args: Sequence[str],
    opts: ClusterOptions,
    after: Sequence[str] = (),
    prefix: str = "curate",
) -> tuple[list[PlannedJob], Path]:
    """[bootstrap job], N embed array tasks, [M near tasks, M decontam tasks], then the global job,
    each afterok on the one before."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--embed-groups", type=int)
    parser.add_argument("--global-tasks", type=int)
    try:
        known, rest = parser.parse_known_args(list(stage_args))
    except SystemExit as exc:
        raise LaunchError("curate: --embed-groups and --global-tasks need a number") from exc
    cfg = curate_config(rest)
    n = known.embed_groups or (int(cfg.embed.groups) if cfg.embed.groups else DEFAULT_GROUPS)
    if n < 1:
        raise LaunchError("--embed-groups must be >= 1")
    m = known.global_tasks or (int(cfg.global_tasks) if cfg.global_tasks else None)
    if m is not None and m < 1:
        raise LaunchError("--global-tasks must be >= 1")
    out = Path(cfg.output_dir).resolve()
    # the jobs see the same absolute output_dir whatever their working directory
    fixed = ("output_dir=", "embed.groups=", "global_tasks=")
    rest = [a for a in rest if not a.startswith(fixed)]
    # the pool and eval sets (which can name patients) travel in a private arguments file
    base, private_files = private_argv(
        ["run"], [*rest, f"output_dir={out}"], out / "private" / f"launch-{prefix}.args"
    )
    base.append(f"embed.groups={n}")
    if m:
        base.append(f"global_tasks={m}")
    in_process = opts.cluster == "debug"

    def job(name: str, flags: list[str], distributed: bool = False) -> StageJob:
        return StageJob(
            name,
            "curation",
            [*base, *flags],
            out,
            in_process=in_process,
            max_requeues=opts.max_requeues,
            distributed=distributed,
        )

    plan: list[PlannedJob] = []
    if cfg.bootstrap.enabled:
        boot = job(f"{prefix}-bootstrap", ["--step", "bootstrap"])
        plan.append(PlannedJob(f"{prefix}-bootstrap", [boot], after=list(after)))
        after = [f"{prefix}-bootstrap"]
    embed = [
        job(f"{prefix}-embed-{g:04d}", ["--step", "embed", "--group", str(g)]) for g in range(n)
    ]
    plan.append(PlannedJob(f"{prefix}-embed", embed, after=list(after), array=True))
    after = [f"{prefix}-embed"]
    for step in ("near", "decontam") if m else ():
        tasks = [
            job(f"{prefix}-{step}-{i:04d}", ["--step", step, "--task", str(i)]) for i in range(m)
        ]
        plan.append(PlannedJob(f"{prefix}-{step}", tasks, after=after, array=True))
        after = [f"{prefix}-{step}"]
    # balance.kmeans=exact clusters over the M ranks of the global job (curation/dkmeans.py)
    ranks = m if m and cfg.balance.kmeans == "exact" and not in_process else 1
    final = job(f"{prefix}-global", ["--step", "global"], distributed=ranks > 1)
    plan.append(PlannedJob(f"{prefix}-global", [final], after=after, tasks_per_node=ranks))
    plan[0].private_files = private_files
    return plan, out
