"""One optimizer update for any registered method: precision, DDP/FSDP, schedules, NaN guard.

`Engine.train_step(batch)` is callable without a data loader (bench/train_step.py times it); the
loop in `pretrain.train` feeds it batches, checkpoints it and logs what it returns.

DDP wraps the *whole method* (its forward is `forward_loss`), so a method may call its modules in
any order and any number of times; only parameters of `method.ddp_modules()` are synchronised (the
rest, e.g. an EMA teacher, is listed as ignored). FSDP2 (`dist.fsdp=true`) shards every ViT block,
then every parameter-holding child of the method (student *and* teacher, so an EMA update pairs
local shards of equal shape), then the method as root.

Continued pretraining: `init.from` is loaded into every backbone of the method before wrapping
(pretrain.init_from); during the first `init.heads_only_steps` steps the gradients of
`method.backbone_parameters()` are dropped after backward, so only the heads train (logged as the
`backbone_frozen` schedule).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from pretrain import distributed as du
from pretrain.methods import SSLMethod, StepState, build_method
from pretrain.optim import apply_lr_wd, build_optimizer, check_param_groups
from pretrain.schedules import cosine_schedule, lr_scale, steps_from_epochs, value_at

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps: continuing would only burn compute."""


def resolve_total_steps(optim: DictConfig, steps_per_epoch: int) -> int:
    max_steps = int(optim.max_steps)
    if max_steps >= 0:
        return max_steps
    return steps_from_epochs(float(optim.epochs), steps_per_epoch)


