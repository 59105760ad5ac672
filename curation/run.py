"""`python -m curation run --config FILE [key=value ...]`: pool -> curated shards (LVD-142M style).

Steps, each cached in output_dir/steps (see curation/steps.py) and skipped when re-run:
  embed      descriptor/backbone embeddings + thumbnails, one job per shard group
  exact      pixel-identical images (manifest sha256), one keeper per group
  near       copies (crops, resizes, brightness, JPEG) by aligned matching, connected components
  decontam   copies of eval images, their exact duplicates and their patients
  select     seeds: sample- and cluster-based retrieval; no seeds: hierarchical k-means +
             balanced sampling to sample.target_size (null: keep all survivors)
  write      curated shards + manifest.jsonl (source keys kept, per-image reason)
  report     summary.json + report.html
On a cluster (launch/curate.py does this): N array tasks
  python -m curation run ARGS embed.groups=N --step embed --group $SLURM_ARRAY_TASK_ID
then one job `python -m curation run ARGS embed.groups=N --step global` for everything after
embedding (it refuses, naming them, while a group is missing). With bootstrap.enabled, a
`--step bootstrap` job first trains the embedding model once.
Exit codes: 0 done, 2 refused (bad config or data), 1 other failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from curation import report
from curation.decontaminate import check_patient_keys, contamination_pairs, decontaminate
from curation.dedup import (
    Pairs,
    components,
    copy_pairs,
    exact_duplicates,
    keeper_rank,
    merge_pairs,
    part_rows,
)
from curation.dkmeans import gather_rows, hierarchical_kmeans_dist
from curation.embed import (
    Embedded,
    EmbedError,
    dataset_groups,
    embed_dataset,
    make_encoder,
    short_side,
)
from curation.hkmeans import auto_clusters, balanced_sample, hierarchical_kmeans
from curation.index import normalize_rows
from curation.retrieve import retrieve
from curation.steps import PartsMissing, Steps, StopAfter, Timer
from curation.writer import write_curated
from pretrain.backbones import CONFIG_FILENAME, WEIGHTS_FILENAME, find_export
from pretrain.config import (
    ConfigError,
    load_config,
    pseudonymised_config,
    save_config,
    split_overrides,
)
from pretrain.data.specs import DatasetSpecError
from pretrain.distributed import (
    cleanup_distributed,
    detect_env,
    global_rank,
    init_distributed,
    wait_for_rank0,
    world_size,
)
from pretrain.privacy import pseudonymised_path

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
STEPS = ("embed", "exact", "near", "decontam", "select", "write", "report")
RUN_STEPS = ("bootstrap", "embed", "near", "decontam", "global")
KMEANS = ("faiss", "exact")
RANK_WAIT = timedelta(hours=48)  # other ranks wait while rank 0 deduplicates a large pool
ARRAY_STEPS = ("near", "decontam")  # split over `global_tasks` array tasks (--step S --task I)
USER_ERRORS = (DatasetSpecError, EmbedError, FileNotFoundError, PartsMissing)


def _index_cfg(cfg: DictConfig) -> dict:
    c = cfg.index
    return dict(
        kind=c.kind,
        flat_max=int(c.flat_max),
        nlist=c.nlist,
        pq_m=c.pq_m,
        nprobe=int(c.nprobe),
        use_gpu=c.gpu,
        seed=int(cfg.seed),
        copy_flat_max=int(c.copy_flat_max),
        copy_nprobe=int(c.copy_nprobe),
    )


def _bootstrap(cfg: DictConfig, out: Path, *, may_train: bool = True) -> str:
    """Pretrain briefly on the raw pool (python -m pretrain) and return the run dir to embed with.

    Array tasks (`may_train=False`) only use a finished bootstrap model: all of them training it at
    once would race; `--step bootstrap` (the launcher's first curation job) trains it."""
    run_dir = out / "bootstrap"
    if not (run_dir / "export" / CONFIG_FILENAME).is_file():
        if not may_train:
            raise EmbedError(
                f"bootstrap.enabled: no bootstrap model in {run_dir} yet; run "
                "`python -m curation run ... --step bootstrap` before the embed jobs"
            )
        cmd = [
            sys.executable,
            "-m",
            "pretrain",
            f"output_dir={run_dir}",
            f"data.train={cfg.pool}",
            f"optim.max_steps={int(cfg.bootstrap.max_steps)}",
            *[str(o) for o in cfg.bootstrap.overrides],
        ]
        logger.info("bootstrap: %s", " ".join(cmd))
        if subprocess.run(cmd, check=False).returncode != 0:
            raise EmbedError(f"bootstrap pretraining failed (command: {' '.join(cmd)})")
    return str(run_dir)


EMBED_KEYS = ("backbone", "weights", "img_size", "channels", "window")


def _encoder_content(embed_cfg: DictConfig, steps: Steps) -> list[list[str]]:
    """sha256 of the weights the encoder loads, so retrained weights under one path re-embed."""
    backbone = str(embed_cfg.backbone)
    if backbone == "descriptor":
        return []
    if backbone.startswith("timm:"):
        return steps.hashes.files([Path(embed_cfg.weights)]) if embed_cfg.weights else []
    if backbone.startswith("local-dir:"):
        folder = Path(backbone[len("local-dir:") :])
        return steps.hashes.files(sorted(p for p in folder.iterdir() if p.is_file()))
    try:
        target = find_export(Path(backbone))
    except FileNotFoundError as exc:
        raise EmbedError(f"embed.backbone={backbone}: {exc}") from exc
    files = (
        [target, target.with_name(WEIGHTS_FILENAME)] if target.name == CONFIG_FILENAME else [target]
    )
    return steps.hashes.files([f for f in files if f.is_file()])


def _embed_all(
    cfg: DictConfig,
    out: Path,
    steps: Steps,
    *,
    only_group: int | None = None,
    merge_only: bool = False,
) -> tuple[Embedded, list[Embedded], list[Embedded], dict] | None:
    """Step a for the pool, the seeds and the eval sets; None after a single group job.

    `only_group`: embed that pool group only (one array task). `merge_only`: embed no pool group,
    merge those the array wrote (refused, naming them, when some are missing); the seeds and eval
    sets, small next to the pool, are embedded here. Returns the embeddings and the encoder
    settings (what later steps read of the pool: its embeddings alone, so adding a seed or eval
    set recomputes neither exact nor near duplicates). Every group is keyed on the content of its
    shards (embed.py), so this always calls embed_dataset: what is unchanged is read back."""
    embed_cfg = cfg.embed.copy()
    if cfg.bootstrap.enabled:
        embed_cfg.backbone = _bootstrap(cfg, out, may_train=only_group is None and not merge_only)
    settings = {
        **{k: embed_cfg[k] for k in EMBED_KEYS},
        "weights_sha256": _encoder_content(embed_cfg, steps),
    }
    stain = embed_cfg.stain_norm
    if stain.method and embed_cfg.backbone != "descriptor":  # another staining: embed again
        reference = [Path(stain.reference)] if stain.reference else []
        settings["stain_norm"] = [stain.method, steps.hashes.files(reference)]
    n_groups = None if embed_cfg.groups is None else int(embed_cfg.groups)
    with Timer() as t:
        encoder = make_encoder(embed_cfg)
        progress, hashes = bool(cfg.progress), steps.hashes
        pool = embed_dataset(
            str(cfg.pool),
            out / "embed" / "pool",
            encoder,
            embed_cfg,
            progress=progress,
            n_groups=n_groups,
            only_group=only_group,
            merge_only=merge_only,
            settings=settings,
            hashes=hashes,
        )
        if pool is None:
            return None

        def embed_sets(specs, prefix: str) -> list:
            return [
                embed_dataset(
                    str(spec),
                    out / "embed" / f"{prefix}-{i}",
                    encoder,
                    embed_cfg,
                    progress=progress,
                    settings=settings,
                    hashes=hashes,
                )
                for i, spec in enumerate(specs)
            ]

        seeds, evals = embed_sets(cfg.seeds, "seeds"), embed_sets(cfg.eval_sets, "eval")

    def summary() -> tuple[dict, None, None]:
        groups = len(dataset_groups(str(cfg.pool), embed_cfg.shards_per_job, n_groups))
        return (
            {
                "in": len(pool),
                "out": len(pool),
                "seconds": t.seconds,
                "encoder": encoder.name,
                "dim": int(pool.embeddings.shape[1]),
                "groups": groups,
                "seeds": [len(s) for s in seeds],
                "eval_sets": [len(e) for e in evals],
                "images_per_second": None
                if merge_only
                else round(len(pool) / max(t.seconds, 1e-9), 1),
                "pool_groups_from": "array tasks (--step embed --group G)"
                if merge_only
                else "this run",
            },
            None,
            None,
        )

    steps.run(
        "embed",
        summary,
        settings={
            "embed": settings,
            "shards_per_job": embed_cfg.shards_per_job,
            "groups": n_groups,
        },
        datasets={"pool": cfg.pool, "seeds": list(cfg.seeds), "eval sets": list(cfg.eval_sets)},
    )
    return pool, seeds, evals, settings


def shown_config(cfg: DictConfig) -> DictConfig:
    """The config as saved beside the outputs: input datasets (pool, seeds, eval sets) by keyed
    pseudonym, as ingest saves its sources; the run itself reads `cfg`."""
    return pseudonymised_config(cfg, ("pool", "seeds", "eval_sets"))


def run_pipeline(
    cfg: DictConfig,
    *,
    only_group: int | None = None,
    stop_after: str | None = None,
    after_embed: bool = False,
    task: tuple[str, int] | None = None,
    writer: bool = True,
) -> dict:
    """Run (or resume) every step; returns summary.json's content ({} when stopped early).

    `only_group`: one embed job of a SLURM array (nothing else). `after_embed`: the global job
    after the array: every step after embedding, refusing when a pool group was not embedded.
    `task=(step, i)`: array task i of `global_tasks` of the near or decontam step: the steps
    before it (merging the embed groups and earlier parts), then its slice of the search only.
    `writer=False`: a rank other than 0 of a distributed global job (computes, never writes)."""
    out = Path(cfg.output_dir)
    if only_group is None and task is None and writer:  # array tasks run at once
        save_config(shown_config(cfg), out)
    steps = Steps(out, stop_after=stop_after, writer=writer)
    try:
        return _run_steps(
            cfg, out, steps, only_group=only_group, after_embed=after_embed, task=task
        )
    except StopAfter:
        return {}
    finally:
        steps.hashes.save()


def _run_steps(
    cfg: DictConfig,
    out: Path,
    steps: Steps,
    *,
    only_group: int | None,
    after_embed: bool,
    task: tuple[str, int] | None,
) -> dict:
    merge_only = after_embed or task is not None
    embedded = _embed_all(cfg, out, steps, only_group=only_group, merge_only=merge_only)
    if embedded is None:
        return {}
    pool, seeds, evals, embed_settings = embedded
    keys = np.array([r["key"] for r in pool.records], dtype=object)
    pixels = np.array([(r.get("height") or 0) * (r.get("width") or 0) for r in pool.records])
    rank = keeper_rank(keys, pixels)
    n, index_cfg = len(pool), _index_cfg(cfg)
    results: dict = {"pool": pool, "seeds": seeds, "evals": evals}

    def exact() -> tuple[dict, dict, dict]:  # b. exact duplicates
        keep, groups = (
            exact_duplicates(np.array([r["sha256"] for r in pool.records]), rank)
            if cfg.dedup.exact
            else (np.ones(n, bool), [])
        )
        return (
            {"in": n, "out": int(keep.sum()), "groups": len(groups)},
            {"groups": [g.tolist() for g in groups]},
            {"keep": keep},
        )

    got = steps.run(
        "exact",
        exact,
        settings={"embed": embed_settings, "dedup.exact": cfg.dedup.exact},
        datasets={"pool": cfg.pool},
    )
    keep_exact = got[1]["keep"]
    results["exact_groups"] = got[0]["data"]["groups"]

    tasks = None if cfg.global_tasks is None else int(cfg.global_tasks)

    def array_step(name: str, part: Callable, to_arrays: Callable, **inputs) -> Any:
        """Run slice `task` of an array step and stop, or merge the parts (global_tasks set), or
        compute the whole step here."""
        key, _ = steps.key(name, **inputs)
        if task is not None and task[0] == name:
            steps.save_part(name, key, task[1], int(tasks), to_arrays(part((task[1], tasks))))
            raise StopAfter(name)
        return None if tasks is None else steps.load_parts(name, key, tasks)

    def near_pairs(part: tuple[int, int] | None) -> Pairs:  # pool indices
        active = np.nonzero(keep_exact)[0]
        if not cfg.dedup.near or len(active) < 2:
            return Pairs.empty()
        pairs = copy_pairs(
            np.asarray(pool.thumbs[active]),
            None,
            cfg.dedup,
            index_cfg,
            res_q=short_side(pool)[active],
            part=part,
            progress=cfg.progress,
        )
        pairs.a, pairs.b = active[pairs.a], active[pairs.b]
        return pairs

    near_inputs = dict(
        settings={"dedup": cfg.dedup, "index": cfg.index, "seed": cfg.seed}, after=["exact"]
    )
    near_parts = array_step("near", near_pairs, lambda p: p.arrays(), **near_inputs)

    def near() -> tuple[dict, dict, dict]:  # c. near duplicates
        d = cfg.dedup
        if near_parts is None:
            pairs = near_pairs(None)
        else:
            pairs = merge_pairs([Pairs.from_arrays(a) for a in near_parts], n)
        a, b, ncc, local, view = pairs.a, pairs.b, pairs.ncc, pairs.local, pairs.view
        edge = (ncc >= d.threshold) & (local >= d.local_threshold)
        keep_c, groups = components(n, a[edge], b[edge], rank)
        keep = keep_exact & keep_c
        slide_of = [r.get("slide") for r in pool.records]
        summary = {
            "in": int(keep_exact.sum()),
            "out": int(keep.sum()),
            "candidate_pairs": int(len(a)),
            "edges": int(edge.sum()),
            "groups": len(groups),
            # tiles of several slides in one group: a slide scanned twice, or cut from one block
            "groups_across_slides": sum(
                len({slide_of[i] for i in g}) > 1 for g in groups if slide_of[g[0]] is not None
            ),
            "threshold": d.threshold,
            "local_threshold": d.local_threshold,
            "tasks": tasks,
        }
        return (
            summary,
            {"groups": [g.tolist() for g in groups]},
            {"keep": keep, "a": a, "b": b, "ncc": ncc, "local": local, "view": view},
        )

    got = steps.run("near", near, **near_inputs)
    keep_near = got[1]["keep"]
    results["near"] = got

    eval_sets = [  # named by pseudonym in records and messages: a folder name can name a patient
        (pseudonymised_path(s), e.thumbs, e.records) for s, e in zip(cfg.eval_sets, evals)
    ]
    near_active = np.nonzero(keep_near)[0]
    check_patient_keys(pool.records, near_active, eval_sets, cfg.decontaminate)

    def decontam_pairs(part: tuple[int, int] | None) -> list[Pairs]:
        return contamination_pairs(
            pool.thumbs,
            pool.records,
            near_active,
            eval_sets,
            cfg.decontaminate,
            index_cfg,
            part=part,
            progress=cfg.progress,
        )

    decontam_inputs = dict(
        settings={"decontaminate": cfg.decontaminate, "index": cfg.index, "seed": cfg.seed},
        datasets={"eval sets": list(cfg.eval_sets)},
        after=["near"],
    )
    decontam_parts = array_step(
        "decontam",
        decontam_pairs,
        lambda found: {k: v for j, p in enumerate(found) for k, v in p.arrays(f"{j}_").items()},
        **decontam_inputs,
    )

    def decontam() -> tuple[dict, dict, dict]:  # d. decontamination
        if decontam_parts is None:
            pairs = decontam_pairs(None)
        else:
            pairs = [
                merge_pairs([Pairs.from_arrays(a, f"{j}_") for a in decontam_parts], len(e))
                for j, e in enumerate(evals)
            ]
        found = decontaminate(pool.records, near_active, eval_sets, cfg.decontaminate, pairs)
        keep = keep_near.copy()
        keep[list(found.removed)] = False
        reasons: dict[str, int] = {}
        for r in found.removed.values():
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1

        def joined(field: str, dtype: type) -> np.ndarray:
            parts = [getattr(p, field) for p in found.pairs]
            return np.concatenate(parts) if parts else np.zeros(0, dtype)

        summary = {
            "in": int(len(near_active)),
            "out": int(keep.sum()),
            "removed_by": reasons,
            "threshold": cfg.decontaminate.threshold,
            "local_threshold": cfg.decontaminate.local_threshold,
            "tasks": tasks,
        }
        return (
            summary,
            {"removed": {str(k): v for k, v in found.removed.items()}},
            {
                "keep": keep,
                "a": joined("a", np.int64),
                "ncc": joined("ncc", np.float32),
                "local": joined("local", np.float32),
            },
        )

    got = steps.run("decontam", decontam, **decontam_inputs)
    keep_clean = got[1]["keep"]
    results["decontam"] = got

    def select() -> tuple[dict, dict, dict]:  # e/f. selection
        selected, summary, data = _select(cfg, pool, seeds, np.nonzero(keep_clean)[0], index_cfg)
        return summary, data, selected

    got = steps.run(
        "select",
        select,
        settings={
            "retrieve": cfg.retrieve,
            "balance": cfg.balance,
            "sample": cfg.sample,
            "seed": cfg.seed,
            "index": cfg.index,
        },
        datasets={"seeds": list(cfg.seeds)},
        after=["decontam"],
    )
    results["select"] = got

    def write() -> tuple[dict, None, None]:  # g. write
        rows = got[1]["rows"]
        n_written = write_curated(cfg, pool, rows, got[0]["data"]["reasons"], out / "curated")
        return {"in": int(len(rows)), "out": n_written, "dir": str(out / "curated")}, None, None

    steps.run("write", write, settings={"write": cfg.write}, after=["select"])
    return report.write_report(cfg, out, steps.summaries, results, shown_config(cfg))


def run_ranked(cfg: DictConfig, *, stop_after: str | None, after_embed: bool) -> dict:
    """The global job on one rank or several (torchrun/SLURM variables). With several, rank 0 runs
    the steps up to decontamination while the others wait; then, with balance.kmeans=exact, every
    rank clusters its slice of the candidates (curation/dkmeans.py) and rank 0 samples and writes.
    The clusters are those of one process."""
    env = detect_env()
    if env.world_size == 1:
        return run_pipeline(cfg, stop_after=stop_after, after_embed=after_embed)
    init_distributed(env, torch.device("cpu"), backend="gloo")
    try:
        if env.rank == 0:
            run_pipeline(cfg, stop_after="decontam", after_embed=after_embed)
        wait_for_rank0("curation: decontam done", RANK_WAIT)
        if env.rank > 0 and cfg.balance.kmeans != "exact":
            return {}  # nothing to share: FAISS's k-means runs on rank 0
        return run_pipeline(
            cfg,
            stop_after=stop_after if env.rank == 0 else "select",
            after_embed=after_embed,
            writer=env.rank == 0,
        )
    finally:
        cleanup_distributed()


def _cluster(cfg: DictConfig, x: np.ndarray, counts: list[int]) -> list:
    """Hierarchical k-means of the candidates: FAISS's (one process), or balance.kmeans=exact,
    spread over the ranks of the job when it has several (the same clusters for any count)."""
    options = dict(
        resample_steps=int(cfg.balance.resample_steps),
        sample_sizes=list(cfg.balance.sample_sizes) if cfg.balance.sample_sizes else None,
        niter=int(cfg.balance.niter),
        seed=int(cfg.seed),
    )
    if cfg.balance.kmeans == "faiss":
        return hierarchical_kmeans(x, counts, **options)
    mine = part_rows(len(x), (global_rank(), world_size()))
    labels, levels = hierarchical_kmeans_dist(x[mine.start : mine.stop], counts, **options)
    levels[0].parent = gather_rows(labels)
    return levels


def _select(
    cfg: DictConfig, pool: Embedded, seeds: list[Embedded], active: np.ndarray, index_cfg: dict
) -> tuple[dict, dict, dict]:
    """Rows to keep with reasons; hierarchical clusters for the report."""
    emb = normalize_rows(np.asarray(pool.embeddings[active]))
    reasons: dict[int, dict] = {}
    info: dict = {}
    if seeds:
        seed_emb = np.concatenate([np.asarray(s.embeddings) for s in seeds])
        local, info = retrieve(
            emb, seed_emb, cfg.retrieve, index_cfg, seed=int(cfg.seed), progress=cfg.progress
        )
        seed_keys = [r["key"] for s in seeds for r in s.records]
        for row, why in local.items():
            if "seed" in why:
                why = {**why, "seed": seed_keys[why["seed"]]}
            reasons[int(active[row])] = why
        candidates = np.array(sorted(reasons), dtype=np.int64)
    else:
        candidates = active
        reasons = {int(i): {"reason": "kept"} for i in active}
    candidates, capped = cap_per_slide(
        candidates, [r.get("slide") for r in pool.records], cfg.sample.per_slide_max, int(cfg.seed)
    )
    if capped:
        info["dropped_by_per_slide_max"] = capped
    target = cfg.sample.target_size
    cand_emb = (
        normalize_rows(np.asarray(pool.embeddings[candidates])) if len(candidates) else emb[:0]
    )
    leaf = np.full(len(candidates), -1, np.int64)
    rows = candidates
    if len(candidates) > 1:
        counts = (
            list(cfg.balance.n_clusters)
            if cfg.balance.n_clusters
            else auto_clusters(len(candidates), int(cfg.balance.levels))
        )
        levels = _cluster(cfg, cand_emb, counts)
        leaf = levels[0].parent
        info["clusters_per_level"] = [len(lv.centroids) for lv in levels]
        if target is not None and int(target) < len(candidates):
            picked, _ = balanced_sample(
                levels,
                int(target),
                seed=int(cfg.seed),
                strategy=str(cfg.balance.strategy),
                x=cand_emb,
            )
            rows = candidates[picked]
    elif target is not None:
        rows = candidates[: int(target)]
    leaf_of = dict(zip(candidates.tolist(), leaf.tolist()))
    data = {
        "reasons": {
            str(int(r)): {**reasons[int(r)], "leaf_cluster": int(leaf_of[int(r)])} for r in rows
        }
    }
    summary = {
        "in": int(len(active)),
        "out": int(len(rows)),
        "mode": "retrieval" if seeds else "automatic",
        "target_size": target,
        **info,
    }
    arrays = {
        "rows": np.asarray(rows, dtype=np.int64),
        "candidates": candidates,
        "candidate_leaf": leaf,
    }
    return arrays, summary, data


def cap_per_slide(
    rows: np.ndarray, slide_of: list[str | None], limit: int | None, seed: int
) -> tuple[np.ndarray, int]:
    """At most `limit` rows per slide (a random, reproducible subset; UNI kept ~800 tiles of
    each slide), so a few large slides do not dominate. Rows without a slide are kept."""
    if limit is None:
        return rows, 0
    rng = np.random.default_rng(seed)
    by_slide: dict[str, list[int]] = {}
    for r in rows.tolist():
        if slide_of[r] is not None:
            by_slide.setdefault(slide_of[r], []).append(r)
    dropped: set[int] = set()
    for members in by_slide.values():
        if len(members) > limit:
            dropped.update(rng.permutation(members)[limit:].tolist())
    kept = np.asarray([r for r in rows.tolist() if r not in dropped], dtype=np.int64)
    return kept, len(dropped)


# ---------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument(
        "--config", help=f"recipe YAML over {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[2])}"
    )
    parser.add_argument(
        "--step",
        choices=RUN_STEPS,
        help="bootstrap: train the bootstrap model only (bootstrap.enabled); embed: the embed step "
        "only (all groups, or --group G); near, decontam: slice --task I of global_tasks of that "
        "step's search (array tasks); global: every step after embed (the job after the arrays; "
        "refuses when a group or a part is missing)",
    )
    parser.add_argument(
        "--task",
        type=int,
        help="with --step near or decontam: this array task's slice (0 .. global_tasks-1)",
    )
    parser.add_argument(
        "--group",
        type=int,
        help="with --step embed: embed only this pool group (SLURM array task "
        "id), of embed.groups groups (or one per embed.shards_per_job shards)",
    )
    parser.add_argument(
        "--list-groups", action="store_true", help="print the number of embed groups and exit"
    )
    parser.add_argument(
        "--stop-after", choices=STEPS[:-1], help="stop after this step (later runs resume)"
    )


