"""Images/s of our shard stream vs torchvision ImageFolder on the same images, transform and workers.

The same MedMNIST split is written once as webdataset shards (our format) and once as a PNG
ImageFolder in a temporary directory; both loaders then run full epochs with the same transform,
batch size and worker count. The npz map-style path (the CPU training input) is timed too.

    .venv/bin/python bench/loader.py                      # pneumoniamnist train, 28 px
    .venv/bin/python bench/loader.py --size 128 --transform dinov2

Prints one JSON line per measurement (images/s over whole epochs, worker start-up included).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.data.loader import build_train_loader  # noqa: E402
from pretrain.data.readers import load_npz_split  # noqa: E402
from pretrain.data.shards import ShardWriter, encode_sample  # noqa: E402
from pretrain.transforms import build_pretrain_transform, eval_transform  # noqa: E402

logger = logging.getLogger(__name__)


def _images(npz_spec: str, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    path, split = npz_spec.rsplit(":", 1)
    images, labels = load_npz_split(path, split)
    labels = labels[:, 0] if labels is not None else np.full(len(images), -1)
    if size and size != images.shape[1]:
        images = np.stack(
            [
                np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
                for im in tqdm(images, desc=f"upsampling to {size}px")
            ]
        )
    return images, labels


def _load_gray(path: str) -> Image.Image:
    """ImageFolder's loader, but gray like the data (its default converts to RGB)."""
    with Image.open(path) as im:
        return im.convert("L")


def write_both(
    images: np.ndarray, labels: np.ndarray, root: Path, per_shard: int
) -> tuple[Path, Path]:
    shards, folder = root / "shards", root / "folder"
    shards.mkdir()
    for start in tqdm(range(0, len(images), per_shard), desc="writing shards"):
        writer = ShardWriter(shards, start // per_shard)
        for i in range(start, min(start + per_shard, len(images))):
            key = f"img{i:06d}"
            writer.write(encode_sample(key, images[i], {"key": key, "label": int(labels[i])}))
        writer.commit()
    for i in tqdm(range(len(images)), desc="writing PNG folder"):
        out = folder / str(int(labels[i])) / f"img{i:06d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(out, compress_level=3)
    return shards, folder


def write_fixed_mtime_shards(images, labels, out: Path, per_shard: int) -> None:
    """ShardWriter's layout, but TarWriter(mtime=0): webdataset's default float mtime costs a PAX
    header per member, which the reader must parse (and makes shards differ run to run)."""
    import webdataset as wds

    from pretrain.data.shards import shard_name

    out.mkdir()
    for start in range(0, len(images), per_shard):
        with open(out / shard_name(start // per_shard), "wb") as f:
            writer = wds.TarWriter(f, mtime=0)
            for i in range(start, min(start + per_shard, len(images))):
                key = f"img{i:06d}"
                writer.write(encode_sample(key, images[i], {"key": key, "label": int(labels[i])}))
            writer.close()


def run_epochs(make_loader, epochs: int) -> tuple[float, int]:
    n, start = 0, time.perf_counter()
    for epoch in range(epochs):
        for batch in make_loader(epoch):
            n += len(batch[1])
    return n / (time.perf_counter() - start), n


def main(argv: list[str] | None = None) -> None:
    data = Path(
        os.environ.get("MEDSSL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--npz", default=f"{data / 'pneumoniamnist.npz'}:train")
    parser.add_argument("--size", type=int, default=None, help="upsample images to this size")
    parser.add_argument("--transform", choices=["none", "eval", "dinov2"], default="eval")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2, help="alternate runs, best is kept")
    parser.add_argument(
        "--fixed-mtime-variant",
        action="store_true",
        help="also time shards written with an integer tar mtime (no PAX header per member)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    images, labels = _images(args.npz, args.size)
    size = images.shape[1]
    if args.transform == "none":  # loader cost only: both yield the float C×H×W tensor
        transform = v2.Identity()
    elif args.transform == "eval":
        transform = eval_transform(size, channels="repeat")
    else:
        transform = build_pretrain_transform(
            "dinov2", global_size=size, local_size=max(8, size // 2), n_local=4
        )
    to_float = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), transform])
    common = dict(batch_size=args.batch_size, num_workers=args.workers)

    with tempfile.TemporaryDirectory(prefix="medssl-bench-") as tmp:
        shards, folder = write_both(images, labels, Path(tmp), args.per_shard)
        folder_ds = datasets.ImageFolder(str(folder), transform=to_float, loader=_load_gray)
        npz_spec = args.npz
        if args.size:  # the npz path only exists at native size
            npz_spec = None

        def shard_loader(epoch):
            return build_train_loader(
                str(shards), transform, seed=0, epoch=epoch, rank=0, world_size=1, **common
            )

        def folder_loader(epoch):
            g = torch.Generator().manual_seed(epoch)
            return DataLoader(folder_ds, shuffle=True, generator=g, **common)

        def npz_loader(epoch):
            return build_train_loader(
                npz_spec, transform, seed=0, epoch=epoch, rank=0, world_size=1, **common
            )

        if args.fixed_mtime_variant:
            fixed = Path(tmp) / "shards-fixed-mtime"
            write_fixed_mtime_shards(images, labels, fixed, args.per_shard)

            def fixed_loader(epoch):
                return build_train_loader(
                    str(fixed), transform, seed=0, epoch=epoch, rank=0, world_size=1, **common
                )

        contenders = {
            "shards (build_train_loader)": shard_loader,
            "torchvision ImageFolder + DataLoader": folder_loader,
        }
        if args.fixed_mtime_variant:
            contenders["shards, integer tar mtime"] = fixed_loader
        if npz_spec:
            contenders["npz map-style (build_train_loader)"] = npz_loader
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, make in contenders.items():
                rate, n = run_epochs(make, args.epochs)
                best[name] = max(best.get(name, 0.0), rate)
        for name, rate in best.items():
            print(
                json.dumps(
                    {
                        "loader": name,
                        "images_per_s": round(rate, 1),
                        "images": n,
                        "size": size,
                        "transform": args.transform,
                        "batch_size": args.batch_size,
                        "workers": args.workers,
                        "epochs": args.epochs,
                    }
                )
            )
        ratio = best["shards (build_train_loader)"] / best["torchvision ImageFolder + DataLoader"]
        print(f"shard loader / ImageFolder speed ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
