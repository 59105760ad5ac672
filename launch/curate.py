"""Curation at cluster scale: the embedding step as an array over shard groups, then the global
steps (deduplication, clustering, sampling, writing) as one job that depends on the whole array.

Contract with `python -m curation run` (curation/run.py), checked before anything is queued:
  python -m curation run ARGS --step embed --group G --groups N   embed shard group G of N
  python -m curation run ARGS --step global                        everything after embedding
where ARGS are the user's (`--config FILE --input SHARDS --out DIR key=value ...`). Group G is a pure function of
(the sorted input shards, G, N), so a requeued task redoes exactly its own group, and the global
job reads the N groups' embeddings. N (`--embed-groups`) is the parallelism, fixed when queueing:
the shards are only listed when the tasks run, so the array can be queued before ingest ends.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path

from launch.cluster import ClusterOptions, LaunchError
from launch.jobs import StageJob
from launch.submit import PlannedJob

EMBED_FLAGS = ["--step", "embed", "--group", "0", "--groups", "2"]
GLOBAL_FLAGS = ["--step", "global"]


def check_curation_run() -> None:
    """Refuse early, naming what is missing, when `curation run` lacks the per-group steps."""
    try:
        module = importlib.import_module("curation.run")
    except ImportError as exc:
        raise LaunchError(
            f"launch curate needs curation/run.py (`python -m curation run`): {exc}"
        ) from exc
    parser = argparse.ArgumentParser(add_help=False)
    parser.error = _raise  # type: ignore[method-assign]
    try:
        module.add_arguments(parser)
        for flags in (EMBED_FLAGS, GLOBAL_FLAGS):
            _, unknown = parser.parse_known_args(
                [*flags, "--config", "x.yaml", "--input", "x", "--out", "x"]
            )
            if unknown:
                raise LaunchError(f"`python -m curation run` does not accept {unknown}")
    except LaunchError as exc:
        raise LaunchError(
            f"{exc}; launch curate runs `curation run ... --step embed --group G --groups N` per "
            "shard group and `curation run ... --step global` after them"
        ) from exc


def _raise(message: str) -> None:
    raise LaunchError(f"`python -m curation run` refuses the launcher's flags: {message}")


def plan_curate(
    stage_args: Sequence[str],
    opts: ClusterOptions,
    after: Sequence[str] = (),
    prefix: str = "curate",
) -> tuple[list[PlannedJob], Path]:
    """`--embed-groups N` (default 4) array tasks, then the global job (afterok on the array)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--embed-groups", type=int, default=4)
    parser.add_argument("--out", required=True)
    try:
        known, rest = parser.parse_known_args(list(stage_args))
    except SystemExit as exc:
        raise LaunchError(
            "curate needs --out DIR (and --config FILE, key=value for curation run)"
        ) from exc
    if known.embed_groups < 1:
        raise LaunchError("--embed-groups must be >= 1")
    check_curation_run()
    out = Path(known.out).resolve()
    base = ["run", *rest, "--out", str(out)]
    in_process = opts.cluster == "debug"
    n = known.embed_groups
    embed = [
        StageJob(
            f"{prefix}-embed-{g:04d}",
            "curation",
            [*base, "--step", "embed", "--group", str(g), "--groups", str(n)],
            out,
            in_process=in_process,
            max_requeues=opts.max_requeues,
        )  # fmt: skip
        for g in range(n)
    ]
    final = StageJob(f"{prefix}-global", "curation", [*base, "--step", "global"], out,
                     in_process=in_process, max_requeues=opts.max_requeues)  # fmt: skip
    plan = [
        PlannedJob(f"{prefix}-embed", embed, after=list(after), array=True),
        PlannedJob(f"{prefix}-global", [final], after=[f"{prefix}-embed"]),
    ]
    return plan, out
