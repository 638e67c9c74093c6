"""The one job configuration: a dataclass, its argparse CLI and an optional YAML file (flags win).

Precedence, lowest first: the dataclass defaults (the embedded default run: bundled Shapes v2 demo
shards, the shipped proving-ground models, ``accm`` at 87.5% pruning, local output), then ``--config FILE.yaml``
(keys are the field names, dashes or underscores), then the flags actually given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The one list of methods (actors.pruners, pipeline.flops and the sweep import it from here)
METHODS = ("none", "random", "fastv", "dart", "visionzip", "prumerge_plus", "cdpruner", "divprune", "accm")
IN_LLM_METHODS = ("fastv", "dart")  # prune inside the LLM (before the projector they keep every patch)
ACCM_BASES = ("prumerge_plus", "cdpruner", "divprune", "visionzip", "random")  # --accm-base: pre-LLM pruners
CAPTION_METHODS = ("accm",)
# read CLIP's projected last-layer patches and the question through CLIP's text tower when a text guide (--clip) is
# loaded; the others need the tower only up to LLaVA's feature layer (actors.engine.LlavaEngine.uses_projection)
TEXT_GUIDED_METHODS = ("prumerge_plus", "accm", "cdpruner")
TEXT_PICK_METHODS = ("prumerge_plus", "accm")  # the methods whose pruner has text-guided picks
CDPRUNER_SIGNS = ("code", "paper")
DTYPES = ("bf16", "fp16", "fp32")  # --dtype
DART_COUNTS = ("code", "budget")  # CDPruner's relevance: negated as its code does, or as its paper reads
TEXT_PICKS = ("nearest", "farthest")
EXPORTS = ("llava-answers",)
DEFAULT_MAX_NEW_TOKENS = 8

REPO_ROOT = Path(__file__).resolve().parents[1]

# The embedded default run (`make demo`): the bundled Shapes v2 demo shards and the models trained for that
# world (the proving ground, models/shapes_v2). The CLIP belongs to the bundle: it is the default --clip only
# while --lvlm is the bundled LVLM (another LVLM gets no text guide unless --clip names one).
DEFAULT_INPUT = "data/shapes_v2/test/"
DEFAULT_MODELS = "models/shapes_v2"


def _repo_path(relative: str) -> str:
    """A bundled path: relative to the working directory if it exists there (``ray job submit
    --working-dir``), else to the repository this file belongs to."""
    return relative if os.path.exists(relative) else str(REPO_ROOT / relative)


def parse_pool(text: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``"MIN:MAX"`` or ``"N"`` -> (min, max) actor pool size."""
    if isinstance(text, (tuple, list)):
        lo, hi = int(text[0]), int(text[-1])
    else:
        parts = str(text).split(":")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"actor pool must be MIN:MAX or N (positive integers), got {text!r}")
        lo, hi = int(parts[0]), int(parts[-1])
    if lo < 1 or hi < lo:
        raise ValueError(f"actor pool needs 1 <= MIN <= MAX, got {lo}:{hi}")
    return lo, hi


