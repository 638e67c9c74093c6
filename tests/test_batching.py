"""Length buckets and per-actor threads (pipeline.batching), and the LVLM tier batching by them."""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pipeline.batching import actor_threads, length_buckets, padding_fraction  # noqa: E402


def test_length_buckets_sort_stably_and_cut_at_the_batch_size():
    lengths = [30, 5, 30, 7, 5, 90, 6]
    buckets = length_buckets(lengths, 3)
    assert buckets == [[1, 4, 6], [3, 0, 2], [5]]
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    assert length_buckets([4] * 5, 2) == [[0, 1], [2, 3], [4]]  # equal lengths keep arrival order
    assert length_buckets([], 4) == []
    with pytest.raises(ValueError):
        length_buckets([1], 0)


def test_padding_fraction():
    assert padding_fraction(90.0, 10.0) == pytest.approx(0.1)
    assert padding_fraction(None, 1.0) is None and padding_fraction(0.0, 0.0) is None


def test_actor_threads_follow_the_ray_cpu_share(ray_session):
    import ray

    @ray.remote
    class Probe:
        def threads(self) -> int:
            return actor_threads("probe")

    for cpus, want in ((0.0, 1), (0.5, 1), (2.0, 2)):  # one at a time: 2.0 takes the session's every CPU
        probe = Probe.options(num_cpus=cpus).remote()
        assert ray.get(probe.threads.remote()) == want, cpus
        ray.kill(probe)
    import torch

    before = torch.get_num_threads()
    assert actor_threads("driver") == before  # not an actor: torch's own choice stays


def _rows(n: int) -> pa.Table:
    from pipeline.shapes import make_item, render

    rows = []
    for i in range(n):
        item = make_item(11, "test", i)
        buf = io.BytesIO()
        render(item.objects).save(buf, format="PNG")
        pad = " ".join(["please"] * (25 if i % 2 else 0))  # short and long prompts, interleaved
        rows.append({"id": f"q{i}", "image": buf.getvalue(), "question": f"{pad} {item.question}".strip(),
                     "answers": [item.answer] * 10, "path": "in.parquet"})
    return pa.Table.from_pylist(rows)


def test_lvlm_tier_buckets_by_prompt_length_and_answers_each_row_as_alone(tmp_path):
    """A block of interleaved short and long prompts: the tier batches short with short (less padding than
    the arrival order would have), and every row's answer equals its answer in a batch of its own."""
    import torch

    from actors.tiny import build_tiny_llava
    from pipeline.config import JobConfig
    from pipeline.lvlm_tier import LVLMTier
    from pipeline.stages import CaptionerTier, decode_batch

    build_tiny_llava(tmp_path / "lvlm", text_layers=2, seed=4, init_std=0.2)
    table = _rows(8)
    with torch.enable_grad():  # the tiers switch autograd off for their process: keep it to this block
        answers = {}
        for batch_size in (4, 1):
            cfg = JobConfig(input=str(tmp_path), output=str(tmp_path / "out"), method="random", lvlm=str(
                tmp_path / "lvlm"), captioner=None, selector=None, batch_size=batch_size, max_new_tokens=4,
                accm_fallback=False).validate()
            decoded = decode_batch(table, max_pixels=cfg.max_pixels, shard_names={"in.parquet": "in.parquet"})
            answers[batch_size] = LVLMTier(cfg)(CaptionerTier(cfg)(decoded)).to_pylist()
    bucketed, alone = answers[4], answers[1]
    assert [r["id"] for r in bucketed] == [r["id"] for r in alone] == [f"q{i}" for i in range(8)]
    assert all(r["error"] is None for r in bucketed)
    assert [r["prediction"] for r in bucketed] == [r["prediction"] for r in alone]
    assert [r["prefill_tokens"] for r in bucketed] == [r["prefill_tokens"] for r in alone]
    assert all(r["prefill_pad_tokens"] == 0 for r in alone)
    lengths = [r["prefill_tokens"] for r in bucketed]
    arrival = sum(max(lengths[i : i + 4]) - n for i in range(0, 8, 4) for n in lengths[i : i + 4])
    assert arrival > 0 and sum(r["prefill_pad_tokens"] for r in bucketed) < arrival / 4


def test_a_failing_bucket_is_retried_alone_and_no_row_is_answered_twice(tmp_path):
    """FastV (the LVLM tier adds its in-LLM scoring FLOPs to the row): one row that always fails sits in the
    second bucket. Its bucket is retried row by row; the first bucket's rows are not rerun, so their FLOPs
    are what a clean run gives, and only the bad row carries an error."""
    import torch

    from actors.tiny import build_tiny_llava
    from pipeline.config import JobConfig
    from pipeline.lvlm_tier import LVLMTier
    from pipeline.stages import CaptionerTier, decode_batch

    class OneBadRow(LVLMTier):  # a fault injected from the test: the engine raises on one question
        calls: list[int] = []
        bad_question = ""

        def _generate(self, inputs):
            self.calls.append(len(inputs["questions"]))
            if self.bad_question in inputs["questions"]:
                raise RuntimeError("injected")
            return super()._generate(inputs)

    build_tiny_llava(tmp_path / "lvlm", text_layers=3, seed=4, init_std=0.2)
    cfg = JobConfig(input=str(tmp_path), output=str(tmp_path / "out"), method="fastv", keep_tokens=8,
                    fastv_layer=1, lvlm=str(tmp_path / "lvlm"), captioner=None, selector=None, batch_size=4,
                    max_new_tokens=3, accm_fallback=False).validate()
    with torch.enable_grad():  # the tiers switch autograd off for their process: keep it to this block
        captioned = CaptionerTier(cfg)(decode_batch(_rows(8), max_pixels=cfg.max_pixels,
                                                    shard_names={"in.parquet": "in.parquet"}))
        clean = LVLMTier(cfg)(captioned).to_pylist()
        OneBadRow.bad_question = captioned.column("question").to_pylist()[5]  # q5: a long prompt, bucket 2
        faulty = OneBadRow(cfg)
        out = faulty(captioned).to_pylist()
    assert faulty.calls[:2] == [4, 4] and sorted(faulty.calls[2:]) == [1, 1, 1, 1]  # bucket 2 alone, row by row
    assert [r["id"] for r in out] == [f"q{i}" for i in range(8)]
    bad = [r for r in out if r["error"] is not None]
    assert len(bad) == 1 and bad[0]["error"] == "lvlm: RuntimeError: injected"
    for got, want in zip(out, clean, strict=True):
        if got["error"] is None:
            assert got["flops_pruner"] == want["flops_pruner"] > 0 and got["flops_total"] == want["flops_total"]
            assert got["prediction"] == want["prediction"]
