"""Curation at cluster scale: the embedding step as an array over shard groups, then the global
steps (deduplication, decontamination, retrieval or balancing, writing) as one job that depends on
the whole array.

  python -m launch curate --config FILE pool=SHARDS output_dir=DIR [key=value ...] [--embed-groups N]

The stage arguments are those of `python -m curation run`; the launcher adds to each job:
  array task G:  python -m curation run ARGS embed.groups=N --step embed --group G
  global job:    python -m curation run ARGS embed.groups=N --step global
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
from launch.submit import PlannedJob

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
    """[bootstrap job], N embed array tasks, then the global job (afterok on the array)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--embed-groups", type=int)
    try:
        known, rest = parser.parse_known_args(list(stage_args))
    except SystemExit as exc:
        raise LaunchError("curate: --embed-groups needs a number") from exc
    cfg = curate_config(rest)
    n = known.embed_groups or (int(cfg.embed.groups) if cfg.embed.groups else DEFAULT_GROUPS)
    if n < 1:
        raise LaunchError("--embed-groups must be >= 1")
    out = Path(cfg.output_dir).resolve()
    # the jobs see the same absolute output_dir whatever their working directory
    rest = [a for a in rest if not a.startswith(("output_dir=", "embed.groups="))]
    base = ["run", *rest, f"output_dir={out}", f"embed.groups={n}"]
    in_process = opts.cluster == "debug"

    def job(name: str, flags: list[str]) -> StageJob:
        return StageJob(
            name,
            "curation",
            [*base, *flags],
            out,
            in_process=in_process,
            max_requeues=opts.max_requeues,
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
    final = job(f"{prefix}-global", ["--step", "global"])
    plan.append(PlannedJob(f"{prefix}-global", [final], after=[f"{prefix}-embed"]))
    return plan, out
