"""Shared fixtures. Real data comes from $MEDSSL_DATA (default ../shared/data) and its absence fails
loudly: a silently skipped data test is a test that cannot fail."""

from __future__ import annotations

import os
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


class StopRun(Exception):
    """TEST-ONLY: leave a run at a given step, as a preemption would."""


def run_interrupted(cfg, method_cls: type, stop_step: int, monkeypatch) -> None:
    """Run `cfg` until step `stop_step` begins and die there (as a kill would; the checkpoints
    written so far stay), then restore the method for the resumed run."""
    from pretrain.train import run

    original = method_cls.forward_loss

    def stop(self, batch, state):
        if state.step == stop_step:
            raise StopRun
        return original(self, batch, state)

    monkeypatch.setattr(method_cls, "forward_loss", stop)
    with pytest.raises(StopRun):
        run(cfg)
    monkeypatch.setattr(method_cls, "forward_loss", original)
