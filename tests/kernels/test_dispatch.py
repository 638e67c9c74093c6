"""Which path the dispatch functions take."""

from __future__ import annotations

import pytest
import torch

import kernels.compact as compact
import kernels.token_scores as token_scores
import kernels.topk_select as topk_select

CASES = [
    (token_scores, "head_mean_query_scores", lambda: (torch.rand(2, 2, 3, 9), 1, 6)),
    (token_scores, "cls_attention_scores", lambda: (torch.rand(2, 3, 9),)),
    (token_scores, "cosine_scores", lambda: (torch.rand(2, 9, 4), torch.rand(2, 4))),
    (topk_select, "split_topk", lambda: (torch.rand(2, 9), 3)),
    (compact, "compact_rows", lambda: (torch.rand(2, 9, 4), torch.tensor([[0, 2], [1, -1]]))),
]


def _spy(monkeypatch: pytest.MonkeyPatch, module, name: str) -> list[str]:
    calls: list[str] = []
    for suffix in ("_triton", "_reference"):
        real = getattr(module, name + suffix)

        def spy(*args, _real=real, _suffix=suffix, **kwargs):
            calls.append(_suffix)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name + suffix, spy)
    return calls


@pytest.mark.parametrize(("module", "name", "make_args"), CASES, ids=[c[1] for c in CASES])
def test_dispatch_paths(monkeypatch, module, name, make_args):
    calls = _spy(monkeypatch, module, name)
    fn = getattr(module, name)
    args = make_args()
    ref = fn(*args)  # CPU tensors, not forced -> reference
    assert calls == ["_reference"]
    monkeypatch.setenv("ACCM_FORCE_TRITON", "1")  # forced -> kernel (interpreter)
    got = fn(*args)
    assert calls == ["_reference", "_triton"]
    fn(*args, use_kernel=False)  # explicit argument beats the environment
    assert calls[-1] == "_reference"
    for a, b in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,), strict=True):
        torch.testing.assert_close(a, b)


def test_kernel_on_cpu_without_interpreter_fails_loudly(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        topk_select.select_topk(torch.rand(1, 5), 2, use_kernel=True)


def test_package_import_stays_light():
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, kernels; assert 'triton' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
