"""ingest -> curate -> pretrain -> eval as dependent jobs, all queued at once.

  python -m launch pipeline SRC... --out DIR --pretrain-config RECIPE --eval-train SPEC
      --eval-test SPEC [--eval-val SPEC] [the three again for each further dataset]
      [--protocol P ...] [--baseline raw|RUN ...] [--no-curate]
      [--curate-config FILE] [--embed-groups N] [--ingest-array N] [--global-tasks M]
      [ingest.K=V] [curate.K=V] [pretrain.K=V] [eval.K=V]

Layout: DIR/shards (ingest), DIR/curation (curation run output_dir; the curated shards in
DIR/curation/curated, its report in DIR/curation/report.html), DIR/pretrain (output_dir),
DIR/eval (one directory per backbone x protocol, per dataset when several are given, and
results.md). A `STAGE.` prefix routes a key=value override to that stage. Curation protects every
eval test (and val) set unless
`curate.eval_sets=[...]` says otherwise: their copies and patients leave the pool. On SLURM
every job waits (afterok) for the one before; a failure stops everything after it. Configs are
checked before queueing, inputs only when each job runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from launch.cluster import ClusterOptions, LaunchError
from launch.stages import plan_eval, plan_ingest, plan_pretrain
from launch.submit import PlannedJob

PREFIXES = ("ingest.", "curate.", "pretrain.", "eval.")


def pipeline_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch pipeline", add_help=False, allow_abbrev=False
    )
    p.add_argument("sources", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--pretrain-config", required=True)
    p.add_argument("--eval-train", action="append", required=True, help="repeatable")
    p.add_argument("--eval-test", action="append", required=True, help="one per --eval-train")
    p.add_argument("--eval-val", action="append", help="none, or one per --eval-train")
    p.add_argument("--eval-config")
    p.add_argument("--protocol", action="append")
    p.add_argument("--baseline", action="append", default=[], help="extra backbones, e.g. raw")
    p.add_argument("--no-curate", action="store_true", help="pretrain on the ingested shards")
    p.add_argument("--curate-config")
    p.add_argument("--embed-groups", type=int, help="curation embed array size (default: 4)")
    p.add_argument("--ingest-array", type=int, help="ingest as an array of N tasks, then a merge")
    p.add_argument(
        "--global-tasks", type=int, help="curation near/decontam searches as arrays of N tasks"
    )
    return p


def route_overrides(overrides: Sequence[str]) -> dict[str, list[str]]:
    """`pretrain.optim.max_steps=9` -> {"pretrain": ["optim.max_steps=9"]}; unprefixed is refused."""
    routed: dict[str, list[str]] = {p[:-1]: [] for p in PREFIXES}
    for item in overrides:
        prefix = next((p for p in PREFIXES if item.startswith(p)), None)
        if prefix is None:
            raise LaunchError(
                f"pipeline override {item!r} must start with one of {', '.join(PREFIXES)}"
            )
        routed[prefix[:-1]].append(item[len(prefix) :])
    return routed


def check_pretrain_config(recipe: str, overrides: Sequence[str]) -> None:
    """Keys and types now; data paths only exist once the earlier jobs ran."""
    from pretrain.config import ConfigError, compose_config

    try:
        compose_config(recipe, overrides)
    except ConfigError as exc:
        raise LaunchError(f"pipeline pretrain config: {exc}") from exc


def plan_pipeline(stage_args: Sequence[str], opts: ClusterOptions) -> tuple[list[PlannedJob], Path]:
    try:
        known, rest = pipeline_parser().parse_known_args(list(stage_args))
    except SystemExit as exc:
        raise LaunchError(
            "pipeline needs SRC..., --out, --pretrain-config, --eval-train and --eval-test"
        ) from exc
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    if len(overrides) != len(rest):
        raise LaunchError(
            f"pipeline: unexpected arguments {[a for a in rest if a not in overrides]}"
        )
    routed = route_overrides(overrides)
    out = Path(known.out).resolve()
    shards, curation_dir, run_dir, eval_dir = (
        out / n for n in ("shards", "curation", "pretrain", "eval")
    )

    array = ["--array", str(known.ingest_array)] if known.ingest_array else []
    plan, _ = plan_ingest([*known.sources, "--out", str(shards), *array, *routed["ingest"]], opts)
    last = plan[-1].name
    train_data = shards
    if not known.no_curate:
        from launch.curate import plan_curate

        curate_args = ["--config", known.curate_config] if known.curate_config else []
        curate_args += [f"pool={shards}", f"output_dir={curation_dir}"]
        if not any(o.startswith("eval_sets=") for o in routed["curate"]):
            # the held-out images the pipeline reports on must not be pretrained on
            held_out = [*known.eval_test, *(known.eval_val or [])]
            curate_args.append(f"eval_sets=[{','.join(held_out)}]")
        curate_args += routed["curate"]
        curate_args += ["--embed-groups", str(known.embed_groups)] if known.embed_groups else []
        curate_args += ["--global-tasks", str(known.global_tasks)] if known.global_tasks else []
        curate_plan, _ = plan_curate(curate_args, opts, after=[last])
        plan += curate_plan
        last, train_data = plan[-1].name, curation_dir / "curated"

    pretrain_args = [
        "--config",
        known.pretrain_config,
        f"output_dir={run_dir}",
        f"data.train={train_data}",
        *routed["pretrain"],
    ]
    check_pretrain_config(known.pretrain_config, pretrain_args[2:])
    pretrain_plan, _ = plan_pretrain(
        pretrain_args, opts, after=[last], validate=False, out_dir=run_dir
    )
    plan += pretrain_plan

    eval_args = ["--out", str(eval_dir)]
    for flag, specs in (("--train", known.eval_train), ("--test", known.eval_test)):
        eval_args += [arg for spec in specs for arg in (flag, spec)]
    eval_args += [arg for spec in known.eval_val or [] for arg in ("--val", spec)]
    eval_args += ["--config", known.eval_config] if known.eval_config else []
    for backbone in [str(run_dir), *known.baseline]:
        eval_args += ["--backbone", backbone]
    for protocol in known.protocol or ["knn"]:
        eval_args += ["--protocol", protocol]
    eval_plan, _ = plan_eval([*eval_args, *routed["eval"]], opts, after=["pretrain"])
    plan += eval_plan
    return plan, out
