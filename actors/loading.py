"""Model directories from a local path, ``file://`` or ``s3://`` URL (downloaded once per process).

The llava-hf layout (config.json, safetensors shards, processor/tokenizer files) is read by
transformers from a local directory; remote prefixes are copied into a cache first. Copies are
shared between processes through ``pipeline.storage.download_dir`` (atomic rename of a staging dir)
and memoised per process here.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

_LOCK = threading.Lock()
_RESOLVED: dict[tuple[str, str], str] = {}


def default_cache_dir() -> str:
    return os.environ.get("ACCM_MODEL_CACHE", os.path.join(tempfile.gettempdir(), "accm-model-cache"))


def local_model_dir(url: str, cache_dir: str | None = None) -> str:
    """A local directory with the model files behind ``url`` (local dir, ``file://`` or ``s3://``)."""
    parsed = urlparse(str(url))
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else str(url)
        if not Path(path).is_dir():
            raise FileNotFoundError(f"model directory not found: {path}")
        return path
    cache = cache_dir or default_cache_dir()
    key = (str(url), cache)
    with _LOCK:
        if key not in _RESOLVED:
            from pipeline.storage import download_dir

            _RESOLVED[key] = download_dir(str(url).rstrip("/"), cache)
        return _RESOLVED[key]


VISION_PARTS = ("model.vision_tower.", "model.multi_modal_projector.")


def _model_key(ckpt_key: str, wanted: set[str]) -> str | None:
    """The model's name for a checkpoint tensor, across the llava-hf (v4) and transformers v5 layouts."""
    candidates = (
        ckpt_key,
        "model." + ckpt_key,
        "model." + ckpt_key.replace("vision_tower.vision_model.", "vision_tower.", 1),
        "model." + ckpt_key.replace("vision_tower.", "vision_tower.vision_model.", 1),
    )
    return next((c for c in candidates if c in wanted), None)


def load_llava_vision_only(path: str, *, dtype: Any, device: Any = "cpu") -> Any:
    """A ``LlavaForConditionalGeneration`` whose vision tower and projector hold the checkpoint's weights while
    the language model and LM head stay on the ``meta`` device (no memory, never read from disk).

    For the captioner tier, which runs only the tower: on LLaVA-1.5-7B this reads ~0.6 GB of the ~14 GB
    checkpoint. Only the safetensors shards that hold vision/projector tensors are opened.
    """
    import json

    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(path)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    # the tower and projector are built for real (as LlavaModel builds them), so that their non-persistent
    # buffers (CLIP's position ids) exist; only the LLM stays on meta
    from transformers import AutoModel
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    model.model.vision_tower = AutoModel.from_config(config.vision_config)
    model.model.multi_modal_projector = LlavaMultiModalProjector(config)
    wanted = {k for k in model.state_dict() if k.startswith(VISION_PARTS)}
    index = Path(path, "model.safetensors.index.json")
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    state: dict[str, Any] = {}
    for name in files:
        with safe_open(str(Path(path, name)), framework="pt") as f:
            for key in f.keys():
                target = _model_key(key, wanted)
                if target is not None:
                    state[target] = f.get_tensor(key).to(dtype)
    missing = sorted(wanted - set(state))
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} vision/projector tensors, e.g. {missing[:3]}")
    model.load_state_dict(state, strict=False, assign=True)
    model.model.vision_tower.to(device=device, dtype=dtype)
    model.model.multi_modal_projector.to(device=device, dtype=dtype)
    return model.eval()
