"""Shared fixtures. Real data comes from $MEDSSL_DATA (default ../shared/data) and its absence fails
loudly: a silently skipped data test is a test that cannot fail."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
