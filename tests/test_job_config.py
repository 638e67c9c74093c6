"""The job's CLI/config, its resource sizing and its input checks: no Ray needed, fast."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfig, build_parser, parse_args
from pipeline.graph import run_job, tier_resources
from pipeline.schema import SchemaError


def test_defaults_are_the_embedded_demo() -> None:
    cfg = parse_args([])
    assert cfg.method == "accm" and cfg.prune_rate == 0.875 and cfg.accm_fallback
    assert cfg.input.rstrip("/").endswith("data/shapes_v2/test")
    assert cfg.lvlm.endswith("models/shapes_v2/lvlm") and not cfg.resume
    assert cfg.captioner.endswith("models/shapes_v2/captioner") and cfg.selector.endswith("models/shapes_v2/selector")
    # the bundled CLIP goes with the bundled LVLM (its tower), and only with it
    assert cfg.clip.endswith("models/shapes_v2/clip") and os.path.isdir(cfg.clip)
    assert parse_args(["--clip", "none"]).clip is None
    assert parse_args(["--lvlm", os.path.abspath(cfg.lvlm)]).clip == cfg.clip  # the bundled LVLM, however named
    assert parse_args(["--lvlm", "/models/llava-1.5-7b-hf"]).clip is None
    assert parse_args(["--lvlm", "/models/llava-1.5-7b-hf", "--clip", "/models/clip"]).clip == "/models/clip"
    for folder in (cfg.input, cfg.lvlm, cfg.captioner, cfg.selector):
        assert os.path.isdir(folder), folder  # the embedded default is shipped in the repo


def test_help_documents_every_option() -> None:
    text = build_parser().format_help()
    for flag in ("--input", "--output", "--method", "--keep-tokens", "--prune-rate", "--fastv-layer", "--lvlm",
                 "--captioner", "--selector", "--num-candidates", "--batch-size", "--captioner-actors",
                 "--lvlm-actors", "--captioner-gpus", "--lvlm-gpus", "--captioner-resource", "--lvlm-resource",
                 "--limit", "--resume", "--s3-endpoint", "--config", "--clip", "--text-pick", "--conv",
                 "--answer-suffix"):
        assert flag in text


def test_yaml_then_flags_win(tmp_path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("method: fastv\nkeep-tokens: 16\nbatch_size: 4\nlvlm_actors: '1:3'\n")
    cfg = parse_args(["--config", str(path), "--keep-tokens", "8"])
    assert cfg.method == "fastv" and cfg.keep_tokens == 8 and cfg.batch_size == 4
    assert cfg.lvlm_actors == (1, 3) and not cfg.accm_fallback  # method given (in YAML): no silent fallback
    path.write_text("no_such_option: 1\n")
    with pytest.raises(ValueError, match="no_such_option"):
        parse_args(["--config", str(path)])
    with pytest.raises(ValueError, match="MIN <= MAX"):
        parse_args(["--captioner-actors", "3:1"])
    assert parse_args(["--keep-tokens", "4"]).prune_rate is None  # an explicit budget replaces the default rate
    with pytest.raises(SystemExit):
        parse_args(["--keep-tokens", "4", "--prune-rate", "0.5"])
    with pytest.raises(ValueError, match="method"):
        parse_args(["--method", "bogus"])


def test_small_cluster_gets_fractional_cpus_and_no_absent_resources() -> None:
    cfg = JobConfig(captioner_actors=(1, 1), lvlm_actors=(1, 2)).validate()
    res = tier_resources(cfg, {"CPU": 2.0})
    actor_cpus = res.captioner["num_cpus"] * 1 + res.lvlm["num_cpus"] * 2
    assert actor_cpus <= 2 - 1  # one CPU stays free for read/decode tasks: no Ray Data deadlock
    assert "resources" not in res.captioner and "num_gpus" not in res.lvlm  # absent on this cluster
    cfg.lvlm_gpus = 1.0
    assert "num_gpus" not in tier_resources(cfg, {"CPU": 2.0}).lvlm  # would never schedule
    big = tier_resources(cfg, {"CPU": 32.0, "GPU": 4.0, "captioner_tier": 1.0, "lvlm_tier": 2.0})
    assert big.captioner == {"num_cpus": 1.0, "num_gpus": 0.5, "resources": {"captioner_tier": 1.0}}
    assert big.lvlm == {"num_cpus": 1.0, "num_gpus": 1.0, "resources": {"lvlm_tier": 1.0}}


def test_autoscale_requests_what_the_tiers_need_not_what_is_up() -> None:
    """--autoscale: on a cluster whose GPU nodes are at zero (only a CPU head is up), the actors still ask for
    their GPUs and tier resources (one unit per GPU, as infra/'s node types carry them), so the autoscaler adds
    GPU nodes instead of the job running on the head's CPUs."""
    head_only = {"CPU": 8.0}
    cfg = parse_args(["--autoscale"])
    res = tier_resources(cfg, head_only)
    assert res.captioner == {"num_cpus": 1.0, "num_gpus": 0.5, "resources": {"captioner_tier": 0.5}}
    assert res.lvlm == {"num_cpus": 1.0, "num_gpus": 1.0, "resources": {"lvlm_tier": 1.0}}
    tp = tier_resources(parse_args(["--autoscale", "--lvlm-tp", "4"]), head_only, node_gpus=[0.0])
    assert tp.lvlm["num_gpus"] == 4.0 and tp.lvlm["resources"] == {"lvlm_tier": 4.0}
    cpu = tier_resources(parse_args(["--autoscale", "--captioner-gpus", "0", "--lvlm-gpus", "0"]), head_only)
    assert cpu.captioner == cpu.lvlm == {"num_cpus": 1.0}  # explicit CPU tiers stay CPU tiers
    # without the flag, the same head-only snapshot gets CPU actors: right for a fixed CPU cluster
    assert "num_gpus" not in tier_resources(parse_args([]), head_only).lvlm


def test_broken_shard_stops_the_job_before_writing(tmp_path) -> None:
    from pipeline import shapes
    from pipeline.schema import INPUT_SCHEMA

    src = tmp_path / "in"
    src.mkdir()
    good = [shapes.item_row(shapes.make_item(0, "test", i)) for i in range(2)]
    pq.write_table(pa.Table.from_pylist(good, schema=INPUT_SCHEMA), src / "a.parquet")
    pq.write_table(pa.table({"id": ["x"], "image": [b"png"], "question": [3]}), src / "b.parquet")
    out = tmp_path / "out"
    cfg = JobConfig(input=str(src), output=str(out), method="random", lvlm=str(tmp_path)).validate()
    import ray  # shards are planned in Ray tasks

    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        with pytest.raises(SchemaError, match=r"b\.parquet.*question"):
            run_job(cfg)
        assert not out.exists()
        (src / "b.parquet").write_bytes(b"PAR1 truncated")
        with pytest.raises(SchemaError, match=r"b\.parquet.*not a readable Parquet"):
            run_job(cfg)
        assert not os.path.exists(out)
    finally:
        ray.shutdown()


def test_lvlm_tp_is_checked_at_parsing_and_sizes_the_replica() -> None:
    assert "--lvlm-tp" in build_parser().format_help()
    assert parse_args([]).lvlm_tp is None  # default: the plain model, no DeepSpeed
    assert parse_args(["--lvlm-tp", "1", "--lvlm-gpus", "0"]).lvlm_tp == 1  # tp=1 runs on CPU
    with pytest.raises(ValueError, match="--lvlm-tp must be >= 1"):
        parse_args(["--lvlm-tp", "0"])
    assert parse_args(["--lvlm-tp", "2", "--lvlm-gpus", "0"]).lvlm_tp == 2  # CPU ranks over gloo
    with pytest.raises(ValueError, match="leave --lvlm-gpus out or set it to 4"):
        parse_args(["--lvlm-tp", "4", "--lvlm-gpus", "1"])
    cfg = parse_args(["--lvlm-tp", "4", "--lvlm-actors", "1:2"])
    big = tier_resources(cfg, {"CPU": 32.0, "GPU": 16.0, "lvlm_tier": 8.0}, node_gpus=[8.0, 8.0])
    assert big.lvlm["num_gpus"] == 4.0  # one replica = one actor holding tp GPUs of one node
    assert parse_args(["--lvlm-tp", "4", "--lvlm-gpus", "4"]).lvlm_gpus == 4.0
    cpu = tier_resources(cfg, {"CPU": 2.0})  # no GPUs: the replica's ranks are CPU processes (gloo)
    assert "num_gpus" not in cpu.lvlm
    with pytest.raises(ValueError, match="4 GPUs on one node"):
        tier_resources(cfg, {"CPU": 32.0, "GPU": 6.0}, node_gpus=[2.0, 2.0, 2.0])


def test_prompt_and_pruner_choices_are_checked_and_recorded() -> None:
    from pipeline.run_facts import output_constants

    cfg = parse_args(["--conv", "vicuna_v1", "--answer-suffix", "short", "--clip", "/models/clip",
                      "--text-pick", "farthest", "--method", "prumerge_plus", "--run-id", "r1"])
    const = output_constants(cfg)
    assert const["conv"] == "vicuna_v1" and const["text_pick"] == "farthest" and const["clip_model"] == "/models/clip"
    assert const["answer_suffix"] == "Answer the question using a single word or phrase."
    # no CLIP: no picks
    assert output_constants(parse_args(["--method", "prumerge_plus", "--clip", "none"]))["text_pick"] is None
    assert output_constants(parse_args(["--method", "random", "--clip", "c"]))["text_pick"] is None
    for argv, message in ((["--conv", "chatml"], "--conv must be one of"),
                          (["--text-pick", "middle"], "--text-pick must be one of"),
                          (["--fastv-layer", "0"], "--fastv-layer must be >= 1")):
        with pytest.raises(ValueError, match=message):
            parse_args(argv)


def test_fastv_layer_at_the_llms_depth_is_refused_before_anything_runs(tmp_path) -> None:
    from pipeline.config import REPO_ROOT

    lvlm = str(REPO_ROOT / "models" / "shapes" / "lvlm")  # a 6-layer LLM
    out = tmp_path / "out"
    cfg = JobConfig(output=str(out), method="fastv", fastv_layer=6, lvlm=lvlm).validate()
    with pytest.raises(ValueError, match=r"--fastv-layer 6 must be below the LLM's depth \(6 layers"):
        run_job(cfg)
    assert not out.exists()


def test_dtype_defaults_to_bf16_on_cuda_fp32_on_cpu_and_is_checked(monkeypatch) -> None:
    import torch

    from pipeline.stages import _device

    assert parse_args([]).dtype is None
    assert parse_args(["--dtype", "fp16"]).dtype == "fp16"
    with pytest.raises(ValueError, match="--dtype"):
        parse_args(["--dtype", "half"])
    assert _device(0.0) == ("cpu", torch.float32)
    assert _device(1.0) == ("cpu", torch.float32)  # no GPU here: a GPU request runs on CPU
    assert _device(0.0, "bf16") == ("cpu", torch.bfloat16)  # an explicit value applies on either device
    # a GPU cannot exist on this machine: torch.cuda.is_available is patched (only the choice is under test)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _device(1.0) == ("cuda", torch.bfloat16)
    assert _device(1.0, "fp16") == ("cuda", torch.float16)
    assert _device(0.0) == ("cpu", torch.float32)
