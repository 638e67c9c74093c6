"""The engine answers identically through the Triton kernels (under the interpreter) and the references.

The kernels conftest sets TRITON_INTERPRET=1; ACCM_FORCE_TRITON=1 makes the dispatch take the kernel path
for CPU tensors, exactly the path CUDA tensors take at run time.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from actors.engine import LlavaEngine
from actors.tiny import build_tiny_llava

QUESTIONS = ["What color is the circle?", "How many squares are there?", "Is there a red cross?"]
IDS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> LlavaEngine:
    path = tmp_path_factory.mktemp("tiny_llava_kernels")
    build_tiny_llava(path, text_layers=3, seed=5, init_std=0.2)
    return LlavaEngine.from_pretrained(str(path))


def count_kernel_launches(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Names of the Triton kernels launched from now on (each kernel module imported ``launch`` by name)."""
    import kernels.compact
    import kernels.token_scores
    import kernels.topk_select

    launched: dict[str, int] = {}
    for module in (kernels.compact, kernels.token_scores, kernels.topk_select):
        original = module.launch

        def counting(fn, *args, _original=original, **kwargs):
            name = getattr(fn, "__name__", str(fn))
            launched[name] = launched.get(name, 0) + 1
            return _original(fn, *args, **kwargs)

        monkeypatch.setattr(module, "launch", counting)
    return launched


@pytest.mark.parametrize("method", ["fastv", "prumerge_plus", "visionzip", "random"])
def test_kernel_and_reference_paths_agree(engine: LlavaEngine, method: str, monkeypatch: pytest.MonkeyPatch):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in QUESTIONS]
    pixels = engine.preprocess(images)

    def run():
        with torch.no_grad():
            return engine.answer(pixels, QUESTIONS, IDS, method=method, keep_tokens=8, max_new_tokens=6)

    monkeypatch.delenv("ACCM_FORCE_TRITON", raising=False)
    ref, ref_pruned = run()
    monkeypatch.setenv("ACCM_FORCE_TRITON", "1")
    launched = count_kernel_launches(monkeypatch)
    ker, ker_pruned = run()

    assert "_cls_attention_kernel" in launched  # the vision stage scored through the kernel
    if method == "fastv":
        assert {"_head_mean_query_kernel", "_rank_keep_kernel", "_compact_rows_kernel"} <= set(launched)
    if method == "visionzip":
        assert "_rank_keep_kernel" in launched

    assert ker.token_ids == ref.token_ids
    assert ker.flops == ref.flops
    assert torch.equal(ker_pruned.kept_indices, ref_pruned.kept_indices)
    torch.testing.assert_close(ker_pruned.retained, ref_pruned.retained)


def test_forced_path_really_runs_a_kernel(monkeypatch: pytest.MonkeyPatch):
    """Guard for the test above: with the env var set, dispatch picks the Triton kernel for CPU tensors."""
    from kernels._dispatch import should_use_kernel

    monkeypatch.setenv("ACCM_FORCE_TRITON", "1")
    assert should_use_kernel(torch.zeros(2), None)
    monkeypatch.delenv("ACCM_FORCE_TRITON")
    assert not should_use_kernel(torch.zeros(2), None)
