"""`python -m curation COMMAND ...`: ingest raw images or tile slides into shards, preview, curate.

Each command module exposes `add_arguments(parser)`, `run(args) -> exit code` and optionally
USER_ERRORS (exceptions shown as one-line errors); adding a stage is one COMMANDS line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pretrain.config import ConfigError
from pretrain.privacy import PrivacyError

COMMANDS = {
    "ingest": ("curation.ingest", "raw images (DICOM, PNG/JPEG/TIFF/BMP, .npz) -> shards"),
    "tile": ("curation.tile", "whole-slide images -> tissue tiles at a fixed mpp -> shards"),
    "preview": ("curation.preview", "image grid + counts of a shard folder"),
    "run": (
        "curation.run",
        "pool shards -> deduplicated, decontaminated, retrieved/balanced shards",
    ),
}


def _usage() -> str:
    lines = [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "usage: python -m curation {" + ",".join(COMMANDS) + "} ...\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(_usage(), file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module_name, help_text = COMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"python -m curation {argv[0]}", description=help_text, fromfile_prefix_chars="@"
    )  # launch's private argument files
    module.add_arguments(parser)
    args = parser.parse_intermixed_args(argv[1:])  # `SRC --out D key=value` in any order
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(module.run(args))
    except (ConfigError, PrivacyError, *getattr(module, "USER_ERRORS", ())) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
