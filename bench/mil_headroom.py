"""How much room do an export's features leave MIL? Mean pooling and ABMIL against an instance oracle.

    python bench/mil_headroom.py EXPORT --data FILE.npz [--repeats 3]

Runs `python -m eval mil` (mean_pool and abmil, the tool's defaults: 200 MNIST-bags of 10-30
images, 1-3 positives, training bags from FILE.npz:train) twice: with test bags drawn from the
test split and from the val split, which eval mil uses for nothing else and which, unlike
PneumoniaMNIST's test split, has the training split's distribution. On the same test bags it scores
an instance oracle, which MIL never has: logistic regression trained on the training split's
instance labels (C by 3-fold CV), a bag scored by the max, the mean of the top 3 or the mean of its
instances' logits. A bag-level method trained on bag labels should not beat it by much, so
`oracle - mean_pool` is the room there is for attention to win (issue 18).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval import mil  # noqa: E402
from eval.features import FeatureExtractor  # noqa: E402
from pretrain.config import load_config  # noqa: E402


def instance_oracle(train_x: np.ndarray, train_y: np.ndarray):
    """Standardised logistic regression on instance labels, C by 3-fold CV (AUROC)."""
    grid = {"logisticregression__C": [1e-3, 1e-2, 1e-1, 1.0]}
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    return GridSearchCV(model, grid, scoring="roc_auc", cv=3).fit(train_x, train_y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--data", required=True, help="an .npz with train, val and test splits")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            mil.DEFAULT_CONFIG,
            None,
            [f"repeats={args.repeats}", "methods=[mean_pool,abmil]", f"cache_dir={tmp}/cache"],
        )
        extract = FeatureExtractor(args.export, cache_dir=Path(tmp) / "cache")
        sets = {s: extract(f"{args.data}:{s}") for s in ("train", "val", "test")}
        x = {s: fs.variant(str(cfg.features)) for s, fs in sets.items()}
        y = {s: np.asarray(fs.labels).ravel() for s, fs in sets.items()}
        positive = int(cfg.synthetic.positive_class)
        oracle = instance_oracle(x["train"], (y["train"] == positive).astype(int))
        print(f"export {args.export}; instance oracle C={oracle.best_params_}")
        header = "| test bags from | instance AUROC | mean_pool | abmil | abmil - mean_pool |"
        print(header + " oracle max | oracle top-3 | oracle mean |")
        print("|---" * 8 + "|")
        for split in ("test", "val"):
            doc = mil.run_mil(
                cfg,
                backbone=args.export,
                bags=f"{args.data}:train",
                test_bags=f"{args.data}:{split}",
                out=Path(tmp) / split,
            )
            # the tool's own test bags: drawn with seed + 1 from all of the split's images
            bags, _ = mil._build_bags(
                cfg, f"{args.data}:{split}", sets[split], None, int(cfg.seed) + 1, test=True
            )
            logits = oracle.decision_function(x[split])
            inst = roc_auc_score(y[split] == positive, logits)

            def bag_auroc(pool, bags=bags, logits=logits) -> float:
                scores = [pool(np.sort(logits[rows])[::-1]) for rows in bags.rows]
                return roc_auc_score(bags.labels, scores)

            m, a = doc["methods"]["mean_pool"]["auroc"], doc["methods"]["abmil"]["auroc"]
            print(
                f"| {split} | {inst:.3f} | {m:.3f} | {a:.3f} | {a - m:+.3f} | "
                f"{bag_auroc(lambda v: v[0]):.3f} | {bag_auroc(lambda v: v[:3].mean()):.3f} | "
                f"{bag_auroc(np.mean):.3f} |"
            )


if __name__ == "__main__":
    main()
