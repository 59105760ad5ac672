"""The training engine on a tiny TEST-ONLY method: DDP equality, exact resume after SIGKILL, NaN
handling, max_steps=0 export, config refusal, checkpoints, monitors.

The method below is registered here so the engine is tested without DINOv2: a student ViT plus a
linear predictor regresses an EMA teacher's features of the horizontally flipped image. Its loss is
a mean of per-sample terms, so 2 ranks x 4 images must give the same update as 1 x 8.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from pretrain import distributed as du
from pretrain.__main__ import EXIT_DIVERGED, EXIT_REFUSED, main
from pretrain.backbones import build_backbone, load_backbone
from pretrain.checkpoint import (
    ResumeRefused,
    choose_resume,
    list_checkpoints,
    load_checkpoint,
    load_newest,
    save_checkpoint,
)
from pretrain.components import masked_vit
from pretrain.config import compose_config
from pretrain.engine import Engine
from pretrain.methods import SSLMethod, StepState, build_method, register_method
from pretrain.monitor import CollapseMonitor, collapse_stats, entropy_stats, knn_top1, read_metrics
from pretrain.schedules import cosine_schedule
from pretrain.train import run
from pretrain.transforms import eval_transform
from pretrain.validation import validate

REPO = Path(__file__).resolve().parents[1]
KILL_ENV = "MEDSSL_TEST_KILL_AT_STEP"
STOP_ENV = "MEDSSL_TEST_STOP_AT_STEP"


class StopRun(Exception):
    """TEST-ONLY: every rank leaves the run at the same step (a coordinated preemption)."""


@register_method("engine_test")
class EngineTestMethod(SSLMethod):
    """TEST-ONLY: student + predictor regress the EMA teacher's features of the flipped image."""

    augment: ClassVar[bool] = False
    tracing: ClassVar[bool] = False
    nan_steps: ClassVar[set[int]] = set()
    trace: ClassVar[list[tuple[int, float, float]]] = []  # (step, student sum, teacher sum)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.student = build_backbone(cfg.model)
        dim = int(self.student.num_features)
        self.predictor = nn.Linear(dim, dim)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)

    def build_transform(self):
        if not self.augment:
            return None
        return lambda img: (img + 0.05 * torch.randn_like(img)).clamp(0, 1)  # main-process RNG

    def forward_loss(self, batch, state: StepState):
        kill_at = os.environ.get(KILL_ENV)
        if kill_at is not None and state.step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)  # a real, unannounced death mid-run
        stop_at = os.environ.get(STOP_ENV)
        if stop_at is not None and state.step == int(stop_at):
            raise StopRun(f"stopped at step {stop_at}")
        images = batch[0]
        if self.tracing:
            EngineTestMethod.trace.append(
                (
                    state.step,
                    float(sum(p.detach().sum() for p in self.student.parameters())),
                    float(sum(p.sum() for p in self.teacher.parameters())),
                )
            )
        pred = self.predictor(self.student(images))
        with torch.no_grad():
            target = self.teacher(images.flip(-1))
        per_sample = 2 - 2 * F.cosine_similarity(pred, target, dim=-1)
        loss = per_sample.mean()
        if state.step in self.nan_steps:
            loss = loss * float("nan")
        return loss, {"cosine": (1 - per_sample.detach() / 2).mean()}

    def schedules(self, total_steps, steps_per_epoch):
        return {"momentum": cosine_schedule(0.9, 1.0, total_steps)}

    @torch.no_grad()
    def on_after_step(self, state):
        teacher = list(self.teacher.parameters())
        student = [p.detach() for p in self.student.parameters()]
        torch._foreach_lerp_(teacher, student, 1.0 - state.values["momentum"])

    def backbone_for_export(self):
        return self.teacher

    @torch.no_grad()
    def monitor_embeddings(self, batch):
        return self.teacher(batch[0])

    def ddp_modules(self):
        return [self.student, self.predictor]


@register_method("engine_test_aug")
class EngineTestAugMethod(EngineTestMethod):
    """TEST-ONLY: the same with random augmentation (and the config adds drop-path)."""

    augment: ClassVar[bool] = True


