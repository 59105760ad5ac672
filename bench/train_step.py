"""Throughput of one training step of each method: images/s, model FLOP/s and MFU, fp32 and bf16.

Measured in one run, on synthetic batches shaped like what each method's loader yields:
  1. the machine's matmul peak: large square torch.mm in fp32 and bf16 (the MFU denominator);
  2. `dinov2`: `pretrain.engine.Engine.train_step` with the dinov2 method (DINO + iBOT + KoLeo,
     EMA teacher, AdamW, grad clipping) on 2 global + n local crops per image, exactly what
     `python -m pretrain` runs per batch; `dinov2_fsdp`: the same step with `dist.fsdp=true` in a
     process group of one rank (FSDP2's wrapping, gathers and sharded optimizer, nothing sharded;
     its blocks take the crop sizes one after the other, as FSDP gathers a block in its forward);
  3. `timm`: a bare timm ViT fwd+bwd on the DINOv2 global-crop batch (the backbone alone);
  4. `lightly`: lightly's DINO pieces side by side (lightly.loss.DINOLoss + DINOProjectionHead on
     the same timm ViT, EMA teacher, one forward per view as in lightly's examples), when
     `import lightly` works;
  5. `mae`: the engine step of pretrain/configs/mae_vitb16.yaml (ViT-B/16 at 224, mask 0.75,
     decoder 8 x 512, norm_pix_loss, AdamW), one image per sample;
  6. `simclr`: the engine step of pretrain/configs/simclr_resnet50.yaml (ResNet-50 at 224, two
     views, 3-layer projection head with BN, NT-Xent, LARS).
`--recipe dinov2_vits14` (any DINOv2 recipe in pretrain/configs, or a path) takes the backbone, crop
sizes, prototypes and per-GPU batch from that recipe for dinov2, timm and lightly alike (explicit
options still win), and every other setting of the dinov2 step from the recipe too. On CUDA each row
also reports the step's peak GPU memory (torch.cuda.max_memory_allocated).
The method workloads build the recipe's merged config (default + method defaults + recipe) and go
through build_method/Engine, so what is timed is the code a real run executes; only sizes,
the schedule length and the precision are overridden. images/s counts source images (a DINOv2
image is 2 + n crops, a SimCLR image 2 views). Model FLOPs are counted once per workload with
torch.utils.flop_counter (matmuls, convolutions, attention; forward + backward + teacher forward)
and divided by the measured step time. A precision whose measured matmul peak would make one step
take longer than --max-step-seconds is reported as skipped (e.g. bf16 on CPUs without native
bf16 matmul support). Every workload of a precision is built and warmed up first (--warmup steps:
the first ones of a run allocate and are slower), then timed in --rounds rounds, round robin, of
--steps steps each; a row's figures are the median over rounds, and the ratios printed last
(medssl/lightly images/s, medssl's MFU over the bare timm fwd+bwd's) the median of the per-round
ratios, so that a slow spell of a shared machine falls on both sides of a ratio.

    .venv/bin/python bench/train_step.py                      # the recipes' models at 224, batch 16
    .venv/bin/python bench/train_step.py --quick              # small models/images: minutes on a CPU
    .venv/bin/python bench/train_step.py --mae-batch 128 --simclr-batch 256   # on a GPU
    bash bench/gpu_step.sh        # issue 17 item 5: the ViT-S/14 and ViT-B/14 recipes on one GPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import statistics
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

from pretrain.backbones import build_backbone  # noqa: E402
from pretrain.config import PRETRAIN_CONFIG_DIR as CONFIG_DIR  # noqa: E402
from pretrain.config import compose_config  # noqa: E402
from pretrain.engine import Engine  # noqa: E402

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# --max-step-seconds guesses a step at this fraction of the peak (bf16 on this CPU: 10-35 %)
ASSUMED_MFU = 0.2
WORKLOADS = ("dinov2", "dinov2_fsdp", "timm", "lightly", "mae", "simclr")
DEFAULT_WORKLOADS = ("dinov2", "timm", "lightly", "mae", "simclr")
# --quick: defaults small enough for a 2-core CPU (explicit options still win)
QUICK = {
    "batch": 2,
    "steps": 2,
    "global_size": 112,
    "local_size": 48,
    "n_local": 2,
    "prototypes": 4096,
    "mae_arch": "vit_small",
    "mae_size": 112,
    "simclr_arch": "resnet18",
    "simclr_size": 112,
    "max_step_seconds": 60.0,
}

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
    """FLOP/s of the fastest square mm (n <= 8192) over the operand layouts a@b, a@b.T, a.T@b.

    CPU kernels differ by layout (bf16 without native units: a.T@b ~10x faster than a@b), and a
    model's linears and their backward use all three, so the peak is the best of them. A layout
    stops growing once one product takes longer than budget_s / 16.
    """
    layouts = {"nn": lambda a, b: a @ b, "nt": lambda a, b: a @ b.t(), "tn": lambda a, b: a.t() @ b}
    n, best = 256, 0.0
    while layouts and n <= 8192:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for name, product in list(layouts.items()):
            product(a, b)
            sync(device)
            start = time.perf_counter()
            reps = 0
            while time.perf_counter() - start < budget_s / 12 or reps < 1:
                product(a, b)
                reps += 1
                sync(device)
            elapsed = time.perf_counter() - start
            best = max(best, 2 * n**3 * reps / elapsed)
            if elapsed / reps > budget_s / 16:
                del layouts[name]
        n *= 2
    return best


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


def engine_step(
    args: argparse.Namespace,
    recipe: Path | None,
    overrides: list[str],
    batch: object,
    precision: str,
    device: torch.device,
    out_dir: str,
) -> Callable[[], None]:
    """`Engine.train_step` on a fixed batch, for the recipe's merged config + overrides."""
    common = [
        "data.train=synthetic",
        f"output_dir={out_dir}",
        f"optim.max_steps={args.warmup + args.steps + 1}",
        "optim.warmup_steps=0",
        f"train.precision={precision}",
        f"train.device={device.type}",
    ]
    engine = Engine(compose_config(recipe, common + overrides), device=device, steps_per_epoch=1000)
    return lambda: engine.train_step(batch)


