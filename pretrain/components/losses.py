"""Self-supervised losses as plain functions on tensors (and, where a running center is state, small
modules): DINO cross-entropy with a softmax-centred or Sinkhorn-Knopp teacher, iBOT masked-patch
cross-entropy, KoLeo, Gram anchoring (DINOv3), NT-Xent (SimCLR) and MAE's normalised-pixel loss.

They follow the reference code numerically (facebookresearch/dinov2, google-research/simclr,
facebookresearch/mae: same normalisations, center momentum, Sinkhorn-Knopp marginals), so a recipe
tuned there means the same here. Under torch.distributed, centering, Sinkhorn-Knopp and NT-Xent's
negatives span all ranks: targets are balanced over the global batch, not per GPU. None of them
reads a config: any training loop can use them.

Example (DINO loss of 2 global + 2 local student crops against 2 teacher crops, batch 4, K 8):
    >>> import torch
    >>> loss_fn = DINOLoss(out_dim=8)
    >>> probs = loss_fn.teacher_probs(torch.randn(2 * 4, 8), teacher_temp=0.04).view(2, 4, 8)
    >>> loss = loss_fn(torch.randn(2, 4, 8), torch.randn(2, 4, 8), probs)
    >>> loss.ndim, bool(loss > 0)
    (0, True)
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain import distributed as du

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# DINO (image-level) loss
# --------------------------------------------------------------------------------------------------


def dino_cross_entropy(
    student_global: Tensor | None,
    student_local: Tensor | None,
    teacher_probs: Tensor,
    student_temp: float = 0.1,
) -> Tensor:
    """Mean cross-entropy H(teacher_j, student_i) over all (student crop i, teacher crop j) pairs, i != j.

    student_global: (n_global, B, K) logits of the student on the global crops (None: not used),
    student_local: (n_local, B, K) logits on the local crops (None or n_local = 0: no local crops),
    teacher_probs: (n_global, B, K) teacher target distributions on the global crops.
    Pairs: every local crop with every teacher crop, every global crop with the *other* teacher
    crops (a view is never its own target). The result is the per-image mean over these
    n_global * (n_global - 1) + n_local * n_global pairs, exactly DINOv2's normalisation.

    Instead of a double loop, the targets are summed once: sum_j H(t_j, s_i) = -<sum_j t_j, log p_i>.
    """
    n_global, batch = teacher_probs.shape[0], teacher_probs.shape[1]
    teacher_probs = teacher_probs.float()
    teacher_sum = teacher_probs.sum(dim=0)  # (B, K)
    total = teacher_probs.new_zeros(())
    n_pairs = 0
    if student_local is not None and student_local.shape[0] > 0:
        lsm = F.log_softmax(student_local.float() / student_temp, dim=-1)  # (n_local, B, K)
        total = total - torch.einsum("lbk,bk->", lsm, teacher_sum)
        n_pairs += student_local.shape[0] * n_global
    if student_global is not None and n_global > 1:
        if student_global.shape[0] != n_global:
            raise ValueError(
                f"student_global has {student_global.shape[0]} crops, teacher_probs {n_global}"
            )
        lsm = F.log_softmax(student_global.float() / student_temp, dim=-1)  # (n_global, B, K)
        others = teacher_sum.unsqueeze(0) - teacher_probs  # targets of the other views
        total = total - torch.einsum("gbk,gbk->", lsm, others)
        n_pairs += n_global * (n_global - 1)
    if n_pairs == 0:
        raise ValueError("dino_cross_entropy: no (student, teacher) pair to compare")
    return total / (n_pairs * batch)


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3, n_samples: int | None = None
) -> Tensor:
    """Sinkhorn-Knopp targets (SwAV / DINOv2): each row an assignment summing to 1, prototypes used
    equally (each column sums to about N/K) over the *global* batch.

    teacher_logits: (N, K) local rows. n_samples: the global number of rows (default: N x world size;
    iBOT passes the all-reduced count of masked patches because it differs per rank).
    """
    logits = teacher_logits.float()
    # Subtracting the global max leaves the normalised result unchanged and keeps exp() finite.
    shift = du.all_reduce_max(logits.max().clone())
    q = torch.exp((logits - shift) / teacher_temp).t()  # (K, N)
    n_prototypes = q.shape[0]
    if n_samples is None:
        n_samples = q.shape[1] * du.world_size()
    q /= du.all_reduce_sum(q.sum())
    for _ in range(n_iterations):
        # rows: every prototype gets total mass 1/K (summed over all ranks)
        q /= du.all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= n_prototypes
        # columns: every sample gets mass 1/N
        q /= q.sum(dim=0, keepdim=True)
        q /= n_samples
    q *= n_samples
    return q.t()


class _CenteredTeacherLoss(nn.Module):
    """The teacher-side state DINO and iBOT share: temperatures, normalisation, a running center.

    The center update is split in two, as in DINOv2: `teacher_probs` uses the current center and
    starts the all-reduce of this step's teacher statistics without waiting for it; `forward` (the
    student's loss, computed after the student pass) finishes it. The network traffic overlaps the
    student's forward instead of stalling before it; the arithmetic is unchanged.
    """

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "centering",
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        if centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(
                f"centering must be 'centering' or 'sinkhorn_knopp', got {centering!r}"
            )
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._pending: tuple[Tensor, float, object] | None = None

    @torch.no_grad()
    def softmax_center(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """softmax((t - center) / temp); the center is the running mean of teacher logits."""
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    def _center_statistics(self, teacher_logits: Tensor) -> tuple[Tensor, float]:
        """(this rank's tensor to sum over ranks, divisor of the sum) for the center update."""
        raise NotImplementedError

    @torch.no_grad()
    def begin_center_update(self, teacher_logits: Tensor) -> None:
        total, divisor = self._center_statistics(teacher_logits)
        handle = dist.all_reduce(total, async_op=True) if du.is_dist() else None
        self._pending = (total, divisor, handle)

    @torch.no_grad()
    def finish_center_update(self) -> None:
        """center <- m * center + (1 - m) * this step's mean over all ranks (no-op if none pending)."""
        if self._pending is None:
            return
        total, divisor, handle = self._pending
        self._pending = None
        if handle is not None:
            handle.wait()
        self.center.mul_(self.center_momentum).add_(total / divisor, alpha=1 - self.center_momentum)

    def update_center(self, teacher_logits: Tensor) -> None:
        self.begin_center_update(teacher_logits)
        self.finish_center_update()


class DINOLoss(_CenteredTeacherLoss):
    """DINO loss with its teacher-side normalisation ("centering" or "sinkhorn_knopp").

    Usage per step: probs = loss.teacher_probs(teacher_logits, temp) (starts the center update),
    then loss(student_global, student_local, probs.view(n_global, B, K)) (completes it).
    """

    def _center_statistics(self, teacher_logits: Tensor) -> tuple[Tensor, float]:
        batch_sum = teacher_logits.float().sum(dim=0, keepdim=True)
        return batch_sum, float(teacher_logits.shape[0] * du.world_size())

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Targets for (N, K) teacher logits with the configured normalisation."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp, self.sinkhorn_iterations)
        probs = self.softmax_center(teacher_logits, teacher_temp)
        self.begin_center_update(teacher_logits)
        return probs

    def forward(
        self, student_global: Tensor | None, student_local: Tensor | None, teacher_probs: Tensor
    ) -> Tensor:
        self.finish_center_update()
        return dino_cross_entropy(student_global, student_local, teacher_probs, self.student_temp)


# --------------------------------------------------------------------------------------------------
# iBOT (masked patch) loss
# --------------------------------------------------------------------------------------------------


def ibot_masked_cross_entropy(
    student_logits: Tensor,
    teacher_probs: Tensor,
    masks: Tensor,
    student_temp: float = 0.1,
) -> Tensor:
    """iBOT loss on masked patches only: per image, the mean over its masked patches of
    H(teacher, student); then the mean over all images (images without a mask count as 0, as in DINOv2).

    student_logits, teacher_probs: (M, K) for the M masked patches in row-major order of `masks`
    (i.e. masks.flatten().nonzero()); masks: (n_images, n_patches) bool.
    """
    masks = masks.bool()
    n_masked = masks.sum(dim=-1, keepdim=True).clamp(min=1)
    weights = (1.0 / n_masked).expand_as(masks)[masks].to(student_logits.device)  # (M,)
    if weights.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"{student_logits.shape[0]} masked-patch logits for {weights.shape[0]} masked patches"
        )
    lsm = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    per_patch = -(teacher_probs.float() * lsm).sum(dim=-1)
    return (per_patch * weights).sum() / masks.shape[0]


