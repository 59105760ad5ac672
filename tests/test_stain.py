"""Stain normalisation (pretrain.transforms.StainNormalize, torchstain) and its eval option."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import rgb2lab

from eval.__main__ import main as eval_main
from pretrain.transforms import StainNormalize


def _tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0


def _rgb(t: torch.Tensor) -> np.ndarray:
    return (t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def ihc(medssl_data) -> np.ndarray:
    return np.asarray(Image.open(medssl_data / "images" / "ihc.png").convert("RGB"))


def _restain(rgb: np.ndarray, factor: float) -> np.ndarray:
    """The same tissue with `factor` times the stain: optical density scaled (Beer-Lambert)."""
    od = -np.log((rgb.astype(np.float64) + 1) / 256)
    return np.clip(256 * np.exp(-od * factor) - 1, 0, 255).astype(np.uint8)


def test_reinhard_matches_the_reference_lab_statistics(ihc):
    reference, tile = ihc[:256, :256], _restain(ihc[256:, 256:], 1.6)
    out = _rgb(StainNormalize("reinhard", reference)(_tensor(tile)))
    ref_lab, out_lab = rgb2lab(reference), rgb2lab(out)
    for c in range(3):  # mean and spread per LAB channel, as Reinhard et al. transfer them
        assert abs(out_lab[..., c].mean() - ref_lab[..., c].mean()) < 2.0
        assert abs(out_lab[..., c].std() - ref_lab[..., c].std()) < 2.0


def test_macenko_undoes_a_stain_change(ihc):
    original = ihc[:256, :256]
    darker = _restain(original, 1.8)
    out = _rgb(StainNormalize("macenko", original)(_tensor(darker)))
    before = np.abs(darker.astype(float) - original).mean()
    after = np.abs(out.astype(float) - original).mean()
    assert after < 0.5 * before, (before, after)


def test_flat_tiles_pass_through_and_are_counted(ihc):
    for method in ("macenko", "reinhard"):
        norm = StainNormalize(method, ihc)
        white = torch.ones(3, 32, 32)
        assert torch.equal(norm(white), white) and norm.failures == 1
        gray = torch.rand(1, 32, 32)
        assert torch.equal(norm(gray), gray)  # not RGB: untouched


def test_eval_refuses_stain_norm_without_reference(medssl_data, tmp_path, capsys):
    npz = medssl_data / "breastmnist.npz"
    args = ["knn", "--backbone", "raw", "--train", f"{npz}:train", "--test", f"{npz}:test"]
    code = eval_main([*args, "--out", str(tmp_path / "o"), "stain_norm.method=macenko"])
    assert code == 2 and "stain_norm.reference" in capsys.readouterr().err
