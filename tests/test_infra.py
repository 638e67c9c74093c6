"""The cluster configs parse, name the tiers the job requests, and start a command the job accepts."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAYJOB = ROOT / "infra/kuberay/rayjob.yaml"
AWS = ROOT / "infra/aws/cluster.yaml"

# GPUs per instance type used in the configs (vendor spec sheets).
INSTANCE_GPUS = {
    "g6.xlarge": ("L4", 1),
    "g6.12xlarge": ("L4", 4),
    "g6.48xlarge": ("L4", 8),
    "p5.48xlarge": ("H100", 8),
}


def _tier_names() -> tuple[str, str]:
    """The job's default tier resource names: defined once, in pipeline/config.py."""
    from pipeline.config import JobConfig

    fields = JobConfig.__dataclass_fields__
    return fields["captioner_resource"].default, fields["lvlm_resource"].default


def _kuberay_resources(group: dict) -> dict:
    """KubeRay passes ``rayStartParams.resources`` to ``ray start --resources`` as a quoted JSON string."""
    raw = group["rayStartParams"]["resources"]
    value = json.loads(raw)  # the outer quotes
    return json.loads(value) if isinstance(value, str) else value


def test_tier_names_are_the_jobs():
    assert _tier_names() == ("captioner_tier", "lvlm_tier")


def test_kuberay_rayjob():
    doc = yaml.safe_load(RAYJOB.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    cluster = spec["rayClusterSpec"]
    pinned = next(d for d in _pyproject_deps() if d.startswith("ray["))
    assert pinned.endswith("==" + cluster["rayVersion"]), "rayVersion must match the pinned Ray"
    groups = cluster["workerGroupSpecs"]
    assert len(groups) == 2
    captioner, lvlm = _tier_names()
    by_tier = {}
    for g in groups:
        res = _kuberay_resources(g)
        (tier,) = [k for k in res if k in (captioner, lvlm)]
        by_tier[tier] = g
        (container,) = g["template"]["spec"]["containers"]
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert res[tier] == gpus, f"{g['groupName']}: one unit of {tier} per GPU"
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        itype = g["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
        assert INSTANCE_GPUS[itype][1] >= gpus
    assert set(by_tier) == {captioner, lvlm}
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["working_dir"] and "env_vars" in env
    _check_entrypoint(spec["entrypoint"])


def _pyproject_deps() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def _check_entrypoint(entrypoint: str) -> None:
    """The entrypoint is the main job and its flags parse with the job's own parser."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "jobs/caption_dataset.py"]
    config = pytest.importorskip("pipeline.config")
    cfg = config.parse_args(argv[2:])
    assert cfg.input.startswith("s3://") and cfg.output.startswith("s3://")
    assert cfg.captioner_gpus and cfg.lvlm_gpus, "GPU tiers must ask for GPUs"
    assert cfg.autoscale, "GPU node types start at 0 (or are still coming up): requests must not fit the head"


def test_aws_cluster_launcher():
    doc = yaml.safe_load(AWS.read_text())
    assert doc["provider"]["type"] == "aws"
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types
    assert types[doc["head_node_type"]]["resources"].get("CPU") == 0
    captioner, lvlm = _tier_names()
    tiers = {}
    for name, t in types.items():
        res = t["resources"]
        named = [k for k in res if k in (captioner, lvlm)]
        if name == doc["head_node_type"]:
            assert not named
            continue
        (tier,) = named
        tiers[tier] = t
        gpu, gpus = INSTANCE_GPUS[t["node_config"]["InstanceType"]]
        assert res["GPU"] == gpus and res[tier] == gpus, f"{name}: one unit of {tier} per GPU"
        assert 0 <= t["min_workers"] <= t["max_workers"]
    assert set(tiers) == {captioner, lvlm}
    assert sum(t["max_workers"] for t in tiers.values()) <= doc["max_workers"]


def test_aws_cluster_matches_the_cost_reports_default_cluster():
    """The report prices the cluster these files start: keep the two in step."""
    from pipeline.cost import CostConfig

    doc = yaml.safe_load(AWS.read_text())
    captioner, lvlm = _tier_names()
    cfg = CostConfig.default()
    for tier_name, tier in ((captioner, cfg.captioner_tier), (lvlm, cfg.lvlm_tier)):
        (node,) = [t for t in doc["available_node_types"].values() if tier_name in t["resources"]]
        gpu, per_node = INSTANCE_GPUS[node["node_config"]["InstanceType"]]
        assert gpu == tier.gpu
        assert per_node * node["max_workers"] == tier.count


def test_tp_plan_sizes_the_lvlm_tier():
    from actors.tp import tp_plan

    assert tp_plan(7e9, 80) == 1  # LLaVA-1.5-7B bf16: 13 GiB
    assert tp_plan(13e9, 24) == 2  # 13B on 24 GB L4s
    assert tp_plan(70e9, 80) == 4  # 130 GiB of weights over 80 GB H100s


TP1_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {root!r})
from actors.tiny import build_tiny_llava
from actors.tp import init_rank, shard_model
model, _ = build_tiny_llava()
model.eval()
x = torch.randint(5, 40, (2, 10))
with torch.no_grad():
    ref = model.model.language_model(input_ids=x).last_hidden_state
init_rank(0, 1, master_port={port})
sharded = shard_model(model, 1)
assert type(sharded).__name__ == "LlavaForConditionalGeneration"
with torch.no_grad():
    out = sharded.model.language_model(input_ids=x).last_hidden_state
assert torch.equal(ref, out), (ref - out).abs().max()
try:
    shard_model(model, 2)
except ValueError as e:
    assert "needs 2 ranks" in str(e)
else:
    raise AssertionError("tp=2 in a 1-rank group must be refused")
print("TP1-OK")
"""


def test_tensor_parallel_tp1_on_cpu_is_the_plain_model(tmp_path):
    """DeepSpeed inference at tp=1 (gloo, CPU) in a fresh process: same hidden states as without it."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "tp1.py"
    script.write_text(TP1_SCRIPT.format(root=str(ROOT), port=port))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and "TP1-OK" in proc.stdout, proc.stderr[-3000:]
