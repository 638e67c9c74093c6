"""Sweep job: every (method, pruning rate) over the same input in one Ray job, then the cost report.

    ray job submit --working-dir . -- python jobs/sweep_pruning_rates.py \\
        --input s3://b/vqa/ --output s3://b/sweep/ \\
        --methods none,fastv,visionzip,prumerge_plus,accm --prune-rates 0.5,0.75,0.875,0.9375
    python jobs/sweep_pruning_rates.py --estimate llava-1.5-7b      # FLOPs model only: no weights, no Ray

Each setting's rows go to ``<output>/<method>/<rate>/`` (the main job's layout and summary.json;
``none`` runs once, under ``none/0/``), the combined per-setting summary to ``<output>/summary.parquet``,
and ``report.md`` with its plots and ``cost_table.csv`` to ``<output>/report/``.

Every option of the main job (``jobs/caption_dataset.py --help``: models, batch size, actor pools,
GPUs, tier resources, ``--lvlm-tp``, ``--limit``, ``--resume``, ...) is accepted and applies to every
setting; ``--method``, ``--prune-rate`` and ``--keep-tokens`` are set per setting.

All settings run in ONE Ray Data graph (``pipeline/sweep.py``): each image is decoded and run through
the vision tower once, and every setting's pruner / ACCM caption / LVLM answer starts from that shared
encoding (FastV and ``none`` take its full features), so S settings cost one tower pass per item and one
start-up of each actor pool. Each setting's rows are still written in the main job's layout, schema,
resume markers and summary.json; a bad input row gives one error row per setting. Items/s per setting
comes from the sweep's wall time apportioned by each setting's measured stage time (docs/notes/sweep.md).
``--sequential`` runs the settings one after another through the main job's graph instead (each re-runs
the tower; kept as the reference the shared graph is tested and benchmarked against).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, any cwd

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("accm.sweep")

DEFAULT_METHODS = "none,fastv,visionzip,prumerge_plus,accm"
DEFAULT_RATES = "0.5,0.75,0.875,0.9375"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sweep_pruning_rates.py",
        allow_abbrev=False,  # unknown options go to the main job: no prefix matching of ours
        description="Run every (method, pruning rate) over the same input in one Ray job, sharing one vision "
        "encoding per item across the settings, and write the accuracy / FLOPs / $ per 1M items report. "
        "Options not listed here go to the main job (jobs/caption_dataset.py --help).",
    )
    p.add_argument("--input", help="Input Parquet shards (local, file:// or s3://); default: the main job's.")
    p.add_argument(
        "--output",
        help="Output root (local, file:// or s3://; default: out/sweep). Estimate mode writes a report only if given.",
    )
    p.add_argument(
        "--methods", default=DEFAULT_METHODS, help=f"Comma-separated methods (default: {DEFAULT_METHODS})."
    )
    p.add_argument(
        "--prune-rates",
        default=DEFAULT_RATES,
        help=f"Comma-separated rates in (0, 1) (default: {DEFAULT_RATES}).",
    )
    p.add_argument(
        "--keeps",
        help="Comma-separated kept visual tokens instead of --prune-rates, as the papers' tables give them (e.g. "
        "192,128,64,72,36,18 of LLaVA-1.5's 576): each becomes the rate 1 - keep / the LVLM's token count.",
    )
    p.add_argument(
        "--tasks",
        help="Comma-separated benchmark tasks (pipeline/tasks) run in the same graph, e.g. pope,mmbench; each "
        "one's input, image root and ground truth come from --benchmarks. The report then has the papers' "
        "table: a column per benchmark in its own unit. A single task can also be given the main job's way "
        "(--task NAME --input ... --annotations ...).",
    )
    p.add_argument(
        "--benchmarks",
        help="YAML file: task -> {input, input_format, image_root, annotations} (paths relative to the file; "
        "local, file:// or s3://). Default: the bundled Shapes-VQA demo in benchmark formats "
        "(data/shapes_vqa/benchmarks/benchmarks.yaml).",
    )
    p.add_argument(
        "--estimate",
        metavar="MODEL",
        help="Print the cost table for a real model from the FLOPs model alone (llava-1.5-7b, llava-1.5-13b "
        "or a checkpoint dir with a config): ACCM = GPT-2 + LongCLIP-L, 576 -> 192/128/64/36/18 tokens. No Ray.",
    )
    p.add_argument(
        "--estimate-keeps", default="192,128,64,36,18", help="Kept visual tokens in estimate mode."
    )
    p.add_argument(
        "--prompt-tokens", type=int, default=64, help="Estimate mode: text tokens around the image."
    )
    p.add_argument("--new-tokens", type=int, default=4, help="Estimate mode: answer tokens.")
    p.add_argument("--caption-tokens", type=int, default=36, help="Estimate mode: ACCM caption tokens.")
    p.add_argument(
        "--cost-config", help="YAML/JSON with GPU prices and tier sizes (pipeline/cost.py documents it)."
    )
    p.add_argument(
        "--cost-captioner-tier",
        help="Priced captioner tier as GPU or GPUxCOUNT, e.g. L4x16 (overrides the config).",
    )
    p.add_argument(
        "--cost-lvlm-tier", help="Priced LVLM tier as GPU or GPUxCOUNT, e.g. H100x8 (overrides the config)."
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=2.0,
        help="Recommendation: accuracy points below full tokens allowed (2).",
    )
    p.add_argument(
        "--target-accuracy",
        type=float,
        help="Recommendation: absolute accuracy in percent to reach (overrides --tolerance).",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="Run the settings one after another through the main job's graph (each re-runs the vision "
        "tower and starts its own actor pools) instead of sharing one vision encoding in one graph.",
    )
    p.add_argument(
        "--measured-usd-per-hour",
        type=float,
        help="Price per hour of the cluster this sweep runs on: adds $ per 1M items from the measured items/s.",
    )
    return p


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def settings_for(methods: list[str], rates: list[float]) -> list[tuple[str, float]]:
    """(method, rate) pairs: ``none`` once at rate 0, every other method at every rate."""
    out: list[tuple[str, float]] = []
    for m in methods:
        for r in [0.0] if m == "none" else rates:
            if (m, r) not in out:
                out.append((m, r))
    return out


def publish_report(out_dir: Path, output: str, s3_endpoint: str | None = None) -> str:
    """Copy the report files to ``<output>/report/`` unless they were written there already."""
    from pipeline import storage

    target = f"{output.rstrip('/')}/report"
    for f in sorted(out_dir.iterdir()):
        storage.write_bytes(f"{target}/{f.name}", f.read_bytes(), s3_endpoint=s3_endpoint)
    return target


def _local_dir(url: str) -> Path | None:
    if url.startswith("s3://"):
        return None
    return Path(url.removeprefix("file://"))


def run_estimate(args: argparse.Namespace, cost) -> int:
    from pipeline.report import cost_table_markdown, estimate_summary, write_report

    keeps = [int(k) for k in args.estimate_keeps.split(",") if k.strip()]
    summary = estimate_summary(
        args.estimate,
        keeps=keeps,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        caption_tokens=args.caption_tokens,
    )
    from pipeline.cost import cost_columns

    print(
        f"# {args.estimate}: $ per 1M items from the FLOPs model ({args.prompt_tokens} prompt tokens, "
        f"{args.new_tokens} answer tokens, ACCM caption {args.caption_tokens} tokens)\n"
    )
    print(cost.describe() + "\n")
    print(cost_table_markdown(cost_columns(summary, cost)))
    if args.output:
        local = _local_dir(args.output)
        with tempfile.TemporaryDirectory() as tmp:
            out_dir = local / "report" if local else Path(tmp)
            path = write_report(
                summary,
                out_dir,
                config=cost,
                title=f"{args.estimate}: FLOPs-model cost estimate",
                notes=[
                    "Estimate mode: FLOPs from pipeline/flops.py for the published configs, no weights.",
                    f"ACCM captioner = ClipCap mapper + GPT-2 small (3 beams, {args.caption_tokens}-token "
                    "caption), selector = LongCLIP-L x 3 candidates + 4-layer encoder.",
                ],
            )
            summary.to_parquet(out_dir / "summary.parquet", index=False)
            where = str(path) if local else publish_report(out_dir, args.output)
        print(f"\nreport: {where}", file=sys.stderr)
    return 0


DEFAULT_BENCHMARKS = "data/shapes_vqa/benchmarks/benchmarks.yaml"


def keep_rates(keeps: str, lvlm: tuple[str, str | None]) -> list[float]:
    """``--keeps`` as pruning rates of the LVLM's visual tokens (read from its config.json only)."""
    import json

    from pipeline import storage
    from pipeline.resume import join

    config = json.loads(storage.read_bytes(join(lvlm[0], "config.json"), s3_endpoint=lvlm[1]))
    vision = config["vision_config"]
    total = (vision.get("image_size", 224) // vision.get("patch_size", 32)) ** 2  # CLIPVisionConfig defaults
    out = []
    for keep in (int(k) for k in keeps.split(",") if k.strip()):
        if not 0 < keep < total:
            raise SystemExit(f"--keeps: {keep} must lie in (0, {total}) (the LVLM's visual tokens)")
        out.append(1.0 - keep / total)
    return out


def benchmark_inputs(args: argparse.Namespace, base) -> list | None:
    """``--tasks``: one input config per task from the ``--benchmarks`` file (None without ``--tasks``)."""
    if not args.tasks:
        return None
    import yaml

    from pipeline import storage
    from pipeline.config import _repo_path
    from pipeline.resume import join
    from pipeline.sweep import task_inputs

    if args.sequential:
        raise SystemExit("--tasks runs every task in one graph; --sequential takes one input (--task)")
    path = args.benchmarks or _repo_path(DEFAULT_BENCHMARKS)
    folder = path.rsplit("/", 1)[0] if "/" in path else "."
    entries = yaml.safe_load(storage.read_bytes(path, s3_endpoint=base.s3_endpoint)) or {}

    def located(value: str | None) -> str | None:
        if value is None or "://" in value or value.startswith("/"):
            return value
        return join(folder, value)

    benchmarks = {task: {k: located(v) if k != "input_format" else v for k, v in entry.items()}
                  for task, entry in entries.items()}
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    return task_inputs(base, tasks, benchmarks)


def described_inputs(base, inputs: list | None) -> str:
    from pipeline import storage

    if not inputs:
        return storage.redact(base.input)
    return ", ".join(f"{c.task} {storage.redact(c.input)}" for c in inputs)


def run_sweep(args: argparse.Namespace, job_argv: list[str], cost) -> int:
    import ray

    from pipeline import storage
    from pipeline.benchmark_table import add_benchmark_columns
    from pipeline.config import METHODS, parse_args
    from pipeline.graph import run_job
    from pipeline.report import summary_from_stats, write_report
    from pipeline.sweep import Setting, run_shared_sweep, setting_config

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown} (known: {', '.join(METHODS)})")
    base = parse_args(job_argv + (["--input", args.input] if args.input else []))
    rates = _floats(args.prune_rates) if not args.keeps else keep_rates(args.keeps, (base.lvlm, base.s3_endpoint))
    if any(not 0.0 < r < 1.0 for r in rates):
        raise SystemExit("--prune-rates must lie in (0, 1)")
    inputs = benchmark_inputs(args, base)
    if inputs:
        base = replace(base, max_new_tokens=max(c.max_new_tokens for c in inputs))
    output = (args.output or "out/sweep").rstrip("/")
    settings = [Setting(m, r) for m, r in settings_for(methods, rates)]
    log.info(
        "sweep: %d settings over %s -> %s", len(settings), described_inputs(base, inputs), storage.redact(output)
    )

    started = False
    if not ray.is_initialized():
        address = base.ray_address or os.environ.get("RAY_ADDRESS") or "local"
        ray.init(
            address=address,
            log_to_driver=True,
            runtime_env={
                "env_vars": {
                    "DS_ACCELERATOR": os.environ["DS_ACCELERATOR"],
                    "TOKENIZERS_PARALLELISM": "false",
                }
            },
        )
        started = True
    walls: dict[tuple[str, float], float | None] = {}
    t0 = time.perf_counter()
    sweep_id = base.run_id or time.strftime("%Y%m%dT%H%M%S")
    try:
        if args.sequential:
            summaries = {}
            for setting in settings:
                log.info("sweep: setting %s (sequential)", setting.label)
                summaries[setting] = run_job(setting_config(base, setting, output, sweep_id))
        else:
            summaries = run_shared_sweep(base, settings, output, sweep_id, inputs=inputs)
        for setting, s in summaries.items():  # no throughput for a setting this run did not process (--resume)
            walls[(setting.method, setting.rate)] = float(s["wall_s"]) if s.get("rows_processed") else None
    finally:
        if started:
            ray.shutdown()
    total_wall = time.perf_counter() - t0

    summary = summary_from_stats([(s.method, s.rate, summaries[s]["stats"], walls[(s.method, s.rate)])
                                  for s in settings])
    summary = add_benchmark_columns(summary, {(s.method, float(s.rate)): summaries[s].get("benchmarks")
                                              for s in settings})
    sink = tempfile.NamedTemporaryFile(suffix=".parquet", delete=False)
    sink.close()
    summary.to_parquet(sink.name, index=False)
    storage.write_bytes(
        f"{output}/summary.parquet", Path(sink.name).read_bytes(), s3_endpoint=base.s3_endpoint
    )
    os.unlink(sink.name)

    local = _local_dir(output)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = local / "report" if local else Path(tmp)
        path = write_report(
            summary,
            out_dir,
            config=cost,
            tolerance_points=args.tolerance,
            target_accuracy=args.target_accuracy,
            measured_usd_per_hour=args.measured_usd_per_hour,
            notes=[
                f"Input: {described_inputs(base, inputs)}; LVLM: {storage.redact(base.lvlm)}; {len(settings)} settings, "
                f"sweep wall time {total_wall:.0f} s.",
                "Accuracy: mean score over rows with answers and no error (as in each setting's summary.json); "
                "errored rows are counted apart. FLOPs are means over rows without error.",
                "Each setting ran the main job's graph on its own (vision tower re-run per setting)."
                if args.sequential
                else "All settings ran in one graph sharing one vision encoding per item; a setting's wall time "
                "(and items/s) is its share of the sweep's wall time by measured stage time.",
            ],
        )
        where = str(path) if local else publish_report(out_dir, output, base.s3_endpoint)
    print(
        summary[
            [
                "method",
                "prune_rate",
                "keep_tokens",
                "items",
                "errors",
                "accuracy",
                "flops_total",
                "items_per_s",
            ]
        ].to_string(index=False)
    )
    print(f"report: {where}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from pipeline.cost import CostConfig

    args, job_argv = build_parser().parse_known_args(argv)
    for flag in ("--method", "--prune-rate", "--keep-tokens"):
        if any(a == flag or a.startswith(flag + "=") for a in job_argv):
            raise SystemExit(f"{flag} is set per setting by the sweep; use --methods / --prune-rates")
    cost = CostConfig.load(args.cost_config).with_tiers(args.cost_captioner_tier, args.cost_lvlm_tier)
    from pipeline.logs import setup_logging

    setup_logging()
    if args.estimate:
        return run_estimate(args, cost)
    from pipeline.exits import exit_code

    try:
        return run_sweep(args, job_argv, cost)
    except Exception as exc:  # noqa: BLE001 - the known failures exit with their code, the rest re-raise
        return exit_code(exc, log)


if __name__ == "__main__":
    sys.exit(main())
