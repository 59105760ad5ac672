"""Embedding jobs: a medssl export, a timm model with a weights file, corrupt samples skipped."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from curation.descriptor import THUMB
from curation.embed import EmbedError, Encoder, embed_group, load_embedded, make_encoder
from curation.plant import medmnist, record_for, write_shards
from pretrain.backbones import build_backbone, export_backbone
from pretrain.data.specs import parse_spec

EMBED = {"weights": None, "img_size": None, "channels": None, "device": "cpu"}


@pytest.fixture(scope="module")
def shards(medssl_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    images = medmnist(medssl_data, "pneumoniamnist", "train", 20) + medmnist(
        medssl_data, "retinamnist", "train", 10
    )
    items = [
        (f"img-{i:02d}", px, record_for(f"img-{i:02d}", px, "OT")) for i, px in enumerate(images)
    ]
    write_shards(root / "pool", items)
    return root, items


def test_export_backbone_embeds_unit_vectors(shards):
    root, items = shards
    model = build_backbone({"arch": "vit_tiny", "img_size": 32, "patch_size": 8, "in_chans": 1})
    export_backbone(model, root / "export")
    encoder = make_encoder(OmegaConf.create({**EMBED, "backbone": str(root / "export")}))
    assert encoder.dim == 192
    out = embed_group(
        parse_spec(str(root / "pool")), root / "emb-vit", encoder, batch_size=8, progress=False
    )
    got = load_embedded(out)
    assert got.embeddings.dtype == np.float16 and got.embeddings.shape == (30, 192)
    assert np.allclose(np.linalg.norm(got.embeddings.astype(np.float32), axis=1), 1, atol=1e-2)
    assert got.thumbs.shape == (30, THUMB, THUMB, 3)
    assert [r["key"] for r in got.records] == [k for k, _, _ in items]
    assert got.records[0]["sha256"] == items[0][2]["sha256"] and got.records[0]["height"] == 28
    with torch.no_grad():  # same vector as the model itself gives (float16 storage)
        x = encoder.transform(torch.from_numpy(items[0][1].astype(np.float32) / 255)[None])[None]
        ref = torch.nn.functional.normalize(encoder._features(x), dim=1)[0].numpy()
    assert np.allclose(got.embeddings[0].astype(np.float32), ref, atol=2e-3)


def test_timm_model_needs_and_loads_a_weights_file(shards, tmp_path):
    import safetensors.torch
    import timm

    with pytest.raises(EmbedError, match="needs a weights file.*embed.weights"):
        make_encoder(OmegaConf.create({**EMBED, "backbone": "timm:test_vit"}))
    model = timm.create_model("test_vit", pretrained=False, num_classes=0)
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    cfg = {
        **EMBED,
        "backbone": "timm:test_vit",
        "weights": str(tmp_path / "w.safetensors"),
        "img_size": 32,
    }
    encoder = make_encoder(OmegaConf.create(cfg))
    assert encoder.dim == model.num_features
    torch.save({"blocks.0.bad": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(EmbedError, match="does not fit"):
        make_encoder(OmegaConf.create({**cfg, "weights": str(tmp_path / "bad.pt")}))


def test_corrupt_sample_is_skipped_and_listed(shards, tmp_path):
    _, items = shards
    broken = [*items[:5]]
    key, px, rec = broken[2]
    write_shards(tmp_path / "pool", broken)
    tar = next((tmp_path / "pool").glob("*.tar"))
    data = bytearray(tar.read_bytes())
    start = data.find(b"\x89PNG", data.find(key.encode()))
    data[start + 40 : start + 80] = b"\x00" * 40  # damage the PNG of the third sample
    tar.write_bytes(bytes(data))
    out = embed_group(
        parse_spec(str(tmp_path / "pool")), tmp_path / "emb", Encoder(), progress=False
    )
    got = load_embedded(out)
    assert [r["key"] for r in got.records] == [items[i][0] for i in (0, 1, 3, 4)]
    done = json.loads((out / "DONE.json").read_text())
    assert done["n"] == 4 and done["skipped"][0]["key"] == key
    assert got.embeddings.shape == (4, 214) and got.thumbs.shape[0] == 4
