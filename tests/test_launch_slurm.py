"""The launcher on a real single-node SLURM cluster (tests/slurm/cluster.sh), no mocks.

The cluster is started here when it is not running (as root: Debian packages are installed when
missing) and stopped at the end only if this session started it; `.ci/run` may start it first.
SLURM being unreachable is a failure, never a skip. All jobs are queued at once by one fixture
(the cluster has more CPU slots than the machine has cores), so the tests share the waiting:
  - a 2-task pretrain job whose ranks form one gloo process group;
  - an uninterrupted reference run, a run preempted with submitit's `job._interrupt()` and a run
    hit by a plain `scontrol requeue`, both resuming to the reference's final step and parameters;
  - a curation embed array over shard groups followed by the dependent global job;
  - a job that fails, whose error carries its stderr tail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.attempts import read_attempts
from launch.cluster import ClusterOptions, JobFailed, wait_for
from launch.stages import plan_eval, plan_pretrain
from launch.submit import JOBS_FILENAME, submit_plan
from pretrain.checkpoint import load_newest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
STATE = Path(os.environ.get("MEDSSL_SLURM_STATE", "/tmp/medssl-slurm"))
JOB_TIMEOUT_S = 420  # per wait; a loaded 2-core machine imports torch slowly


def tiny_dinov2(data: Path, out: Path, steps: int = 40) -> list[str]:
    """The DINOv2 method at toy size: a ViT-tiny on 16 px crops of BreastMNIST, CPU, fp32.

    40 steps (a few seconds) leave the interrupt and the requeue time to land after the first
    checkpoint (step 2) and before the run ends; with 8 steps a fast machine finished first.

    Metrics and collapse monitors run only at the last step: a monitor that runs at a checkpoint
    step currently moves the RNG state that the checkpoint records (pretrain/train.py saves after
    the monitors), which makes a resumed run differ from an uninterrupted one."""
    return [
        "method=dinov2",
        f"output_dir={out}",
        f"data.train={data / 'breastmnist.npz'}:train",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.samples_per_epoch=64",
        "model.arch=vit_tiny",
        "model.patch_size=4",
        "model.img_size=16",
        "model.in_chans=1",
        f"optim.max_steps={steps}",
        "optim.warmup_steps=2",
        "optim.lr_reference_batch=8",
        "train.precision=fp32",
        "train.checkpoint_every=2",
        "train.keep_last=2",
        "train.log_every=1000",
        "monitor.collapse_every=1000",
        "train.progress=false",
        "monitor.plot=false",
        "dinov2.crops.global_crops_size=16",
        "dinov2.crops.local_crops_size=8",
        "dinov2.crops.local_crops_number=2",
        "dinov2.dino.head_n_prototypes=64",
        "dinov2.dino.head_hidden_dim=64",
        "dinov2.dino.head_bottleneck_dim=32",
    ]


def _cluster(cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER_SH), cmd], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running cluster and SLURM_CONF for submitit's sbatch/sacct calls; fails when none can run."""
    os.environ["SLURM_CONF"] = str(STATE / "etc" / "slurm.conf")
    started = False
    if _cluster("status").returncode != 0:
        result = _cluster("start")
        if result.returncode != 0:
            pytest.fail(
                "SLURM is not reachable and tests/slurm/cluster.sh start failed "
                f"(exit {result.returncode}); it needs root and Debian's slurm packages:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        started = True
    yield STATE
    if started:
        _cluster("stop")


def _opts(out: Path, **kw) -> ClusterOptions:
    return ClusterOptions(cluster="slurm", folder=out / "launch" / "submitit", timeout_min=15, **kw)


def _await_checkpoint(out: Path, limit_s: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + limit_s
    while not list((out / "checkpoints").glob("ckpt-*.pt")):
        if time.monotonic() > deadline:
            raise AssertionError(f"no checkpoint in {out} after {limit_s} s; see {out / 'launch'}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def runs(slurm_cluster, medssl_data, tmp_path_factory):
    """Queue every job at once, interrupt two of them mid-run, wait for all; outcomes by name."""
    root = tmp_path_factory.mktemp("slurm_runs")
    os.environ["OMP_NUM_THREADS"] = "1"  # same thread count in every job: bit-identical runs
    outs = {name: root / name for name in ("ranks2", "reference", "preempted", "requeued")}
    jobs = {}
    plan, _ = plan_pretrain(
        tiny_dinov2(medssl_data, outs["ranks2"], steps=4), _opts(outs["ranks2"], tasks_per_node=2)
    )
    jobs["ranks2"] = submit_plan(plan, _opts(outs["ranks2"], tasks_per_node=2), outs["ranks2"])[
        0
    ].jobs
    for name in ("reference", "preempted"):
        plan, _ = plan_pretrain(tiny_dinov2(medssl_data, outs[name]), _opts(outs[name]))
        jobs[name] = submit_plan(plan, _opts(outs[name]), outs[name])[0].jobs
    # The acceptance path: the CLI queues the job and prints its id; then a plain scontrol requeue.
    cli = [
        "pretrain",
        *tiny_dinov2(medssl_data, outs["requeued"]),
        "--cluster",
        "slurm",
        "--timeout-min",
        "15",
        "--max-requeues",
        "2",
    ]
    printed = subprocess.run(
        [sys.executable, "-m", "launch", *cli],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert printed.returncode == 0, printed.stderr
    requeue_id = json.loads(printed.stdout)["jobs"]["pretrain"][0]
    import submitit

    jobs["requeued"] = [
        submitit.SlurmJob(outs["requeued"] / "launch" / "submitit" / "%j", requeue_id)
    ]

    npz = medssl_data / "breastmnist.npz"
    outs["eval"] = root / "eval"
    eval_plan, _ = plan_eval(
        [
            "--backbone",
            "raw",
            "--protocol",
            "knn",
            "--protocol",
            "fewshot",
            "--train",
            f"{npz}:train",
            "--test",
            f"{npz}:test",
            "--out",
            str(outs["eval"]),
            "bootstrap.resamples=20",
            "raw_baseline=[]",
            "fewshot.episodes=5",
        ],
        _opts(outs["eval"]),
    )
    eval_jobs = submit_plan(eval_plan, _opts(outs["eval"]), outs["eval"])
    jobs["eval-cells"], jobs["eval-table"] = eval_jobs[0].jobs, eval_jobs[1].jobs

    failing = root / "failing"  # `--wait` blocks until the job ends: collected after the interrupts
    failing_cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launch",
            "ingest",
            str(root / "no_such_source"),
            "--out",
            str(failing),
            "--cluster",
            "slurm",
            "--wait",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )

    _await_checkpoint(outs["preempted"])
    jobs["preempted"][0]._interrupt()  # SIGTERM then USR2, as SLURM preemption does
    _await_checkpoint(outs["requeued"])
    subprocess.run(["scontrol", "requeue", requeue_id], check=True)
    out, err = failing_cli.communicate(timeout=JOB_TIMEOUT_S)
    failed = subprocess.CompletedProcess(failing_cli.args, failing_cli.returncode, out, err)

    outcome = {"outs": outs, "failed": failed, "failing": failing}
    for name, job_list in jobs.items():
        try:
            outcome[name] = wait_for(job_list, timeout_s=JOB_TIMEOUT_S)
        except JobFailed as exc:
            outcome[name] = JobFailed(f"{exc}\n{_log_tails(job_list)}")
    return outcome


def _log_tails(jobs, lines: int = 15) -> str:
    """The last lines of every task's stderr: what a failed or hung job was doing."""
    out = []
    for job in jobs:
        for t in range(job.num_tasks):
            text = job.task(t).stderr() or ""
            tail = "\n".join(text.splitlines()[-lines:])
            out.append(f"--- job {job.job_id} task {t} stderr (last {lines} lines):\n{tail}")
    return "\n".join(out)


def _ok(outcome, name):
    result = outcome[name]
    if isinstance(result, Exception):
        raise AssertionError(f"{name} failed: {result}")
    return result


def _final(out: Path) -> dict:
    found = load_newest(out / "checkpoints")
    assert found is not None, f"no checkpoint in {out}"
    return found[1]


def test_two_task_pretrain_forms_one_gloo_group(runs):
    (ranks,) = _ok(runs, "ranks2")
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert all(r["world_size"] == 2 for r in ranks)
    out = runs["outs"]["ranks2"]
    log = (Path(ranks[0]["log_dir"]) / "rank0.err").read_text()
    assert "process group ready: rank 0/2 (env, backend gloo" in log
    ckpt = _final(out)
    assert ckpt["step"] == 4
    assert ckpt["data"]["world_size"] == 2 and ckpt["data"]["global_batch"] == 8


def _assert_resumed_like_reference(runs, name: str, first_status: str) -> None:
    _ok(runs, "reference")
    _ok(runs, name)
    out, ref_out = runs["outs"][name], runs["outs"]["reference"]
    attempts = [a for a in read_attempts(out) if a["name"] == "pretrain"]
    starts = [a for a in attempts if a["event"] == "start"]
    ends = [a for a in attempts if a["event"] == "end"]
    assert [a["attempt"] for a in starts] == [1, 2], attempts
    assert [a["restart_count"] for a in starts] == [0, 1]
    assert [e["status"] for e in ends] == [first_status, "completed"], ends
    assert "resumed from" in (out / "train.log").read_text()
    ckpt, ref = _final(out), _final(ref_out)
    assert ckpt["step"] == ref["step"] == 40
    assert ckpt["model"].keys() == ref["model"].keys()
    for key, value in ref["model"].items():
        assert torch.equal(ckpt["model"][key], value), (
            f"{name}: parameter {key} differs from the reference"
        )


def test_preempted_job_resumes_to_the_same_parameters(runs):
    _assert_resumed_like_reference(runs, "preempted", first_status="preempted")


def test_scontrol_requeue_resumes_to_the_same_parameters(runs):
    _assert_resumed_like_reference(runs, "requeued", first_status="stopped")
    first_end = next(a for a in read_attempts(runs["outs"]["requeued"]) if a["event"] == "end")
    assert first_end["signal"] == "SIGTERM"


def test_failing_job_reports_its_stderr_tail(runs):
    failed = runs["failed"]
    assert failed.returncode == 1, failed.stderr
    # The stage's own error line, inside the launcher's error, after the tail marker.
    assert "--- last lines of stderr ---" in failed.stderr
    tail = failed.stderr.split("--- last lines of stderr ---", 1)[1]
    assert "no_such_source: no such file or directory" in tail
    assert "ingest failed with exit code 2" in failed.stderr
    ends = [a for a in read_attempts(runs["failing"]) if a["event"] == "end"]
    assert [(e["status"], e["returncode"]) for e in ends] == [("failed", 2)]


def test_eval_array_then_dependent_table_job(runs):
    cells = _ok(runs, "eval-cells")
    (table,) = _ok(runs, "eval-table")
    out = runs["outs"]["eval"]
    assert sorted(c["name"] for c in cells) == ["eval-raw-fewshot", "eval-raw-knn"]
    array_ids = {c["job_id"].split("_")[0] for c in cells}
    assert len(array_ids) == 1 and sorted(c["job_id"].split("_")[1] for c in cells) == ["0", "1"]
    queued = [
        json.loads(line) for line in (out / "launch" / JOBS_FILENAME).read_text().splitlines()
    ]
    assert queued[1]["name"] == "eval-table" and queued[1]["dependency"] == sorted(array_ids)
    rows = json.loads(Path(table["results.json"]).read_text())
    assert sorted((r["backbone"], r["protocol"]) for r in rows) == [
        ("raw", "fewshot"),
        ("raw", "knn"),
    ]
    for row in rows:
        doc = json.loads((out / "raw" / row["protocol"] / "metrics.json").read_text())
        best = doc["protocols"][row["protocol"]]["best"]
        assert row["accuracy"] == doc["protocols"][row["protocol"]]["settings"][best]["accuracy"]


ARRAY_CURATION = (
    "sample.target_size=12",
    "balance.n_clusters=[6,2]",
    "balance.kmeans=exact",  # the global job: 3 ranks, each clustering a slice of the candidates
    "progress=false",
)


@pytest.fixture(scope="module")
def curation_jobs(slurm_cluster, medssl_data, tmp_path_factory):
    """Queued at once: `launch curate` with a 2-task embed array and the global job afterok on it;
    `launch curate --global-tasks 3` (embed, near and decontam arrays, then the global job); and
    `launch ingest --array 3` (three tasks, then the merging ingest)."""
    from launch.curate import plan_curate
    from launch.stages import plan_ingest
    from tests.test_launch_local import _curation_pool

    root = tmp_path_factory.mktemp("slurm_curation")
    pool, copies = _curation_pool(medssl_data, root)
    out = root / "curation"
    plan, planned_out = plan_curate(
        [f"pool={pool}", f"output_dir={out}", "progress=false", "--embed-groups", "2"], _opts(out)
    )
    assert planned_out == out.resolve()
    outcome = {"out": out, "pool": pool, "copies": copies, "root": root}
    submitted = submit_plan(plan, _opts(out), out)
    tasks_out = root / "curation-tasks"
    evals = f"eval_sets=[{medssl_data / 'pneumoniamnist.npz'}:val]"  # holds the pool's X-rays
    tasks_args = [f"pool={pool}", evals, *ARRAY_CURATION]
    plan, _ = plan_curate(
        [*tasks_args, f"output_dir={tasks_out}", "--embed-groups", "2", "--global-tasks", "3"],
        _opts(tasks_out),
        prefix="tasks",
    )
    submitted += submit_plan(plan, _opts(tasks_out), tasks_out)
    ingest_out = root / "ingest-array"
    ingest_args = [f"{medssl_data / 'breastmnist.npz'}:test", "--shard-size", "40"]
    plan, _ = plan_ingest(
        [*ingest_args, "progress=false", "--out", str(ingest_out), "--array", "3"],
        _opts(ingest_out),
    )
    submitted += submit_plan(plan, _opts(ingest_out), ingest_out)
    outcome.update(
        submitted=submitted,
        tasks_out=tasks_out,
        tasks_args=tasks_args,
        ingest_out=ingest_out,
        ingest_args=ingest_args,
    )
    for entry in submitted:
        try:
            outcome[entry.name] = wait_for(entry.jobs, timeout_s=JOB_TIMEOUT_S)
        except JobFailed as exc:
            outcome[entry.name] = JobFailed(f"{exc}\n{_log_tails(entry.jobs)}")
    return outcome


def test_search_arrays_give_the_single_process_keep_set_and_clusters(curation_jobs):
    """global_tasks=3 on SLURM: 3 near tasks and 3 decontam tasks, each a slice of the queries,
    merged by a global job of 3 ranks, each clustering a slice of the candidates, into exactly what
    one process keeps, removes and clusters."""
    from curation.run import DEFAULT_CONFIG, run_pipeline
    from pretrain.config import load_config

    assert len(_ok(curation_jobs, "tasks-near")) == len(_ok(curation_jobs, "tasks-decontam")) == 3
    (ranks,) = _ok(curation_jobs, "tasks-global")  # one job of 3 tasks
    assert sorted(r["rank"] for r in ranks) == [0, 1, 2]
    out, one = curation_jobs["tasks_out"], curation_jobs["root"] / "curation-one"
    run_pipeline(
        load_config(DEFAULT_CONFIG, None, [*curation_jobs["tasks_args"], f"output_dir={one}"])
    )
    parts = sorted(p.name for p in (out / "steps" / "parts").rglob("part-*.npz"))
    assert parts == sorted([f"part-{i:04d}-of-0003.npz" for i in range(3)] * 2)
    for step, fields in (
        ("near", ("keep", "a", "b")),
        ("decontam", ("keep", "a")),
        ("select", ("rows", "candidate_leaf")),
    ):
        got, want = np.load(out / "steps" / f"{step}.npz"), np.load(one / "steps" / f"{step}.npz")
        for field in fields:
            np.testing.assert_array_equal(got[field], want[field], err_msg=f"{step}.{field}")
    removed = json.loads((out / "steps" / "decontam.json").read_text())["data"]["removed"]
    assert len(removed) >= 30  # the 30 X-rays of the pool come from the eval split
    queued = [
        json.loads(line)["name"]
        for line in (out / "launch" / JOBS_FILENAME).read_text().splitlines()
    ]
    assert queued == ["tasks-embed", "tasks-near", "tasks-decontam", "tasks-global"]


def test_ingest_array_then_merge_equals_one_ingest(curation_jobs, tmp_path):
    from curation.__main__ import main as curation_main
    from pretrain.data.shards import list_shards

    assert len(_ok(curation_jobs, "ingest-tasks")) == 3
    _ok(curation_jobs, "ingest")
    out, one = curation_jobs["ingest_out"], tmp_path / "one"
    assert curation_main(["ingest", *curation_jobs["ingest_args"], "--out", str(one)]) == 0
    assert (out / "manifest.jsonl").read_bytes() == (one / "manifest.jsonl").read_bytes()
    assert [p.read_bytes() for p in list_shards(out)] == [p.read_bytes() for p in list_shards(one)]


def test_curation_embed_array_then_dependent_global_job(curation_jobs):
    tasks = _ok(curation_jobs, "curate-embed")
    (final,) = _ok(curation_jobs, "curate-global")
    out = curation_jobs["out"]
    array_ids = {t["job_id"].split("_")[0] for t in tasks}
    assert len(array_ids) == 1 and sorted(t["job_id"].split("_")[1] for t in tasks) == ["0", "1"]
    queued = [
        json.loads(line) for line in (out / "launch" / JOBS_FILENAME).read_text().splitlines()
    ]
    assert [q["name"] for q in queued] == ["curate-embed", "curate-global"]
    assert queued[1]["dependency"] == sorted(array_ids)  # afterok on the whole array
    shards = sorted(str(p) for p in curation_jobs["pool"].glob("shard-*.tar"))
    groups = out / "embed" / "pool" / "groups"
    done = [json.loads((groups / f"group-00000{g}" / "DONE.json").read_text()) for g in (0, 1)]
    assert [d["shards"] for d in done] == [shards[:1], shards[1:]]
    kept = {
        json.loads(line)["key"]
        for line in (out / "curated" / "manifest.jsonl").read_text().splitlines()
    }
    for copy, original in curation_jobs["copies"].items():
        assert (copy in kept) + (original in kept) == 1, (copy, original)
    assert len(kept) == 50
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"]["embed"]["groups"] == 2 and summary["curated"] == 50
    assert final["job_id"] not in array_ids