class iBOTPatchLoss(_CenteredTeacherLoss):  # noqa: N801 -- the method's published name
    """iBOT loss with its own running center (patch logits have other statistics than class logits)."""

    def _center_statistics(self, teacher_logits: Tensor) -> tuple[Tensor, float]:
        """Mean over this rank's masked patches, averaged over ranks (DINOv2's patch center)."""
        if teacher_logits.shape[0] == 0:
            batch_mean = self.center.new_zeros(self.center.shape)
        else:
            batch_mean = teacher_logits.float().mean(dim=0, keepdim=True)
        return batch_mean, float(du.world_size())

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        if self.centering == "sinkhorn_knopp":
            n_samples = torch.tensor(float(teacher_logits.shape[0]), device=teacher_logits.device)
            n_samples = int(du.all_reduce_sum(n_samples).item())
            return sinkhorn_knopp(
                teacher_logits, teacher_temp, self.sinkhorn_iterations, n_samples=max(n_samples, 1)
            )
        probs = self.softmax_center(teacher_logits, teacher_temp)
        self.begin_center_update(teacher_logits)
        return probs

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, masks: Tensor) -> Tensor:
        self.finish_center_update()
        return ibot_masked_cross_entropy(student_logits, teacher_probs, masks, self.student_temp)


# --------------------------------------------------------------------------------------------------
# KoLeo regulariser
# --------------------------------------------------------------------------------------------------


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko entropy estimate (Sablayrolles et al. 2018): -mean log distance of each
    L2-normalised feature to its nearest neighbour in the batch. Spreads features uniformly; computed
    in fp32 because nearest-neighbour distances between near-duplicates underflow in bf16."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(-2.0)  # never one's own neighbour (cosine >= -1 for all others)
            nearest = dots.argmax(dim=1)
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
        return -torch.log(distances + eps).mean()


