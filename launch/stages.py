"""Each stage as a plan of jobs: which commands, how many tasks, which depend on which.

The stages' own CLIs stay the single source of truth: a job runs `python -m STAGE ...` with the
arguments the user gave (plus the few the launcher must set, e.g. an eval cell's --out), and
everything a stage can check before running (pretrain's config, eval's specs) is checked here
first, so a typo fails in seconds instead of after a queue wait.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

from eval.protocols.base import dataset_name
from launch.cluster import ClusterOptions, LaunchError
from launch.jobs import StageJob
from launch.results import gather_eval_table
from launch.submit import PlannedJob, private_argv

logger = logging.getLogger(__name__)


def _split(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(key=value overrides, everything else) -- the convention of every stage CLI."""
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    return overrides, [a for a in args if a not in overrides]


def _job(
    name: str, module: str, argv: Sequence[str], out_dir: Path, opts: ClusterOptions, **kw
) -> StageJob:
    return StageJob(
        name,
        module,
        argv,
        out_dir,
        in_process=opts.cluster == "debug",
        max_requeues=opts.max_requeues,
        **kw,
    )


# ------------------------------------------------------------------------------------ ingest
def ingest_out(stage_args: Sequence[str]) -> Path:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out", required=True)
    known, _ = parser.parse_known_args(list(stage_args))
    return Path(known.out).resolve()


def refuse_salt_argument(args: Sequence[str]) -> None:
    """A salt on the command line would land in jobs.jsonl, submitit files and shell histories."""
    if any(a.partition("=")[0].strip() == "patient_salt" for a in _split(args)[0]):
        raise LaunchError(
            "patient_salt= is not taken on the command line: set "
            "$MEDSSL_PATIENT_SALT or patient_salt_file=PATH"
        )


def plan_ingest(
    stage_args: Sequence[str], opts: ClusterOptions, command: str = "ingest"
) -> tuple[list[PlannedJob], Path]:
    """One job `python -m curation COMMAND @ARGS_FILE` (a re-run resumes), or with `--array N`
    an array of N tasks (`... --task I --tasks N`, each writing its own slice of the shards) and
    then that job, which finds nothing left to do and merges the manifest (afterok on the array).
    COMMAND: ingest (raw images) or tile (whole-slide images, an array task per slide range).

    The SRC paths (folders named after patients, often) go into a private arguments file,
    OUT/private/launch-COMMAND.args (mode 0600, or under private_dir=), which argparse reads;
    the job, its submitit pickle and the launch records name only that file. The file is
    written when the plan is submitted (`PlannedJob.private_files`), not while planning."""
    refuse_salt_argument(stage_args)
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--array", type=int, default=0)
    try:
        known, stage_args = parser.parse_known_args(list(stage_args))
        out = ingest_out(stage_args)
    except SystemExit as exc:
        raise LaunchError(
            f"{command} needs --out DIR (python -m curation {command} SRC... --out DIR [--array N])"
        ) from exc
    if known.array < 0:
        raise LaunchError(f"--array must be >= 1, got {known.array}")
    private = dict(o.split("=", 1) for o in _split(stage_args)[0]).get("private_dir")
    args_file = (Path(private) if private else out / "private") / f"launch-{command}.args"
    argv, private_files = private_argv([command], stage_args, args_file)
    plan = []
    if known.array:
        n = known.array
        tasks = [
            _job(
                f"{command}-{i:04d}",
                "curation",
                [*argv, "--task", str(i), "--tasks", str(n)],
                out,
                opts,
            )
            for i in range(n)
        ]
        plan.append(PlannedJob(f"{command}-tasks", tasks, array=True))
    after = [f"{command}-tasks"] if known.array else []
    plan.append(PlannedJob(command, [_job(command, "curation", argv, out, opts)], after=after))
    plan[0].private_files = private_files
    return plan, out


# ------------------------------------------------------------------------------------ pretrain
def pretrain_output_dir(stage_args: Sequence[str]) -> Path:
    """Validate the pretraining config exactly as `python -m pretrain` will; return output_dir."""
    from pretrain.config import ConfigError, compose_config
    from pretrain.validation import validate

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    known, rest = parser.parse_known_args(list(stage_args))
    overrides, other = _split(rest)
    if other:
        raise LaunchError(
            f"pretrain: unexpected arguments {other} (use --config FILE and key=value)"
        )
    try:
        cfg = compose_config(known.config, overrides)
        validate(cfg)
    except ConfigError as exc:
        raise LaunchError(f"pretrain: {exc}") from exc
    return Path(str(cfg.output_dir)).resolve()


def plan_pretrain(
    stage_args: Sequence[str],
    opts: ClusterOptions,
    after: Sequence[str] = (),
    validate: bool = True,
    out_dir: Path | None = None,
) -> tuple[list[PlannedJob], Path]:
    """One job of nodes x tasks_per_node ranks (one per GPU, or per CPU slot without GPUs)."""
    out = pretrain_output_dir(stage_args) if validate else Path(out_dir or ".").resolve()
    tasks = opts.tasks_per_node or max(1, opts.gpus_per_node)
    if opts.cluster == "debug" and (tasks > 1 or opts.nodes > 1):
        raise LaunchError("--cluster debug runs one process: use --tasks-per-node 1 --nodes 1")
    argv, private_files = private_argv([], stage_args, out / "private" / "launch-pretrain.args")
    job = _job("pretrain", "pretrain", argv, out, opts, distributed=True)
    planned = PlannedJob(
        "pretrain",
        [job],
        after=list(after),
        tasks_per_node=tasks,
        nodes=opts.nodes,
        private_files=private_files,
    )
    return [planned], out


