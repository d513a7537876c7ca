"""Shared pytest fixtures."""

from __future__ import annotations

import json

import pytest

#: A tiny CLIP (ViT 32 px / patch 8, 2+2 layers of width 32, 16-d embeddings); random init, no download.
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory):
    """A tiny randomly initialised open_clip model saved as a config JSON and a .safetensors checkpoint.

    Returns ``{"model": name, "model_config": path, "checkpoint": path}``; use it as the backbone spec
    ``{"name": "open_clip", "model": model, "model_config": model_config, "pretrained": checkpoint}``.
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny_open_clip")
    name = "robustft-tiny-clip"
    config = folder / f"{name}.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG, indent=2))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    checkpoint = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    return {"model": name, "model_config": str(config), "checkpoint": str(checkpoint)}