@pytest.fixture(autouse=True)
def _reset_test_method():
    EngineTestMethod.nan_steps = set()
    EngineTestMethod.trace = []
    EngineTestMethod.tracing = True
    yield
    EngineTestMethod.nan_steps = set()
    EngineTestMethod.tracing = False


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> Path:
    """32 train / 16 val 16x16 gray images in two classes that differ in brightness."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"

    def split(n):
        labels = np.arange(n) % 2
        images = rng.integers(0, 120, size=(n, 16, 16)) + 100 * labels[:, None, None]
        return images.astype(np.uint8), labels[:, None].astype(np.int64)

    tr, tr_l = split(32)
    va, va_l = split(16)
    np.savez(path, train_images=tr, train_labels=tr_l, val_images=va, val_labels=va_l)
    return path


def overrides(npz: Path, out: Path, **extra) -> list[str]:
    base = {
        "method": "engine_test",
        "output_dir": str(out),
        "data.train": f"{npz}:train",
        "data.batch_size": 8,
        "data.num_workers": 0,
        "model.arch": "vit_tiny",
        "model.patch_size": 4,
        "model.img_size": 16,
        "model.in_chans": 1,
        "optim.max_steps": 4,
        "optim.warmup_steps": 0,
        "optim.base_lr": 0.002,
        "optim.lr_reference_batch": 8,
        "optim.clip_grad": 1.0,
        "train.precision": "fp32",
        "train.checkpoint_every": 2,
        "train.log_every": 1,
        "train.progress": False,
        "monitor.plot": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def config(npz: Path, out: Path, **extra):
    cfg = compose_config(None, overrides(npz, out, **extra))
    validate(cfg)
    return cfg


def final_state(out: Path) -> dict:
    found = load_newest(out / "checkpoints")
    assert found is not None, f"no checkpoint in {out}"
    return found[1]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (held open together so the OS cannot hand out one twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---- refusal before work --------------------------------------------------------------------


def test_unknown_or_missing_keys_and_bad_data_are_refused_before_any_work(
    tiny_npz, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main([*overrides(tiny_npz, out), "optim.bogus=1"]) == EXIT_REFUSED
    assert "unknown config key 'optim.bogus'" in capsys.readouterr().err
    assert main([f"output_dir={out}", "method=engine_test", "optim.max_steps=1"]) == EXIT_REFUSED
    assert "data.train" in capsys.readouterr().err
    assert main(overrides(tiny_npz, out, **{"data.train": f"{tiny_npz}:nosplit"})) == EXIT_REFUSED
    assert "data.train" in capsys.readouterr().err
    assert main(overrides(tiny_npz, out, **{"data.channels": 3})) == EXIT_REFUSED
    assert "model.in_chans=1" in capsys.readouterr().err
    assert main(overrides(tiny_npz, out, method="no_such_method")) == EXIT_REFUSED
    assert "unknown method 'no_such_method'" in capsys.readouterr().err
    assert not out.exists()  # nothing was created


# ---- max_steps=0 ------------------------------------------------------------------------------


def test_max_steps_zero_exports_the_initialised_backbone(tiny_npz, tmp_path):
    out = tmp_path / "init"
    cfg = config(tiny_npz, out, **{"optim.max_steps": 0})
    run(cfg)
    model, meta = load_backbone(out / "export")
    assert meta["method"] == "engine_test" and meta["step"] == 0 and "untrained" in meta["source"]
    du.seed_everything(int(cfg.train.seed))
    reference = build_method(cfg).backbone_for_export().state_dict()
    exported = model.state_dict()
    assert exported.keys() == reference.keys()
    for key in reference:
        assert torch.equal(exported[key], reference[key]), key
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    assert (out / "config.yaml").is_file()


# ---- exact resume after SIGKILL ----------------------------------------------------------------


def _cli(args: list[str], kill_at_step: int | None = None) -> subprocess.CompletedProcess:
    """`python -m pretrain ARGS` in a fresh process that has the test methods registered."""
    code = "import sys, tests.test_engine; from pretrain.__main__ import main; sys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    env["OMP_NUM_THREADS"] = "1"
    if kill_at_step is not None:
        env[KILL_ENV] = str(kill_at_step)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_killed_run_resumes_exactly(tiny_npz, tmp_path):
    """6 steps straight == SIGKILL during step 3 (last checkpoint: 2) + the same config again."""
    extra = {
        "method": "engine_test_aug",  # random augmentation in the main process
        "model.drop_path_rate": 0.2,  # random draws in the model
        "optim.max_steps": 6,  # 4 batches per epoch: resume mid-epoch 0, finish in epoch 1
        "monitor.collapse_every": 2,  # side work at checkpoint steps must not move the RNG streams
    }
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(config(tiny_npz, straight, **extra))
    killed = _cli(overrides(tiny_npz, resumed, **extra), kill_at_step=3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(resumed / "checkpoints")] == [2]
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3]
    EngineTestMethod.trace = []
    run(config(tiny_npz, resumed, **extra))
    assert [s for s, _, _ in EngineTestMethod.trace] == [2, 3, 4, 5]  # resumed at step 2

    a, b = final_state(straight), final_state(resumed)
    assert a["step"] == b["step"] == 6 and a["data"] == b["data"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pname, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(
                torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][pname][k])
            ), pname
    ra, rb = read_metrics(straight / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in rb] == list(range(1, 7))  # step 3 of the killed run dropped
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    model, meta = load_backbone(resumed / "export")
    assert meta["step"] == 6
    for key, value in model.state_dict().items():
        assert torch.equal(value, a["model"][f"teacher.{key}"]), key


# ---- DDP / FSDP with 2 gloo processes == 1 process ---------------------------------------------


def _dist_worker(rank: int, world: int, ports: list[int], jobs: list, result_dir: str) -> None:
    """torchrun-style environment, then `run` for each (config, stop_at_step) job; a job with a
    stop step is interrupted there and started again (resume). Every start gets a fresh rendezvous
    port: a rank that re-joins early must not find the store of the previous group."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1"
    )
    torch.set_num_threads(1)
    logging.getLogger().setLevel(logging.INFO)  # train.log records the resume
    free = iter(ports)
    for cfg, stop_at in jobs:
        if stop_at is not None:
            os.environ[STOP_ENV], os.environ["MASTER_PORT"] = str(stop_at), str(next(free))
            with pytest.raises(StopRun):
                run(cfg)
            del os.environ[STOP_ENV]
        os.environ["MASTER_PORT"] = str(next(free))
        run(cfg)
    # all_gather_with_grad: gradients flow back to this rank's slice, summed over ranks' losses.
    os.environ["MASTER_PORT"] = str(next(free))
    env = du.detect_env()
    du.init_distributed(env, torch.device("cpu"))
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = du.all_gather_with_grad(x)
    (gathered * torch.arange(world * 2, dtype=torch.float32)[:, None]).sum().backward()
    torch.save(
        {"gathered": gathered.detach(), "grad": x.grad}, Path(result_dir) / f"gather{rank}.pt"
    )
    du.cleanup_distributed()