# ------------------------------------------------------------------------------------ eval
def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch eval", add_help=False)
    p.add_argument(
        "--backbone",
        action="append",
        required=True,
        help="repeatable: pretraining output dirs, exports, checkpoints or 'raw'",
    )
    p.add_argument(
        "--protocol",
        action="append",
        required=True,
        help="repeatable: knn, linear, logreg, fewshot, label_efficiency, all",
    )
    p.add_argument(
        "--train", action="append", required=True, help="repeatable: one per evaluation dataset"
    )
    p.add_argument("--test", action="append", required=True, help="paired with --train by order")
    p.add_argument("--val", action="append", help="none, or one per --train")
    p.add_argument("--out", required=True)
    p.add_argument("--config")
    return p


def backbone_label(path: str, taken: set[str]) -> str:
    """A short directory-safe name per backbone (`raw`, the run directory's name, ...), unique."""
    p = Path(path)
    parts = [x for x in p.parts if x not in ("export", "checkpoints", "/")]
    if p.suffix in (".pt", ".safetensors"):
        parts[-1] = p.stem
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", parts[-1] if parts else "backbone") or "backbone"
    label, i = base, 2
    while label in taken:
        label, i = f"{base}-{i}", i + 1
    taken.add(label)
    return label


def eval_datasets(
    train: Sequence[str], test: Sequence[str], val: Sequence[str] | None
) -> list[dict[str, str | None]]:
    """Pair the repeated --train/--test/--val specs by order and name each dataset (unique)."""
    if len(test) != len(train) or (val and len(val) != len(train)):
        raise LaunchError(
            f"eval: {len(train)} --train, {len(test)} --test and {len(val or [])} --val: give "
            "one --test (and none or one --val) per --train, in the same order"
        )
    taken: set[str] = set()
    datasets = []
    for i, (train_spec, test_spec) in enumerate(zip(train, test)):
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset_name(train_spec)) or "dataset"
        label, k = name, 2
        while label in taken:
            label, k = f"{name}-{k}", k + 1
        taken.add(label)
        datasets.append(
            {"label": label, "train": train_spec, "test": test_spec, "val": val[i] if val else None}
        )
    return datasets


def plan_eval(
    stage_args: Sequence[str], opts: ClusterOptions, after: Sequence[str] = (), prefix: str = "eval"
) -> tuple[list[PlannedJob], Path]:
    """An array over datasets x backbones x protocols, then one job that gathers
    OUT/results.{md,csv,json}. With one dataset the cells are OUT/BACKBONE/PROTOCOL, with several
    OUT/DATASET/BACKBONE/PROTOCOL and the table gains a dataset-by-dataset summary."""
    try:
        known, rest = eval_parser().parse_known_args(list(stage_args))
    except SystemExit as exc:
        raise LaunchError("eval needs --backbone, --protocol, --train, --test and --out") from exc
    overrides, other = _split(rest)
    if other:
        raise LaunchError(f"eval: unexpected arguments {other}")
    out = Path(known.out).resolve()
    datasets = eval_datasets(known.train, known.test, known.val)
    config = ["--config", known.config] if known.config else []
    taken: set[str] = set()
    labels = [backbone_label(b, taken) for b in known.backbone]
    cells, calls, private_files = [], [], {}
    for data in datasets:
        shared = ["--train", data["train"], "--test", data["test"], *config]
        shared += ["--val", data["val"]] if data["val"] else []
        base, tag = (out / data["label"], f"{data['label']}-") if len(datasets) > 1 else (out, "")
        for backbone, label in zip(known.backbone, labels):
            for protocol in known.protocol:
                cell_out = base / label / protocol
                name = f"{prefix}-{tag}{label}-{protocol}"
                args = ["--backbone", backbone, *shared, "--out", str(cell_out), *overrides]
                argv, files = private_argv(
                    [protocol], args, out / "private" / f"launch-{name}.args"
                )
                private_files.update(files)
                calls.append(_job(name, "eval", argv, out, opts))
                cells.append(
                    {
                        "backbone": backbone,
                        "label": label,
                        "protocol": protocol,
                        "dataset": data["label"],
                        "out": str(cell_out),
                    }
                )
    cells_file = (out / "private" / f"launch-{prefix}-cells.json").resolve()
    private_files[cells_file] = json.dumps(cells)
    gather = _GatherEval(out, cells_file)
    plan = [
        PlannedJob(
            f"{prefix}-cells", calls, after=list(after), array=True, private_files=private_files
        ),
        PlannedJob(f"{prefix}-table", [gather], after=[f"{prefix}-cells"]),
    ]
    return plan, out


class _GatherEval:
    """Picklable callable for the gather job; the cells (with their backbone and dataset paths)
    are read from the private file written at submission."""

    def __init__(self, out: Path, cells_file: Path):
        self.out, self.cells_file = out, cells_file

    def __call__(self) -> dict[str, str]:
        return gather_eval_table(self.out, json.loads(self.cells_file.read_text()))