@dataclass
class JobConfig:
    """Everything one run of ``jobs/caption_dataset.py`` needs (picklable: actors receive it)."""

    input: str = field(default_factory=lambda: _repo_path(DEFAULT_INPUT))
    output: str = "out/caption_dataset"
    task: str | None = None  # a benchmark (pipeline.tasks): its prompt, answer length and official metric
    input_format: str | None = None  # pipeline.sources.FORMATS; None: detected from the file names
    image_root: str | None = None  # where a question file's images lie (default: the file's folder)
    annotations: str | None = None  # the benchmark's ground truth as it ships (a file or a folder)
    export: str | None = None  # llava-answers: also write LLaVA's answer JSONL
    method: str = "accm"
    keep_tokens: int | None = None
    prune_rate: float | None = 0.875
    fastv_layer: int = 2
    lvlm: str = field(default_factory=lambda: _repo_path(f"{DEFAULT_MODELS}/lvlm"))
    captioner: str | None = field(default_factory=lambda: _repo_path(f"{DEFAULT_MODELS}/captioner"))
    selector: str | None = field(default_factory=lambda: _repo_path(f"{DEFAULT_MODELS}/selector"))
    # CLIPModel folder: PruMerge+'s text guide, projected patches (ACCM reference); None: the bundled CLIP when
    # lvlm is the bundled LVLM, else none; "none": none
    clip: str | None = None
    text_pick: str = "nearest"  # PruMerge+ text-guided picks: nearest (the paper) or farthest (ACCM's code)
    accm_base: str = "prumerge_plus"  # the pre-LLM pruner ACCM's caption model works behind (the paper's)
    cdpruner_sign: str = "code"  # CDPruner's relevance sign: code (negated, as its public code) or paper
    dart_layer: int = 2  # DART prunes inside the LLM after this layer (its LLaVA-1.5-7B setting)
    dart_count: str = "code"  # DART's kept count: code (pivots + 8 x budget // 8, its public code) or budget
    conv: str = "llava_hf"  # LVLM conversation format (actors.prompt.CONVERSATIONS)
    # answer-format line (actors.prompt.ANSWER_SUFFIXES): None = none, or with --task the benchmark's own line;
    # with --task, "none" drops the benchmark's line and any other value replaces it
    answer_suffix: str | None = None
    num_candidates: int | None = None  # None: the caption model's own ``beams``
    max_new_tokens: int | None = None  # None: the task's length (LLaVA's evaluation scripts), else 8
    batch_size: int = 16
    dtype: str | None = None  # DTYPES; None: bf16 on CUDA (LLaVA-1.5's own dtype), fp32 on CPU
    captioner_actors: tuple[int, int] = (1, 1)
    lvlm_actors: tuple[int, int] = (1, 1)
    captioner_gpus: float | None = None  # None: 0.5 when the cluster has GPUs, else 0
    lvlm_gpus: float | None = None  # None: 1 (tp: lvlm_tp) when the cluster has GPUs, else 0
    lvlm_tp: int | None = None  # None: plain model; N: DeepSpeed tensor parallelism over N GPUs per replica
    autoscale: bool = False  # request GPUs and tier resources as asked even if no node has them yet
    captioner_resource: str = "captioner_tier"
    lvlm_resource: str = "lvlm_tier"
    limit: int | None = None
    resume: bool = False
    part_rows: int = 128  # the write unit: finished rows go to a durable part in groups of at most this many
    retry_budget_s: float = 180.0  # how long a transient object-store fault is retried before exit code 3
    s3_endpoint: str | None = None
    model_cache: str = field(default_factory=lambda: os.path.expanduser("~/.cache/accm-pipeline/models"))
    max_pixels: int = 2**28  # decompression-bomb bound (pipeline.decode.DEFAULT_MAX_PIXELS)
    ray_address: str | None = None
    run_id: str | None = None
    seed: int = 0
    # Set by the CLI when --method was not given: missing ACCM checkpoints then fall back to prumerge_plus.
    accm_fallback: bool = True

    def validate(self) -> JobConfig:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        from pipeline.sources import FORMATS

        if self.input_format is not None and self.input_format not in FORMATS:
            raise ValueError(f"--input-format must be one of {', '.join(FORMATS)}, got {self.input_format!r}")
        if self.export not in (None, *EXPORTS):
            raise ValueError(f"--export must be one of {', '.join(EXPORTS)}, got {self.export!r}")
        task = self.task_module  # an unknown --task fails here
        if self.max_new_tokens is None:
            self.max_new_tokens = task.MAX_NEW_TOKENS if task else DEFAULT_MAX_NEW_TOKENS
        if self.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be >= 1")
        if self.keep_tokens is not None and self.keep_tokens < 0:
            raise ValueError("--keep-tokens must be >= 0")
        if self.prune_rate is not None and not 0.0 <= self.prune_rate < 1.0:
            raise ValueError("--prune-rate must be in [0, 1)")
        if self.keep_tokens is not None:
            self.prune_rate = None  # --keep-tokens overrides the (default) pruning rate
        if self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        from actors.prompt import CONVERSATIONS

        if self.conv not in CONVERSATIONS:
            raise ValueError(f"--conv must be one of {', '.join(CONVERSATIONS)}, got {self.conv!r}")
        if self.accm_base not in ACCM_BASES:
            raise ValueError(f"--accm-base must be one of {', '.join(ACCM_BASES)}, got {self.accm_base!r}")
        if self.cdpruner_sign not in CDPRUNER_SIGNS:
            raise ValueError(f"--cdpruner-sign must be one of {', '.join(CDPRUNER_SIGNS)}, got {self.cdpruner_sign!r}")
        if self.dart_count not in DART_COUNTS:
            raise ValueError(f"--dart-count must be one of {', '.join(DART_COUNTS)}, got {self.dart_count!r}")
        if self.dart_layer < 1:
            raise ValueError(f"--dart-layer must be >= 1, got {self.dart_layer}")
        if self.text_pick not in TEXT_PICKS:
            raise ValueError(f"--text-pick must be one of {', '.join(TEXT_PICKS)}, got {self.text_pick!r}")
        if self.fastv_layer < 1:
            raise ValueError(f"--fastv-layer must be >= 1 (FastV ranks tokens by layer K-1's attention), "
                             f"got {self.fastv_layer}")
        if self.num_candidates is not None and self.num_candidates < 1:
            raise ValueError("--num-candidates must be >= 1")
        if self.part_rows < 1:
            raise ValueError("--part-rows must be >= 1")
        if self.retry_budget_s < 0:
            raise ValueError("--retry-budget-s must be >= 0")
        if self.limit is not None and self.limit < 0:
            raise ValueError("--limit must be >= 0")
        if self.lvlm_tp is not None:
            if self.lvlm_tp < 1:
                raise ValueError(f"--lvlm-tp must be >= 1, got {self.lvlm_tp}")
            # --lvlm-gpus 0: CPU ranks over gloo (actors.tp); otherwise one GPU per rank
            if self.lvlm_tp > 1 and self.lvlm_gpus and self.lvlm_gpus != self.lvlm_tp:
                raise ValueError(f"--lvlm-tp {self.lvlm_tp}: each LVLM replica takes {self.lvlm_tp} GPUs (one "
                                 f"per rank); leave --lvlm-gpus out or set it to {self.lvlm_tp}, got "
                                 f"{self.lvlm_gpus:g}")
        bundled_lvlm = _repo_path(f"{DEFAULT_MODELS}/lvlm")
        if self.clip is None and os.path.realpath(self.lvlm) == os.path.realpath(bundled_lvlm):
            self.clip = _repo_path(f"{DEFAULT_MODELS}/clip")  # the bundled LVLM's tower is this CLIP's
        elif self.clip is not None and self.clip.lower() == "none":
            self.clip = None
        self.captioner_actors = parse_pool(self.captioner_actors)
        self.lvlm_actors = parse_pool(self.lvlm_actors)
        return self

    @property
    def task_module(self):
        """The ``--task`` module (``pipeline.tasks``), or None; raises on an unknown name."""
        from pipeline import tasks

        return tasks.get(self.task) if self.task else None

    @property
    def uses_captions(self) -> bool:
        return self.method in CAPTION_METHODS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(JobConfig)}

