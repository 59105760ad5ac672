"""The launcher without SLURM: flags, attempt records, failures, signals, local and debug clusters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from curation.__main__ import main as curation_main
from launch.__main__ import build_parser
from launch.__main__ import main as launch_main
from launch.attempts import read_attempts
from launch.cluster import LaunchError, options_from_args
from launch.jobs import StageFailed, StageJob, TaskPlace
from launch.pipeline import plan_pipeline
from launch.results import gather_eval_table
from launch.stages import backbone_label
from pretrain.data.shards import list_shards
from pretrain.monitor import read_metrics

REPO = Path(__file__).resolve().parents[1]


def _read_args(plan: list, job: StageJob) -> list[str]:
    """A planned job's argv with its private arguments file read in place, as argparse does."""
    files = {path: text for planned in plan for path, text in planned.private_files.items()}
    argv = []
    for arg in job.argv:
        path = Path(arg[1:]) if arg.startswith("@") else None
        argv += files[path].splitlines() if path in files else [arg]
    return argv


def _opts(argv: list[str], out: Path):
    args, rest = build_parser().parse_known_args(argv)
    return options_from_args(args, out), rest


def test_cluster_flags_are_validated_with_the_flag_named(tmp_path):
    opts, rest = _opts(
        [
            "pretrain",
            "--config",
            "r.yaml",
            "a.b=1",
            "--cluster",
            "slurm",
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "--partition",
            "gpu",
            "--mem-gb",
            "64",
        ],
        tmp_path,
    )
    assert rest == ["--config", "r.yaml", "a.b=1"]  # the stage's own arguments pass through
    assert (opts.nodes, opts.gpus_per_node, opts.partition, opts.mem_gb) == (2, 8, "gpu", 64.0)
    assert opts.folder == (tmp_path / "launch" / "submitit").resolve()
    # arrays: 64 tasks at once on SLURM; locally one at a time (each task uses every core)
    assert opts.array_parallelism == 64
    assert _opts(["eval", "--cluster", "local"], tmp_path)[0].array_parallelism == 1
    local = _opts(["eval", "--cluster", "local", "--array-parallelism", "3"], tmp_path)[0]
    assert local.array_parallelism == 3
    for argv, message in [
        (["--array-parallelism", "0"], "--array-parallelism must be >= 1"),
        (["--cluster", "local", "--nodes", "2"], "--cluster local runs on one node"),
        (["--max-requeues", "-1"], "--max-requeues must be >= 0"),
        (["--tasks-per-node", "0"], "--tasks-per-node must be >= 1"),
    ]:
        with pytest.raises(LaunchError, match=message):
            _opts(["pretrain", *argv], tmp_path)


def test_task_place_exports_torchrun_variables_and_a_shared_port():
    place = TaskPlace(
        "4242",
        rank=3,
        local_rank=1,
        world_size=4,
        num_nodes=2,
        master_addr="gpu03",
        restart_count=0,
        cluster="slurm",
    )
    env = place.dist_env()
    assert env == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu03",
        "MASTER_PORT": env["MASTER_PORT"],
    }
    other_rank = TaskPlace("4242", 0, 0, 4, 2, "gpu03", 0, "slurm")
    requeued = TaskPlace("4242", 3, 1, 4, 2, "gpu03", 1, "slurm")
    assert other_rank.master_port() == place.master_port()  # every task agrees without talking
    assert requeued.master_port() != place.master_port()  # a new attempt does not meet the old
    assert 20000 <= place.master_port() <= 60000


def test_failed_stage_raises_with_stderr_tail_and_records_each_attempt(tmp_path):
    out = tmp_path / "shards"
    job = StageJob(
        "ingest", "curation", ["ingest", str(tmp_path / "missing"), "--out", str(out)], out
    )
    for attempt in (1, 2):
        with pytest.raises(StageFailed) as info:
            job()
        message = str(info.value)
        assert "ingest failed with exit code 2" in message
        assert f"attempt {attempt}" in message
        tail = message.split("--- last lines of stderr ---", 1)[1]
        assert f"{tmp_path / 'missing'}: no such file or directory" in tail
    records = read_attempts(out)
    assert [(r["event"], r["attempt"]) for r in records] == [
        ("start", 1),
        ("end", 1),
        ("start", 2),
        ("end", 2),
    ]
    assert all(
        r["status"] == "failed" and r["returncode"] == 2 for r in records if r["event"] == "end"
    )
    log_dir = Path(records[2]["log_dir"])
    assert log_dir.name.startswith("attempt-02-job-") and (log_dir / "rank0.err").is_file()


