"""`python -m eval PROTOCOL --backbone PATH --train SPEC --test SPEC [--val SPEC] --out DIR [key=value ...]`

PROTOCOL: a registered protocol (knn, linear, logreg, fewshot, label_efficiency, finetune, lora,
adaptformer, bottleneck, prompt, ...) or `all` (the `suite` list; with --adapt also the
adaptation protocols). --backbone: a pretraining output dir, an exported backbone, a checkpoint, or
`raw` (flattened pixels). Writes DIR/metrics.json (schema in eval/report.py), metrics.jsonl,
report.md, PNG plots and config.yaml. Under torchrun every rank extracts a share of the features;
rank 0 runs the protocols and writes the outputs.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig, OmegaConf

from eval.contamination import pretraining_overlap
from eval.features import RAW_BACKBONE, FeatureError, FeatureExtractor, stain_setting
from eval.protocols import discover, get_protocol, thread_limit
from eval.protocols.base import EvalContext, EvalError, ProtocolResult
from eval.report import (
    SCHEMA_VERSION,
    data_json,
    load_reference,
    protocol_json,
    write_metrics,
    write_report,
)
from pretrain import distributed as du
from pretrain.backbones import BackboneError
from pretrain.config import ConfigError, load_config, save_config
from pretrain.data.readers import UnreadableImageError
from pretrain.data.specs import DatasetSpecError, parse_spec
from pretrain.privacy import pseudonymised_path
from pretrain.provenance import config_sha256, provenance
from pretrain.trackers import Trackers, wandb_available

logger = logging.getLogger("eval")

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


def _raw_pixel_config(cfg: DictConfig) -> DictConfig:
    """The raw-pixel baseline has one feature vector per image: a backbone feature variant
    (knn.features=n4+avgpool, ...) chosen for the backbone means pixels (`auto`) there."""
    raw = copy.deepcopy(cfg)
    for section in raw.values():
        if isinstance(section, DictConfig) and "features" in section:
            section.features = "auto"
    return raw


def _protocol_names(protocol: str, cfg: DictConfig) -> list[str]:
    registry = discover()
    names = [str(p) for p in cfg.suite] if protocol == "all" else [protocol]
    if protocol == "all" and cfg.adaptation.in_all:  # training protocols only when asked: slow
        names += [str(m) for m in cfg.adaptation.methods if str(m) not in names]
    if not names:
        raise EvalError("config `suite` is empty: `all` has nothing to run")
    for name in names:
        if name not in registry:
            raise EvalError(
                f"unknown protocol {name!r}; choose from: all, {', '.join(sorted(registry))}"
            )
    return names


def _extractor(
    backbone: str, cfg: DictConfig, cache_dir: Path, weights: str | None = None
) -> FeatureExtractor:
    window = cfg.window
    if isinstance(window, ListConfig):  # (center, width) in modality units, e.g. HU
        window = tuple(OmegaConf.to_container(window))
    return FeatureExtractor(
        backbone,
        weights=weights,
        cache_dir=cache_dir,
        n_last_blocks=int(cfg.n_last_blocks),
        batch_size=int(cfg.batch_size),
        num_workers=int(cfg.num_workers),
        device=str(cfg.device),
        window=window,
        raw_img_size=cfg.raw_img_size,
        raw_center=bool(cfg.raw_center),
        stain_norm=stain_setting(cfg),
    )


def _run_protocols(
    ctx: EvalContext,
    names: list[str],
    timing: dict[str, float],
    skipped: dict[str, str] | None = None,
    tag: str = "",
) -> dict[str, ProtocolResult]:
    """Run each protocol; with `skipped` given (the `all` suite), one that does not apply to this
    data (few-shot on multi-label targets) is recorded there instead of failing the suite."""
    results: dict[str, ProtocolResult] = {}
    for name in names:
        start = time.perf_counter()
        logger.info("running %s%s", name, tag)
        try:
            results[name] = get_protocol(name).run(ctx)
        except EvalError as exc:
            if skipped is None:
                raise
            logger.warning("%s%s skipped: %s", name, tag, exc)
            skipped[f"{name}{tag}"] = str(exc)
            continue
        timing[f"{name}{tag}"] = time.perf_counter() - start
        best = results[name].settings[results[name].best]
        logger.info(
            "%s%s %s: accuracy %.4f, balanced accuracy %.4f, AUROC %.4f",
            name,
            tag,
            results[name].best,
            best["accuracy"],
            best["balanced_accuracy"],
            best["auroc"],
        )
    return results


def run_eval(
    protocol: str,
    *,
    backbone: str,
    train: str,
    test: str,
    out: str | Path,
    val: str | None = None,
    cfg: DictConfig | None = None,
    argv: Sequence[str] | None = None,
    weights: str | None = None,
) -> dict[str, Any] | None:
    """Run `protocol` and write the outputs; returns the metrics.json document (None off rank 0).

    `argv`: the command line recorded, with its paths pseudonymised (default this process's)."""
    cfg = cfg if cfg is not None else load_config(DEFAULT_CONFIG)
    out_dir = Path(out)
    names = _protocol_names(protocol, cfg)
    if "knn" in names and val is None and int(cfg.knn.default_k) not in map(int, cfg.knn.ks):
        raise EvalError(
            f"knn.default_k={cfg.knn.default_k} is not in knn.ks={list(cfg.knn.ks)}: without "
            "--val it is the k reported"
        )
    if cfg.logging.wandb and not wandb_available():
        raise ConfigError("logging.wandb=true needs Weights & Biases: pip install 'medssl[wandb]'")
    for spec in (train, test, val):
        if spec is not None:
            parse_spec(spec)  # a bad spec fails before the backbone is loaded
    cache_dir = (
        Path(cfg.cache_dir) if cfg.cache_dir else out_dir.resolve().parent / ".feature_cache"
    )
    timing: dict[str, float] = {}
    start = time.perf_counter()
    extractor = _extractor(backbone, cfg, cache_dir, weights)
    ctx = EvalContext.from_specs(cfg, extractor, train=train, test=test, val=val, out_dir=out_dir)
    timing["features"] = time.perf_counter() - start
    if du.is_dist() and dist.get_rank() != 0:
        return None  # rank 0 runs the protocols on the gathered features
    baselines: dict[str, Any] = {}
    raw_names = [n for n in names if n in [str(p) for p in cfg.raw_baseline]]
    skipped: dict[str, str] | None = {} if protocol == "all" else None
    with thread_limit(int(cfg.threads)):
        results = _run_protocols(ctx, names, timing, skipped)
        if raw_names and backbone != RAW_BACKBONE:
            start = time.perf_counter()
            raw_ctx = EvalContext.from_specs(
                _raw_pixel_config(cfg),
                _extractor(RAW_BACKBONE, cfg, cache_dir),
                train=train,
                test=test,
                val=val,
                out_dir=out_dir,
            )
            timing["features (raw)"] = time.perf_counter() - start
            raw_results = _run_protocols(raw_ctx, raw_names, timing, skipped, tag=" (raw)")
            baselines["raw"] = {
                "preprocessing": raw_ctx.extractor.preprocessing() if raw_ctx.extractor else {},
                "protocols": {n: protocol_json(r, raw_ctx) for n, r in raw_results.items()},
            }
    meta = extractor.meta
    backbone_provenance = meta.get("provenance") or {}
    overlap: dict[str, Any] = {"checked": False, "reason": "raw pixels or a foreign backbone"}
    if not extractor.is_raw and backbone_provenance:
        overlap = pretraining_overlap(backbone, meta, {"val": val, "test": test})
    record = provenance(cfg, inputs=[s for s in (train, val, test) if s is not None], argv=argv)
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": record["command"],  # every path in it pseudonymised, as in the report
        "backbone": {
            "path": pseudonymised_path(backbone),
            "fingerprint": extractor.fingerprint,
            "arch": meta.get("arch"),
            "num_features": meta.get("num_features") or int(ctx.train.tokens.shape[-1]),
            "source": meta.get("source"),
            "git_commit": (backbone_provenance.get("code") or {}).get("git_commit"),
            "pretraining_manifests": [
                i.get("manifest_sha256") or i.get("listing_sha256")
                for i in backbone_provenance.get("inputs") or []
            ],
            "provenance": backbone_provenance or None,
        },
        "provenance": record,
        "pretraining_overlap": overlap,
        "preprocessing": extractor.preprocessing(),
        "data": data_json(ctx),
        "protocols": {n: protocol_json(r, ctx) for n, r in results.items()},
        "baselines": baselines,
        "skipped": skipped or {},
        "reference": load_reference(cfg.reference, ctx.dataset_name),
        "timing_s": timing,
    }
    write_metrics(doc, out_dir)
    track_eval(doc, cfg, out_dir)
    with thread_limit(int(cfg.threads)):
        write_report(doc, results, ctx, out_dir)
    save_config(cfg, out_dir)
    logger.info("wrote %s and %s", out_dir / "metrics.json", out_dir / "report.md")
    return doc


