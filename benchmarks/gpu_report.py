"""The report of ``bench_gpu.py``: its table, its markdown and the issue's targets checked on its numbers."""

from __future__ import annotations

from typing import Any

NEW_TOKENS = 8
TARGET_HF_RATIO = 1.0
TARGET_KEEP = 72
TARGET_EFFICIENCY = 0.8


def _f(x: Any, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}{fmt}}"


def table_lines(report: dict) -> list[str]:
    lines = [f"{'batch':>5} {'engine':<6} {'method':<18} {'kept':>5} {'prefill':>8} {'wall ms':>9} {'items/s':>9} "
             f"{'e2e it/s':>9} {'GFLOPs':>9} {'FLOPs x':>8} {'speedup':>8} {'sp/FLOPs':>9} {'peak GiB':>9}"]  # fmt: skip
    for r in report["settings"]:
        if "error" in r:
            lines.append(
                f"{r['batch']:>5} {r['engine']:<6} {r['method']:<18} {r['kept']:>5}  ERROR {r['error']}"
            )
            continue
        lines.append(
            f"{r['batch']:>5} {r['engine']:<6} {r['method']:<18} {r['kept']:>5} {_f(r.get('prefill_len_mean'), '.1f', 8)} "
            f"{r['wall_s'] * 1e3:>9.1f} {r['items_per_s']:>9.2f} {_f(r.get('e2e_items_per_s'), '.2f', 9)} "
            f"{_f(r.get('llm_gflops'), '.4g', 9)} {_f(r.get('flops_ratio'), '.2f', 8)} {_f(r.get('speedup'), '.2f', 8)} "
            f"{_f(r.get('efficiency'), '.2f', 9)} {_f(r.get('peak_mem_gib'), '.1f', 9)}"
        )
    for r in report["settings"]:
        if r["engine"] == "hf" and "ours_e2e_over_hf" in r:
            lines.append(
                f"batch {r['batch']}: ours/HF items/s at {r['kept']} tokens = {r['ours_e2e_over_hf']:.2f} end to end "
                f"(vision+LLM, as HF), {r['ours_generate_over_hf']:.2f} generate only; greedy tokens equal on "
                f"{100 * r['greedy_tokens_equal']:.0f}% of items; same prompt tokens: {r['same_prompt_as_engine']}"
            )
    for t in report["targets"]:
        mark = "PASS" if t["pass"] else "MISS"
        lines.append(f"target {mark}: {t['name']}: {t['value']:.2f} (>= {t['target']})")
    k = report.get("kernels") or {}
    if k.get("rows"):
        peak = k.get("peak_gbps")
        lines.append(
            f"kernels (HBM peak {f'{peak:.0f} GB/s' if peak else 'unknown'}){': ' + k['note'] if k.get('note') else ''}"
        )
        lines.append(
            f"  {'kernel':38s} {'MB':>8s} {'ms':>9s} {'GB/s':>8s} {'%peak':>6s}   {'torch ms':>9s} {'GB/s':>8s}  torch op"
        )
        for r in k["rows"]:
            lines.append(
                f"  {r['kernel']:38s} {r['mb']:8.2f} {r['kernel_ms']:9.4f} {r['kernel_gbps']:8.1f} "
                f"{'   n/a' if r['pct_peak'] is None else format(r['pct_peak'], '5.1f') + '%'}   {r['torch_ms']:9.4f} {r['torch_gbps']:8.1f}  {r['torch_op']} "
                f"({r['torch_over_kernel']:.2f}x)"
            )
    elif k:
        lines.append(f"kernels: {k.get('skipped') or k.get('error')}")
    if report["skipped"]:
        lines.append(f"skipped (budget {report['budget_s']:.0f} s spent): {', '.join(report['skipped'])}")
    lines.append(f"total {report['elapsed_s']:.1f} s")
    return lines


