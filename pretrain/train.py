"""The pretraining loop every method runs on: read top to bottom, it is the whole procedure.

run(cfg): processes join -> output_dir/config.yaml -> Engine (method, optimizer, schedules) ->
[max_steps=0: export the initialised backbone, stop] -> resume from the newest readable
checkpoint (refused when checkpoints exist but none is readable; train.resume=fresh) ->
for each epoch: a loader positioned at the first unseen batch -> train_step, metrics, collapse
and k-NN monitors, checkpoint + export every `checkpoint_every` steps -> final checkpoint,
export, curves.

Exact resume: a checkpoint holds the model, optimizer, scaler, step, data position (epoch, batch
in epoch) and every rank's RNG states, captured between two steps. On restart the loader is
rebuilt for that epoch skipping the consumed batches, then the RNGs are restored, so the next
batch, its augmentations (drawn in the main process with num_workers=0) and the model's random
draws are those of the uninterrupted run. Monitors run inside `preserve_rng`, so how often one
logs never changes the trajectory.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pretrain import distributed as du
from pretrain.checkpoint import (
    EXPORT_DIR,
    ResumePoint,
    RunCheckpointer,
    plan_resume,
    preserve_rng,
    restore_rng,
)
from pretrain.config import (
    CONFIG_FILENAME,
    PRETRAIN_INPUT_KEYS,
    plain,
    pseudonymised_config,
    save_config,
)
from pretrain.data.loader import build_train_loader
from pretrain.data.specs import parse_spec
from pretrain.engine import Engine
from pretrain.monitor import (
    CURVES_FILENAME,
    METRICS_FILENAME,
    CollapseMonitor,
    MetricsAccumulator,
    MetricsWriter,
    OnlineKNN,
    plot_curves,
)
from pretrain.privacy import write_private
from pretrain.provenance import config_sha256
from pretrain.trackers import Trackers

logger = logging.getLogger(__name__)

LOG_FILENAME = "train.log"


def samples_per_epoch(cfg: DictConfig, spec) -> int:
    if cfg.data.samples_per_epoch is not None:
        return int(cfg.data.samples_per_epoch)
    from pretrain.data.datasets import open_dataset

    return len(open_dataset(spec, window=plain(cfg.data.window)))


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@contextlib.contextmanager
def log_file(path: Path | None) -> Iterator[None]:
    """Also log to output_dir/train.log for the duration of the run."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class StepReporter:
    """What happens between two steps besides checkpoints: metrics lines, collapse and k-NN
    monitors, the progress bar. Collective under DDP/FSDP (every rank calls it every step)."""

    def __init__(
        self,
        cfg: DictConfig,
        saved_cfg: DictConfig,
        engine: Engine,
        is_main: bool,
        device: torch.device,
    ):
        out, m = Path(cfg.output_dir), cfg.monitor
        self.engine, self.device = engine, device
        self.metrics = MetricsWriter(
            out / METRICS_FILENAME, enabled=is_main, resume_step=engine.step
        )
        self.trackers = Trackers(
            out,
            tensorboard=is_main and bool(cfg.logging.tensorboard),
            wandb=is_main and bool(cfg.logging.wandb),
            wandb_mode=str(cfg.logging.wandb_mode),
            wandb_project=str(cfg.logging.wandb_project),
            config=tracker_config(cfg, saved_cfg),
            resume_step=engine.step,
        )
        self.accumulator = MetricsAccumulator()
        self.collapse = CollapseMonitor(m)
        self.knn = None
        if int(m.knn_every) > 0:
            self.knn = OnlineKNN(
                m.knn_train,
                m.knn_test,
                img_size=int(cfg.model.img_size),
                channels=cfg.data.channels,
                window=plain(cfg.data.window),
                k=int(m.knn_k),
                max_samples=int(m.knn_max_samples),
                batch_size=int(cfg.data.batch_size),
                device=device,
                autocast_dtype=engine.autocast_dtype,
            )
        self.log_every = max(1, int(cfg.train.log_every))
        self.collapse_every = int(m.collapse_every) or self.log_every
        self.knn_every = int(m.knn_every)
        self.bar = tqdm(
            total=engine.total_steps,
            initial=engine.step,
            desc="pretrain",
            dynamic_ncols=True,
            disable=not (is_main and cfg.train.progress),
        )
        self.tick, self.tick_step = time.perf_counter(), engine.step

    def _due(self, every: int) -> bool:
        step = self.engine.step
        return every > 0 and (step % every == 0 or step == self.engine.total_steps)

    def after_step(self, result: dict[str, Any], batch: Any, epoch: int) -> None:
        engine, step = self.engine, self.engine.step
        self.accumulator.add(result)
        self.bar.update(1)
        record: dict[str, Any] = {}
        if self._due(self.log_every):
            now, state = time.perf_counter(), result["state"]
            record.update(self.accumulator.flush(self.device))
            record.update(
                lr=state.lr,
                wd=state.wd,
                **state.values,
                images_per_s=(step - self.tick_step)
                * engine.global_batch
                / max(now - self.tick, 1e-9),
                memory_gb=_memory_gb(self.device),
                nan_skipped=engine.nan_skipped,
            )
            if engine.scaler.is_enabled():
                record["grad_scale"] = engine.scaler.get_scale()
            self.tick, self.tick_step = now, step
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", refresh=False)
        if self._due(self.collapse_every):
            with torch.no_grad(), _autocast(self.device, engine.autocast_dtype):
                stats = self.collapse.measure(engine.method.monitor_embeddings(batch))
            self.collapse.check(stats, step)
            record.update(stats)
        if self.knn is not None and self._due(self.knn_every):
            record.update(self.knn.evaluate(engine.method))
        if record:
            self.metrics.write({"step": step, "epoch": epoch, **record})
            self.trackers.log(record, step)

    def close(self) -> None:
        self.bar.close()
        self.trackers.close()