def recipe_path(name: str) -> Path:
    path = Path(name)
    if path.suffix != ".yaml":
        path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"--recipe {name}: no such recipe ({path})")
    return path


def recipe_defaults(name: str) -> dict:
    """The sizes a DINOv2 recipe trains with, as this script's option defaults."""
    cfg = compose_config(recipe_path(name), ["data.train=synthetic", "output_dir=unused"])
    if str(cfg.method) != "dinov2":
        raise SystemExit(f"--recipe {name}: method {cfg.method}, not dinov2")
    crops = cfg.dinov2.crops
    return {
        "arch": str(cfg.model.arch),
        "patch": int(cfg.model.patch_size),
        "global_size": int(crops.global_crops_size),
        "local_size": int(crops.local_crops_size),
        "n_local": int(crops.local_crops_number),
        "prototypes": int(cfg.dinov2.dino.head_n_prototypes),
        "batch": int(cfg.data.batch_size),
    }


def one_process_group(device: torch.device, out_dir: str) -> None:
    """A process group of world size 1, which FSDP needs even when it shards nothing."""
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=f"file://{os.path.join(out_dir, 'process-group')}",
            rank=0,
            world_size=1,
        )


def dinov2_step(
    args: argparse.Namespace,
    precision: str,
    device: torch.device,
    out_dir: str,
    fsdp: bool = False,
):
    overrides = [
        "method=dinov2",
        f"data.batch_size={args.batch}",
        f"model.arch={args.arch}",
        f"model.patch_size={args.patch}",
        f"model.img_size={args.global_size}",
        "model.in_chans=3",
        "data.channels=3",
        f"dinov2.crops.global_crops_size={args.global_size}",
        f"dinov2.crops.local_crops_size={args.local_size}",
        f"dinov2.crops.local_crops_number={args.n_local}",
        f"dinov2.dino.head_n_prototypes={args.prototypes}",
    ]
    if args.recipe is None:  # DINOv2's ViT settings; a recipe brings its own
        overrides += ["model.layerscale=1e-5", "model.drop_path_rate=0.1"]
    if fsdp:
        one_process_group(device, out_dir)
        overrides.append("dist.fsdp=true")
    recipe = recipe_path(args.recipe) if args.recipe else None
    batch = multicrop_batch(args, device)
    return engine_step(args, recipe, overrides, batch, precision, device, out_dir)


def mae_step(args: argparse.Namespace, precision: str, device: torch.device, out_dir: str):
    """MAE recipe: what its loader yields is (B x C x H x W images, labels)."""
    b, size = args.mae_batch, args.mae_size
    overrides = [
        f"data.batch_size={b}",
        f"model.arch={args.mae_arch}",
        f"model.patch_size={args.mae_patch}",
        f"model.img_size={size}",
    ]
    batch = (torch.randn(b, 3, size, size, device=device), torch.zeros(b, dtype=torch.long))
    recipe = CONFIG_DIR / "mae_vitb16.yaml"
    return engine_step(args, recipe, overrides, batch, precision, device, out_dir)