def run(args: argparse.Namespace) -> int:
    overrides, rest = split_overrides(args.overrides)
    if rest:
        raise ConfigError(f"unexpected arguments {rest}: give settings as key=value")
    if args.group is not None and args.step != "embed":
        raise ConfigError("--group G needs --step embed (one embed job of an array)")
    if (args.task is not None) != (args.step in ARRAY_STEPS):
        raise ConfigError(f"--task I goes with --step {' or '.join(ARRAY_STEPS)}, and they with it")
    cfg = load_config(DEFAULT_CONFIG, args.config, overrides)
    if cfg.global_tasks is not None and int(cfg.global_tasks) < 1:
        raise ConfigError(f"global_tasks must be >= 1 or null, got {cfg.global_tasks}")
    if args.task is not None:
        if cfg.global_tasks is None or not 0 <= args.task < int(cfg.global_tasks):
            raise ConfigError(
                f"--task {args.task} needs global_tasks=N with 0 <= task < N "
                f"(global_tasks={cfg.global_tasks})"
            )
        run_pipeline(cfg, task=(args.step, args.task))
        print(json.dumps({"step": args.step, "task": args.task, "tasks": cfg.global_tasks}))
        return 0
    groups = None if cfg.embed.groups is None else int(cfg.embed.groups)
    if args.list_groups:
        print(len(dataset_groups(str(cfg.pool), cfg.embed.shards_per_job, groups)))
        return 0
    if args.step == "bootstrap":
        if not cfg.bootstrap.enabled:
            raise ConfigError("--step bootstrap needs bootstrap.enabled=true")
        print(_bootstrap(cfg, Path(cfg.output_dir)))
        return 0
    if args.group is not None:
        run_pipeline(cfg, only_group=args.group)
        return 0
    if cfg.balance.kmeans not in KMEANS:
        raise ConfigError(f"balance.kmeans must be one of {KMEANS}, got {cfg.balance.kmeans!r}")
    if cfg.sample.per_slide_max is not None and int(cfg.sample.per_slide_max) < 1:
        raise ConfigError(
            f"sample.per_slide_max must be >= 1 or null, got {cfg.sample.per_slide_max}"
        )
    stop_after = "embed" if args.step == "embed" else args.stop_after
    summary = run_ranked(cfg, stop_after=stop_after, after_embed=args.step == "global")
    if summary:
        print(
            json.dumps(
                {
                    "curated": summary.get("curated"),
                    "output_dir": str(cfg.output_dir),
                    "curated_dir": str(Path(cfg.output_dir) / "curated"),
                }
            )
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point without curation/__main__.py: `python -m curation.run ...`."""
    parser = argparse.ArgumentParser(
        prog="python -m curation run", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ConfigError, *USER_ERRORS) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