def tracker_config(cfg: DictConfig, saved_cfg: DictConfig) -> dict[str, Any]:
    """What a tracker is told of the run: the training hyperparameters and the hash of the saved
    config.yaml (`saved_cfg`), never the data section or output_dir (paths)."""
    keep = ("method", "model", "optim", "train", str(cfg.method))
    doc = {k: plain(cfg[k]) for k in keep if k in cfg}
    return {**doc, "config_sha256": config_sha256(saved_cfg)}


def run(cfg: DictConfig) -> Path:
    """Join the process group (if any), train, leave; returns output_dir."""
    env = du.detect_env()
    device = du.select_device(env, str(cfg.train.device))
    du.init_distributed(env, device, str(cfg.dist.backend))
    log_path = Path(cfg.output_dir) / LOG_FILENAME if env.is_main else None
    try:
        with log_file(log_path):
            return train(cfg, env, device)
    finally:
        du.cleanup_distributed()


def train(cfg: DictConfig, env: du.DistEnv, device: torch.device) -> Path:
    out = Path(cfg.output_dir)
    saved_cfg = pseudonymised_config(cfg, PRETRAIN_INPUT_KEYS)
    if env.is_main:  # the inputs by pseudonym beside the outputs; as given, owner-only
        save_config(saved_cfg, out)
        write_private(out / "private" / CONFIG_FILENAME, OmegaConf.to_yaml(cfg))
    spec = parse_spec(str(cfg.data.train))
    batch_size = int(cfg.data.batch_size)
    global_batch = batch_size * env.world_size
    n_samples = samples_per_epoch(cfg, spec)
    if n_samples < global_batch:
        raise ValueError(
            f"{spec}: {n_samples} samples per epoch, fewer than one global batch ({global_batch})"
        )
    steps_per_epoch = n_samples // global_batch
    # Decided before the engine exists: a run resumed from its own checkpoint continues from it,
    # so init.from is applied only once (max_steps=0 resumes nothing: it exports the
    # initialisation, init.from included). Unreadable checkpoints stop the run here (exit 2).
    start = plan_resume(cfg, env.is_main) if int(cfg.optim.max_steps) != 0 else ResumePoint(None)
    has_checkpoint = start.path is not None
    if has_checkpoint and cfg.init["from"] is not None:
        logger.info("init.from not re-applied: resuming from this run's checkpoints")
    engine = Engine(
        cfg,
        device=device,
        rank=env.rank,
        world_size=env.world_size,
        steps_per_epoch=steps_per_epoch,
        apply_init=not has_checkpoint,
    )
    outputs = RunCheckpointer(cfg, saved_cfg, engine, env.is_main)

    if engine.total_steps == 0:  # the honest random-init baseline
        backbone = {
            k[len(outputs.backbone_prefix) :]: v
            for k, v in engine.state_dicts()[0].items()
            if k.startswith(outputs.backbone_prefix)
        }
        outputs.export(backbone, 0, f"{cfg.method} initialisation (untrained, max_steps=0)")
        logger.info("max_steps=0: exported the initialised backbone to %s", out / EXPORT_DIR)
        return out

    epoch, batch_in_epoch, rng = outputs.resume(start)
    if rng is None:
        du.seed_everything(du.rank_seed(int(cfg.train.seed) + engine.step, env.rank))
    transform = engine.method.build_transform()
    collate_fn = engine.method.collate_fn()
    reporter = StepReporter(cfg, saved_cfg, engine, env.is_main, device)
    ckpt_every, total = int(cfg.train.checkpoint_every), engine.total_steps
    while engine.step < total:
        loader = build_train_loader(
            spec,
            transform,
            batch_size=batch_size,
            num_workers=int(cfg.data.num_workers),
            seed=int(cfg.train.seed),
            rank=env.rank,
            world_size=env.world_size,
            resampled=bool(cfg.data.resampled),
            shuffle_buffer=int(cfg.data.shuffle_buffer),
            window=plain(cfg.data.window),
            epoch=epoch,
            skip_batches=batch_in_epoch,
            drop_last=True,
            pin_memory=device.type == "cuda",
            collate_fn=collate_fn,
        )
        if rng is not None:  # after building the loader, before its first batch
            restore_rng(rng)
            rng = None
        engine.epoch = epoch
        batches = iter(loader)
        while batch_in_epoch < steps_per_epoch and engine.step < total:
            batch = next(batches, None)
            if batch is None:  # this rank's share ran out early (unbalanced shards)
                logger.warning(
                    "epoch %d: rank %d out of data at batch %d; restarting its stream",
                    epoch,
                    env.rank,
                    batch_in_epoch,
                )
                batches = iter(loader)
                if (batch := next(batches, None)) is None:
                    raise RuntimeError(f"{spec}: the loader yields no full batch of {batch_size}")
            result = engine.train_step(batch)
            batch_in_epoch += 1
            with preserve_rng() as rng_now:  # side work never moves the training's random streams
                reporter.after_step(result, batch, epoch)
                if engine.step % ckpt_every == 0 or engine.step == total:
                    # position of the *next* batch and RNG before the monitors: what step+1 sees
                    done = batch_in_epoch >= steps_per_epoch
                    outputs.save(
                        epoch + 1 if done else epoch, 0 if done else batch_in_epoch, rng_now
                    )
        if batch_in_epoch >= steps_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
    reporter.close()

    if outputs.last_saved != engine.step:
        outputs.save(epoch, batch_in_epoch)
    if env.is_main and cfg.monitor.plot:
        plot_curves(out / METRICS_FILENAME, out / CURVES_FILENAME)
    logger.info(
        "done: %d steps, %d skipped as non-finite; outputs in %s",
        engine.step,
        engine.nan_skipped,
        out,
    )
    return out
