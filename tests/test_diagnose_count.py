"""jobs/diagnose_count.py on the shipped Shapes v2 models, a few val count items at 87.5% pruning."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from jobs import diagnose_count as D  # noqa: E402
from pipeline import shapes_v2 as world  # noqa: E402


def test_count_indices_are_count_items():
    assert {world.make_item(0, "val", i).question_type for i in D.count_indices(3, 6)} == {"count"}


def test_lvlm_text_tallies_every_caption_form(tmp_path):
    out = D.main(["lvlm-text", "--n", "8", "--batch-size", "8", "--threads", "1", "--json", str(tmp_path / "t.json")])
    result = out["result"]
    forms = ("none", "total fact", "seen objects listed", "wholly discarded objects listed")
    for form in forms:
        split = [result.get(f"{form} | sees every counted object: {v}", {"n": 0})["n"] for v in ("yes", "no")]
        assert result[form]["n"] == sum(split) == 8
    # the LVLM was trained to read a count fact beside the image: the oracle caption answers the count items
    assert result["total fact"]["accuracy"] >= 0.75 > result["none"]["accuracy"]
    assert (tmp_path / "t.json").exists()


def test_listed_objects_wholly_discarded_are_among_those_seen():
    from actors.engine import LlavaEngine

    engine = LlavaEngine.from_pretrained(str(D.REPO / "models/shapes_v2/lvlm"),
                                         clip_text_url=str(D.REPO / "models/shapes_v2/clip"))
    batch = next(D.count_batches(engine, "val", 0, 6, 9, 6, 0))
    def sentences(text):
        return {t.strip() for t in (text or "").split(".") if t.strip()}

    seen, gone = D.list_captions(batch, False), D.list_captions(batch, True)
    assert any(gone)  # at 9 kept tokens some counted objects are wholly discarded
    for s, g in zip(seen, gone, strict=True):
        assert sentences(g) <= sentences(s)


def test_count_token_starts_as_the_identity():
    """The probe's wrapper adds nothing before it trains: step 0 matches the plain model's step 0."""
    plain = D.main(["caption-finetune", "--steps", "1", "--n", "8", "--batch-size", "4", "--threads", "1"])
    token = D.main(["caption-finetune", "--steps", "1", "--n", "8", "--batch-size", "4", "--threads", "1",
                    "--count-token"])
    assert plain["result"]["curve"][0] == token["result"]["curve"][0]
    assert [c["step"] for c in token["result"]["curve"]] == [0, 1]
    assert plain["result"]["captioner"] == "models/shapes_v2/captioner"  # no machine path in a report
    assert 0.0 <= plain["result"]["curve"][0]["abstained"] <= 1.0


def test_kept_context_sees_every_count_item_and_saves_the_option(tmp_path):
    """With the kept patches read too, every count item's counted objects are in view: all are targets."""
    import json

    out = D.main(["caption-finetune", "--steps", "1", "--n", "8", "--batch-size", "4", "--threads", "1",
                  "--kept-context", "--out", str(tmp_path / "c")])
    assert [c["items_seen"] for c in out["result"]["curve"]] == [8, 8]
    assert out["result"]["kept_context"] is True
    assert json.loads((tmp_path / "c" / "accm_captioner.json").read_text())["kept_context"] is True


def test_out_refuses_a_shipped_folder():
    with pytest.raises(SystemExit, match="runs/"):
        D.main(["caption-finetune", "--out", str(D.REPO / "models/shapes_v2/captioner_probe")])


class _AppendConstants(torch.nn.Module):
    """A patch-prefix mapper's output shape: the M slots, then 2 constant slots."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.ones(x.shape[0], 2, x.shape[2])], dim=1)


def test_count_token_mapper_sums_over_patch_slots():
    torch.manual_seed(0)
    wrapped = D.CountTokenMapper(_AppendConstants(), 4)
    torch.nn.init.normal_(wrapped.out.weight)
    x = torch.randn(2, 3, 4)
    out = wrapped(x)
    assert out.shape == (2, 5, 4)
    assert torch.equal(out[:, :4], torch.cat([x, torch.ones(2, 1, 4)], dim=1))  # only the last constant moves
    one = wrapped.summary
    wrapped(torch.cat([x, x.flip(1)], dim=1))  # every slot twice, in another order: a sum doubles
    assert torch.allclose(wrapped.summary, 2 * one, atol=1e-5)
