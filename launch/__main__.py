"""`python -m launch STAGE [stage arguments] --cluster local|slurm|debug [resources]`.

STAGE: ingest | tile | curate | pretrain | eval | pipeline. Stage arguments are those of the stage's own
CLI (`python -m curation ingest ...`, `python -m pretrain ...`, ...); see each plan_* in
launch/stages.py and launch/pipeline.py for what the launcher adds. On SLURM the jobs are queued and
their ids printed (add --wait to follow them); local and debug run them here and wait.
Exit codes: 0 done (or queued), 1 a job failed, 2 refused before submitting anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from launch.cluster import JobFailed, LaunchError, add_cluster_arguments, options_from_args
from launch.submit import submit_plan
from pretrain.privacy import PrivacyError

logger = logging.getLogger("launch")

STAGES = ("ingest", "tile", "curate", "pretrain", "eval", "pipeline")
EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch",
        description="Run a medssl stage on this machine or on SLURM (submitit). Arguments not "
        "listed here are passed to the stage.",
        epilog="examples:\n"
        "  python -m launch pretrain --config pretrain/configs/dinov2_cpu.yaml output_dir=runs/a "
        "data.train=... --cluster slurm --tasks-per-node 2 --wait\n"
        "  python -m launch eval --backbone runs/a --backbone raw --protocol knn --protocol logreg "
        "--train x.npz:train --test x.npz:test --out runs/eval --cluster local",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a stage's own flag (ingest's --array) must not match ours by prefix
    )
    parser.add_argument("stage", choices=STAGES)
    add_cluster_arguments(parser)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    return parser


def plan_stage(stage: str, stage_args: list[str], args: argparse.Namespace):
    """(plan, output dir, cluster options) for one stage; raises LaunchError on bad arguments."""
    from launch import stages

    # Options depend on OUT (the submitit folder lives in it): a first pass with a neutral OUT.
    probe = options_from_args(args, Path("."))
    if stage in ("ingest", "tile"):
        plan, out = stages.plan_ingest(stage_args, probe, command=stage)
    elif stage == "pretrain":
        plan, out = stages.plan_pretrain(stage_args, probe)
    elif stage == "eval":
        plan, out = stages.plan_eval(stage_args, probe)
    elif stage == "curate":
        from launch.curate import plan_curate

        plan, out = plan_curate(stage_args, probe)
    else:
        from launch.pipeline import plan_pipeline

        plan, out = plan_pipeline(stage_args, probe)
    return plan, out, options_from_args(args, out)


def public_command(stage: str, argv: Sequence[str]) -> str:
    """The command as launch records keep it: every path pseudonymised (input folders often
    name patients; the jobs read them from private argument files)."""
    from pretrain.privacy import resolve_site_key
    from pretrain.provenance import pseudonymised_args

    rest = list(argv)
    rest.remove(stage)
    return shlex.join(
        ["python", "-m", "launch", stage, *pseudonymised_args(rest, resolve_site_key())]
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, stage_args = parser.parse_known_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        from launch.stages import refuse_salt_argument

        refuse_salt_argument(stage_args)
        command = public_command(args.stage, argv)
        plan, out, opts = plan_stage(args.stage, stage_args, args)
        submitted = submit_plan(plan, opts, out, wait=args.wait, command=command)
    except JobFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (LaunchError, PrivacyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    summary = {
        "stage": args.stage,
        "cluster": opts.cluster,
        "out": str(out),
        "logs": str(opts.folder),
        "jobs": {s.name: s.ids for s in submitted},
    }
    if all(s.results is not None for s in submitted):
        summary["results"] = {s.name: s.results for s in submitted}
    print(json.dumps(summary, indent=2, default=str))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