class KoLeoLoss(nn.Module):
    def forward(self, features: Tensor) -> Tensor:
        return koleo_loss(features)


# --------------------------------------------------------------------------------------------------
# Gram anchoring (DINOv3)
# --------------------------------------------------------------------------------------------------


def gram_loss(student_patches: Tensor, teacher_patches: Tensor, remove_neg: bool = False) -> Tensor:
    """Gram anchoring (DINOv3, Simeoni et al. 2025): mean squared difference between the student's
    and an earlier teacher's patch-to-patch cosine similarities, image by image.

    It constrains how patches of an image relate to each other, not the features themselves, so
    the image-level objective stays free while the patch similarity structure cannot drift.
    student_patches, teacher_patches: (B, P, D) patch tokens of the same crops (the widths may
    differ). remove_neg sets negative similarities to 0 in both matrices (DINOv3's option).

    Example:
        >>> x = torch.randn(2, 5, 8)
        >>> round(float(gram_loss(x, 3 * x)), 6)  # scale-free: the same directions give zero
        0.0
    """
    if student_patches.shape[:2] != teacher_patches.shape[:2]:
        raise ValueError(
            f"gram_loss: student patches {tuple(student_patches.shape)} and teacher patches "
            f"{tuple(teacher_patches.shape)} differ in images or patches"
        )
    with torch.autocast(device_type=student_patches.device.type, enabled=False):
        s = F.normalize(student_patches.float(), dim=-1)
        t = F.normalize(teacher_patches.float(), dim=-1)
        s_gram = s @ s.transpose(-1, -2)
        t_gram = t @ t.transpose(-1, -2)
        if remove_neg:
            s_gram = s_gram.clamp(min=0.0)
            t_gram = t_gram.clamp(min=0.0)
        return F.mse_loss(s_gram, t_gram)


# --------------------------------------------------------------------------------------------------
# NT-Xent (SimCLR)
# --------------------------------------------------------------------------------------------------


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float, gather: bool = True) -> Tensor:
    """NT-Xent over the global batch: mean over this rank's 2B anchors of
    -log( exp(s(a, a+)/t) / sum_{k != a} exp(s(a, k)/t) ), s = cosine similarity,
    k ranging over all 2N views of all ranks (SimCLR's `add_contrastive_loss`, averaged).

    z1, z2: (B, D) projections of view 1 / view 2 of this rank's images. With `gather`, the
    negatives come from every rank through `all_gather_with_grad`, so 2 ranks x B images train
    like 1 x 2B images.
    """
    z1 = F.normalize(z1.float(), dim=-1)
    z2 = F.normalize(z2.float(), dim=-1)
    b = z1.shape[0]
    if gather and du.is_dist():
        k1, k2 = du.all_gather_with_grad(z1), du.all_gather_with_grad(z2)
        offset = dist.get_rank() * b
    else:
        k1, k2, offset = z1, z2, 0
    n = k1.shape[0]
    idx = torch.arange(b, device=z1.device) + offset
    self_mask = F.one_hot(idx, n).bool()
    logits_aa = (z1 @ k1.T / temperature).masked_fill(self_mask, float("-inf"))
    logits_bb = (z2 @ k2.T / temperature).masked_fill(self_mask, float("-inf"))
    logits_ab = z1 @ k2.T / temperature
    logits_ba = z2 @ k1.T / temperature
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], dim=1), idx)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], dim=1), idx)
    return 0.5 * (loss_a + loss_b)


# --------------------------------------------------------------------------------------------------
# MAE pixel reconstruction
# --------------------------------------------------------------------------------------------------


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, N, patch*patch*C), row-major patches, pixels (p, q, c) as in MAE."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch}")
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def patchify3d(volumes: Tensor, patch: int) -> Tensor:
    """(B, C, D, H, W) -> (B, N, patch³*C): cube patches in row-major (d, h, w) order, the order
    of a flattened 3D patch-embedding convolution; voxels (p, q, r, c) within a patch."""
    b, c, d, h, w = volumes.shape
    if d % patch or h % patch or w % patch:
        raise ValueError(f"volume {d}x{h}x{w} is not a multiple of the patch size {patch}")
    x = volumes.reshape(b, c, d // patch, patch, h // patch, patch, w // patch, patch)
    x = torch.einsum("ncdphqwr->ndhwpqrc", x)
    return x.reshape(b, (d // patch) * (h // patch) * (w // patch), patch**3 * c)


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = True) -> Tensor:
    """Mean over removed patches of the per-patch MSE; targets normalised per patch if norm_pix
    (mean, unbiased variance + 1e-6, exactly MAE's `forward_loss`).

    pred, target: (B, N, P) per-patch pixels (see `patchify`); mask: (B, N), 1 = removed.
    """
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
