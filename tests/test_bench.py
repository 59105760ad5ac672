"""The benchmark scripts run (no timing is asserted): bench/train_step.py's recipe mode is what
bench/gpu_step.sh runs on a GPU machine, so a broken option must fail here first."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import train_step  # noqa: E402


@pytest.mark.parametrize(
    "recipe, arch, drop_path",
    [("dinov2_vits14", "vit_small", 0.1), ("dinov2_vitb14", "vit_base", 0.2)],
)
def test_recipe_mode_takes_the_gpu_recipes_sizes(recipe, arch, drop_path):
    """DINOv2's /14 models: 2 x 224 px global and 8 x 98 px local crops, 65,536 prototypes, 64
    images per GPU; explicit options still win over the recipe."""
    args = train_step.parse_args(["--recipe", recipe])
    got = (args.arch, args.patch, args.global_size, args.local_size, args.n_local)
    assert got == (arch, 14, 224, 98, 8)
    assert (args.prototypes, args.batch) == (65536, 64)
    assert train_step.parse_args(["--recipe", recipe, "--batch", "3"]).batch == 3
    cfg = train_step.compose_config(
        train_step.recipe_path(recipe), ["data.train=synthetic", "output_dir=unused"]
    )
    assert cfg.model.drop_path_rate == drop_path and cfg.train.precision == "bf16"


def test_recipe_mode_times_the_step_plain_and_under_fsdp(capsys):
    train_step.main(
        [
            "--recipe",
            "dinov2_vits14",
            "--global-size",
            "28",
            "--local-size",
            "14",
            "--n-local",
            "2",
            "--prototypes",
            "256",
            "--batch",
            "2",
            "--steps",
            "1",
            "--rounds",
            "2",
            "--precisions",
            "fp32",
            "--workloads",
            "dinov2,dinov2_fsdp",
            "--device",
            "cpu",
        ]
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line[:1] == "{"]
    steps = {r["workload"]: r for r in rows if "workload" in r}
    assert set(steps) == {"medssl_dinov2", "medssl_dinov2_fsdp"}
    for row in steps.values():
        assert row["images_per_s"] > 0 and 0 < row["mfu"] < 1
        assert len(row["round_step_s"]) == 2  # timed once per round, round robin
    assert not train_step.torch.distributed.is_initialized()  # the one-rank group is torn down


def test_recipe_mode_refuses_a_recipe_of_another_method():
    with pytest.raises(SystemExit, match="simclr_cpu: method simclr, not dinov2"):
        train_step.parse_args(["--recipe", "simclr_cpu"])
