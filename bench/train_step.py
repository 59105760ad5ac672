"""Throughput of one DINOv2 training step: images/s, model FLOP/s and MFU, fp32 and bf16 together.

Measured in one run, on synthetic multi-crop batches (2 global + n local crops per image):
  1. the machine's matmul peak: large square torch.mm in fp32 and bf16 (the MFU denominator);
  2. a bare timm ViT fwd+bwd on the global-crop batch (what the backbone alone reaches);
  3. our step: `pretrain.engine.Engine.train_step` with the dinov2 method (DINO + iBOT + KoLeo,
     EMA teacher, AdamW, grad clipping), exactly what `python -m pretrain` runs per batch;
  4. lightly's DINO pieces side by side (lightly.loss.DINOLoss + DINOProjectionHead on the same
     timm ViT, EMA teacher, one forward per view as in lightly's examples), when `import lightly`
     works.
Model FLOPs are counted once per workload with torch.utils.flop_counter (matmuls, convolutions,
attention; forward + backward + teacher forward) and divided by the measured step time.
A precision whose measured matmul peak would make one step take longer than --max-step-seconds
is reported as skipped (e.g. bf16 on CPUs without native bf16 matmul support).

    .venv/bin/python bench/train_step.py                      # ViT-S/16, 2x224 + 8x96, batch 16
    .venv/bin/python bench/train_step.py --batch 4 --steps 2  # quicker
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.__main__ import compose_config  # noqa: E402
from pretrain.backbones import build_backbone  # noqa: E402
from pretrain.engine import Engine  # noqa: E402

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# PyTorch's flop counter knows the CUDA attention kernels but not the CPU flash kernel timm uses.
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_CPU_SDPA_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
if _CPU_SDPA not in flop_registry:

    @register_flop_formula(_CPU_SDPA, get_raw=True)
    def _cpu_sdpa_flop(query, key, value, *args, out_val=None, **kwargs) -> int:
        return sdpa_flop_count(query.shape, key.shape, value.shape)

    @register_flop_formula(_CPU_SDPA_BWD, get_raw=True)
    def _cpu_sdpa_bwd_flop(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, budget_s: float = 2.0) -> float:
    """FLOP/s of the largest square mm (<= 8192) that runs in about budget_s."""
    n, best = 256, 0.0
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        sync(device)
        start = time.perf_counter()
        reps = 0
        while time.perf_counter() - start < budget_s / 4 or reps < 2:
            a @ b
            reps += 1
            sync(device)
        elapsed = time.perf_counter() - start
        best = max(best, 2 * n**3 * reps / elapsed)
        if elapsed / reps > budget_s / 8 or n >= 8192:
            return best
        n *= 2


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def count_flops(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def time_steps(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per step (mean over `steps` after the caller's warmup)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def multicrop_batch(args: argparse.Namespace, device: torch.device) -> tuple[dict, torch.Tensor]:
    """What the loader yields for dinov2: ({'global_crops': [2 x B..], 'local_crops': [n x B..]}, labels)."""
    g, lo, b = args.global_size, args.local_size, args.batch
    views = {
        "global_crops": [torch.randn(b, 3, g, g, device=device) for _ in range(2)],
        "local_crops": [torch.randn(b, 3, lo, lo, device=device) for _ in range(args.n_local)],
    }
    return views, torch.zeros(b, dtype=torch.long)


def our_step(args: argparse.Namespace, precision: str, device: torch.device, out_dir: str):
    n_steps = args.warmup + args.steps + 1
    overrides = [
        "method=dinov2", "data.train=synthetic", f"output_dir={out_dir}",
        f"data.batch_size={args.batch}", f"optim.max_steps={n_steps}", "optim.warmup_steps=0",
        f"model.arch={args.arch}", f"model.patch_size={args.patch}", f"model.img_size={args.global_size}",
        "model.in_chans=3", "data.channels=3", "model.layerscale=1e-5", "model.drop_path_rate=0.1",
        f"train.precision={precision}", f"train.device={device.type}",
        f"dinov2.crops.global_crops_size={args.global_size}",
        f"dinov2.crops.local_crops_size={args.local_size}",
        f"dinov2.crops.local_crops_number={args.n_local}",
        f"dinov2.dino.head_n_prototypes={args.prototypes}",
    ]  # fmt: skip
    cfg = compose_config(None, overrides)
    engine = Engine(cfg, device=device, steps_per_epoch=1000)
    batch = multicrop_batch(args, device)
    return (lambda: engine.train_step(batch)), engine


def timm_step(args: argparse.Namespace, precision: str, device: torch.device):
    """Bare backbone fwd+bwd on the 2B global crops (plain AdamW step excluded)."""
    model = build_backbone(
        {"arch": args.arch, "patch_size": args.patch, "img_size": args.global_size, "in_chans": 3}
    ).to(device)
    x = torch.randn(2 * args.batch, 3, args.global_size, args.global_size, device=device)

    def step() -> None:
        with autocast(device, precision):
            loss = model(x).float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def lightly_step(args: argparse.Namespace, precision: str, device: torch.device):
    """lightly's DINO building blocks as its examples use them: one forward per view."""
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import update_momentum

    class Student(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = build_backbone(
                {"arch": args.arch, "patch_size": args.patch, "img_size": args.global_size,
                 "in_chans": 3, "layerscale": 1e-5, "drop_path_rate": 0.1}
            )  # fmt: skip
            dim = self.backbone.num_features
            self.head = DINOProjectionHead(dim, 2048, 256, args.prototypes, freeze_last_layer=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

    student = Student().to(device)
    # lightly's head uses the old nn.utils.weight_norm, which deepcopy refuses: build a twin.
    teacher = Student().to(device).requires_grad_(False)
    teacher.load_state_dict(student.state_dict())
    criterion = DINOLoss(output_dim=args.prototypes).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.04)
    views, _ = multicrop_batch(args, device)
    global_views, all_views = views["global_crops"], views["global_crops"] + views["local_crops"]

    def step() -> None:
        with autocast(device, precision):
            with torch.no_grad():
                teacher_out = [teacher(v) for v in global_views]
            student_out = [student(v) for v in all_views]
            loss = criterion(teacher_out, student_out, teacher_temp=0.04)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 3.0)
        optimizer.step()
        update_momentum(student, teacher, m=0.996)

    return step


