"""DINOv2 losses as reusable pieces: DINO cross-entropy (softmax-centering or Sinkhorn-Knopp teacher),
iBOT masked-patch cross-entropy, KoLeo.

Each loss is a plain function on tensors plus, where state is needed (the running center), a small
module. They follow facebookresearch/dinov2 numerically (same normalisations, same center momentum,
same Sinkhorn-Knopp marginals) so a recipe tuned there means the same here. Centering and
Sinkhorn-Knopp sum over all ranks when torch.distributed is initialised: the teacher targets must be
balanced over the global batch, not per GPU.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world_size() -> int:
    return dist.get_world_size() if _dist_on() else 1


def _all_reduce_(tensor: Tensor) -> Tensor:
    if _dist_on():
        dist.all_reduce(tensor)
    return tensor


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
    shift = logits.max().clone()
    if _dist_on():
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    q = torch.exp((logits - shift) / teacher_temp).t()  # (K, N)
    n_prototypes = q.shape[0]
    if n_samples is None:
        n_samples = q.shape[1] * _world_size()
    q /= _all_reduce_(q.sum())
    for _ in range(n_iterations):
        # rows: every prototype gets total mass 1/K (summed over all ranks)
        q /= _all_reduce_(q.sum(dim=1, keepdim=True))
        q /= n_prototypes
        # columns: every sample gets mass 1/N
        q /= q.sum(dim=0, keepdim=True)
        q /= n_samples
    q *= n_samples
    return q.t()


class _CenteredTeacherLoss(nn.Module):
    """The teacher-side state DINO and iBOT share: temperatures, normalisation, a running center."""

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


class DINOLoss(_CenteredTeacherLoss):
    """DINO loss with its teacher-side normalisation ("centering" or "sinkhorn_knopp").

    Usage per step: probs = loss.teacher_probs(teacher_logits, temp) (also updates the center),
    then loss(student_global, student_local, probs.view(n_global, B, K)).
    """

    @torch.no_grad()
    def softmax_center(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """softmax((t - center) / temp); the center is the running mean of teacher logits."""
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """center <- m * center + (1 - m) * mean of this step's teacher logits over all ranks."""
        batch_sum = teacher_logits.float().sum(dim=0, keepdim=True)
        _all_reduce_(batch_sum)
        batch_mean = batch_sum / (teacher_logits.shape[0] * _world_size())
        self.center.mul_(self.center_momentum).add_(batch_mean, alpha=1 - self.center_momentum)

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Targets for (N, K) teacher logits with the configured normalisation."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp, self.sinkhorn_iterations)
        probs = self.softmax_center(teacher_logits, teacher_temp)
        self.update_center(teacher_logits)
        return probs

    def forward(
        self, student_global: Tensor | None, student_local: Tensor | None, teacher_probs: Tensor
    ) -> Tensor:
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

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """Mean over this rank's masked patches, averaged over ranks (DINOv2's patch center)."""
        if teacher_logits.shape[0] == 0:
            batch_mean = self.center.new_zeros(self.center.shape)
        else:
            batch_mean = teacher_logits.float().mean(dim=0, keepdim=True)
        _all_reduce_(batch_mean)
        batch_mean /= _world_size()
        self.center.mul_(self.center_momentum).add_(batch_mean, alpha=1 - self.center_momentum)

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        if self.centering == "sinkhorn_knopp":
            n_samples = torch.tensor(float(teacher_logits.shape[0]), device=teacher_logits.device)
            n_samples = int(_all_reduce_(n_samples).item())
            return sinkhorn_knopp(
                teacher_logits, teacher_temp, self.sinkhorn_iterations, n_samples=max(n_samples, 1)
            )
        probs = F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)
        self.update_center(teacher_logits)
        return probs

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, masks: Tensor) -> Tensor:
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