def test_two_process_ddp_and_fsdp_equal_one_process_with_the_same_global_batch(tiny_npz, tmp_path):
    """1 x 8 images == DDP 2 x 4 == FSDP 2 x 4 interrupted after step 2 and resumed (sharded load)."""
    once = {"train.checkpoint_every": 100}  # only the final checkpoint
    single = config(tiny_npz, tmp_path / "single", **{"data.batch_size": 8}, **once)
    run(single)
    ddp = config(tiny_npz, tmp_path / "ddp", **{"data.batch_size": 4}, **once)
    fsdp = config(tiny_npz, tmp_path / "fsdp", **{"data.batch_size": 4, "dist.fsdp": True})
    jobs = [(ddp, None), (fsdp, 2)]
    mp.spawn(_dist_worker, args=(2, free_ports(4), jobs, str(tmp_path)), nprocs=2, join=True)

    ref = final_state(tmp_path / "single")
    init = build_state_init(single)
    assert any(not torch.equal(ref["model"][k], init[k]) for k in init)  # training moved weights
    for name in ("ddp", "fsdp"):
        got = final_state(tmp_path / name)
        assert got["step"] == ref["step"] == 4 and got["data"]["global_batch"] == 8
        assert got["data"]["world_size"] == 2
        for key in ref["model"]:
            torch.testing.assert_close(
                got["model"][key], ref["model"][key], rtol=1e-4, atol=2e-6, msg=f"{name} {key}"
            )
        assert len(got["rng"]) == 2  # both ranks' RNG streams saved
    assert "resumed from" in (tmp_path / "fsdp" / "train.log").read_text()
    for rank in range(2):
        res = torch.load(tmp_path / f"gather{rank}.pt", weights_only=True)
        torch.testing.assert_close(res["gathered"][:, 0], torch.tensor([1.0, 1.0, 2.0, 2.0]))
        # d/dx of sum_r sum_i w_i * gathered_i (each rank's identical loss) = world * w[rank slice]
        expected = 2 * torch.arange(4, dtype=torch.float32)[2 * rank : 2 * rank + 2, None].expand(
            2, 3
        )
        torch.testing.assert_close(res["grad"], expected)


