"""Components work without a config, in any loop: their docstring examples run, the masked-ViT
forward equals timm's own, and the multi-crop collate builds masks inside loader workers."""

from __future__ import annotations

import doctest
import importlib
import random

import pytest
import timm
import torch
from timm.layers import DropPath
from torch.utils.data import DataLoader

from pretrain.components.masked_vit import (
    blocks_run_grouped,
    vit_embed,
    vit_encode,
    vit_encode_groups,
    vit_forward,
    vit_tokens,
    vit_tokens_groups,
)
from pretrain.components.masks import BlockMaskGenerator, MultiCropCollate

COMPONENTS = ["ema", "heads", "knn", "losses", "masked_vit", "masks"]
EXAMPLES = [f"pretrain.components.{name}" for name in COMPONENTS] + ["pretrain.io"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"reg_tokens": 4, "no_embed_class": True},
        {"class_token": False, "global_pool": "avg"},
        {"dynamic_img_size": True},
    ],
    ids=["plain", "registers+no_embed_class", "no_cls", "dynamic"],
)
def test_masked_vit_forward_equals_timm(kwargs):
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=0, **kwargs
    ).eval()
    size = 48 if kwargs.get("dynamic_img_size") else 32  # dynamic: another grid than built for
    images = torch.randn(2, 3, size, size)
    assert torch.allclose(vit_forward(vit, images), vit.forward_features(images), atol=1e-5)


def test_mask_token_replaces_exactly_the_masked_patches_before_positions():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=0)
    images = torch.randn(1, 3, 32, 32)
    masks = torch.zeros(1, 16, dtype=torch.bool)
    masks[0, [0, 5]] = True
    token = torch.full((1, vit.embed_dim), 3.0)
    tokens = vit_embed(vit, images, masks, token)[0, 1:]  # after the class token
    positions = vit.pos_embed[0, 1:]
    assert torch.allclose(tokens[0], 3.0 + positions[0]) and torch.allclose(
        tokens[5], 3.0 + positions[5]
    )
    unmasked = vit_embed(vit, images)[0, 1:]
    assert torch.equal(tokens[1], unmasked[1])
    cls, patches = vit_tokens(vit, images, masks, token)
    assert torch.allclose(
        torch.cat([cls[:, None], patches], 1), vit_encode(vit, vit_embed(vit, images, masks, token))
    )