SIGNAL_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, sys.argv[1])
    import launch.jobs as jobs
    jobs.STOP_WAIT_S = 1.0
    job = jobs.StageJob("sleeper", "timeit", ["-n", "1", "import time; time.sleep(60)"], sys.argv[2])
    try:
        job()
    except jobs.StageStopped as exc:
        print("STOPPED", exc, flush=True)
        sys.exit(3)
    """
)


def _start_job_script(script: str, out: Path) -> subprocess.Popen:
    """Run a StageJob script in its own process; return once its attempt and child have started."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(REPO), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not any(r["event"] == "start" for r in read_attempts(out)):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    time.sleep(1.0)  # let the child start
    return proc


def test_sigterm_from_the_scheduler_is_a_stop_not_a_failure(tmp_path):
    """SLURM's SIGTERM (requeue, preemption) reaches both the task process and its child: the
    attempt is recorded as stopped and no failure is reported for the stage."""
    out = tmp_path / "run"
    proc = _start_job_script(SIGNAL_SCRIPT, out)
    child = int(subprocess.check_output(["pgrep", "-P", str(proc.pid)]).split()[0])
    os.kill(child, signal.SIGTERM)  # as slurmstepd does: every process of the step
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 3, stderr
    assert "stopped by SIGTERM" in stdout
    end = [r for r in read_attempts(out) if r["event"] == "end"]
    assert [(e["status"], e["signal"], e["returncode"]) for e in end] == [
        ("stopped", "SIGTERM", -15)
    ]


REQUEUE_SCRIPT = textwrap.dedent(
    """
    import os, signal, subprocess, sys
    sys.path.insert(0, sys.argv[1])
    import launch.jobs as jobs

    def requeue(signum, frame):  # submitit's handler: `scontrol requeue`, then exit
        # SLURM stops every process of the step while scontrol waits for its reply
        killed_mid_call = "import os, signal, time; os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.5)"
        subprocess.check_call([sys.executable, "-c", killed_mid_call])
        print("REQUEUED", flush=True)
        sys.exit(4)

    signal.signal(jobs.submitit.JobEnvironment._usr_sig(), requeue)
    job = jobs.StageJob("sleeper", "timeit", ["-n", "1", "import time; time.sleep(60)"], sys.argv[2])
    job()
    """
)


def test_requeue_command_survives_the_sigterm_of_the_requeue_it_sent(tmp_path):
    """On USR2 submitit runs `scontrol requeue`; SLURM's SIGTERM to the step can reach scontrol
    before it returns. The requeue must still complete and end the attempt as stopped, not raise
    (which submitit records as a failed job: the preemption test on the real cluster saw it)."""
    out = tmp_path / "run"
    proc = _start_job_script(REQUEUE_SCRIPT, out)
    os.kill(proc.pid, signal.SIGUSR2)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 4, stderr
    assert "REQUEUED" in stdout
    end = [r for r in read_attempts(out) if r["event"] == "end"]
    assert [(e["status"], e["signal"]) for e in end] == [("stopped", "SIGUSR2")]


def test_cli_refuses_a_bad_pretrain_config_before_submitting(tmp_path, capsys):
    out = tmp_path / "run"
    code = launch_main(
        [
            "pretrain",
            f"output_dir={out}",
            f"data.train={tmp_path}/x.npz:train",
            "optim.max_steps=1",
            "optim.bogus=1",
            "--cluster",
            "slurm",
        ]
    )
    assert code == 2
    assert "unknown config key 'optim.bogus'" in capsys.readouterr().err
    assert not out.exists()  # nothing queued, nothing written