@pytest.mark.parametrize("clip_grad", [1e-3, 1e3], ids=["over-the-limit", "under-the-limit"])
def test_gradients_are_scaled_to_the_clip_limit_only_when_their_norm_exceeds_it(
    tiny_npz, tmp_path, clip_grad
):
    """The step reports the norm before clipping; the optimizer gets the gradients scaled to
    `optim.clip_grad` when they exceed it, and untouched otherwise. Its first moments show what it
    used: fused AdamW scales the gradients inside its own step (`grad_scale`)."""
    engine = Engine(
        config(
            tiny_npz, tmp_path / "run", **{"optim.clip_grad": clip_grad, "model.drop_path_rate": 0}
        ),
        device=torch.device("cpu"),
        steps_per_epoch=4,
    )
    gen = torch.Generator().manual_seed(0)
    batch = (torch.rand(8, 1, 16, 16, generator=gen), torch.zeros(8, dtype=torch.long))
    reference = copy.deepcopy(engine.method)  # the same weights: its raw gradients, by hand
    loss, _ = reference(batch, engine.step_state())
    loss.backward()
    raw = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    raw_norm = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in raw.values()]))
    assert (raw_norm > clip_grad) == (clip_grad < 1)  # the two cases are what they claim

    result = engine.train_step(batch)
    torch.testing.assert_close(result["grad_norm"].double(), raw_norm, rtol=1e-5, atol=0)
    scale = float(clip_grad / (raw_norm + 1e-6)) if raw_norm > clip_grad else 1.0
    stepped = dict(engine.method.named_parameters())
    assert raw.keys() == {n for n, p in stepped.items() if p.grad is not None}
    for name, grad in raw.items():
        torch.testing.assert_close(stepped[name].grad, grad * scale, rtol=1e-5, atol=1e-9)
    assert engine.optimizer.defaults["fused"]  # the path that scales inside the step
    assert not hasattr(engine.optimizer, "grad_scale")  # no scaling left for the next step
    for group in engine.optimizer.param_groups:
        beta1 = group["betas"][0]
        for param in group["params"]:
            name = next(n for n, p in stepped.items() if p is param)
            first_moment = engine.optimizer.state[param]["exp_avg"]
            expected = (1 - beta1) * raw[name] * scale
            torch.testing.assert_close(first_moment, expected, rtol=1e-5, atol=1e-12)


def test_fsdp_in_a_one_process_group_takes_the_unsharded_step(tiny_npz, tmp_path, monkeypatch):
    """dist.fsdp in a process group of world size 1 (how bench/train_step.py times FSDP on one
    GPU) runs FSDP's wrapper around DINOv2's student and EMA teacher, and its steps give the
    weights that the unwrapped engine gives. FSDP-sharded blocks run crop size by crop size (their
    parameters are gathered by their own forward), so the unwrapped engine does so too here:
    summing a weight's gradient over two matmuls or one differs in the last bit, which AdamW's
    first steps (update ~ lr * sign(grad)) turn into visible differences."""
    runs_grouped = masked_vit.blocks_run_grouped
    monkeypatch.setattr(masked_vit, "blocks_run_grouped", lambda vit: False)
    dinov2 = {
        "method": "dinov2",
        "dinov2.crops.global_crops_size": 16,
        "dinov2.crops.local_crops_size": 8,
        "dinov2.crops.local_crops_number": 2,
        "dinov2.dino.head_n_prototypes": 64,
        "dinov2.ibot.head_n_prototypes": 64,
    }
    gen = torch.Generator().manual_seed(0)
    crops = {
        "global_crops": [torch.rand(4, 1, 16, 16, generator=gen) for _ in range(2)],
        "local_crops": [torch.rand(4, 1, 8, 8, generator=gen) for _ in range(2)],
    }
    batch = (crops, torch.zeros(4, dtype=torch.long))  # iBOT masks drawn in the step, seeded
    cpu = torch.device("cpu")
    plain = Engine(config(tiny_npz, tmp_path / "plain", **dinov2), device=cpu, steps_per_epoch=4)
    for _ in range(2):
        assert not plain.train_step(batch)["skipped"]
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
    )
    try:
        cfg = config(tiny_npz, tmp_path / "fsdp", **dinov2, **{"dist.fsdp": True})
        sharded = Engine(cfg, device=cpu, steps_per_epoch=4)
        assert sharded.fsdp and sharded.model is sharded.method
        assert any(type(p).__name__ == "DTensor" for p in sharded.method.parameters())
        assert not runs_grouped(sharded.method.student.backbone)
        assert runs_grouped(plain.method.student.backbone)
        for _ in range(2):
            assert not sharded.train_step(batch)["skipped"]
        got, _ = sharded.state_dicts()
    finally:
        torch.distributed.destroy_process_group()
    ref = plain.method.state_dict()
    init = build_state_init(config(tiny_npz, tmp_path / "init", **dinov2))
    assert any(not torch.equal(ref[k], init[k]) for k in init)  # the steps moved the weights
    assert got.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)