class _ScaleEachSample(torch.nn.Module):
    """Stands in for drop path: scales sample i of a (B, N, D) batch by i + 1, so it gives another
    result when given the stacked tokens of several groups instead of each group's batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.arange(1, x.shape[0] + 1, dtype=x.dtype).view(-1, 1, 1)


@pytest.mark.parametrize("variant", ["plain", "registers+layerscale+qk_norm", "per-sample branch"])
def test_crop_sizes_through_the_blocks_together_equal_one_pass_per_size(variant):
    """DINOv2's student pass: global crops (16 patches, half of them masked on one image) and local
    crops (4 patches) stacked through each block give each crop's own tokens and the same weight
    gradients as running each size alone."""
    torch.manual_seed(0)
    kwargs = {"reg_tokens": 2, "init_values": 0.1, "qk_norm": True} if variant != "plain" else {}
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        depth=3,
        num_classes=0,
        dynamic_img_size=True,
        **kwargs,
    )
    if variant == "per-sample branch":
        for block in vit.blocks:
            block.drop_path1, block.drop_path2 = _ScaleEachSample(), _ScaleEachSample()
    assert blocks_run_grouped(vit)
    big, small = torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16)
    masks = torch.zeros(4, 16, dtype=torch.bool)
    masks[1, :8] = True
    token = torch.randn(1, vit.embed_dim)
    weights = [torch.randn(4, 192), torch.randn(4, 16, 192), torch.randn(6, 192)]

    def run(grouped: bool) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        vit.zero_grad(set_to_none=True)
        if grouped:
            (cls_big, patches_big), (cls_small, _) = vit_tokens_groups(
                vit, [big, small], [masks, None], token
            )
        else:
            cls_big, patches_big = vit_tokens(vit, big, masks, token)
            cls_small, _ = vit_tokens(vit, small)
        outputs = [cls_big, patches_big, cls_small]
        sum((o * w).sum() for o, w in zip(outputs, weights, strict=True)).backward()
        return [o.detach() for o in outputs], {n: p.grad for n, p in vit.named_parameters()}

    separate, separate_grads = run(grouped=False)
    together, together_grads = run(grouped=True)
    for a, b in zip(together, separate, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert separate_grads.keys() == together_grads.keys()
    for name, grad in separate_grads.items():
        torch.testing.assert_close(together_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_blocks_dropping_above_0_1_run_each_branch_on_a_subset_of_each_crop_batch():
    """DINOv2's stochastic-depth shortcut in the grouped pass: at a drop-path rate above 0.1 a
    block runs each residual branch only on a random int(B * (1 - rate)) of each crop size's B
    samples and adds it back scaled by B / kept. Checked against that rule written out per crop
    size (subsets drawn crop size by crop size, the attention branch's before the MLP's), outputs
    and weight gradients; at rates of 0.1 and below timm's per-sample drop path is kept."""
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        depth=2,
        num_classes=0,
        dynamic_img_size=True,
        init_values=0.1,
    ).train()
    for block, rate in zip(vit.blocks, (0.5, 0.3), strict=True):
        block.drop_path1, block.drop_path2 = DropPath(rate), DropPath(rate)
    big, small = torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16)
    weights = [torch.randn(4, 17, 192), torch.randn(6, 5, 192)]

    def by_hand() -> list[torch.Tensor]:
        groups = [vit_embed(vit, big), vit_embed(vit, small)]
        for block in vit.blocks:
            rate = block.drop_path1.drop_prob
            for branch in (
                lambda t, blk=block: blk.ls1(blk.attn(blk.norm1(t))),
                lambda t, blk=block: blk.ls2(blk.mlp(blk.norm2(t))),
            ):
                updated = []
                for tokens in groups:
                    b = tokens.shape[0]
                    kept = max(1, int(b * (1 - rate)))  # 0.5: 2 of 4, 3 of 6; 0.3: 2 of 4, 4 of 6
                    samples = torch.randperm(b)[:kept]
                    updated.append(tokens.index_add(0, samples, branch(tokens[samples]) * b / kept))
                groups = updated
        return [vit.norm(t) for t in groups]

    def grouped() -> list[torch.Tensor]:
        return vit_encode_groups(vit, [vit_embed(vit, big), vit_embed(vit, small)])

    results = []
    for run in (by_hand, grouped):
        torch.manual_seed(1)
        vit.zero_grad(set_to_none=True)
        outputs = run()
        sum((o * w).sum() for o, w in zip(outputs, weights, strict=True)).backward()
        results.append(
            ([o.detach() for o in outputs], {n: p.grad for n, p in vit.named_parameters()})
        )
    (expected, expected_grads), (got, got_grads) = results
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    # the dropped samples cost nothing: the first block's MLP sees 2 of 4 big and 3 of 6 small
    # crops at 0.5; at 0.1, timm's per-sample drop path, it sees every row
    rows_seen: list[int] = []
    vit.blocks[0].mlp.register_forward_hook(lambda m, args, out: rows_seen.append(len(args[0])))
    grouped()
    for block in vit.blocks:
        block.drop_path1, block.drop_path2 = DropPath(0.1), DropPath(0.1)
    grouped()
    assert rows_seen == [2 * 17 + 3 * 5, 4 * 17 + 6 * 5]


class _Views(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        views = {
            "global_crops": [torch.full((1, 8, 8), float(i)), torch.full((1, 8, 8), i + 0.5)],
            "local_crops": [torch.full((1, 4, 4), -float(i))],
        }
        return views, i


def test_multicrop_collate_in_workers_is_crop_major_with_masks():
    collate = MultiCropCollate(BlockMaskGenerator(4), (0.1, 0.5), mask_probability=0.5)
    loader = DataLoader(_Views(), batch_size=4, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 2
    batch, labels = batches[1]
    assert labels.tolist() == [4, 5, 6, 7]
    # crop-major: crop 0 of images 4..7, then crop 1 of images 4..7
    firsts = batch["global_crops"][:, 0, 0, 0].tolist()
    assert firsts == [4.0, 5.0, 6.0, 7.0, 4.5, 5.5, 6.5, 7.5]
    assert batch["local_crops"][:, 0, 0, 0].tolist() == [-4.0, -5.0, -6.0, -7.0]
    masks = batch["masks"]
    assert masks.shape == (8, 16) and int((masks.sum(1) > 0).sum()) == 4  # half the crops masked
    assert torch.equal(batch["mask_indices"], masks.flatten().nonzero().flatten())
    # workers draw different masks (reseeded per worker), not one worker's copy
    assert not torch.equal(batches[0][0]["masks"], masks)


def test_multicrop_collate_without_generator_has_no_masks():
    random.seed(0)
    batch, _ = MultiCropCollate(None)([_Views()[0], _Views()[1]])
    assert batch["masks"] is None and batch["mask_indices"] is None
    assert batch["global_crops"].shape == (4, 1, 8, 8)
