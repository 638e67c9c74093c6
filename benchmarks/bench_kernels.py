"""Achieved memory bandwidth of the kernels/ Triton kernels next to their torch equivalents.

    python benchmarks/bench_kernels.py            # on a CUDA machine
    python benchmarks/bench_kernels.py --smoke    # CPU: tiny sizes under TRITON_INTERPRET=1, checks the script only

Every row counts the bytes a kernel must move (inputs read once + outputs written once) and divides
by the measured time; the device's theoretical peak (memory clock x bus width x 2) is printed above.
Shapes follow LLaVA-1.5-7B: 576 image tokens in a ~640-token prompt, 32 heads x 128, hidden 4096,
keeping 25% of the image. Not run in CI. Goal (issue 4): compaction >= 70% of peak and faster than torch.
Without CUDA (and without --smoke) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Known HBM peaks (GB/s), used when the driver does not report memory clock / bus width.
PEAK_GBPS = {"H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L4": 300.0}


@dataclass
class Row:
    name: str
    nbytes: int
    kernel_ms: float
    torch_ms: float
    torch_name: str


def peak_bandwidth_gbps(torch) -> float | None:
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    for key, gbps in PEAK_GBPS.items():
        if key in props.name:
            return gbps
    return None


def bench(fn: Callable[[], object], device: str, reps: int) -> float:
    """Mean milliseconds per call."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100))
    fn()  # warm-up (jit/interpreter rewrite)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) * 1e3 / reps