def measure(name: str, make: Callable[[], Callable[[], None]], precision: str, args, device,
            peaks: dict[str, float], flops_cache: dict[str, int]) -> dict:  # fmt: skip
    row: dict = {"workload": name, "precision": precision, "batch": args.batch}
    flops = flops_cache.get(name)
    if flops is not None:
        estimate = flops / (peaks[precision] * 0.5)
        if estimate > args.max_step_seconds:
            row["skipped"] = (
                f"{precision} matmul peak {peaks[precision] / 1e9:.1f} GFLOP/s: one step would take "
                f"~{estimate / 60:.0f} min (> --max-step-seconds {args.max_step_seconds:.0f})"
            )
            return row
    step = make()
    if flops is None:  # the first (warmup) step is counted
        flops = count_flops(step)
        flops_cache[name] = flops
        warmup = args.warmup - 1
    else:
        warmup = args.warmup
    for _ in range(max(0, warmup)):
        step()
    seconds = time_steps(step, args.steps, device)
    flop_s = flops / seconds
    row.update(
        images_per_s=args.batch / seconds,
        step_s=seconds,
        gflop_per_image=flops / args.batch / 1e9,
        model_tflop_s=flop_s / 1e12,
        mfu=flop_s / peaks[precision],
    )
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--batch", type=int, default=16, help="images per step (each gives 2 + n_local crops)"
    )
    p.add_argument("--steps", type=int, default=2, help="timed steps per workload")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed steps first (the first counts FLOPs)"
    )
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--n-local", type=int, default=8)
    p.add_argument("--prototypes", type=int, default=65536)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--max-step-seconds", type=float, default=600.0)
    p.add_argument("--workloads", default="ours,timm,lightly")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    precisions = [s for s in args.precisions.split(",") if s]
    peaks = {pr: matmul_peak(DTYPES[pr], device) for pr in DTYPES}
    print(json.dumps({"device": str(device), "threads": torch.get_num_threads(),
                      **{f"matmul_peak_{k}_tflop_s": v / 1e12 for k, v in peaks.items()}}))  # fmt: skip
    wanted = args.workloads.split(",")
    try:
        import lightly  # noqa: F401

        has_lightly = True
    except ImportError as exc:
        has_lightly = False
        print(json.dumps({"workload": "lightly", "skipped": f"import lightly failed: {exc}"}))
    rows, flops_cache = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        for precision in precisions:
            makers: list[tuple[str, Callable]] = []
            if "ours" in wanted:
                makers.append(
                    ("medssl_dinov2", lambda pr=precision: our_step(args, pr, device, tmp)[0])
                )
            if "timm" in wanted:
                makers.append(
                    ("timm_vit_fwd_bwd", lambda pr=precision: timm_step(args, pr, device))
                )
            if "lightly" in wanted and has_lightly:
                makers.append(("lightly_dino", lambda pr=precision: lightly_step(args, pr, device)))
            for name, make in makers:
                row = measure(name, make, precision, args, device, peaks, flops_cache)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(
        f"\n{'workload':<20} {'prec':<5} {'img/s':>8} {'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU':>7}"
    )
    for r in rows:
        if "skipped" in r:
            print(f"{r['workload']:<20} {r['precision']:<5} skipped: {r['skipped']}")
            continue
        print(
            f"{r['workload']:<20} {r['precision']:<5} {r['images_per_s']:>8.2f} "
            f"{r['gflop_per_image']:>10.1f} {r['model_tflop_s']:>8.3f} {100 * r['mfu']:>6.1f}%"
        )
    ours = {r["precision"]: r for r in rows if r["workload"] == "medssl_dinov2" and "mfu" in r}
    lite = {r["precision"]: r for r in rows if r["workload"] == "lightly_dino" and "mfu" in r}
    for precision in ours:
        if precision in lite:
            print(
                f"{precision}: medssl/lightly images/s = "
                f"{ours[precision]['images_per_s'] / lite[precision]['images_per_s']:.2f}x"
            )


if __name__ == "__main__":
    main()