def test_local_cluster_ranks_form_one_gloo_group(tmp_path, medssl_data, capsys):
    """Two local tasks -> two `python -m pretrain` ranks joined by the launcher's RANK/MASTER_*."""
    out = tmp_path / "run"
    code = launch_main(
        [
            "pretrain",
            f"output_dir={out}",
            f"data.train={medssl_data / 'breastmnist.npz'}:train",
            "model.arch=vit_tiny",
            "model.patch_size=4",
            "model.img_size=28",
            "model.in_chans=1",
            "method=mae",
            "mae.decoder_depth=1",
            "mae.decoder_embed_dim=32",
            "mae.decoder_num_heads=2",
            "data.batch_size=4",
            "data.num_workers=0",
            "optim.max_steps=2",
            "optim.warmup_steps=0",
            "train.checkpoint_every=2",
            "train.log_every=1",
            "train.progress=false",
            "train.device=cpu",
            "--cluster",
            "local",
            "--tasks-per-node",
            "2",
        ]
    )
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    results = summary["results"]["pretrain"]
    assert sorted((r["rank"], r["world_size"]) for r in results) == [(0, 2), (1, 2)]
    rank0 = (Path(results[0]["log_dir"]) / "rank0.err").read_text()
    assert "process group ready: rank 0/2 (env, backend gloo" in rank0
    # two steps trained with gradients all-reduced over both ranks: a global batch of 4 x 2
    assert "global batch 8 (4 x 2)" in rank0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert (out / "checkpoints" / "ckpt-00000002.pt").is_file() and (out / "export").is_dir()
    starts = [r for r in read_attempts(out) if r["event"] == "start"]
    assert sorted(r["rank"] for r in starts) == [0, 1] and len({r["job_id"] for r in starts}) == 1


def test_debug_cluster_runs_the_stage_in_this_process(tmp_path, medssl_data, capsys):
    out = tmp_path / "shards"
    code = launch_main(
        ["ingest", str(medssl_data / "images"), "--out", str(out), "--cluster", "debug"]
    )
    assert code == 0, capsys.readouterr().err
    (start,) = [r for r in read_attempts(out) if r["event"] == "start"]
    assert start["pid"] == os.getpid() and start["cluster"] == "debug"
    assert (out / "manifest.jsonl").is_file()
    assert (
        len((out / "manifest.jsonl").read_text().splitlines()) == 3
    )  # ihc, retina, microaneurysms
    args_file = out / "private" / "launch-ingest.args"  # written at submission, owner-only
    assert oct(args_file.stat().st_mode)[-3:] == "600"


def test_ingest_array_then_merge_equals_one_ingest(tmp_path, medssl_data, capsys):
    """`launch ingest --array 3`: three tasks, each its own shards, then the job that merges; the
    output equals a plain ingest's, byte for byte."""
    npz = medssl_data / "breastmnist.npz"
    common = [f"{npz}:val", f"{npz}:test", "--shard-size", "40", "progress=false"]
    one = tmp_path / "one"
    assert curation_main(["ingest", *common, "--out", str(one), "--workers", "1"]) == 0
    out = tmp_path / "arr"
    code = launch_main(
        ["ingest", *common, "--out", str(out), "--array", "3", "--cluster", "local", "--wait"]
    )
    assert code == 0, capsys.readouterr().err
    queued = [json.loads(line) for line in (out / "launch" / "jobs.jsonl").read_text().splitlines()]
    assert [q["name"] for q in queued] == ["ingest-tasks", "ingest"]
    starts = [r for r in read_attempts(out) if r["event"] == "start"]
    assert len(starts) == 4  # three array tasks and the merge
    for name in ("manifest.jsonl", "rejected.jsonl"):
        assert (out / name).read_bytes() == (one / name).read_bytes()
    assert {p.name: p.read_bytes() for p in list_shards(out)} == {
        p.name: p.read_bytes() for p in list_shards(one)
    }
    assert "--task" not in (out / "private" / "launch-ingest.args").read_text()


def _metrics_doc(accuracy: float, auroc: float) -> dict:
    setting = {
        "accuracy": accuracy,
        "balanced_accuracy": 0.5,
        "auroc": auroc,
        "f1_macro": 0.4,
        "accuracy_ci95": [accuracy - 0.1, accuracy + 0.1],
        "auroc_ci95": None,
        "n": 156,
    }
    return {
        "data": {"dataset": "breastmnist"},
        "protocols": {
            "knn": {
                "best": "k=20",
                "settings": {"k=20": setting, "k=10": {**setting, "accuracy": 0.0}},
            }
        },
    }


