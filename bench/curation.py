"""Curation benchmarks: speed (how cost grows with N) and quality (planted cases on the shared data).

python bench/curation.py speed [--sizes 10000 100000 1000000] [--dim 384] [--leaf-size 50]
    on synthetic float16 vectors with 1 % planted near duplicates: the near-dup graph (k-NN of
    every vector via `knn_graph`, edges above a cosine threshold, connected components) with the
    recall of the planted duplicates' edges against exact search of a sample, and the 3-level
    hierarchical k-means with resampling (N / leaf-size leaves, 5 children per parent); seconds,
    peak RSS and the growth exponent between sizes; then embedding images/s.
python bench/curation.py copies [--sizes 10000 100000] [--copy-flat-max 12000]
    copy detection's stage 1 (81 crop views per image against the index of whole images), exact
    (flat) and through `ivfhnsw` lists, on the shared data's real 2D images (8,236) and, past that,
    on lookalikes made from them (flips, shifts, gamma, noise: many near neighbours, no copies),
    with 1 % planted crop copies (85-95 % of the side, resized back): seconds and copies found.
python bench/curation.py scale [--sizes 10000 100000] [key=value ...]
    a pool of N real images from the shared data (mixtures of two past the 8,212 sources), with 1 %
    planted near copies and 0.5 % exact copies shuffled over the shards; ingest, then `curation run`
    (eval set: PneumoniaMNIST test; sample.target_size=N/2), each size in child processes: seconds
    per step, peak RSS, recall of the planted copies, unique images removed, growth exponents.
python bench/curation.py quality [--out NEW_DIR] [--copies 600] [key=value ...]
    all 2D MedMNIST images of the shared data as a pool with planted copies (6 kinds) and eval
    copies, through `curation run`; prints a threshold sweep over the verified pair scores, then
    recall per kind, source images without a planted copy removed (overall and per dataset, split
    by whether the source itself holds a pixel- or near-identical twin), eval copies removed,
    seconds (wall and CPU) per step, and the precision of retrieval from chest X-ray seeds.
    Use a new --out directory for timings: a second run reuses the cached steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NEAR_IDENTICAL = 0.995  # unaligned NCC of two source images above which they are one image twice
sys.path.insert(0, str(REPO))


def _synthetic(n: int, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors with 1 % planted near-duplicates, float16 as `curation run` stores
    them, made in chunks (a float64 draw of 1M x 384 alone is 3 GB); and the planted rows."""
    from curation.index import batches

    centres = rng.normal(size=(max(1, n // 100), dim)).astype(np.float32)
    x = np.empty((n, dim), np.float32)
    for s, e in batches(n, 65536):
        x[s:e] = centres[rng.integers(0, len(centres), e - s)]
        x[s:e] += 0.5 * rng.standard_normal((e - s, dim), dtype=np.float32)
    dup = rng.choice(n, n // 100, replace=False)
    x[dup] = x[rng.choice(n, len(dup))] + 0.02 * rng.standard_normal(
        (len(dup), dim), dtype=np.float32
    )
    out = np.empty((n, dim), np.float16)
    for s, e in batches(n, 65536):
        out[s:e] = x[s:e] / np.linalg.norm(x[s:e], axis=1, keepdims=True)
    return out, dup


def _edge_recall(
    x: np.ndarray, sims: np.ndarray, ids: np.ndarray, rows: np.ndarray, threshold: float
) -> tuple[int, int]:
    """Edges (row, j) at cosine >= threshold that exact search finds for `rows`, and how many of
    them the graph holds (in either direction)."""
    from curation.index import as_f32, batches

    q = as_f32(x[rows])
    exact = [np.zeros(0, np.int64)] * len(rows)
    for s, e in batches(len(x), 65536):
        hit_r, hit_c = np.nonzero(q @ as_f32(x[s:e]).T >= threshold)
        for i, j in zip(hit_r, hit_c + s):
            exact[i] = np.append(exact[i], j)
    total = found = 0
    for row, partners in zip(rows, exact):
        for j in partners[partners != row]:
            total += 1
            found += bool(
                np.any((ids[row] == j) & (sims[row] >= threshold))
                or np.any((ids[j] == row) & (sims[j] >= threshold))
            )
    return found, total


def speed(args: argparse.Namespace) -> None:
    import resource

    import scipy.sparse as sp
    import torch
    from scipy.sparse.csgraph import connected_components

    from curation.hkmeans import auto_clusters, hierarchical_kmeans
    from curation.index import knn_graph

    rng = np.random.default_rng(0)
    rows = []
    for n in args.sizes:
        x, planted = _synthetic(n, args.dim, rng)
        t0 = time.perf_counter()
        sims, ids = knn_graph(x, args.k, progress=False)
        keep = (sims >= args.threshold) & (ids != np.arange(n)[:, None]) & (ids >= 0)
        a = np.repeat(np.arange(n), args.k)[keep.ravel()]
        graph = sp.coo_matrix(
            (np.ones(len(a), np.int8), (a, ids.ravel()[keep.ravel()])), shape=(n, n)
        )
        n_comp, _ = connected_components(graph, directed=False)
        t_graph = time.perf_counter() - t0
        sample = rng.choice(planted, min(len(planted), 1000), replace=False)
        found, total = _edge_recall(x, sims, ids, sample, args.threshold)
        del sims, ids, keep, a, graph
        counts = auto_clusters(n, 3, leaf_size=args.leaf_size)
        t0 = time.perf_counter()
        levels = hierarchical_kmeans(x, counts)
        t_km = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        row = (n, t_graph, found / max(1, total), t_km, t_graph + t_km, rss)
        rows.append(row)
        print(
            f"N={n:>9,}  near-dup graph {t_graph:6.1f} s (removed {n - n_comp:,}, planted-edge recall "
            f"{found}/{total})  hierarchical k-means {'/'.join(str(len(lv.centroids)) for lv in levels)} "
            f"{t_km:6.1f} s  total {t_graph + t_km:6.1f} s  peak RSS {rss:.2f} GiB",
            flush=True,
        )
        del x, levels
    print(
        f"\nN            graph s  recall  k-means s  total s  peak RSS GiB  growth (total)"
        f"   (threads: {torch.get_num_threads()}, leaf size {args.leaf_size})"
    )
    for i, (n, tg, recall, tk, total, rss) in enumerate(rows):
        growth = (
            f"N^{np.log(total / rows[i - 1][4]) / np.log(n / rows[i - 1][0]):.2f}" if i else "-"
        )
        print(f"{n:<12,} {tg:7.1f} {recall:7.4f} {tk:10.1f} {total:8.1f} {rss:13.2f}  {growth}")
    _embed_speed(args)


def _embed_speed(args: argparse.Namespace) -> None:
    import tempfile

    from omegaconf import OmegaConf

    from curation.embed import Encoder, embed_group
    from curation.plant import medmnist, record_for, write_shards
    from pretrain.data.specs import parse_spec

    data = Path(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        images = medmnist(data, "pneumoniamnist", "train", 2000) + medmnist(
            data, "retinamnist", "train", 1000
        )
        write_shards(
            Path(tmp) / "pool",
            [(f"k{i}", px, record_for(f"k{i}", px, "OT")) for i, px in enumerate(images)],
        )
        spec = parse_spec(str(Path(tmp) / "pool"))
        t0 = time.perf_counter()
        embed_group(spec, Path(tmp) / "emb", Encoder(), batch_size=256, progress=False)
        dt = time.perf_counter() - t0
        print(
            f"\nembedding (descriptor, 28 px MedMNIST from shards): {len(images) / dt:.0f} images/s"
        )
        del OmegaConf


def quality(args: argparse.Namespace) -> None:
    from curation import plant
    from curation.run import DEFAULT_CONFIG, run_pipeline
    from pretrain.config import load_config

    data, out = Path(args.data), Path(args.out)
    rng = np.random.default_rng(args.seed)
    originals = []
    pool_splits = {
        "pneumoniamnist": ("train", "val"),
        "breastmnist": ("train", "val", "test"),
        "retinamnist": ("train", "val", "test"),
    }
    for name, splits in pool_splits.items():
        for split in splits:
            for i, px in enumerate(plant.medmnist(data, name, split)):
                originals.append((f"{name}-{split}-{i:05d}", px, plant.MEDMNIST_MODALITY[name]))
    items, pairs = plant.planted_pool(originals, args.copies, seed=args.seed)
    for j in rng.choice(len(originals), args.exact, replace=False):  # exact duplicates
        key, px, mod = originals[int(j)]
        items.append((f"exact-{j}", px.copy(), plant.record_for(f"exact-{j}", px, mod)))
        pairs.append((key, f"exact-{j}", "exact"))
    evals = plant.medmnist(data, "pneumoniamnist", "test")
    eval_items = [
        (f"eval-{i:04d}", px, plant.record_for(f"eval-{i:04d}", px, "CR"))
        for i, px in enumerate(evals)
    ]
    leaks = []
    for j, i in enumerate(rng.choice(len(evals), args.leaks, replace=False)):
        kind = (*plant.KINDS, "exact")[j % (len(plant.KINDS) + 1)]
        px = evals[int(i)].copy() if kind == "exact" else plant.plant_copy(evals[int(i)], kind, rng)
        items.append(
            (f"leak-{j:03d}-{kind}", px, plant.record_for(f"leak-{j:03d}-{kind}", px, "CR"))
        )
        leaks.append(f"leak-{j:03d}-{kind}")
    items = [items[i] for i in rng.permutation(len(items))]
    items = [(rec["key"], px, rec) for _, px, rec in items]  # evaluate by the keys the shards carry
    leaks = [k for k, _, _ in items if k.startswith("leak-")]
    if not (out / "pool" / "manifest.jsonl").is_file():
        plant.write_shards(out / "pool", items)
        plant.write_shards(out / "eval", eval_items)
        seeds = plant.medmnist(data, "pneumoniamnist", "val", 100, seed=args.seed)
        plant.write_shards(
            out / "seeds",
            [
                (f"seed-{i}", px, plant.record_for(f"seed-{i}", px, "CR"))
                for i, px in enumerate(seeds)
            ],
        )
    overrides = [
        f"pool={out / 'pool'}",
        f"output_dir={out / 'run'}",
        f"eval_sets=[{out / 'eval'}]",
        "progress=false",
        *args.overrides,
    ]
    t0, c0 = time.perf_counter(), time.process_time()
    summary = run_pipeline(load_config(DEFAULT_CONFIG, None, overrides))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    _sweep(out / "run", items, pairs, leaks)
    kept = {
        json.loads(line)["key"]
        for line in (out / "run" / "curated" / "manifest.jsonl").read_text().splitlines()
    }
    removed = {k for k, _, _ in items} - kept
    no_leaks = [it for it in items if not it[0].startswith("leak-")]
    result = plant.score(no_leaks, pairs, removed)
    result.update(_unique_removed(originals, pairs, removed))
    result["eval_copies_removed"] = f"{sum(k in removed for k in leaks)}/{len(leaks)}"
    result["seconds_total"] = round(seconds, 1)
    result["cpu_seconds_total"] = round(cpu, 1)
    result["seconds_per_step"] = {k: v.get("seconds") for k, v in summary["steps"].items()}
    # Seeds: the same run directory, so embeddings, dedup and decontamination are reused.
    run_pipeline(load_config(DEFAULT_CONFIG, None, [*overrides, f"seeds=[{out / 'seeds'}]"]))
    got = [
        json.loads(line)["key"]
        for line in (out / "run" / "curated" / "manifest.jsonl").read_text().splitlines()
    ]
    modality = {k: r["modality"] for k, _, r in items}
    result["retrieval_precision_xray_seeds"] = round(
        float(np.mean([modality[k] == "CR" for k in got])), 4
    )
    result["retrieved"] = len(got)
    print(json.dumps(result, indent=1))


def _unique_removed(originals: list, pairs: list, removed: set[str]) -> dict:
    """Removed share of the source images without a planted copy (what a checker counts as
    unique), overall and per source dataset, split by why the source image had a twin anyway:
    pixel-identical to another source image, near-identical (unaligned NCC >= 0.995 with another
    image of its dataset: the same frame or photograph saved twice), or neither."""
    from curation import plant

    planted = {k for a, b, _ in pairs for k in (a, b)}
    unique = [(k, px, k.split("-")[0]) for k, px, _ in originals if k not in planted]
    twins = plant.source_twins(unique)
    out: dict = {}
    for name in [None, *sorted({src for _, _, src in unique})]:
        keys = [k for k, _, src in unique if name is None or src == name]
        gone = [k for k in keys if k in removed]
        sha = [k for k in gone if twins[k][0]]
        near = [k for k in gone if not twins[k][0] and twins[k][1] >= NEAR_IDENTICAL]
        other = len(gone) - len(sha) - len(near)
        has_twin = sum(twins[k][0] or twins[k][1] >= NEAR_IDENTICAL for k in keys)
        out["unique_removed" + (f"_{name}" if name else "")] = {
            "unique": len(keys),
            "removed": len(gone),
            "rate": round(len(gone) / max(1, len(keys)), 4),
            "with_source_twin": has_twin,
            "removed_pixel_identical_twin": len(sha),
            "removed_near_identical_twin": len(near),
            "removed_other": other,
            "rate_other": round(other / max(1, len(keys)), 4),
        }
    return out


def _sweep(run: Path, items: list, pairs: list, leaks: list) -> None:
    """Recall / false removal for other thresholds, from the verified scores the run saved."""
    from curation.dedup import components, keeper_rank

    records = [
        json.loads(line)
        for line in (run / "embed" / "pool" / "records.jsonl").read_text().splitlines()
    ]
    index = {r["key"]: i for i, r in enumerate(records)}
    n = len(records)
    z = np.load(run / "steps" / "near.npz")
    keep_exact = np.load(run / "steps" / "exact.npz")["keep"]
    rank = keeper_rank(
        np.array([r["key"] for r in records]), np.array([r["height"] * r["width"] for r in records])
    )
    mod = np.array([r["modality"] for r in records])
    planted = {index[k] for a, b, _ in pairs for k in (a, b)}
    unique = np.array(
        [i for i in range(n) if i not in planted and not records[i]["key"].startswith("leak-")]
    )
    pa, pb = np.array([index[a] for a, _, _ in pairs]), np.array([index[b] for _, b, _ in pairs])
    print(
        "\nthreshold  local   recall  false_removal  "
        + "  ".join(f"{m:>6}" for m in sorted(set(mod)))
    )
    for t in (0.975, 0.98, 0.985, 0.99):
        for lt in (0.7, 0.8, 0.85):
            edge = (z["ncc"] >= t) & (z["local"] >= lt)
            keep, _ = components(n, z["a"][edge], z["b"][edge], rank)
            keep &= keep_exact
            _, label = _labels(n, z["a"][edge], z["b"][edge])
            recall = np.mean((label[pa] == label[pb]) | ~keep_exact[pa] | ~keep_exact[pb])
            per = "  ".join(
                f"{1 - keep[unique[mod[unique] == m]].mean():6.3f}" for m in sorted(set(mod))
            )
            print(f"{t:9.3f} {lt:6.2f} {recall:8.3f} {1 - keep[unique].mean():14.4f}  {per}")
    dz = np.load(run / "steps" / "decontam.npz")
    reached = np.load(run / "steps" / "near.npz")[
        "keep"
    ]  # leaks the earlier steps left to this one
    leak_rows = {index[k] for k in leaks if reached[index[k]]}
    print(
        "\ndecontamination: threshold local  eval copies found (of those reaching it)  other pool images removed"
    )
    for t in (0.965, 0.97, 0.975, 0.98, 0.985):
        for lt in (0.6, 0.7, 0.8):
            hit = (dz["ncc"] >= t) & (dz["local"] >= lt)
            rows = set(dz["a"][hit].tolist())
            print(
                f"{t:27.3f} {lt:5.2f} {len(rows & leak_rows):>10}/{len(leak_rows)} {len(rows - leak_rows):>20}"
            )


def _labels(n: int, a: np.ndarray, b: np.ndarray) -> tuple[int, np.ndarray]:
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    return connected_components(
        sp.coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False
    )


def _real_thumbs(data: Path) -> np.ndarray:
    import torch

    from curation.descriptor import thumbnail

    thumbs = []
    for name in ("pneumoniamnist", "retinamnist", "breastmnist"):
        with np.load(data / f"{name}.npz") as z:
            for split in ("train", "val", "test"):
                for px in z[f"{split}_images"]:
                    t = torch.from_numpy(px).float() / 255
                    thumbs.append(thumbnail(t[None] if t.ndim == 2 else t.permute(2, 0, 1)))
    return np.stack(thumbs)


def _lookalikes(base: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n images near real ones but not copies of them: flip, shift by <= 3 px, gamma, noise."""
    x = base[rng.integers(0, len(base), n)].astype(np.float32)
    flip = rng.random(n) < 0.5
    x[flip] = x[flip, :, ::-1]
    for i, (dy, dx) in enumerate(rng.integers(-3, 4, size=(n, 2))):
        x[i] = np.roll(x[i], (int(dy), int(dx)), axis=(0, 1))
    x = 255 * (x / 255) ** rng.uniform(0.6, 1.6, size=(n, 1, 1, 1))
    x += rng.normal(0, 6, size=x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def _plant_crops(
    pool: np.ndarray, k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    import torch
    import torch.nn.functional as F

    sources = rng.choice(len(pool), k, replace=False)
    copies = []
    for i in sources:
        t = torch.from_numpy(pool[i]).permute(2, 0, 1).float()[None]
        side = int(round(32 * rng.uniform(0.85, 0.95)))
        oy, ox = (int(v) for v in rng.integers(0, 32 - side + 1, 2))
        crop = t[:, :, oy : oy + side, ox : ox + side]
        back = F.interpolate(crop, size=(32, 32), mode="bilinear", antialias=True)
        copies.append(back[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy())
    return np.concatenate([pool, np.stack(copies)]), sources


def copies(args: argparse.Namespace) -> None:
    import torch

    from curation.dedup import view_candidates

    rng = np.random.default_rng(0)
    base = _real_thumbs(Path(args.data))
    variants = {
        "flat": {"copy_flat_max": 10**12},
        "ivfhnsw": {"copy_flat_max": 0, "copy_nprobe": 16},
    }
    rows = []
    for n in args.sizes:
        pool = (
            base[rng.choice(len(base), n, replace=False)]
            if n <= len(base)
            else _lookalikes(base, n, rng)
        )
        pool, sources = _plant_crops(pool, max(10, n // 100), rng)
        planted = set(zip(sources.tolist(), range(n, len(pool))))
        for name, index in variants.items():
            if name == "flat" and n > args.copy_flat_max:
                continue  # N^2: 100k takes an hour
            t0 = time.perf_counter()
            q, d, _ = view_candidates(
                pool,
                pool,
                same=True,
                neighbours=8,
                candidates=5,
                min_similarity=0.85,
                index_cfg={**index, "use_gpu": False, "seed": 0},
                progress=False,
            )
            seconds = time.perf_counter() - t0
            found = set(zip(np.minimum(q, d).tolist(), np.maximum(q, d).tolist())) & planted
            rows.append((len(pool), name, seconds, len(found), len(planted)))
            print(
                f"N={len(pool):>9,} {name:8s} {seconds:8.1f} s  planted copies found {len(found)}/{len(planted)}",
                flush=True,
            )
    print(
        f"\nN            index      stage-1 s   copies found   (threads: {torch.get_num_threads()})"
    )
    for n, name, sec, found, total in rows:
        print(f"{n:<12,} {name:9s} {sec:10.1f}   {found}/{total}")


def _mixed_pool(data: Path, n: int, rng: np.random.Generator) -> tuple[np.ndarray, list, list]:
    """n gray 28 px images from the shared data (PneumoniaMNIST test split left out: it is the eval
    set): the real images first, then mixtures of two of them (flipped, shifted, noisy) so that N can
    exceed the sources without copies among them; 1 % planted near copies (crop + resize, JPEG,
    brightness) and 0.5 % exact copies, all shuffled over the shards. Returns (images, planted
    near pairs, planted exact pairs) as (original index, copy index)."""
    import io

    from PIL import Image

    real = []
    for name, splits in (
        ("pneumoniamnist", ("train", "val")),
        ("breastmnist", ("train", "val", "test")),
        ("retinamnist", ("train", "val", "test")),
    ):
        with np.load(data / f"{name}.npz") as z:
            for split in splits:
                arr = z[f"{split}_images"]
                real.append(
                    arr if arr.ndim == 3 else (arr @ [0.299, 0.587, 0.114]).astype(np.uint8)
                )
    real = np.concatenate(real)
    n_near, n_exact = n // 100, n // 200
    base_n = n - n_near - n_exact
    if base_n <= len(real):
        base = real[rng.choice(len(real), base_n, replace=False)]
    else:
        extra = base_n - len(real)
        a, b = real[rng.integers(0, len(real), extra)], real[rng.integers(0, len(real), extra)]
        w = rng.uniform(0.5, 0.7, size=(extra, 1, 1))
        mix = w * a + (1 - w) * b[:, :, ::-1]
        for i, (dy, dx) in enumerate(rng.integers(-3, 4, size=(extra, 2))):
            mix[i] = np.roll(mix[i], (int(dy), int(dx)), axis=(0, 1))
        mix += rng.normal(0, 4, size=mix.shape)
        base = np.concatenate([real, np.clip(mix, 0, 255).astype(np.uint8)])

    def near_copy(px: np.ndarray, kind: int) -> np.ndarray:
        pil = Image.fromarray(px)
        if kind == 0:  # crop 85-95 % of the side, resized back
            side = int(rng.integers(24, 27))
            oy, ox = (int(v) for v in rng.integers(0, 28 - side + 1, 2))
            return np.asarray(
                pil.crop((ox, oy, ox + side, oy + side)).resize((28, 28), Image.BICUBIC)
            )
        if kind == 1:  # JPEG
            buf = io.BytesIO()
            pil.save(buf, format="JPEG", quality=int(rng.integers(50, 90)))
            return np.asarray(Image.open(io.BytesIO(buf.getvalue())))
        return np.clip(px.astype(np.float32) * rng.uniform(0.8, 1.2) + 5, 0, 255).astype(np.uint8)

    near_src = rng.choice(base_n, n_near, replace=False)
    exact_src = rng.choice(base_n, n_exact, replace=False)
    copies = [near_copy(base[i], j % 3) for j, i in enumerate(near_src)]
    images = np.concatenate([base, np.stack(copies), base[exact_src]])
    order = rng.permutation(len(images))  # position -> old index
    where = np.empty(len(images), np.int64)
    where[order] = np.arange(len(images))  # old index -> position
    near = [(where[s], where[base_n + j]) for j, s in enumerate(near_src)]
    exact = [(where[s], where[base_n + n_near + j]) for j, s in enumerate(exact_src)]
    return images[order], near, exact


def _run_child(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB of the child and the children it waited for)."""
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-3000:]
            raise SystemExit(f"{' '.join(map(str, cmd[2:4]))} failed ({proc.returncode}):\n{tail}")
    return seconds, usage.ru_maxrss / 1e6  # KB -> GB


def scale(args: argparse.Namespace) -> None:
    """Ingest + `curation run` at each size, in child processes of this one, side by side."""
    import json
    import math
    import os
    import tempfile

    data = Path(args.data)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MEDSSL_PATIENT_SALT": "bench-public-data"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        for n in args.sizes:
            rng = np.random.default_rng(n)
            images, near, exact = _mixed_pool(data, n, rng)
            root = Path(tmp) / f"n{n}"
            root.mkdir()
            np.savez(
                root / "pool.npz", train_images=images, train_labels=np.zeros((n, 1), np.uint8)
            )
            del images
            py = [sys.executable, "-m", "curation"]
            t_ingest, _ = _run_child(
                [
                    *py,
                    "ingest",
                    f"{root / 'pool.npz'}:train",
                    "--out",
                    str(root / "shards"),
                    "progress=false",
                    "sources=keep",
                    f"workers={args.workers}",
                ],
                env,
            )
            t_run, peak = _run_child(
                [
                    *py,
                    "run",
                    f"pool={root / 'shards'}",
                    f"output_dir={root / 'cur'}",
                    f"eval_sets=[{data / 'pneumoniamnist.npz'}:test]",
                    "progress=false",
                    f"sample.target_size={n // 2}",
                    *args.overrides,
                ],
                env,
            )
            summary = json.loads((root / "cur" / "summary.json").read_text())
            records = [
                json.loads(line)
                for line in (root / "cur" / "embed" / "pool" / "records.jsonl")
                .read_text()
                .splitlines()
            ]
            row_of = {int(r["source"].rsplit(":", 1)[1]): i for i, r in enumerate(records)}
            with np.load(root / "cur" / "steps" / "near.npz") as z:
                keep = z["keep"]
            found = sum(keep[row_of[a]] != keep[row_of[b]] for a, b in near + exact)
            involved = {i for pair in near + exact for i in pair}
            unique = np.array([row_of[i] for i in range(n) if i not in involved])
            gone = unique[~keep[unique]]
            # a removed image whose keeper is the same picture twice (unaligned NCC >= 0.995) is a
            # twin the shared data already holds (see quality), not a unique image lost
            keeper = {}
            for step in ("exact", "near"):
                doc = json.loads((root / "cur" / "steps" / f"{step}.json").read_text())
                for group in doc["data"]["groups"]:
                    keeper.update({row: group[0] for row in group[1:]})
            pixels = np.load(root / "pool.npz")["train_images"].reshape(n, -1).astype(np.float64)
            source_of = {row: i for i, row in row_of.items()}
            twins = sum(
                row in keeper
                and np.corrcoef(pixels[source_of[row]], pixels[source_of[keeper[row]]])[0, 1]
                >= NEAR_IDENTICAL
                for row in gone.tolist()
            )
            removed = (len(gone) - twins) / len(unique)
            steps = {k: v.get("seconds", 0) for k, v in summary["steps"].items()}
            rows.append(
                dict(
                    n=n,
                    ingest=t_ingest,
                    run=t_run,
                    peak=peak,
                    steps=steps,
                    recall=found / len(near + exact),
                    removed=removed,
                    twins_removed=twins / len(unique),
                )
            )
            print(json.dumps({"bench": "scale", **rows[-1]}), flush=True)
    names = list(rows[0]["steps"])
    print(f"\n{'step':<12}" + "".join(f"{r['n']:>12,}" for r in rows) + "   growth exponent")

    def line(label, values, fmt="{:12.1f}"):
        growth = ""
        if len(values) > 1 and values[0] > 0 and values[-1] > 0:
            k = math.log(values[-1] / values[0]) / math.log(rows[-1]["n"] / rows[0]["n"])
            growth = f"   {k:.2f}"
        print(f"{label:<12}" + "".join(fmt.format(v) for v in values) + growth)

    line("ingest s", [r["ingest"] for r in rows])
    for name in names:
        line(f"{name} s", [r["steps"].get(name, 0) for r in rows])
    line("run s", [r["run"] for r in rows])
    line("peak RSS GB", [r["peak"] for r in rows], "{:12.2f}")
    line("recall", [r["recall"] for r in rows], "{:12.3f}")
    line("unique rm", [r["removed"] for r in rows], "{:12.4f}")
    line("twins rm", [r["twins_removed"] for r in rows], "{:12.4f}")
    if len(rows) > 1:
        print(
            f"\nrun time ratio {rows[-1]['run'] / rows[0]['run']:.1f}x for {rows[-1]['n'] / rows[0]['n']:.0f}x images"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("speed")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.95, help="near-duplicate cosine")
    p.add_argument("--leaf-size", type=int, default=50, help="points per leaf cluster")
    c = sub.add_parser("copies")
    c.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    c.add_argument("--copy-flat-max", type=int, default=12_000, help="largest N timed flat")
    q = sub.add_parser("quality")
    q.add_argument("--out", default="/tmp/medssl-curation-quality")
    q.add_argument("--copies", type=int, default=600)
    q.add_argument("--exact", type=int, default=30)
    q.add_argument("--leaks", type=int, default=35)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("overrides", nargs="*", help="key=value for curation run")
    e = sub.add_parser("scale")
    e.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    e.add_argument("--workers", type=int, default=2, help="ingest worker processes")
    e.add_argument("overrides", nargs="*", help="key=value for curation run")
    for s in (p, c, q, e):
        s.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    args = parser.parse_args()
    {"speed": speed, "copies": copies, "quality": quality, "scale": scale}[args.mode](args)


if __name__ == "__main__":
    main()
