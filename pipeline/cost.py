"""What a setting costs on a GPU cluster: $ per 1M items from per-item FLOPs (or measured throughput).

The pipeline has two GPU tiers (SPEC.md section 4): the **captioner tier** runs the vision tower, the
pruner, the caption model and the selector; the **LVLM tier** runs the projector and the (pruned) LLM.
Each item's FLOPs therefore split into a captioner-tier part and an LVLM-tier part, and each part runs
on that tier's GPUs at an assumed model-FLOPs utilisation (MFU):

    gpu_seconds(tier) = flops(tier) / (peak_flops(gpu) * mfu)

Decode steps are memory-bound, so the LLM decode FLOPs get their own, lower utilisation
(``decode_mfu``). Two prices follow from these GPU-seconds:

* **right-sized**: every tier scaled to exactly the work it gets, so an item costs the sum over tiers
  of gpu_seconds x $/GPU-second (a lower bound, what an autoscaler approaches);
* **cluster**: the fixed cluster of the config (``count`` GPUs per tier) runs at the pace of its
  bottleneck tier, ``items/s = min(count / gpu_seconds)``, and the whole cluster is paid for:
  $/item = cluster $/s / items/s.

A run on real GPUs measures items/s; then ``usd_per_1m_from_throughput`` gives the measured price
from the price per hour of the cluster that ran it.

The prices and peaks below are plain **assumptions** (dated), not quotes: cloud prices vary by
provider, region, commitment and month. Override them with a YAML/JSON file (``CostConfig.load``);
``CostConfig.default().to_dict()`` shows the layout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

# Per-item FLOPs components (schema column ``flops_<name>``) and the tier that executes each.
CAPTIONER_TIER_COMPONENTS = ("vision", "pruner", "captioner", "selector")
LVLM_TIER_COMPONENTS = ("projector", "llm_prefill", "llm_decode")
ALL_COMPONENTS = CAPTIONER_TIER_COMPONENTS + LVLM_TIER_COMPONENTS

PRICES_AS_OF = "2025-06"


@dataclass(frozen=True)
class Gpu:
    """One GPU class: on-demand price per GPU-hour and dense BF16 tensor-core peak (no sparsity)."""

    name: str
    usd_per_hour: float
    peak_tflops: float
    note: str = ""

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12


# Assumed prices as of PRICES_AS_OF (per GPU-hour, on demand). Peaks are the vendors' dense BF16 figures.
DEFAULT_GPUS: dict[str, Gpu] = {
    "L4": Gpu("L4", 0.80, 121.0, "AWS g6.xlarge on demand ~$0.80/h (1x L4); 24 GB"),
    "A10G": Gpu("A10G", 1.01, 70.0, "AWS g5.xlarge on demand ~$1.01/h (1x A10G); 24 GB"),
    "A100-80GB": Gpu(
        "A100-80GB", 2.50, 312.0, "round figure between GPU clouds (~$1.5-2) and hyperscalers (~$4)"
    ),
    "H100": Gpu(
        "H100", 4.00, 989.0, "H100 SXM 80 GB; round figure between GPU clouds (~$2-3) and hyperscalers (~$7)"
    ),
    "H200": Gpu("H200", 5.00, 989.0, "H200 SXM 141 GB; same compute as H100, more and faster memory"),
}


@dataclass(frozen=True)
class Tier:
    """A GPU tier of the cluster: which GPU, how many, and the utilisation assumed for it."""

    gpu: str
    count: float
    mfu: float = 0.35
    decode_mfu: float = 0.05  # only the LVLM tier decodes: batched greedy decode is memory-bound


@dataclass(frozen=True)
class CostConfig:
    """GPU prices and the cluster shape used for every $ figure of a report."""

    gpus: dict[str, Gpu] = field(default_factory=lambda: dict(DEFAULT_GPUS))
    captioner_tier: Tier = Tier("L4", 16)  # two 8x L4 nodes (g6.48xlarge-class)
    lvlm_tier: Tier = Tier("H100", 8)  # one 8x H100 node (p5.48xlarge-class)
    prices_as_of: str = PRICES_AS_OF

    @classmethod
    def default(cls) -> CostConfig:
        return cls()

    def gpu(self, tier: Tier) -> Gpu:
        if tier.gpu not in self.gpus:
            raise KeyError(
                f"GPU {tier.gpu!r} has no price in the cost config (known: {', '.join(self.gpus)})"
            )
        return self.gpus[tier.gpu]

    @property
    def cluster_usd_per_hour(self) -> float:
        return sum(t.count * self.gpu(t).usd_per_hour for t in (self.captioner_tier, self.lvlm_tier))

    def with_tiers(self, captioner: str | None = None, lvlm: str | None = None) -> CostConfig:
        """A copy with tiers given as ``GPU`` or ``GPUxCOUNT`` (e.g. ``L4x4``, ``H100x8``)."""
        out = self
        if captioner:
            out = replace(out, captioner_tier=_parse_tier(captioner, out.captioner_tier))
        if lvlm:
            out = replace(out, lvlm_tier=_parse_tier(lvlm, out.lvlm_tier))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "prices_as_of": self.prices_as_of,
            "gpus": {k: asdict(v) for k, v in self.gpus.items()},
            "captioner_tier": asdict(self.captioner_tier),
            "lvlm_tier": asdict(self.lvlm_tier),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostConfig:
        """Defaults overridden by ``data``; GPUs given in ``data`` are added to / replace the defaults."""
        base = cls()
        gpus = dict(base.gpus)
        for name, g in (data.get("gpus") or {}).items():
            gpus[name] = Gpu(**{"name": name, **g})
        cfg = cls(
            gpus=gpus,
            captioner_tier=Tier(**{**asdict(base.captioner_tier), **(data.get("captioner_tier") or {})}),
            lvlm_tier=Tier(**{**asdict(base.lvlm_tier), **(data.get("lvlm_tier") or {})}),
            prices_as_of=str(data.get("prices_as_of", base.prices_as_of)),
        )
        cfg.gpu(cfg.captioner_tier), cfg.gpu(cfg.lvlm_tier)  # fail early on an unknown GPU
        return cfg

    @classmethod
    def load(cls, path: str | Path | None) -> CostConfig:
        """Read a YAML or JSON override file; ``None`` gives the documented defaults."""
        if path is None:
            return cls()
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        return cls.from_dict(data)

    def describe(self) -> str:
        """One paragraph of the assumptions, for the top of a report."""
        c, lv = self.captioner_tier, self.lvlm_tier
        gc, gl = self.gpu(c), self.gpu(lv)
        return (
            f"Prices are assumptions as of {self.prices_as_of} (on-demand, per GPU-hour), not quotes. "
            f"Captioner tier: {c.count:g} x {gc.name} (${gc.usd_per_hour:.2f}/h, {gc.peak_tflops:g} dense BF16 TFLOPS) "
            f"at MFU {c.mfu:.0%}. LVLM tier: {lv.count:g} x {gl.name} (${gl.usd_per_hour:.2f}/h, "
            f"{gl.peak_tflops:g} TFLOPS) at MFU {lv.mfu:.0%} for prefill and {lv.decode_mfu:.0%} for decode "
            f"(memory-bound). Cluster: ${self.cluster_usd_per_hour:.2f}/h."
        )


def _parse_tier(spec: str, base: Tier) -> Tier:
    name, _, count = spec.partition("x")
    return replace(base, gpu=name, count=float(count) if count else base.count)


@dataclass(frozen=True)
class SettingCost:
    """GPU time and price of one item of a setting under a ``CostConfig``."""

    captioner_gpu_s: float  # GPU-seconds per item on the captioner tier
    lvlm_gpu_s: float  # GPU-seconds per item on the LVLM tier
    cluster_items_per_s: float  # the configured cluster's pace (its bottleneck tier's)
    bottleneck: str  # "captioner_tier" or "lvlm_tier"
    usd_per_1m_cluster: float
    usd_per_1m_rightsized: float
    balanced_gpu_ratio: float  # LVLM-tier GPUs per captioner-tier GPU that keeps both tiers busy


def tier_flops(flops: Mapping[str, float]) -> tuple[float, float, float]:
    """Split per-item FLOPs into (captioner tier, LVLM prefill + projector, LVLM decode).

    ``flops`` maps component names (``vision``, ..., ``llm_decode``, ``total``; a ``flops_`` prefix is
    accepted) to FLOPs. The projector runs with the prefill; whatever ``total`` holds beyond the named
    parts (older outputs had no ``flops_projector`` column) is counted there too.
    """
    f = {k.removeprefix("flops_"): float(v or 0.0) for k, v in flops.items() if v is not None}
    cap = sum(f.get(k, 0.0) for k in CAPTIONER_TIER_COMPONENTS)
    decode = f.get("llm_decode", 0.0)
    prefill = f.get("projector", 0.0) + f.get("llm_prefill", 0.0)
    named = cap + prefill + decode
    prefill += max(f.get("total", named) - named, 0.0)
    return cap, prefill, decode


def setting_cost(flops: Mapping[str, float], config: CostConfig) -> SettingCost:
    """$ per 1M items of one setting from its mean per-item FLOPs (see the module docstring)."""
    cap_f, prefill_f, decode_f = tier_flops(flops)
    ct, lt = config.captioner_tier, config.lvlm_tier
    gc, gl = config.gpu(ct), config.gpu(lt)
    cap_s = cap_f / (gc.peak_flops * ct.mfu)
    lvlm_s = prefill_f / (gl.peak_flops * lt.mfu) + decode_f / (gl.peak_flops * lt.decode_mfu)
    rates = {
        "captioner_tier": ct.count / cap_s if cap_s > 0 else math.inf,
        "lvlm_tier": lt.count / lvlm_s if lvlm_s > 0 else math.inf,
    }
    bottleneck = min(rates, key=rates.get)
    items_per_s = rates[bottleneck]
    usd_cluster = config.cluster_usd_per_hour / 3600.0 / items_per_s * 1e6 if items_per_s > 0 else math.inf
    usd_right = (cap_s * gc.usd_per_hour + lvlm_s * gl.usd_per_hour) / 3600.0 * 1e6
    ratio = lvlm_s / cap_s if cap_s > 0 else math.inf
    return SettingCost(cap_s, lvlm_s, items_per_s, bottleneck, usd_cluster, usd_right, ratio)


def usd_per_1m_from_throughput(items_per_s: float, cluster_usd_per_hour: float) -> float:
    """Measured price: a cluster at ``cluster_usd_per_hour`` that processed ``items_per_s``."""
    if not items_per_s or items_per_s <= 0:
        return math.nan
    return cluster_usd_per_hour / 3600.0 / items_per_s * 1e6


def cost_columns(summary: Any, config: CostConfig, *, measured_usd_per_hour: float | None = None) -> Any:
    """The summary (pandas DataFrame, one row per setting) with the cost columns added.

    Adds ``captioner_gpu_s``, ``lvlm_gpu_s``, ``cluster_items_per_s``, ``bottleneck``,
    ``usd_per_1m_cluster``, ``usd_per_1m_rightsized``, ``balanced_gpu_ratio`` and ``usd_per_1m_measured`` (NaN unless the run's
    cluster price is known: ``measured_usd_per_hour`` or a ``cluster_usd_per_hour`` column).
    """
    out = summary.copy()
    flops_cols = [c for c in out.columns if c.startswith("flops_") and c != "flops_reference_total"]
    costs = [setting_cost({c: row[c] for c in flops_cols}, config) for _, row in out.iterrows()]
    for name in SettingCost.__dataclass_fields__:
        out[name] = [getattr(c, name) for c in costs]
    measured = []
    for _, row in out.iterrows():
        price = measured_usd_per_hour
        if price is None and "cluster_usd_per_hour" in out.columns:
            price = row["cluster_usd_per_hour"]
        ips = row.get("items_per_s") if "items_per_s" in out.columns else None
        ok = price is not None and ips is not None and not _isnan(price) and not _isnan(ips)
        measured.append(usd_per_1m_from_throughput(float(ips), float(price)) if ok else math.nan)
    out["usd_per_1m_measured"] = measured
    return out


def _isnan(x: Any) -> bool:
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return True