def build_engine_schedules(
    optim: DictConfig, total_steps: int, steps_per_epoch: int, global_batch: int
) -> dict[str, np.ndarray]:
    """lr (scaled to the global batch, warmup + cosine) and weight decay (cosine) per step."""
    lr = float(optim.base_lr) * lr_scale(
        global_batch, int(optim.lr_reference_batch), str(optim.lr_scaling)
    )
    if optim.warmup_steps is not None:
        warmup = int(optim.warmup_steps)
    else:
        warmup = steps_from_epochs(float(optim.warmup_epochs), steps_per_epoch)
    if warmup > total_steps:
        logger.warning("warmup (%d steps) longer than the run (%d): capped", warmup, total_steps)
        warmup = total_steps
    return {
        "lr": cosine_schedule(lr, float(optim.min_lr), total_steps, warmup_steps=warmup),
        "wd": cosine_schedule(
            float(optim.weight_decay), float(optim.weight_decay_end), total_steps
        ),
    }


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN's bf16 matmuls beat fp32 (without them they emulate, slowly)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_channels_last(setting: Any, model: nn.Module) -> bool:
    """`train.channels_last`: true | false | auto (true when the model has non-patchifying convs,
    i.e. a ResNet; a ViT's patch embedding alone gains nothing)."""
    if setting in (True, False):
        return bool(setting)
    if str(setting) != "auto":
        raise ValueError(f"train.channels_last must be true, false or auto, got {setting!r}")
    return any(isinstance(m, nn.Conv2d) and m.kernel_size != m.stride for m in model.modules())


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _shard_fsdp(method: SSLMethod, device: torch.device) -> None:
    """FSDP2: one group per ViT block (student and teacher alike), the rest in the root group.

    Every computation of a step happens inside `method.forward`, so the root group is gathered
    exactly then; the engine's other entry points are registered as forward methods. Blocks and
    root params are sharded per parameter on dim 0, so EMA updates pair equal-shaped local shards.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (du.world_size(),))
    for module in list(method.modules()):
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.Sequential | nn.ModuleList):
            for block in blocks:
                fully_shard(block, mesh=mesh)
    fully_shard(method, mesh=mesh)
    for name in ("monitor_embeddings", "export_features"):
        register_fsdp_forward_method(method, name)


class Engine:
    """Method + wrapper + optimizer + scaler + schedules; holds the step counter and NaN counters."""

    def __init__(
        self,
        cfg: DictConfig,
        *,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        steps_per_epoch: int = 1,
        apply_init: bool = True,
    ):
        """apply_init: load `init.from` (continued pretraining); False when a checkpoint of this
        run will be resumed, so its weights are never overwritten by the initial ones."""
        self.cfg, self.device, self.rank, self.world_size = cfg, device, rank, world_size
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.global_batch = int(cfg.data.batch_size) * world_size
        self.total_steps = resolve_total_steps(cfg.optim, self.steps_per_epoch)
        self.precision = str(cfg.train.precision)
        self.autocast_dtype = AUTOCAST_DTYPES[self.precision]
        if self.precision == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
            logger.warning(
                "train.precision=bf16 on a CPU without native bf16 matmuls (%s): they run several "
                "times slower than fp32 here (bench/train_step.py); train.precision=fp32 is faster",
                torch.backends.cpu.get_cpu_capability(),
            )
        # FSDP needs a process group; one of world size 1 shards nothing but runs FSDP's code path
        # (bench/train_step.py measures its overhead that way)
        self.fsdp = bool(cfg.dist.fsdp) and (world_size > 1 or du.is_dist())

        du.seed_everything(int(cfg.train.seed))  # identical initial weights on every rank
        self.method: SSLMethod = build_method(cfg).to(device)
        if use_channels_last(cfg.train.channels_last, self.method):
            # NHWC convolutions: ~25 % faster ResNet steps on CPU, the fast path for GPU tensor cores
            self.method.to(memory_format=torch.channels_last)
        self.method.train()
        self.init_report = None
        if apply_init and cfg.init["from"] is not None:  # before wrapping: plain tensors
            from pretrain.init_from import initialise_from

            self.init_report = initialise_from(
                self.method,
                str(cfg.init["from"]),
                layout=str(cfg.init.layout),
                report_dir=cfg.output_dir if rank == 0 else None,
            )
        n = max(self.total_steps, 1)
        self.schedules = build_engine_schedules(
            cfg.optim, n, self.steps_per_epoch, self.global_batch
        )
        self.method.lr_schedule = self.schedules["lr"]
        for name, values in self.method.schedules(n, self.steps_per_epoch).items():
            if name in self.schedules or len(values) != n:
                raise ValueError(f"method schedule {name!r}: duplicate name or length != {n}")
            self.schedules[name] = np.asarray(values, dtype=np.float64)
        self.heads_only_steps = int(cfg.init.heads_only_steps)
        if self.heads_only_steps > 0:  # 1 while the backbone is frozen (logged like any schedule)
            self.schedules["backbone_frozen"] = (np.arange(n) < self.heads_only_steps).astype(
                np.float64
            )

        if bool(cfg.train.compile):
            for module in self.method.ddp_modules():
                module.compile()
        self.model: nn.Module = self._wrap()
        groups = self.method.param_groups()
        check_param_groups(groups, self.method)
        optim = cfg.optim
        self.optimizer = build_optimizer(
            groups,
            betas=tuple(optim.betas),
            fused=optim.fused,
            device=device,
            name=str(optim.optimizer),
            momentum=float(optim.momentum),
            lars_eta=float(optim.lars_eta),
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.clip_grad = float(optim.clip_grad)
        # Fused Adam(W) divides the gradients by its `grad_scale` (GradScaler's protocol) inside its
        # own pass over them, so a clipped step needs no separate multiply of every gradient.
        # GradScaler (fp16) sets grad_scale itself, and FSDP's DTensor steps keep torch's clip.
        self._clip_in_step = (
            bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))
            and not self.scaler.is_enabled()
            and not self.fsdp
        )
        self.trainable = [p for p in self.method.parameters() if p.requires_grad]
        # after wrapping: FSDP replaces parameters by sharded ones
        self.frozen_backbone = self.method.backbone_parameters() if self.heads_only_steps else []
        self._frozen_norms = (
            [
                m
                for backbone in self.method.backbone_modules()
                if any(p.requires_grad for p in backbone.parameters())  # not DINOv2's teacher
                for m in backbone.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)
            ]
            if self.heads_only_steps
            else []
        )
        self._backbone_frozen = False
        if self.heads_only_steps:
            logger.info(
                "heads-only warmup: %d backbone tensors frozen for the first %d steps",
                len(self.frozen_backbone),
                self.heads_only_steps,
            )
        self.step = 0
        self.nan_skipped = 0
        self.nan_consecutive = 0
        self.nan_abort_after = int(cfg.train.nan_abort_after)
        self.epoch = 0  # set by the loop; read into StepState
        logger.info(
            "engine: %s, %d trainable params in %d groups, global batch %d (%d x %d), lr %.3g, "
            "%d steps (%d/epoch), %s, %s",
            cfg.method,
            sum(p.numel() for p in self.trainable),
            len(groups),
            self.global_batch,
            int(cfg.data.batch_size),
            world_size,
            self.schedules["lr"].max(),
            self.total_steps,
            self.steps_per_epoch,
            self.precision,
            "FSDP" if self.fsdp else ("DDP" if world_size > 1 else "single process"),
        )

    # ---- wrapping ------------------------------------------------------------------------------
    def _wrap(self) -> nn.Module:
        if self.fsdp:
            _shard_fsdp(self.method, self.device)
            return self.method
        if self.world_size == 1:
            return self.method
        from torch.nn.parallel import DistributedDataParallel as DDP

        synced = {id(p) for m in self.method.ddp_modules() for p in m.parameters()}
        synced |= {id(b) for m in self.method.ddp_modules() for b in m.buffers()}
        ignored = [n for n, p in self.method.named_parameters() if id(p) not in synced]
        ignored += [n for n, b in self.method.named_buffers() if id(b) not in synced]
        DDP._set_params_and_buffers_to_ignore_for_model(self.method, ignored)
        return DDP(
            self.method,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            forward_sync_buffers=False,  # buffers of ddp_modules agree at init; EMA state is rank-local
            find_unused_parameters=bool(self.cfg.dist.find_unused_parameters),
        )

    # ---- one step ------------------------------------------------------------------------------
    def step_state(self, step: int | None = None) -> StepState:
        step = self.step if step is None else step
        values = {k: value_at(v, step) for k, v in self.schedules.items() if k not in ("lr", "wd")}
        return StepState(
            step=step,
            max_steps=self.total_steps,
            epoch=self.epoch,
            world_size=self.world_size,
            rank=self.rank,
            device=self.device,
            lr=value_at(self.schedules["lr"], step),
            wd=value_at(self.schedules["wd"], step),
            values=values,
            autocast_dtype=self.autocast_dtype,
        )

    def _freeze_backbone(self, frozen: bool) -> None:
        """Heads-only warmup: BatchNorm statistics stay as loaded (eval mode, re-applied every
        step in case the loop called .train()), and in a single process the backbone computes no
        gradients at all (its backward is skipped)."""
        for norm in self._frozen_norms:
            norm.train(not frozen and self.method.training)
        if frozen != self._backbone_frozen and self.world_size == 1:
            for param in self.frozen_backbone:
                param.requires_grad_(not frozen)
        self._backbone_frozen = frozen

    def _grad_norm(self) -> tuple[Tensor, Tensor]:
        """The total gradient norm, as computed (a DTensor under FSDP) and as a plain tensor."""
        grads = [p.grad for p in self.trainable if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        full = getattr(norm, "full_tensor", None)
        return norm, (full() if callable(full) else norm).detach().float()

    def train_step(self, batch: Any) -> dict[str, Any]:
        """One update at `self.step`; returns tensors (no host sync) + `skipped`/`overflow` flags."""
        state = self.step_state()
        if self.heads_only_steps:
            self._freeze_backbone(state.values["backbone_frozen"] > 0)
        apply_lr_wd(self.optimizer, state.lr, state.wd, state.values.get("last_layer_lr"))
        self.optimizer.zero_grad(set_to_none=True)
        batch = to_device(batch, self.device)
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            loss, terms = self.model(batch, state)
        self.scaler.scale(loss).backward()
        if self._backbone_frozen:
            # heads-only warmup: no gradient, so no update, no weight decay and no optimizer state
            # for the backbone (the EMA teacher then stays equal to it too). Under DDP the grads
            # were computed (its hooks expect them) and are dropped here.
            for param in self.frozen_backbone:
                param.grad = None
        self.method.on_after_backward(state)
        self.scaler.unscale_(self.optimizer)
        norm, grad_norm = self._grad_norm()
        max_norm = self.clip_grad if self.clip_grad > 0 else math.inf
        # One host sync per step: every rank must agree to skip (loss is rank-local). It also
        # says whether to clip, so unclipped steps skip the multiply by 1 of every gradient.
        flags = torch.stack(
            [
                ~torch.isfinite(loss.detach().float()),
                ~torch.isfinite(grad_norm),
                grad_norm > max_norm,
            ]
        )
        flags = du.all_reduce_max(flags.float().to(self.device)).cpu()
        loss_bad, grad_bad, clip = bool(flags[0]), bool(flags[1]), bool(flags[2])
        clip = clip and not grad_bad
        if clip and not self._clip_in_step:
            torch.nn.utils.clip_grads_with_norm_(self.trainable, max_norm, norm, foreach=True)
        # fp16: inf grads with a finite loss are an overflow the GradScaler handles by itself.
        overflow = self.scaler.is_enabled() and grad_bad and not loss_bad
        skipped = loss_bad or (grad_bad and not overflow)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            self.nan_skipped += 1
            self.nan_consecutive += 1
            logger.warning(
                "step %d: non-finite %s, update skipped (%d in a row, %d total)",
                self.step,
                "loss" if loss_bad else "gradient",
                self.nan_consecutive,
                self.nan_skipped,
            )
            if self.scaler.is_enabled():
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        else:
            self.nan_consecutive = 0
            if clip and self._clip_in_step:  # clip_grads_with_norm_'s factor, applied by the step
                self.optimizer.grad_scale = (grad_norm + 1e-6) / max_norm
            try:
                self.scaler.step(self.optimizer)
            finally:
                self.optimizer.__dict__.pop("grad_scale", None)
            self.scaler.update()
            if not overflow:
                self.method.on_after_step(state)
        self.step += 1
        if self.nan_consecutive >= self.nan_abort_after > 0:
            raise TrainingDiverged(
                f"{self.nan_consecutive} consecutive steps (up to step {self.step - 1}) had a "
                f"non-finite loss or gradient; aborting. Lower optim.base_lr, raise warmup, use "
                f"train.precision=fp32 or bf16, or check the data; the last good checkpoint is kept."
            )
        return {
            "loss": loss.detach(),
            "terms": {k: v.detach() for k, v in terms.items()},
            "grad_norm": grad_norm,
            "skipped": skipped,
            "overflow": overflow,
            "state": state,
        }

    # ---- checkpoint state ----------------------------------------------------------------------
    def _sd_options(self, full_cpu: bool = True) -> StateDictOptions:
        return StateDictOptions(full_state_dict=True, cpu_offload=full_cpu)

    def state_dicts(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Full (unsharded) model and optimizer state, on CPU; a collective under FSDP."""
        return get_state_dict(self.method, self.optimizer, options=self._sd_options())

    def load_state_dicts(self, model_state: dict[str, Tensor], optim_state: dict[str, Any]) -> None:
        set_state_dict(
            self.method,
            self.optimizer,
            model_state_dict=model_state,
            optim_state_dict=optim_state,
            options=StateDictOptions(full_state_dict=True, strict=True),
        )

    def counters(self) -> dict[str, int]:
        return {
            "step": self.step,
            "nan_skipped": self.nan_skipped,
            "nan_consecutive": self.nan_consecutive,
        }

    def restore(
        self,
        model_state: dict[str, Tensor],
        optim_state: dict[str, Any],
        scaler_state: dict[str, Any],
        counters: dict[str, int],
    ) -> None:
        """Everything a checkpoint holds of the engine, back in place (the inverse of
        state_dicts + scaler.state_dict + counters)."""
        self.load_state_dicts(model_state, optim_state)
        self.scaler.load_state_dict(scaler_state)
        self.step = int(counters["step"])
        self.nan_skipped = int(counters["nan_skipped"])
        self.nan_consecutive = int(counters["nan_consecutive"])
