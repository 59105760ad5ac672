"""Shared fixtures. Real data comes from $MEDSSL_DATA (default ../shared/data) and its absence fails
loudly: a silently skipped data test is a test that cannot fail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    root = Path(os.environ.get("MEDSSL_DATA", REPO.parent / "shared" / "data"))
    if not (root / "SOURCES.md").is_file():
        raise RuntimeError(
            f"MEDSSL_DATA={root} does not hold the shared test data (no SOURCES.md). "
            "Set MEDSSL_DATA to the folder with the MedMNIST .npz, dicom/ and images/."
        )
    return root


@pytest.fixture(scope="session")
def medssl_data() -> Path:
    return data_root()


@pytest.fixture(scope="session", autouse=True)
def private_user_config(tmp_path_factory):
    """The per-user site key is made in a test-owned config folder, never the developer's own
    (subprocesses inherit it); tests that need a known key set $MEDSSL_PATIENT_SALT."""
    old = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("user-config"))
    os.environ.pop("MEDSSL_PATIENT_SALT", None)
    yield
    if old is None:
        os.environ.pop("XDG_CONFIG_HOME", None)
    else:
        os.environ["XDG_CONFIG_HOME"] = old


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids oversubscription stalls.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ramp_npz(tmp_path_factory) -> Path:
    """24 train 16x16 gray images with structure (a ramp plus noise) so that patches differ."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "ramp.npz"
    ramp = np.linspace(0, 200, 16)[None, :] + rng.integers(0, 50, size=(24, 16, 16))
    labels = (np.arange(24) % 2)[:, None].astype(np.int64)
    np.savez(path, train_images=ramp.astype(np.uint8), train_labels=labels)
    return path


# The shared shape of the suite's 4-step runs on 16 px images (tests add their method's keys).
TINY_RUN = {
    "data.batch_size": 8,
    "data.num_workers": 0,
    "data.channels": 1,
    "model.arch": "vit_tiny",
    "model.patch_size": 4,
    "model.img_size": 16,
    "model.in_chans": 1,
    "optim.max_steps": 4,
    "optim.warmup_steps": 1,
    "train.precision": "fp32",
    "train.checkpoint_every": 2,
    "train.log_every": 1,
    "train.progress": False,
    "monitor.plot": False,
}


def tiny_run_config(method: str, npz, out, **overrides):
    """The composed and validated config of a 4-step `method` run on `npz` (TINY_RUN + overrides)."""
    from pretrain.config import compose_config
    from pretrain.validation import validate

    items = {"method": method, "output_dir": str(out), "data.train": f"{npz}:train", **TINY_RUN}
    items.update(overrides)
    cfg = compose_config(None, [f"{k}={v}" for k, v in items.items()])
    validate(cfg)
    return cfg


_KILL_CHILD = """
import importlib, os, signal, sys
import torch
torch.set_num_threads(int(sys.argv[4]))
module, name, step = sys.argv[1].rsplit(".", 1) + [int(sys.argv[2])]
method = getattr(importlib.import_module(module), name)
forward_loss = method.forward_loss
def forward_or_die(self, batch, state):
    if state.step == step:
        os.kill(os.getpid(), signal.SIGKILL)  # a real, unannounced death mid-run
    return forward_loss(self, batch, state)
method.forward_loss = forward_or_die
from pretrain.__main__ import main
sys.exit(main(["--config", sys.argv[3]]))
"""


def run_killed(cfg, method_cls: type, kill_step: int) -> None:
    """Run `cfg` as `python -m pretrain` in a child process that SIGKILLs itself when step
    `kill_step` begins (the checkpoints written so far stay), with this process's thread count
    so that its arithmetic is the same as an in-process run's."""
    from omegaconf import OmegaConf

    recipe = Path(cfg.output_dir).parent / f"{Path(cfg.output_dir).name}-config.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, recipe)
    target = f"{method_cls.__module__}.{method_cls.__qualname__}"
    args = [target, str(kill_step), str(recipe), str(torch.get_num_threads())]
    result = subprocess.run(
        [sys.executable, "-c", _KILL_CHILD, *args],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