def markdown(report: dict) -> str:
    env = report["env"]
    md = [
        f"# bench_gpu: LLaVA-1.5-7B shape, {env['device_name']}", "",
        f"`{report['command']}`  ",
        f"torch {env['torch']}, transformers {env['transformers']}, dtype {report['dtype']}, "
        f"{report['shape']['text_layers']} LLM layers, {report['shape']['vision_layers']} vision layers, random weights; "
        f"{NEW_TOKENS} new tokens (ignore_eos), best of {report['repeats']}; our engine's attention "
        f"{report['engine_attention']}, HF generate's sdpa"
        + (" — **--quick: tiny widths, not the 7B shape; numbers check the script only**" if report["quick"] else ""),
        "",
        "| batch | engine | method | kept | prefill len | wall ms | items/s | e2e items/s | LLM GFLOPs | FLOPs ratio "
        "| speedup | speedup/FLOPs | peak GiB |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip

    def c(x, fmt):
        return "" if x is None else format(x, fmt)

    for r in report["settings"]:
        if "error" in r:
            md.append(f"| {r['batch']} | {r['engine']} | {r['method']} | {r['kept']} | error: {r['error']} "
                      "| | | | | | | | |")  # fmt: skip
            continue
        md.append(
            f"| {r['batch']} | {r['engine']} | {r['method']} | {r['kept']} | {c(r.get('prefill_len_mean'), '.1f')} "
            f"| {r['wall_s'] * 1e3:.1f} | {r['items_per_s']:.2f} | {c(r.get('e2e_items_per_s'), '.2f')} "
            f"| {c(r.get('llm_gflops'), '.4g')} | {c(r.get('flops_ratio'), '.2f')} | {c(r.get('speedup'), '.2f')} "
            f"| {c(r.get('efficiency'), '.2f')} | {c(r.get('peak_mem_gib'), '.1f')} |"
        )
    md += ["", "## Targets", ""]
    md += [f"- {'PASS' if t['pass'] else 'MISS'}: {t['name']}: {t['value']:.2f} (target >= {t['target']})"
           for t in report["targets"]]  # fmt: skip
    for r in report["settings"]:
        if r["engine"] == "hf" and "ours_e2e_over_hf" in r:
            md.append(f"- batch {r['batch']}: ours generate only / HF = {r['ours_generate_over_hf']:.2f}; greedy "
                      f"tokens equal on {100 * r['greedy_tokens_equal']:.0f}% of items")  # fmt: skip
    k = report.get("kernels") or {}
    if k.get("rows"):
        peak = k.get("peak_gbps")
        md += ["", f"## Kernels (HBM peak {f'{peak:.0f} GB/s' if peak else 'unknown'})", ""]
        if k.get("note"):
            md += [k["note"], ""]
        md += [
            "| kernel | MB | ms | GB/s | % peak | torch op | torch ms | torch GB/s |",
            "|---|---:|---:|---:|---:|---|---:|---:|",
        ]
        md += [f"| {r['kernel']} | {r['mb']:.2f} | {r['kernel_ms']:.4f} | {r['kernel_gbps']:.1f} | "
               f"{c(r['pct_peak'], '.1f')} | {r['torch_op']} | {r['torch_ms']:.4f} | {r['torch_gbps']:.1f} |"
               for r in k["rows"]]  # fmt: skip
    elif k:
        md += ["", f"Kernels: {k.get('skipped') or k.get('error')}"]
    if report["skipped"]:
        md += ["", f"Skipped (budget {report['budget_s']:.0f} s spent): {', '.join(report['skipped'])}"]
    md += ["", f"Total {report['elapsed_s']:.1f} s.", ""]
    return "\n".join(md)


def targets(settings: list[dict], quick: bool) -> list[dict]:
    out = []
    suffix = " (--quick shape)" if quick else ""
    for r in settings:
        if r["engine"] == "hf" and "ours_e2e_over_hf" in r:
            v = r["ours_e2e_over_hf"]
            out.append({"name": f"ours/HF generate items/s, {r['kept']} tokens, batch {r['batch']}{suffix}",
                        "value": v, "target": TARGET_HF_RATIO, "pass": v >= TARGET_HF_RATIO})  # fmt: skip
    for r in settings:
        if r["engine"] == "ours" and r["kept"] == TARGET_KEEP and "efficiency" in r:
            v = r["efficiency"]
            out.append({"name": f"speedup/FLOPs ratio, {r['method']} at {TARGET_KEEP} kept, batch {r['batch']}{suffix}",
                        "value": v, "target": TARGET_EFFICIENCY, "pass": v >= TARGET_EFFICIENCY})  # fmt: skip
    return out


# -- main ------------------------------------------------------------------------------------------------