def test_eval_cells_are_gathered_into_one_table(tmp_path):
    cells = []
    for label, acc, auc in [("runA", 0.8125, 0.9), ("raw", 0.75, 0.7)]:
        cell_out = tmp_path / label / "knn"
        cell_out.mkdir(parents=True)
        (cell_out / "metrics.json").write_text(json.dumps(_metrics_doc(acc, auc)))
        cells.append(
            {"backbone": f"/runs/{label}", "label": label, "protocol": "knn", "out": str(cell_out)}
        )
    paths = gather_eval_table(tmp_path, cells)
    rows = json.loads(Path(paths["results.json"]).read_text())
    assert [(r["backbone"], r["protocol"], r["setting"], r["accuracy"]) for r in rows] == [
        ("runA", "knn", "k=20", 0.8125),
        ("raw", "knn", "k=20", 0.75),
    ]
    md = Path(paths["results.md"]).read_text()
    assert "| runA | knn | k=20 | 0.8125 [0.713, 0.912] | 0.5000 | 0.9000 | 0.4000 |" in md
    assert (
        Path(paths["results.csv"])
        .read_text()
        .splitlines()[2]
        .startswith("raw,knn,k=20,breastmnist,156,0.75,")
    )
    missing = [
        *cells,
        {"backbone": "x", "label": "x", "protocol": "linear", "out": str(tmp_path / "x")},
    ]
    with pytest.raises(FileNotFoundError, match="x/linear"):
        gather_eval_table(tmp_path, missing)


