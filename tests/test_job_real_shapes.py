"""The published ACCM through the whole main job, with real-shaped parts and random weights (no download).

LLaVA-1.5-7B's tower and projector widths (CLIP ViT-L/14-336: 1024 wide, 16 heads, 336 px / 14 = 576 patches;
4 of its 24 layers so that the feature layer -2, the layer after it that PruMerge+'s CLS score reads, and the
last layer exist) with a 2-layer LLaMA-7B-width LLM (4096, 11008 FFN, 32 heads, vocab 32064); the authors'
caption model (GPT-2 small + ClipCap mapper) and selector (LongCLIP-L text tower + 4-layer encoder) as their
checkpoint files, turned into model folders by ``jobs/convert_accm_checkpoint.py``; a CLIP-L/336-shaped
``--clip`` folder. Real-sized images of several sizes and formats. Checked: every row answered, captions
present, the components add up to the total, and the analytic FLOPs equal a measured count
(``torch.utils.flop_counter.FlopCounterMode`` over the same stages run in this process) within 2%.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from tests import realshape  # noqa: E402

QUESTIONS = ["What is the man holding?", "Is there a dog in the picture?", "What color is the car?"]
SIZES = [(640, 480, "JPEG"), (1024, 768, "PNG"), (333, 500, "JPEG")]  # width, height, format


def _photo(width: int, height: int, fmt: str, seed: int) -> bytes:
    """A photo-sized image with smooth structure and noise (JPEG/PNG bytes)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([np.sin(x / (23 + 7 * c) + c) * np.cos(y / (31 + 5 * c)) for c in range(3)], -1)
    img = ((base * 0.5 + 0.5) * 200 + rng.normal(0, 20, (height, width, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, str]:
    """Model folders: LLaVA (real widths), converted ACCM captioner + selector, CLIP-L/336."""
    import torch

    from actors.tiny import build_processor, build_tokenizer, fast_random_llava
    from jobs.convert_accm_checkpoint import main as convert

    root = tmp_path_factory.mktemp("real_parts")
    tok = build_tokenizer()
    model = fast_random_llava(realshape.llava_7b_config(tok, vision_layers=4), dtype=torch.bfloat16)
    model.save_pretrained(root / "llava")
    build_processor(tok, image_size=336, patch=14).save_pretrained(root / "llava")
    del model
    files = realshape.authors_checkpoints(root / "authors")
    gpt2, clip = realshape.gpt2_small_dir(root / "gpt2"), realshape.clip_l336_dir(root / "clip")
    assert convert(["--caption-ckpt", str(files["caption"]), "--selector-ckpt", str(files["selector"]),
                    "--longclip", str(files["longclip"]), "--gpt2", str(gpt2), "--clip", str(clip),
                    "--output", str(root / "accm"), "--max-caption-tokens", "12"]) == 0  # 67 in the release:
    # random weights never say '.', so every beam would run all 67 steps (CI time); the shapes are the same
    return {"lvlm": str(root / "llava"), "captioner": str(root / "accm" / "captioner"),
            "selector": str(root / "accm" / "selector"), "clip": str(clip)}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


def _config(parts: dict[str, str], src, out):
    from pipeline.config import JobConfig

    return JobConfig(input=str(src), output=str(out), method="accm", prune_rate=0.875, lvlm=parts["lvlm"],
                     captioner=parts["captioner"], selector=parts["selector"], clip=parts["clip"],
                     conv="vicuna_v1", answer_suffix="short", max_new_tokens=3, batch_size=len(QUESTIONS),
                     accm_fallback=False).validate()


def test_published_accm_runs_through_the_job_at_real_shapes(parts, ray_local, tmp_path) -> None:
    from pipeline.graph import run_job
    from pipeline.schema import FLOPS_COLUMNS, INPUT_SCHEMA

    src = tmp_path / "in"
    src.mkdir()
    rows = [{"id": f"photo-{i}", "image": _photo(w, h, fmt, i), "question": q, "answers": ["yes"] * 10}
            for i, ((w, h, fmt), q) in enumerate(zip(SIZES, QUESTIONS, strict=True))]
    pq.write_table(pa.Table.from_pylist(rows, schema=INPUT_SCHEMA), src / "photos.parquet")
    cfg = _config(parts, src, tmp_path / "out")
    summary = run_job(cfg)
    assert summary["items"] == len(rows) and summary["errors"] == 0
    out = pq.read_table(tmp_path / "out" / "photos.parquet").to_pylist()
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    parts_cols = [c for c in FLOPS_COLUMNS if c not in ("flops_total", "flops_reference_total")]
    for r in out:
        assert r["error"] is None and isinstance(r["prediction"], str)
        assert r["keep_tokens"] == 72 and r["visual_tokens_total"] == 576
        assert r["caption"] and len(r["caption_candidates"]) == 3 and r["caption"] in r["caption_candidates"]
        assert abs(sum(r["selector_probs"]) - 1.0) < 1e-4
        assert r["conv"] == "vicuna_v1" and r["text_pick"] == "nearest" and r["clip_model"] == parts["clip"]
        assert r["answer_suffix"] == "Answer the question using a single word or phrase."
        assert all(r[c] > 0 for c in parts_cols), {c: r[c] for c in parts_cols}
        assert sum(r[c] for c in parts_cols) == pytest.approx(r["flops_total"], rel=1e-9)

    # the same stages in this process under a FLOP counter: analytic (the job's rows) = measured within 2%
    import torch

    from pipeline.lvlm_tier import LVLMTier
    from pipeline.stages import CaptionerTier, decode_batch
    from tests.flopcount import FlopCounterMode

    one = pa.Table.from_pylist([dict(rows[0], path=str(src / "photos.parquet"))])
    decoded = decode_batch(one, max_pixels=cfg.max_pixels, shard_names={str(src / "photos.parquet"): "photos.parquet"})
    with torch.enable_grad():  # the tiers switch autograd off for their process: keep it to this block
        captioner, lvlm = CaptionerTier(cfg), LVLMTier(cfg)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            answered = lvlm(captioner(decoded)).to_pylist()[0]
    assert torch.is_grad_enabled()
    measured = counter.get_total_flops()
    assert answered["error"] is None
    assert answered["flops_total"] == pytest.approx(measured, rel=0.02), (answered["flops_total"], measured)
    assert answered["caption"] == out[0]["caption"] and answered["prediction"] == out[0]["prediction"]
