"""`medssl STAGE ...` is exactly `python -m STAGE ...`."""

from __future__ import annotations

import runpy
import sys

STAGES = ("curation", "pretrain", "eval", "launch")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in STAGES:
        print(f"usage: medssl {{{','.join(STAGES)}}} ...  (same as python -m STAGE ...)")
        sys.exit(0 if args and args[0] in ("-h", "--help") else 2)
    stage = args[0]
    sys.argv = [f"medssl {stage}", *args[1:]]
    runpy.run_module(stage, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
