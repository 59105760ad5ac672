"""`python -m launch.demo_data DIR`: make sure the data `make demo` reads is in DIR before any job starts.

The demo ingests `DIR/pneumoniamnist.npz` (MedMNIST v2, CC BY 4.0) and the DICOM files in `DIR/dicom`.
A missing MedMNIST file is downloaded with the `medmnist` package when it is installed and the machine
is online; otherwise the demo stops here and says what to do, instead of failing inside a queued job.
Exit codes: 0 ready, 2 something is missing and could not be fetched.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

MEDMNIST_FLAGS = {"pneumoniamnist": "PneumoniaMNIST"}  # file stem -> medmnist dataset class


class DemoDataError(RuntimeError):
    """Demo data that is missing and could not be fetched."""


def ensure_medmnist(root: Path, flag: str) -> Path:
    """`root/<flag>.npz`, downloaded through `medmnist` (28 px, all splits) when absent."""
    path = root / f"{flag}.npz"
    if path.is_file():
        return path
    try:
        medmnist = importlib.import_module("medmnist")
    except ImportError as exc:
        raise DemoDataError(
            f"{path} is missing and the `medmnist` package is not installed: run "
            f"`.venv/bin/pip install medmnist` (then `make demo` downloads it), or set MEDSSL_DATA to "
            f"a folder that holds {path.name}"
        ) from exc
    root.mkdir(parents=True, exist_ok=True)
    try:  # one call fetches the file that holds every split
        getattr(medmnist, MEDMNIST_FLAGS[flag])(
            split="train", download=True, root=str(root), size=28
        )
    except Exception as exc:  # network errors come in many types, from several libraries
        raise DemoDataError(
            f"{path} is missing and downloading it with medmnist failed ({type(exc).__name__}: "
            f"{exc}); this machine may be offline: copy {path.name} into {root}"
        ) from exc
    if not path.is_file():
        raise DemoDataError(f"medmnist reported success but {path} is not there")
    logger.info("downloaded %s", path)
    return path


def check_demo_data(root: Path) -> None:
    """Raise DemoDataError naming every missing input, after fetching what can be fetched."""
    problems = []
    for flag in MEDMNIST_FLAGS:
        try:
            ensure_medmnist(root, flag)
        except DemoDataError as exc:
            problems.append(str(exc))
    dicom = root / "dicom"
    if not dicom.is_dir() or not any(dicom.iterdir()):
        problems.append(
            f"{dicom} is missing or empty: put a few DICOM files there (pydicom's sample files, "
            "e.g. `python -c 'import pydicom.data as d; print(d.get_testdata_file(\"CT_small.dcm\"))'`)"
        )
    if problems:
        raise DemoDataError("demo data not ready:\n  " + "\n  ".join(problems))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m launch.demo_data DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_demo_data(Path(args[0]))
    except DemoDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"demo data ready in {args[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
