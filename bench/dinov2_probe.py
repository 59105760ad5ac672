"""Where a DINOv2 run's image-level signal goes: class tokens, head bottleneck, prototypes, logits.

    python bench/dinov2_probe.py RUN_DIR [--data FILE.npz:train] [--images 256] [--init]

Loads the newest checkpoint of RUN_DIR (or, with --init, the same config untrained) and prints,
for the EMA teacher and the student, on the first N training images (eval transform):
- the mean pairwise cosine of the class tokens and of the head's L2-normalised bottleneck,
- the mean pairwise cosine of the prototypes (the head's last layer rows),
- the spread of the head logits across prototypes and across images.
The DINO targets are softmax((logits - center) / teacher_temp): when the logits' spread across
images is far below the teacher temperature, every target is near uniform and the DINO loss
sits at log K (issue 17's diagnosis).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.checkpoint import load_newest  # noqa: E402
from pretrain.config import compose_config  # noqa: E402
from pretrain.data.datasets import open_dataset  # noqa: E402
from pretrain.methods import build_method  # noqa: E402
from pretrain.transforms import eval_transform  # noqa: E402


def mean_offdiag_cosine(x: torch.Tensor) -> float:
    x = F.normalize(x.float(), dim=-1)
    sims = x @ x.t()
    n = sims.shape[0]
    return float(sims[~torch.eye(n, dtype=torch.bool)].mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--data", help="dataset spec (default: the run's data.train)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--init", action="store_true", help="the untrained network of the same config")
    args = p.parse_args()

    saved = OmegaConf.load(args.run / "config.yaml")
    cfg = OmegaConf.merge(
        compose_config(
            None, ["data.train=x", "optim.max_steps=1", "output_dir=x", "method=dinov2"]
        ),
        saved,
    )
    torch.manual_seed(int(cfg.get("seed", 0)))
    method = build_method(cfg)
    if not args.init:
        _, state = load_newest(args.run / "checkpoints")
        method.load_state_dict(state["model"])
    method.eval()
    spec = args.data or str(cfg.data.train)
    transform = eval_transform(int(cfg.model.img_size), cfg.data.channels)
    dataset = open_dataset(spec, transform=transform)
    images = torch.stack([dataset[i][0] for i in range(min(args.images, len(dataset)))])
    print(f"{args.run} ({'init' if args.init else 'trained'}), {len(images)} images of {spec}")
    with torch.no_grad():
        for name, net in (("teacher", method.teacher), ("student", method.student)):
            cls, _ = net.tokens(images)
            head = net.dino_head
            logits = head(cls)
            print(
                f"{name}: class-token cosine {mean_offdiag_cosine(cls):.3f}, "
                f"bottleneck cosine {mean_offdiag_cosine(head.mlp(cls)):.3f}, "
                f"prototype cosine {mean_offdiag_cosine(head.last_layer.weight):.3f}, "
                f"logit std across prototypes {float(logits.std(1).mean()):.4f}, "
                f"across images {float(logits.std(0).mean()):.4f}"
            )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