def simclr_step(args: argparse.Namespace, precision: str, device: torch.device, out_dir: str):
    """SimCLR recipe: what its loader yields is ([view1, view2], labels)."""
    b, size = args.simclr_batch, args.simclr_size
    overrides = [f"data.batch_size={b}", f"model.arch={args.simclr_arch}", f"model.img_size={size}"]
    views = [torch.randn(b, 3, size, size, device=device) for _ in range(2)]
    batch = (views, torch.zeros(b, dtype=torch.long))
    recipe = CONFIG_DIR / "simclr_resnet50.yaml"
    return engine_step(args, recipe, overrides, batch, precision, device, out_dir)


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
                {
                    "arch": args.arch,
                    "patch_size": args.patch,
                    "img_size": args.global_size,
                    "in_chans": 3,
                    "layerscale": 1e-5,
                    "drop_path_rate": 0.1,
                }
            )
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


def prepare(
    name: str,
    batch: int,
    make: Callable[[], Callable[[], None]],
    precision: str,
    args,
    device,
    peaks: dict[str, float],
    flops_cache: dict[str, int],
    flops_key: str,
) -> tuple[dict, Callable[[], None] | None]:
    """Build one workload's step, count its FLOPs and warm it up: (its row, the step), or (the row
    saying why it is skipped, None). `flops_key`: workloads that compute the same model share one
    FLOP count. On CUDA the row's peak memory is that of its warmup steps, less what the workloads
    built before it hold."""
    row: dict = {"workload": name, "precision": precision, "batch": batch}
    flops = flops_cache.get(flops_key)
    if flops is not None:
        estimate = flops / (peaks[precision] * ASSUMED_MFU)
        if estimate > args.max_step_seconds:
            row["skipped"] = (
                f"{precision} matmul peak {peaks[precision] / 1e9:.1f} GFLOP/s: one step would take "
                f"~{estimate / 60:.0f} min (> --max-step-seconds {args.max_step_seconds:.0f})"
            )
            return row, None
    resident = 0
    if device.type == "cuda":
        resident = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    step = make()
    if flops is None:  # the first (warmup) step is counted
        flops = count_flops(step)
        flops_cache[flops_key] = flops
        warmup = args.warmup - 1
    else:
        warmup = args.warmup
    for _ in range(warmup):
        step()
    row["flops"] = flops
    row["round_step_s"] = []
    if device.type == "cuda":
        row["peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) - resident) / 2**30
    return row, step


def finish(row: dict, peaks: dict[str, float]) -> dict:
    """The row's figures from the median of its rounds' seconds per step."""
    seconds = statistics.median(row["round_step_s"])
    flops = row.pop("flops")
    flop_s = flops / seconds
    row.update(
        images_per_s=row["batch"] / seconds,
        step_s=seconds,
        gflop_per_image=flops / row["batch"] / 1e9,
        model_tflop_s=flop_s / 1e12,
        mfu=flop_s / peaks[row["precision"]],
    )
    return row


def per_round_ratio(ours: dict, other: dict) -> float:
    """Median over rounds of ours / other in images/s: each round times every workload back to
    back, so a slow spell of the machine hits both sides of the ratio."""
    return statistics.median(
        (ours["batch"] / a) / (other["batch"] / b)
        for a, b in zip(ours["round_step_s"], other["round_step_s"], strict=True)
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=f"small sizes for a CPU: {QUICK}")
    p.add_argument(
        "--recipe",
        default=None,
        help="a DINOv2 recipe (pretrain/configs name or path): its sizes and settings",
    )
    p.add_argument("--batch", type=int, default=16, help="images per step (0 in --*-batch: this)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per workload and round")
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (the first counts FLOPs)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="times each workload's --steps steps once per round, round robin; figures are "
        "medians over the rounds",
    )
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS), help=f"any of {WORKLOADS}")
    p.add_argument("--arch", default="vit_small", help="dinov2/timm/lightly backbone")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--n-local", type=int, default=8)
    p.add_argument("--prototypes", type=int, default=65536)
    p.add_argument("--mae-arch", default="vit_base")
    p.add_argument("--mae-patch", type=int, default=16)
    p.add_argument("--mae-size", type=int, default=224)
    p.add_argument("--mae-batch", type=int, default=0)
    p.add_argument("--simclr-arch", default="resnet50")
    p.add_argument("--simclr-size", type=int, default=224)
    p.add_argument("--simclr-batch", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--max-step-seconds", type=float, default=600.0)
    known = p.parse_known_args(argv)[0]
    if known.quick:
        p.set_defaults(**QUICK)
    if known.recipe:
        p.set_defaults(**recipe_defaults(known.recipe))
    args = p.parse_args(argv)
    if min(args.steps, args.rounds) < 1 or args.warmup < 1:
        p.error("--steps and --rounds must be >= 1, --warmup >= 1 (it counts the FLOPs)")
    args.mae_batch = args.mae_batch or args.batch
    args.simclr_batch = args.simclr_batch or args.batch
    wanted = ["dinov2" if w == "ours" else w for w in args.workloads.split(",") if w]
    unknown = sorted(set(wanted) - set(WORKLOADS))
    if unknown:
        p.error(f"--workloads: unknown {unknown}; choose from {WORKLOADS}")
    args.wanted = wanted
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
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
    print(
        json.dumps(
            {
                "device": str(device),
                "threads": torch.get_num_threads(),
                **{f"matmul_peak_{k}_tflop_s": v / 1e12 for k, v in peaks.items()},
            }
        )
    )
    wanted = args.wanted
    has_lightly = False
    if "lightly" in wanted:
        try:
            import lightly  # noqa: F401

            has_lightly = True
        except ImportError as exc:
            print(json.dumps({"workload": "lightly", "skipped": f"import lightly failed: {exc}"}))
    rows, flops_cache = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        for precision in precisions:
            # (workload, table name, images per step, builder of the step closure)
            makers: list[tuple[str, str, int, Callable]] = [
                (
                    "dinov2",
                    "medssl_dinov2",
                    args.batch,
                    lambda pr=precision: dinov2_step(args, pr, device, tmp),
                ),
                (
                    "dinov2_fsdp",
                    "medssl_dinov2_fsdp",
                    args.batch,
                    lambda pr=precision: dinov2_step(args, pr, device, tmp, fsdp=True),
                ),
                (
                    "timm",
                    "timm_vit_fwd_bwd",
                    args.batch,
                    lambda pr=precision: timm_step(args, pr, device),
                ),
                (
                    "lightly",
                    "lightly_dino",
                    args.batch,
                    lambda pr=precision: lightly_step(args, pr, device),
                ),
                (
                    "mae",
                    f"medssl_mae_{args.mae_arch}",
                    args.mae_batch,
                    lambda pr=precision: mae_step(args, pr, device, tmp),
                ),
                (
                    "simclr",
                    f"medssl_simclr_{args.simclr_arch}",
                    args.simclr_batch,
                    lambda pr=precision: simclr_step(args, pr, device, tmp),
                ),
            ]
            live: list[tuple[dict, Callable[[], None]]] = []
            for key, name, batch, make in makers:
                if key not in wanted or (key == "lightly" and not has_lightly):
                    continue
                flops_key = "dinov2" if key == "dinov2_fsdp" else key
                row, step = prepare(
                    name, batch, make, precision, args, device, peaks, flops_cache, flops_key
                )
                rows.append(row)
                if step is None:
                    print(json.dumps(row), flush=True)
                else:
                    live.append((row, step))
            for _ in range(args.rounds):  # round robin: each round times every workload
                for row, step in live:
                    row["round_step_s"].append(time_steps(step, args.steps, device))
            for row, _ in live:
                print(json.dumps(finish(row, peaks)), flush=True)
            live.clear()
            gc.collect()  # free this precision's models before the next one
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'workload':<24} {'prec':<5} {'img/s':>8} {'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU':>7}"
        f" {'peak GiB':>9}"
    )
    for r in rows:
        if "skipped" in r:
            print(f"{r['workload']:<24} {r['precision']:<5} skipped: {r['skipped']}")
            continue
        peak = f"{r['peak_mem_gib']:>9.2f}" if "peak_mem_gib" in r else f"{'-':>9}"
        print(
            f"{r['workload']:<24} {r['precision']:<5} {r['images_per_s']:>8.2f} "
            f"{r['gflop_per_image']:>10.1f} {r['model_tflop_s']:>8.3f} {100 * r['mfu']:>6.1f}% "
            f"{peak}"
        )

    def by_precision(workload: str) -> dict[str, dict]:
        return {r["precision"]: r for r in rows if r["workload"] == workload and "mfu" in r}

    ours, lite, timm = (
        by_precision(w) for w in ("medssl_dinov2", "lightly_dino", "timm_vit_fwd_bwd")
    )
    for precision, row in ours.items():
        rounds = len(row["round_step_s"])
        if precision in lite:
            ratio = per_round_ratio(row, lite[precision])
            print(
                f"{precision}: medssl/lightly images/s = {ratio:.2f}x (median of {rounds} rounds)"
            )
        if precision in timm:
            flops = row["gflop_per_image"] / timm[precision]["gflop_per_image"]
            ratio = per_round_ratio(row, timm[precision]) * flops
            print(
                f"{precision}: medssl MFU / timm fwd+bwd MFU = {ratio:.2f} (median of {rounds} rounds)"
            )


if __name__ == "__main__":
    main()
