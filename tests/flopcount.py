"""FlopCounterMode that also counts CPU's fused attention op.

torch's counter has formulas for the CUDA fused attention ops but not for
``aten._scaled_dot_product_flash_attention_for_cpu``, which the engine's SDPA takes on CPU: without this the
attention products (the same two matmuls eager attention runs) would count as zero. Registered once, here,
for the tests that hold the analytic FLOPs to the counter.
"""

from __future__ import annotations

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["FlopCounterMode"]

_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QKᵀ and PV in full, as torch counts its CUDA fused ops (causal counted in full too)."""
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


if _CPU_SDPA.default not in flop_counter.flop_registry:
    flop_counter.register_flop_formula(_CPU_SDPA)(_cpu_sdpa_flop)