# (flag, field, type, help); type "bool" = store_true.
_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--input", "input", str, "Input Parquet shards: a directory or file, local path, file:// or s3:// "
     "(default: the bundled Shapes v2 demo shards, data/shapes_v2/test)."),
    ("--task", "task", str, "Benchmark task (pipeline/tasks): vqav2, textvqa, gqa, pope, mme, mmbench, seed, "
     "scienceqa, mmvp, flickr30k. It fixes the prompt, --max-new-tokens and the official metric, and reads "
     "the benchmark's own files (see README, Benchmarks). Default: none (the project's Parquet, VQA accuracy)."),
    ("--input-format", "input_format", str, "Input format: parquet (the project's), llava-jsonl, llava-json, "
     "mmbench-tsv, mmvp-csv or hf-parquet (lmms-eval's Hugging Face shards). Default: from the file names."),
    ("--image-root", "image_root", str, "Folder (path, file:// or s3://) the question file's image names are "
     "relative to (default: the question file's folder)."),
    ("--annotations", "annotations", str, "The benchmark's ground truth as it ships (a file or a folder), where "
     "the question file does not carry the answers (e.g. POPE's coco_pope_*.json, GQA's "
     "testdev_balanced_questions.json, MME's folder)."),
    ("--export", "export", str, "llava-answers: also write LLaVA's answer JSONL to <output>/llava_answers.jsonl "
     "(question_id, prompt, text, answer_id, model_id, metadata), for the benchmarks' own scripts."),
    ("--output", "output", str, "Output directory (local path, file:// or s3://): one Parquet file per input "
     "shard, same relative name, plus summary.json and _done/ completion markers (default: out/caption_dataset)."),
    ("--method", "method", str, f"Pruning method, one of {', '.join(METHODS)} (default: accm)."),
    ("--keep-tokens", "keep_tokens", int, "Visual tokens kept per image (overrides --prune-rate)."),
    ("--prune-rate", "prune_rate", float, "Fraction of visual tokens pruned, in [0, 1) (default: 0.875)."),
    ("--fastv-layer", "fastv_layer", int, "FastV: prune inside the LLM after this layer (default: 2)."),
    ("--lvlm", "lvlm", str, "LLaVA model directory: local, file:// or s3:// (default: models/shapes_v2/lvlm)."),
    ("--captioner", "captioner", str, "ACCM caption model directory (accm only; default: "
     "models/shapes_v2/captioner)."),
    ("--selector", "selector", str, "ACCM selector directory (accm only; default: models/shapes_v2/selector)."),
    ("--clip", "clip", str, "A CLIPModel folder (e.g. openai/clip-vit-large-patch14-336; local, file:// or "
     "s3://), loaded once per captioner actor: the text guide of prumerge_plus/accm (question vs projected "
     "patch embeddings) and the projected patch embeddings ACCM's reference caption model reads. Without it "
     "the text-guided picks are skipped. Default: models/shapes_v2/clip while --lvlm is the bundled "
     "models/shapes_v2/lvlm (whose tower it is), else none; 'none' turns it off."),
    ("--accm-base", "accm_base", str, f"The pre-LLM pruner ACCM works behind: its caption model reads what this "
     f"base discards. One of {', '.join(ACCM_BASES)} (default: prumerge_plus, the paper's)."),
    ("--cdpruner-sign", "cdpruner_sign", str, "CDPruner's instruction relevance: 'code' (default: negated before "
     "the min-max normalisation, as Theia-4869/CDPruner's llava_arch.py does, so patches least similar to the "
     "question weigh most) or 'paper' (similarity as the paper defines it). Needs --clip; without it CDPruner "
     "is a plain DPP over the tokens' similarity."),
    ("--dart-layer", "dart_layer", int, "DART: prune inside the LLM after this layer (default: 2)."),
    ("--dart-count", "dart_count", str, "DART's kept image tokens: 'code' (default: 4 image pivots + 8 x (budget "
     "// 8), as its public code keeps, e.g. 132 for 128) or 'budget' (exactly the budget, the paper's counts)."),
    ("--text-pick", "text_pick", str, "PruMerge+ text-guided picks: 'nearest' patches to the question (the "
     "ACCM paper, default) or 'farthest' (ACCM's code as written: topk of the L2 distance, largest=True)."),
    ("--conv", "conv", str, "LVLM conversation format: 'llava_hf' (USER: <image>\n... ASSISTANT:, what the "
     "proving-ground models use; default) or 'vicuna_v1' (LLaVA-1.5's evaluation prompt with its system "
     "prompt, as in every published LLaVA-1.5 number)."),
    ("--answer-suffix", "answer_suffix", str, "Answer-format line added to each question after a newline: "
     "'none', 'short' (Answer the question using a single word or phrase.), 'option' (Answer with "
     "the option's letter from the given choices directly.) or any literal text. Default: none; with --task, the "
     "benchmark's own line as LLaVA's files carry it, which 'none' drops and any other value replaces (models "
     "trained without such lines, like the shipped proving-ground ones, answer plain questions best)."),
    ("--num-candidates", "num_candidates", int, "Caption candidates per item (beam size; default: the caption "
     "model's own, its config's 'beams'). 1 decodes greedily and skips the selector: nothing to choose, no cost."),
    ("--max-new-tokens", "max_new_tokens", int, "Answer length limit in tokens (default: the task's, "
     "as LLaVA's evaluation scripts set it; 8 without --task)."),
    ("--batch-size", "batch_size", int, "Rows per model batch in both tiers (default: 16)."),
    ("--dtype", "dtype", str, "Model weights and activations: bf16, fp16 or fp32 (default: bf16 on CUDA, "
     "LLaVA-1.5's own dtype; fp32 on CPU). An explicit value applies on either device."),
    ("--captioner-actors", "captioner_actors", str, "Captioner tier actor pool size MIN:MAX (default: 1:1)."),
    ("--lvlm-actors", "lvlm_actors", str, "LVLM tier actor pool size MIN:MAX (default: 1:1)."),
    ("--captioner-gpus", "captioner_gpus", float, "GPUs per captioner actor (default: 0.5 if the cluster "
     "has GPUs, else 0)."),
    ("--lvlm-gpus", "lvlm_gpus", float, "GPUs per LVLM actor (default: 1 if the cluster has GPUs, else 0; "
     "with --lvlm-tp N: N)."),
    ("--lvlm-tp", "lvlm_tp", int, "Run the LVLM tier's model with DeepSpeed inference tensor parallelism over "
     "N GPUs of one node per replica (models too large for one GPU; each replica then requests N GPUs). On a "
     "cluster without GPUs (or with --lvlm-gpus 0) the N ranks are CPU processes over gloo. 1 goes through "
     "DeepSpeed without splitting (default: off, the plain model)."),
    ("--autoscale", "autoscale", "bool", "The cluster autoscales (e.g. GPU node types at min 0, as in infra/): "
     "request the tiers' GPUs (--*-gpus, default 0.5 / 1 / tp) and tier resources (one unit per GPU) even when "
     "no node has them yet, so that the autoscaler adds them. Without it, requests fit the nodes alive at job "
     "start, and a GPU cluster scaled to zero would run on its head's CPUs."),
    ("--captioner-resource", "captioner_resource", str, "Custom Ray resource of the captioner tier, requested "
     "only when the cluster has it (default: captioner_tier)."),
    ("--lvlm-resource", "lvlm_resource", str, "Custom Ray resource of the LVLM tier (default: lvlm_tier)."),
    ("--limit", "limit", int, "Process only the first N rows (in shard order)."),
    ("--resume", "resume", "bool", "Continue a crashed or interrupted run in --output: shards with a _done/ "
     "marker are skipped, rows already in a durable part (_parts/) are not redone. Without it a run starts "
     "clean and replaces earlier output of the same shards."),
    ("--part-rows", "part_rows", int, "Write unit: finished rows are written by Ray workers as durable parts of "
     "at most this many rows, so a crash loses fewer than this many finished rows plus the rows inside the "
     "tiers (default: 128)."),
    ("--retry-budget-s", "retry_budget_s", float, "Seconds a transient object-store fault (connection reset, "
     "timeout, 5xx, SlowDown) is retried with exponential backoff before the job exits with code 3; --resume "
     "then continues (default: 180)."),
    ("--s3-endpoint", "s3_endpoint", str, "S3 endpoint URL (else AWS_ENDPOINT_URL / the AWS environment)."),
    ("--model-cache", "model_cache", str, "Local directory s3:// models are copied into (per node)."),
    ("--max-pixels", "max_pixels", int, "Decompression-bomb bound: images claiming more pixels are refused per row before decoding; any photo below it is decoded reduced for the model (default: 2**28)."),
    ("--ray-address", "ray_address", str, "Ray cluster to join (default: RAY_ADDRESS, as `ray job submit` "
     "sets it, else a new local Ray)."),
    ("--run-id", "run_id", str, "Run id written to every row (default: a fresh one)."),
    ("--seed", "seed", int, "Seed of the random pruner (default: 0)."),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caption_dataset.py",
        description="Batch VQA over Parquet shards on Ray Data: decode -> captioner tier (vision tower, pruner, "
        "ACCM captions) -> LVLM tier (projector + pruned LLM) -> scoring -> Parquet + summary.json. "
        "With no arguments: the bundled Shapes v2 demo shards, the shipped proving-ground models "
        "(models/shapes_v2), accm at 87.5% pruning, local output.",
    )
    parser.add_argument("--config", help="YAML file with any of these options (keys: option names); "
                        "flags given on the command line win.")
    budget = parser.add_mutually_exclusive_group()
    for flag, name, typ, help_text in _FLAGS:
        target = budget if name in ("keep_tokens", "prune_rate") else parser
        if typ == "bool":
            target.add_argument(flag, dest=name, action="store_true", default=argparse.SUPPRESS, help=help_text)
        else:
            target.add_argument(flag, dest=name, type=typ, default=argparse.SUPPRESS, help=help_text)
    return parser


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS or name == "accm_fallback":
            raise ValueError(f"{path}: unknown option {key!r}")
        out[name] = value
    return out


def parse_args(argv: list[str] | None = None) -> JobConfig:
    """CLI -> validated ``JobConfig`` (defaults < YAML < flags)."""
    ns = vars(build_parser().parse_args(argv))
    config_file = ns.pop("config", None)
    values = _load_yaml(config_file) if config_file else {}
    if "prune_rate" in ns:  # a flag's budget replaces a budget from the YAML file
        values.pop("keep_tokens", None)
    values.update(ns)  # only flags actually given are in ns (default=SUPPRESS)
    values["accm_fallback"] = "method" not in values
    return JobConfig(**values).validate()
