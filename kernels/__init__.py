"""Triton GPU kernels for visual-token pruning, each beside its PyTorch reference.

Kept import-light on purpose: transformers probes a top-level module named ``kernels``,
so nothing here may import triton (or torch) at package import time.

Modules (each: ``@triton.jit`` kernel, launcher ``*_triton``, reference ``*_reference``, dispatch):

- ``kernels.token_scores``: ``head_mean_query_scores`` (FastV), ``cls_attention_scores``, ``cosine_scores``
- ``kernels.topk_select``: ``select_topk`` / ``split_topk`` (ascending indices, ties -> lower index)
- ``kernels.compact``: ``compact_rows``, ``compact_kv``, ``compact_cache_``, ``keep_positions``

Dispatch: CUDA tensor + triton -> kernel, else reference; ``ACCM_FORCE_TRITON=1`` or ``use_kernel=True``
forces the kernel (CPU tensors then need ``TRITON_INTERPRET=1``). Signatures: ``docs/notes/kernels.md``.
"""