def build_state_init(cfg) -> dict:
    du.seed_everything(int(cfg.train.seed))
    return build_method(cfg).state_dict()


# ---- NaN handling -----------------------------------------------------------------------------


def test_non_finite_step_is_skipped_counted_and_leaves_weights_untouched(tiny_npz, tmp_path):
    EngineTestMethod.nan_steps = {1}
    out = tmp_path / "nan"
    run(config(tiny_npz, out))
    steps = {s: (student, teacher) for s, student, teacher in EngineTestMethod.trace}
    assert sorted(steps) == [0, 1, 2, 3]
    assert steps[2] == steps[1]  # neither the optimizer nor the EMA ran at step 1
    assert steps[1] != steps[0] and steps[3] != steps[2]
    records = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert records[1]["nan_skipped"] == 0 and records[2]["nan_skipped"] == 1
    assert records[4]["nan_skipped"] == 1 and "loss" not in records[2]  # skipped step not averaged
    assert final_state(out)["counters"]["nan_skipped"] == 1


def test_consecutive_non_finite_steps_abort_with_a_clear_message(tiny_npz, tmp_path, caplog):
    EngineTestMethod.nan_steps = {1, 2, 3}
    out = tmp_path / "diverged"
    args = overrides(
        tiny_npz,
        out,
        **{"train.nan_abort_after": 3, "optim.max_steps": 6, "train.checkpoint_every": 1},
    )
    assert main(args) == EXIT_DIVERGED
    assert "3 consecutive steps" in caplog.text and "non-finite" in caplog.text
    assert [s for s, _ in list_checkpoints(out / "checkpoints")][
        -1
    ] == 3  # steps 2, 3 saved, 4 never
    assert max(s for s, _, _ in EngineTestMethod.trace) == 3


# ---- precision --------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_on_cpu(tiny_npz, tmp_path, precision):
    cfg = config(tiny_npz, tmp_path / precision, **{"train.precision": precision})
    engine = Engine(cfg, device=torch.device("cpu"), steps_per_epoch=4)
    batch = (torch.rand(4, 1, 16, 16), torch.zeros(4, dtype=torch.long))
    before = [p.detach().clone() for p in engine.trainable]
    result = engine.train_step(batch)
    assert not result["skipped"] and torch.isfinite(result["loss"])
    if precision == "fp16":
        assert engine.scaler.is_enabled()
        engine.scaler.update(
            2.0**120
        )  # force an fp16 overflow: the scaler skips, it is no NaN step
        w = [p.detach().clone() for p in engine.trainable]
        result = engine.train_step(batch)
        assert result["overflow"] and not result["skipped"] and engine.nan_skipped == 0
        assert all(torch.equal(a, b) for a, b in zip(w, engine.trainable))
        assert engine.scaler.get_scale() == 2.0**119
    else:
        assert not engine.scaler.is_enabled()
    assert any(not torch.equal(a, b) for a, b in zip(before, engine.trainable))
    assert engine.step == (2 if precision == "fp16" else 1)


# ---- monitors, checkpoints, distributed env -----------------------------------------------------


def test_online_knn_collapse_monitor_and_curves(tiny_npz, tmp_path):
    out = tmp_path / "knn"
    run(
        config(
            tiny_npz,
            out,
            **{
                "monitor.knn_every": 2,
                "monitor.knn_train": f"{tiny_npz}:train",
                "monitor.knn_test": f"{tiny_npz}:val",
                "monitor.knn_k": 5,
                "monitor.plot": True,
            },
        )
    )
    records = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert "knn_top1" not in records[1] and "knn_top1" in records[2]
    # the step-4 k-NN, recomputed by hand from the final export (the same weights): cosine
    # similarity of L2-normalised features, the 5 nearest vote with weight exp(s / 0.07)
    model, meta = load_backbone(out / "export")
    transform = eval_transform(meta["img_size"], meta["channels"])
    feats, labels = {}, {}
    with np.load(tiny_npz) as npz, torch.no_grad():
        for split in ("train", "val"):
            x = [
                transform(torch.from_numpy(im / 255.0).float()[None])
                for im in npz[f"{split}_images"]
            ]
            feats[split] = F.normalize(model(torch.stack(x)), dim=1).numpy()
            labels[split] = npz[f"{split}_labels"][:, 0]
    sims = feats["val"] @ feats["train"].T
    votes = np.zeros((len(sims), 2))
    for i, row in enumerate(np.argsort(-sims, axis=1)[:, :5]):
        for j in row:
            votes[i, labels["train"][j]] += np.exp(sims[i, j] / 0.07)
    by_hand = float((votes.argmax(1) == labels["val"]).mean())
    assert records[4]["knn_top1"] == pytest.approx(by_hand, abs=1e-9)
    for key in (
        "loss",
        "cosine",
        "lr",
        "wd",
        "momentum",
        "grad_norm",
        "images_per_s",
        "memory_gb",
        "emb_std_ratio",
        "eff_rank",
    ):
        assert key in records[4], key
    assert records[1]["lr"] == pytest.approx(0.002) and records[4]["lr"] < records[2]["lr"] < 0.002
    assert (out / "curves.png").stat().st_size > 10_000
    assert (out / "train.log").is_file() and (out / "config.yaml").is_file()