def test_several_eval_datasets_get_their_own_cells_and_one_table_by_dataset(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: dinov2\noptim: {max_steps: 2}\n")
    opts, _ = _opts(["pipeline", "--cluster", "slurm"], tmp_path)
    args = ["src", "--out", str(tmp_path / "p"), "--pretrain-config", str(recipe)]
    evals = []
    for name in ("pneumoniamnist", "breastmnist"):
        evals += ["--eval-train", f"d/{name}.npz:train", "--eval-test", f"d/{name}.npz:test"]
        evals += ["--eval-val", f"d/{name}.npz:val"]
    plan, out = plan_pipeline([*args, *evals, "--baseline", "raw"], opts)
    curate = next(p for p in plan if p.name == "curate-global").calls[0]
    # every dataset's held-out images leave the pretraining pool
    assert (
        "eval_sets=[d/pneumoniamnist.npz:test,d/breastmnist.npz:test,"
        "d/pneumoniamnist.npz:val,d/breastmnist.npz:val]" in _read_args(plan, curate)
    )
    cells = next(p for p in plan if p.name == "eval-cells").calls
    by_name = {c.name: _read_args(plan, c) for c in cells}
    assert sorted(by_name) == [
        "eval-breastmnist-pretrain-knn",
        "eval-breastmnist-raw-knn",
        "eval-pneumoniamnist-pretrain-knn",
        "eval-pneumoniamnist-raw-knn",
    ]
    breast_raw = by_name["eval-breastmnist-raw-knn"]
    assert breast_raw[0] == "knn" and breast_raw[breast_raw.index("--backbone") + 1] == "raw"
    assert breast_raw[breast_raw.index("--train") + 1] == "d/breastmnist.npz:train"
    assert breast_raw[breast_raw.index("--val") + 1] == "d/breastmnist.npz:val"
    assert breast_raw[breast_raw.index("--out") + 1] == str(
        out / "eval" / "breastmnist" / "raw" / "knn"
    )
    with pytest.raises(LaunchError, match="one --test"):
        plan_pipeline([*args, *evals[:-2], "--eval-train", "d/x.npz:train"], opts)

    # the gather job: one column per dataset, the reference anchors of both below
    cells = []
    for dataset, label, acc, auc in [
        ("pneumoniamnist", "runA", 0.8125, 0.9),
        ("pneumoniamnist", "raw", 0.75, 0.7),
        ("breastmnist", "runA", 0.625, 0.6),
    ]:
        cell_out = tmp_path / "t" / dataset / label / "knn"
        cell_out.mkdir(parents=True)
        (cell_out / "metrics.json").write_text(json.dumps(_metrics_doc(acc, auc)))
        cells.append(
            {"backbone": label, "label": label, "protocol": "knn", "dataset": dataset}
            | {"out": str(cell_out)}
        )
    paths = gather_eval_table(tmp_path / "t", cells)
    rows = json.loads(Path(paths["results.json"]).read_text())
    assert [r["dataset"] for r in rows] == ["pneumoniamnist", "pneumoniamnist", "breastmnist"]
    md = Path(paths["results.md"]).read_text()
    assert "| backbone | pneumoniamnist | breastmnist |" in md
    assert "| runA | 0.9000 / 0.8125 | 0.6000 / 0.6250 |" in md
    assert "| raw | 0.7000 / 0.7500 | - |" in md
    # MedMNIST v2's ResNet-18: 0.944 / 0.854 on PneumoniaMNIST, 0.901 / 0.863 on BreastMNIST
    assert "| ResNet-18 (28) | 0.9440 / 0.8540 | 0.9010 / 0.8630 |" in md
    assert "| breastmnist | runA | knn | k=20 | 0.6250 [0.525, 0.725] |" in md


def test_backbone_labels_are_short_and_unique():
    taken: set[str] = set()
    labels = [
        backbone_label(p, taken) for p in ["runs/a", "runs/a/export", "raw", "b/ckpt-00000010.pt"]
    ]
    assert labels == ["a", "a-2", "raw", "ckpt-00000010"]


def test_pipeline_plan_chains_the_stages_and_routes_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: dinov2\noptim: {max_steps: 2}\n")
    opts, _ = _opts(["pipeline", "--cluster", "slurm"], tmp_path)
    plan, out = plan_pipeline(
        [
            "src1",
            "src2",
            "--out",
            str(tmp_path / "p"),
            "--pretrain-config",
            str(recipe),
            "--eval-train",
            "x.npz:train",
            "--eval-test",
            "x.npz:test",
            "--baseline",
            "raw",
            "--protocol",
            "knn",
            "--protocol",
            "linear",
            "--no-curate",
            "pretrain.optim.max_steps=5",
            "eval.bootstrap.resamples=10",
            "ingest.workers=2",
        ],
        opts,
    )
    assert out == (tmp_path / "p").resolve()
    assert [(p.name, p.after, len(p.calls)) for p in plan] == [
        ("ingest", [], 1),
        ("pretrain", ["ingest"], 1),
        ("eval-cells", ["pretrain"], 4),
        ("eval-table", ["eval-cells"], 1),
    ]
    ingest, pretrain = plan[0].calls[0], plan[1].calls[0]
    # The SRC paths travel in a private argument file, never in the job's argv or records.
    # Written when the plan is submitted: planning (which may still refuse) leaves no files.
    args_file = out / "shards" / "private" / "launch-ingest.args"
    assert ingest.argv == ["ingest", f"@{args_file}"] and not args_file.exists()
    assert plan[0].private_files[args_file].split("\n")[:-1] == [
        "src1",
        "src2",
        "--out",
        str(out / "shards"),
        "workers=2",
    ]
    # so do every other stage's arguments (eval's datasets, curation's pool and eval sets)
    assert pretrain.argv == [f"@{out / 'pretrain' / 'private' / 'launch-pretrain.args'}"]
    pretrain_args = _read_args(plan, pretrain)
    assert f"data.train={out / 'shards'}" in pretrain_args
    assert pretrain_args[-1] == "optim.max_steps=5"
    assert pretrain.distributed and not ingest.distributed
    cells = plan[2].calls
    assert sorted(c.name for c in cells) == [
        "eval-pretrain-knn",
        "eval-pretrain-linear",
        "eval-raw-knn",
        "eval-raw-linear",
    ]
    assert all(
        c.argv[1:] == [f"@{out / 'eval' / 'private' / f'launch-{c.name}.args'}"] for c in cells
    )
    assert all(_read_args(plan, c)[-1] == "bootstrap.resamples=10" for c in cells)
    with pytest.raises(LaunchError, match="must start with one of"):
        plan_pipeline(
            [
                "s",
                "--out",
                str(tmp_path / "refused"),
                "--pretrain-config",
                str(recipe),
                "--eval-train",
                "a",
                "--eval-test",
                "b",
                "--no-curate",
                "optim.max_steps=5",
            ],
            opts,
        )
    with pytest.raises(LaunchError, match="unknown config key 'optim.bogus'"):
        plan_pipeline(
            [
                "s",
                "--out",
                str(tmp_path / "refused"),
                "--pretrain-config",
                str(recipe),
                "--eval-train",
                "a",
                "--eval-test",
                "b",
                "--no-curate",
                "pretrain.optim.bogus=1",
            ],
            opts,
        )
    assert not (tmp_path / "refused").exists()  # a refused plan wrote nothing


def _curation_pool(medssl_data: Path, root: Path) -> tuple[Path, dict[str, str]]:
    """3 shards of real images (X-rays, ultrasounds, fundi) with an exact and a JPEG copy planted."""
    import io

    import numpy as np
    from PIL import Image

    from curation.plant import MEDMNIST_MODALITY, medmnist, record_for, write_shards

    items = []
    for name, n in (("pneumoniamnist", 30), ("breastmnist", 10), ("retinamnist", 10)):
        for i, px in enumerate(medmnist(medssl_data, name, "val", n, seed=3)):
            items.append(
                (
                    f"{name[:5]}-{i:02d}",
                    px,
                    record_for(f"{name[:5]}-{i:02d}", px, MEDMNIST_MODALITY[name]),
                )
            )
    buf = io.BytesIO()
    Image.fromarray(items[4][1]).save(buf, format="JPEG", quality=70)
    copies = {
        "copy-exact": (items[1][0], items[1][1].copy()),
        "copy-jpeg": (items[4][0], np.asarray(Image.open(io.BytesIO(buf.getvalue())))),
    }
    for key, (_, px) in copies.items():
        items.insert(len(items) // 2, (key, px, record_for(key, px, "CR")))
    write_shards(root / "pool", items, shard_size=20)
    return root / "pool", {key: original for key, (original, _) in copies.items()}


def test_local_curate_runs_the_embed_array_then_the_global_job(tmp_path, medssl_data, capsys):
    """`launch curate` on this machine: 2 embed tasks (one per shard group) and the global job
    produce curated shards in which each planted copy or its original is gone, not both."""
    pool, copies = _curation_pool(medssl_data, tmp_path)
    out = tmp_path / "curation"
    code = launch_main(
        [
            "curate",
            f"pool={pool}",
            f"output_dir={out}",
            "progress=false",
            "--embed-groups",
            "2",
            "--cluster",
            "local",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    summary = json.loads(captured.out)
    assert list(summary["jobs"]) == ["curate-embed", "curate-global"]
    assert len(summary["jobs"]["curate-embed"]) == 2
    tasks = sorted(r["name"] for r in summary["results"]["curate-embed"])
    assert tasks == ["curate-embed-0000", "curate-embed-0001"]
    groups = out / "embed" / "pool" / "groups"
    shards = sorted(str(p) for p in pool.glob("shard-*.tar"))
    done = [json.loads((groups / f"group-00000{g}" / "DONE.json").read_text()) for g in (0, 1)]
    assert [d["shards"] for d in done] == [shards[:1], shards[1:]]  # contiguous chunks of 3 shards
    manifest = (out / "curated" / "manifest.jsonl").read_text().splitlines()
    kept = {json.loads(line)["key"] for line in manifest}
    for copy, original in copies.items():
        assert (copy in kept) + (original in kept) == 1, (copy, original)
    assert len(kept) == 50  # the 50 originals (or a copy in place of its original)
    attempts = {(r["name"], r["event"], r.get("status")) for r in read_attempts(out)}
    assert ("curate-global", "end", "completed") in attempts
    assert (out / "report.html").is_file() and (out / "config.yaml").is_file()


def test_curate_refuses_a_bad_config_before_queueing(tmp_path, capsys):
    out = tmp_path / "curation"
    code = launch_main(
        ["curate", "pool=x", f"output_dir={out}", "dedup.treshold=0.9", "--cluster", "slurm"]
    )
    assert code == 2 and "unknown config key 'dedup.treshold'" in capsys.readouterr().err
    code = launch_main(
        ["curate", "pool=x", f"output_dir={out}", "--step", "embed", "--cluster", "local"]
    )
    assert code == 2 and "the launcher adds --step/--group" in capsys.readouterr().err
    assert not out.exists()


def test_pipeline_plan_curates_between_ingest_and_pretrain(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: dinov2\noptim: {max_steps: 2}\n")
    opts, _ = _opts(["pipeline", "--cluster", "slurm"], tmp_path)
    plan, out = plan_pipeline(
        [
            "src",
            "--out",
            str(tmp_path / "p"),
            "--pretrain-config",
            str(recipe),
            "--eval-train",
            "x.npz:train",
            "--eval-test",
            "x.npz:test",
            "--embed-groups",
            "3",
            "curate.dedup.threshold=0.98",
        ],
        opts,
    )
    assert [(p.name, p.after, len(p.calls)) for p in plan][:4] == [
        ("ingest", [], 1),
        ("curate-embed", ["ingest"], 3),
        ("curate-global", ["curate-embed"], 1),
        ("pretrain", ["curate-global"], 1),
    ]
    embed, final, pretrain = plan[1].calls[2], plan[2].calls[0], plan[3].calls[0]
    args_file = out / "curation" / "private" / "launch-curate.args"
    assert embed.argv == [
        "run",
        f"@{args_file}",
        "embed.groups=3",
        "--step",
        "embed",
        "--group",
        "2",
    ]
    assert _read_args(plan, embed)[1:5] == [
        f"pool={out / 'shards'}",
        "eval_sets=[x.npz:test]",
        "dedup.threshold=0.98",
        f"output_dir={out / 'curation'}",
    ]
    assert final.argv[-2:] == ["--step", "global"] and final.argv[:-2] == embed.argv[:-4]
    assert f"data.train={out / 'curation' / 'curated'}" in _read_args(plan, pretrain)


def test_pipeline_plan_with_ingest_and_search_arrays(tmp_path):
    """--ingest-array 2 --global-tasks 3: ingest tasks, then the merging ingest; embed array; the
    near and decontam arrays; the global job; every job afterok on the one before."""
    opts, _ = _opts(["pipeline", "--cluster", "slurm"], tmp_path)
    plan, out = plan_pipeline(
        [
            "src1",
            "--out",
            str(tmp_path / "p"),
            "--pretrain-config",
            str(REPO / "pretrain" / "configs" / "simclr_cpu.yaml"),
            "--eval-train",
            "x.npz:train",
            "--eval-test",
            "x.npz:test",
            "--embed-groups",
            "2",
            "--ingest-array",
            "2",
            "--global-tasks",
            "3",
        ],
        opts,
    )
    assert [(p.name, p.after, len(p.calls), p.array) for p in plan][:7] == [
        ("ingest-tasks", [], 2, True),
        ("ingest", ["ingest-tasks"], 1, False),
        ("curate-embed", ["ingest"], 2, True),
        ("curate-near", ["curate-embed"], 3, True),
        ("curate-decontam", ["curate-near"], 3, True),
        ("curate-global", ["curate-decontam"], 1, False),
        ("pretrain", ["curate-global"], 1, False),
    ]
    assert plan[0].calls[1].argv[-4:] == ["--task", "1", "--tasks", "2"]
    near, final = plan[3].calls[2], plan[5].calls[0]
    assert near.argv[-5:] == ["global_tasks=3", "--step", "near", "--task", "2"]
    assert final.argv[-3:] == ["global_tasks=3", "--step", "global"]


def test_curate_plan_trains_the_bootstrap_model_once_before_the_array(tmp_path):
    from launch.curate import plan_curate

    opts, _ = _opts(["curate", "--cluster", "slurm"], tmp_path)
    plan, out = plan_curate(
        ["pool=p", f"output_dir={tmp_path / 'c'}", "bootstrap.enabled=true", "--embed-groups", "2"],
        opts,
        after=["ingest"],
    )
    assert [(p.name, p.after, len(p.calls)) for p in plan] == [
        ("curate-bootstrap", ["ingest"], 1),
        ("curate-embed", ["curate-bootstrap"], 2),
        ("curate-global", ["curate-embed"], 1),
    ]
    assert (
        plan[0].calls[0].argv[-2:] == ["--step", "bootstrap"] and out == (tmp_path / "c").resolve()
    )


def test_demo_data_check_names_what_is_missing_and_how_to_get_it(
    tmp_path, medssl_data, monkeypatch, capsys
):
    from launch import demo_data

    assert demo_data.main([str(medssl_data)]) == 0  # the shared data is complete: nothing fetched
    monkeypatch.setitem(sys.modules, "medmnist", None)  # not installed: import raises ImportError
    assert demo_data.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "pneumoniamnist.npz") in err and "pip install medmnist" in err
    assert str(tmp_path / "dicom") in err
    assert list(tmp_path.iterdir()) == []  # nothing half-written