def track_eval(doc: dict[str, Any], cfg: DictConfig, out_dir: Path) -> None:
    """Every protocol setting's metrics (step 0) and each fine-tuning / adapter run's per-epoch
    curve to the trackers asked for in `logging`."""
    if not (cfg.logging.tensorboard or cfg.logging.wandb):
        return
    trackers = Trackers(
        out_dir,
        tensorboard=bool(cfg.logging.tensorboard),
        wandb=bool(cfg.logging.wandb),
        wandb_mode=str(cfg.logging.wandb_mode),
        wandb_project=str(cfg.logging.wandb_project),
        config={"protocols": list(doc["protocols"]), "config_sha256": config_sha256(cfg)},
    )
    try:
        for name, block in doc["protocols"].items():
            for setting, metrics in block["settings"].items():
                trackers.log({f"{name}/{setting}/{k}": v for k, v in metrics.items()}, step=0)
                params = metrics.get("params") if isinstance(metrics, dict) else None
                for seed, curve in enumerate((params or {}).get("history") or []):
                    for point in curve:
                        values = {f"{name}/{setting}/seed{seed}/{k}": v for k, v in point.items()}
                        trackers.log(values, step=int(point["epoch"]))
    finally:
        trackers.close()


def _init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not du.is_dist():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mil"]:  # bag-level evaluation has its own arguments (eval/mil.py)
        from eval.mil import main as mil_main

        return mil_main(argv[1:])
    registry = discover()
    parser = argparse.ArgumentParser(
        prog="python -m eval",
        fromfile_prefix_chars="@",  # launch's private argument files
        description="Evaluate a frozen backbone: k-NN, linear probes, logistic regression, "
        "few-shot and label efficiency, with medical metrics and bootstrap CIs; adapt it: full "
        "fine-tuning, LoRA, AdaptFormer, bottleneck adapters, prompt tuning.",
    )
    parser.add_argument(
        "protocol", help=f"all | {' | '.join(sorted(registry))} | mil (see python -m eval mil -h)"
    )
    parser.add_argument(
        "--backbone",
        required=True,
        help="pretraining output dir, export dir, checkpoint, 'raw', local-dir:PATH (any timm "
        "model folder), timm:NAME[?key=value&...] with --weights, or 2.5d:ANY-OF-THOSE (a 2D "
        "backbone over a volume's axial slices, features averaged)",
    )
    parser.add_argument(
        "--weights",
        help="weights file for --backbone timm:NAME (.safetensors/.pth/.bin; never downloaded)",
    )
    parser.add_argument("--train", required=True, help="dataset spec (e.g. file.npz:train)")
    parser.add_argument("--test", required=True, help="dataset spec of the reported split")
    parser.add_argument("--val", help="dataset spec for selection (default: split of train)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--config", help="recipe YAML overriding eval/configs/default.yaml")
    parser.add_argument(
        "--adapt",
        action="store_true",
        help="`all` also runs the adaptation protocols (adaptation.methods; adaptation.in_all=true)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        overrides = [*args.overrides, *(["adaptation.in_all=true"] if args.adapt else [])]
        cfg = load_config(DEFAULT_CONFIG, args.config, overrides)
        _init_distributed()
        run_eval(
            args.protocol,
            backbone=args.backbone,
            train=args.train,
            test=args.test,
            val=args.val,
            out=args.out,
            cfg=cfg,
            argv=[__file__, *(sys.argv[1:] if argv is None else argv)],
            weights=args.weights,
        )
    except (
        ConfigError,
        DatasetSpecError,
        EvalError,
        FeatureError,
        FileNotFoundError,
        BackboneError,
        UnreadableImageError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if du.is_dist():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