def test_knn_and_collapse_statistics_by_hand():
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    test = F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0], [1.0, 0.0]]), dim=1)
    assert knn_top1(train, labels, test, torch.tensor([0, 1, 1]), k=2) == pytest.approx(2 / 3)
    same = collapse_stats(torch.ones(16, 8))
    assert same["emb_std_ratio"] == pytest.approx(0.0, abs=1e-6) and same[
        "eff_rank"
    ] == pytest.approx(1.0, abs=1e-4)
    spread = collapse_stats(torch.randn(512, 8, generator=torch.Generator().manual_seed(0)))
    assert 0.8 < spread["emb_std_ratio"] < 1.2 and spread["eff_rank"] > 7.0
    uniform = entropy_stats(torch.full((4, 10), 0.1))
    assert uniform["teacher_entropy"] == pytest.approx(1.0) and uniform[
        "teacher_marginal_entropy"
    ] == pytest.approx(1.0)
    one_hot = entropy_stats(F.one_hot(torch.zeros(4, dtype=torch.long), 10).float())
    assert one_hot["teacher_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert one_hot["teacher_marginal_entropy"] == pytest.approx(0.0, abs=1e-6)


def test_collapse_monitor_warns_on_uniform_and_one_hot_teacher_targets():
    cfg = OmegaConf.load(Path(__file__).parents[1] / "pretrain/configs/default.yaml").monitor
    monitor = CollapseMonitor(cfg)
    sharp = torch.full((64, 16), 0.2 / 15).scatter_(1, torch.arange(64).remainder(16)[:, None], 0.8)
    assert monitor.check(monitor.measure({"probs": sharp}), step=1) == []
    uniform = monitor.check(monitor.measure({"probs": torch.full((64, 16), 1 / 16)}), step=2)
    assert len(uniform) == 1 and "near uniform" in uniform[0]
    one_prototype = F.one_hot(torch.zeros(64, dtype=torch.long), 16).float()
    assert "one prototype" in " ".join(monitor.check(monitor.measure({"probs": one_prototype}), 3))
    assert monitor.warned == 2


def test_checkpoints_are_atomic_keep_last_k_and_skip_corrupt_ones(tmp_path):
    d = tmp_path / "ck"
    for step in (1, 2, 3, 4):
        save_checkpoint(
            {"format": 1, "step": step, "rng": [(3, (1, 2), None)]}, d, step, keep_last=2
        )
    assert [s for s, _ in list_checkpoints(d)] == [3, 4]
    # A real SIGKILL during a save: the child stops inside the write (before fsync and rename).
    child = (
        "import os, sys, time, torch\n"
        "from pretrain.checkpoint import save_checkpoint\n"
        "def stall(fd):\n"
        "    print('writing', flush=True); time.sleep(120)\n"
        "os.fsync = stall\n"
        "state = {'format': 1, 'step': 5, 'w': torch.ones(1 << 20)}\n"
        "save_checkpoint(state, sys.argv[1], 5, keep_last=2)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child, str(d)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert (d / ".ckpt-00000005.pt.tmp").is_file() and not (d / "ckpt-00000005.pt").exists()
    assert [s for s, _ in list_checkpoints(d)] == [3, 4]  # nothing older was pruned either
    (d / "ckpt-00000006.pt").write_bytes(b"garbage")  # a corrupt copy
    path, state = load_newest(d)
    assert state["step"] == 4 and path.name == "ckpt-00000004.pt"
    assert load_checkpoint(path)["rng"][0][1] == (1, 2)
    save_checkpoint({"format": 1, "step": 5, "rng": []}, d, 5, keep_last=2)
    assert not (d / ".ckpt-00000005.pt.tmp").exists()  # the next save clears the leftover


# ---- runs that cannot be lost: unreadable checkpoints --------------------------------------------


def _unreadable_checkpoints(ckpt_dir: Path, scratch: Path) -> dict[str, bytes]:
    """Three unreadable checkpoints newer than anything a 4-step run writes (the reviewer's case):
    garbage bytes, a truncated real checkpoint, an empty file. Returns name -> bytes written."""
    save_checkpoint({"format": 1, "step": 7, "w": torch.randn(4096)}, scratch, 7, keep_last=0)
    whole = (scratch / "ckpt-00000007.pt").read_bytes()
    files = {
        "ckpt-00000050.pt": b"\x00 this is not a checkpoint " * 64,
        "ckpt-00000060.pt": whole[: len(whole) // 2],
        "ckpt-00000070.pt": b"",
    }
    ckpt_dir.mkdir(parents=True)
    for name, data in files.items():
        (ckpt_dir / name).write_bytes(data)
    return files


def test_no_readable_checkpoint_refuses_with_exit_2_and_fresh_starts_over(tiny_npz, tmp_path):
    out = tmp_path / "run"
    files = _unreadable_checkpoints(out / "checkpoints", tmp_path / "scratch")
    args = overrides(tiny_npz, out, **{"train.keep_last": 3})
    refused = _cli(args)
    assert refused.returncode == 2, refused.stderr[-3000:]
    for name in files:
        assert name in refused.stderr
    assert "ckpt-00000060.pt: truncated" in refused.stderr
    assert "ckpt-00000070.pt: empty file" in refused.stderr
    assert "ckpt-00000050.pt: not a PyTorch checkpoint" in refused.stderr
    assert "train.resume=fresh" in refused.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(files)
    for name, data in files.items():
        assert (out / "checkpoints" / name).read_bytes() == data, name
    assert not (out / "export").exists()  # nothing trained

    assert main([*args, "train.resume=fresh"]) == 0
    assert [s for s, _, _ in EngineTestMethod.trace] == [0, 1, 2, 3]  # started at step 0
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    assert load_checkpoint(out / "checkpoints" / "ckpt-00000004.pt")["step"] == 4
    for name, data in files.items():  # moved aside intact, out of reach of pruning
        assert (out / "unreadable" / name).read_bytes() == data, name
    EngineTestMethod.trace = []
    assert main([*args, "train.resume=fresh"]) == 0  # the same command again (a requeue)
    assert EngineTestMethod.trace == []  # resumed at step 4 of 4: its progress was kept


def test_resume_skips_newer_unreadable_checkpoint_and_pruning_keeps_the_new_one(
    tiny_npz, tmp_path, caplog
):
    out, extra = tmp_path / "run", {"train.keep_last": 1}
    run(config(tiny_npz, out, **{"train.keep_last": 3}))
    ckpt = out / "checkpoints"
    (ckpt / "ckpt-00000004.pt").unlink()
    garbage = b"half a copy"
    (ckpt / "ckpt-00000006.pt").write_bytes(garbage)
    EngineTestMethod.trace = []
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        run(config(tiny_npz, out, **extra))
    assert [s for s, _, _ in EngineTestMethod.trace] == [2, 3]  # resumed from ckpt-2
    assert any("ckpt-00000006.pt" in r.getMessage() for r in caplog.records)
    assert [s for s, _ in list_checkpoints(ckpt)] == [4, 6]  # keep_last=1 kept the new one
    assert load_checkpoint(ckpt / "ckpt-00000004.pt")["step"] == 4
    assert (ckpt / "ckpt-00000006.pt").read_bytes() == garbage


def test_pruning_only_removes_checkpoints_older_than_the_one_written(tmp_path):
    d = tmp_path / "ck"
    files = _unreadable_checkpoints(d, tmp_path / "scratch")
    for step in (2, 4):
        save_checkpoint({"format": 1, "step": step}, d, step, keep_last=3)
    assert [s for s, _ in list_checkpoints(d)] == [2, 4, 50, 60, 70]
    save_checkpoint({"format": 1, "step": 6}, d, 6, keep_last=2)
    assert [s for s, _ in list_checkpoints(d)] == [4, 6, 50, 60, 70]
    save_checkpoint({"format": 1, "step": 8}, d, 8, keep_last=1)
    assert [s for s, _ in list_checkpoints(d)] == [8, 50, 60, 70]
    for name, data in files.items():
        assert (d / name).read_bytes() == data
    path, state = load_newest(d)
    assert path.name == "ckpt-00000008.pt" and state["step"] == 8


def test_resume_refuses_another_methods_checkpoint_and_unknown_modes(tiny_npz, tmp_path, capsys):
    d = tmp_path / "run" / "checkpoints"
    save_checkpoint({"format": 1, "step": 3, "method": "mae"}, d, 3, keep_last=0)
    with pytest.raises(ResumeRefused, match="ckpt-00000003.pt was written by method 'mae'"):
        choose_resume(d, "fresh", "engine_test")
    assert choose_resume(d, "auto", "mae")[1]["step"] == 3
    assert main(overrides(tiny_npz, tmp_path / "x", **{"train.resume": "never"})) == 2
    assert "train.resume must be one of" in capsys.readouterr().err


def test_distributed_environment_detection(monkeypatch):
    for var in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SUBMITIT_EXECUTOR",
        "SLURM_PROCID",
        "SLURM_STEP_ID",
        "SLURM_STEPID",
        "SLURM_JOB_ID",
        "SLURM_NTASKS",
    ):
        monkeypatch.delenv(var, raising=False)
    assert du.detect_env() == du.DistEnv()
    monkeypatch.setenv("SLURM_PROCID", "0")  # inside a batch script, not an srun step: one process
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert du.detect_env().world_size == 1
    for k, v in dict(
        SLURM_STEP_ID="0",
        SLURM_PROCID="5",
        SLURM_LOCALID="1",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpu[03-04]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NODEID="1",
    ).items():
        monkeypatch.setenv(k, v)
    slurm = du.detect_env()
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr, slurm.source) == (
        5,
        8,
        1,
        "gpu03",
        "slurm",
    )
    assert 20000 <= slurm.master_port <= 32767 and slurm.master_port == du.detect_env().master_port
    for k, v in dict(
        RANK="3", WORLD_SIZE="4", LOCAL_RANK="3", MASTER_ADDR="10.0.0.1", MASTER_PORT="1234"
    ).items():
        monkeypatch.setenv(k, v)
    torchrun = du.detect_env()  # torchrun's variables win over SLURM's
    assert (
        torchrun.rank,
        torchrun.world_size,
        torchrun.master_addr,
        torchrun.master_port,
        torchrun.source,
    ) == (
        3,
        4,
        "10.0.0.1",
        1234,
        "env",
    )
    assert du.rank_seed(0, 0) != du.rank_seed(0, 1)


def _rank0_wait_worker(rank: int, port: int, rank0_dies: bool, result_dir: str) -> None:
    import time
    from datetime import timedelta

    os.environ.update(RANK=str(rank), WORLD_SIZE="3", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    du.init_distributed(du.detect_env(), torch.device("cpu"), "gloo")
    if rank == 0:
        time.sleep(1.0)
        if rank0_dies:
            os._exit(3)  # as a killed or crashed rank 0: no word to anyone
    start = time.monotonic()
    try:
        du.wait_for_rank0("phase one", timedelta(hours=1))
        outcome = "released"
    except Exception:  # the store's connection closed
        outcome = "failed"
    seconds = time.monotonic() - start
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps([outcome, seconds]))
    du.cleanup_distributed()


@pytest.mark.parametrize("rank0_dies", [False, True])
def test_other_ranks_wait_for_rank0_and_fail_at_once_when_it_dies(tmp_path, rank0_dies):
    """The curation global job's ranks wait hours for rank 0 through the store: released when it
    announces, failing within seconds (not after the hour's timeout) when it dies."""
    ctx = mp.get_context("spawn")
    port = free_ports(1)[0]
    procs = [
        ctx.Process(target=_rank0_wait_worker, args=(r, port, rank0_dies, str(tmp_path)))
        for r in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert not any(p.is_alive() for p in procs), "a rank is still waiting"
    for p in procs:
        p.kill()
    got = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (1, 2)}
    for outcome, seconds in got.values():
        assert outcome == ("failed" if rank0_dies else "released")
        assert seconds < 60
    assert procs[0].exitcode == (3 if rank0_dies else 0)


def test_metrics_are_strict_json_lines(tiny_npz, tmp_path):
    EngineTestMethod.nan_steps = {0}
    out = tmp_path / "json"
    run(config(tiny_npz, out, **{"optim.max_steps": 2}))
    records = [
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [1, 2]  # train.log_every=1: one line per step
    # the skipped step's NaN loss is left out of the means, not written as a NaN constant
    assert "loss" not in records[0] and records[0]["nan_skipped"] == 1
    assert isinstance(records[1]["loss"], float) and records[1]["nan_skipped"] == 1