def run(device: str, smoke: bool) -> list[Row]:
    import torch

    from kernels.compact import compact_rows
    from kernels.token_scores import cls_attention_scores, cosine_scores, head_mean_query_scores
    from kernels.topk_select import select_topk

    torch.manual_seed(0)
    if smoke:  # tiny: only checks that every benchmark runs
        batch, heads, seq, img_start, n_img, head_dim, hidden, vis_dim, kv_layers, reps = 2, 2, 40, 3, 30, 16, 64, 32, 2, 1
    else:
        batch, heads, seq, img_start, n_img, head_dim, hidden, vis_dim, kv_layers, reps = 16, 32, 640, 35, 576, 128, 4096, 1024, 32, 1
    keep = n_img // 4
    bf16 = torch.bfloat16
    rows: list[Row] = []

    def add(name, nbytes, kernel_fn, torch_fn, torch_name):
        rows.append(Row(name, nbytes, bench(kernel_fn, device, reps), bench(torch_fn, device, reps), torch_name))

    # --- scoring -------------------------------------------------------------------------------
    # FastV: only the last query row is read, [B, H, 1, L] as the engine passes it
    last_row = torch.rand(batch, heads, 1, seq, device=device, dtype=bf16)
    add(
        "head_mean_query_scores bf16",
        batch * heads * n_img * 2 + batch * n_img * 4,
        lambda: head_mean_query_scores(last_row, img_start, n_img, use_kernel=True),
        lambda: last_row[:, :, -1, img_start : img_start + n_img].float().mean(1),
        "slice.float().mean",
    )
    cls_layer = torch.rand(batch, 16, n_img + 1, device=device, dtype=bf16)  # CLIP-L: 16 heads, CLS row + 576 patches
    cls_row = cls_layer[:, :, 1:]
    add(
        "cls_attention_scores bf16",
        batch * 16 * n_img * 2 + batch * n_img * 4,
        lambda: cls_attention_scores(cls_row, use_kernel=True),
        lambda: cls_row.float().sum(1),
        "float().sum",
    )
    patches = torch.randn(batch, n_img, vis_dim, device=device, dtype=bf16)
    text = torch.randn(batch, vis_dim, device=device, dtype=bf16)
    add(
        "cosine_scores bf16",
        batch * n_img * vis_dim * 2 + batch * vis_dim * 2 + batch * n_img * 4,
        lambda: cosine_scores(patches, text, use_kernel=True),
        lambda: torch.nn.functional.cosine_similarity(patches, text[:, None, :], dim=-1),
        "F.cosine_similarity",
    )

    # --- top-k ---------------------------------------------------------------------------------
    scores = torch.randn(batch, n_img, device=device)
    add(
        f"split_topk k={keep}/{n_img}",
        batch * n_img * 4 + batch * n_img * 8,  # read scores, write kept + discarded indices
        lambda: select_topk(scores, keep, use_kernel=True),
        lambda: scores.topk(keep, dim=1).indices.sort(dim=1).values,
        "topk+sort",
    )

    # --- compaction ----------------------------------------------------------------------------
    kept_img = select_topk(scores, keep, use_kernel=False)
    from kernels.compact import keep_positions

    positions = keep_positions(kept_img, img_start, n_img, seq)  # [B, L'] full-sequence positions
    n_out = positions.shape[1]
    for dtype in (bf16, torch.float32):
        hidden_states = torch.randn(batch, seq, hidden, device=device, dtype=dtype)
        flat_h = (positions + torch.arange(batch, device=device)[:, None] * seq).reshape(-1)
        esz = hidden_states.element_size()
        add(
            f"compact_rows hidden {str(dtype)[6:]}",
            2 * batch * n_out * hidden * esz + positions.numel() * 8,
            lambda hs=hidden_states: compact_rows(hs, positions, use_kernel=True),
            lambda hs=hidden_states, fh=flat_h: hs.view(-1, hs.shape[-1]).index_select(0, fh),
            "index_select",
        )
    kv = [torch.randn(batch, heads, seq, head_dim, device=device, dtype=bf16) for _ in range(2)]
    bh = torch.arange(batch * heads, device=device).view(batch, heads, 1)
    flat_kv = (bh * seq + positions[:, None, :]).reshape(-1)
    gather_idx = positions[:, None, :, None].expand(batch, heads, n_out, head_dim)
    one = 2 * batch * heads * n_out * head_dim * 2 + positions.numel() * 8
    add(
        "compact_rows K/V bf16 (one tensor)",
        one,
        lambda: compact_rows(kv[0], positions, use_kernel=True),
        lambda: kv[0].view(-1, head_dim).index_select(0, flat_kv),
        "index_select",
    )
    add(
        "compact_rows K/V bf16 (one tensor)",
        one,
        lambda: compact_rows(kv[0], positions, use_kernel=True),
        lambda: kv[0].gather(2, gather_idx),
        "gather",
    )
    layers = [(kv[0], kv[1])] * kv_layers

    def torch_kv():
        return [(k.view(-1, head_dim).index_select(0, flat_kv), v.view(-1, head_dim).index_select(0, flat_kv)) for k, v in layers]

    from kernels.compact import compact_kv

    add(
        f"compact_kv {kv_layers} layers bf16",
        2 * kv_layers * one,
        lambda: compact_kv(layers, positions, use_kernel=True),
        torch_kv,
        "index_select x2L",
    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, Triton interpreter (checks the script)")
    args = parser.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here; nothing to measure (run on a GPU machine, or --smoke).")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_kernels: triton is not installed; nothing to measure.")
        return 0
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda":
        peak = peak_bandwidth_gbps(torch)
        name = torch.cuda.get_device_name(0)
        print(f"device: {name}   peak HBM bandwidth: {f'{peak:.0f} GB/s' if peak else 'unknown'}")
    else:
        peak = None
        print("device: cpu (smoke run under the Triton interpreter: timings are meaningless)")
    rows = run(device, args.smoke)
    print(f"{'kernel':38s} {'MB':>8s} {'triton ms':>10s} {'GB/s':>8s} {'%peak':>6s}   {'torch ms':>9s} {'GB/s':>8s}  torch op")
    for r in rows:
        k_gbps = r.nbytes / r.kernel_ms / 1e6
        t_gbps = r.nbytes / r.torch_ms / 1e6
        pct = f"{100 * k_gbps / peak:5.1f}%" if peak else "   n/a"
        print(
            f"{r.name:38s} {r.nbytes / 1e6:8.2f} {r.kernel_ms:10.4f} {k_gbps:8.1f} {pct:>6s}   "
            f"{r.torch_ms:9.4f} {t_gbps:8.1f}  {r.torch_name} ({r.torch_ms / r.kernel_ms:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
