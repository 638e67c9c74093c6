"""Stage 0 of the v1 proving-ground LVLM (``jobs/train_lvlm.py``): vision tower pre-training with dense heads.

Per-patch colour / shape / empty (exact labels, since one object sits in one patch), per-patch row / column (so
the features keep each patch's place) and a CLS object-count head, on the penultimate layer.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from actors import shapes_lvlm as L
from jobs.train_utils import log, lr_at
from pipeline import shapes


class TowerHeads(nn.Module):
    """Dense supervision on the penultimate vision layer: per-patch colour/shape/row/column, CLS object count.

    The row/column heads keep the patch's place in its feature, as a pre-trained CLIP's features keep it:
    a tower trained on colour/shape/count only lost it (a linear probe read row and column at chance), and
    the LLM then could not answer "what shape is in row r, column c" from anything but RoPE offsets.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.color = nn.Linear(dim, 1 + len(shapes.COLOR_NAMES))
        self.shape = nn.Linear(dim, 1 + len(shapes.SHAPES))
        self.count = nn.Linear(dim, shapes.MAX_OBJECTS + 1)
        self.row = nn.Linear(dim, shapes.GRID)
        self.col = nn.Linear(dim, shapes.GRID)

    def forward(self, hidden: torch.Tensor):
        h = self.norm(hidden)
        patches = h[:, 1:]
        return self.color(patches), self.shape(patches), self.count(h[:, 0]), self.row(patches), self.col(patches)


def patch_rows_cols(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 64] row and column labels of the row-major patch grid."""
    idx = torch.arange(shapes.GRID * shapes.GRID).expand(batch, -1)
    return idx // shapes.GRID, idx % shapes.GRID


def stage0_batch(rng: np.random.Generator, n: int):
    images, colors, shapes_, counts = [], [], [], []
    for _ in range(n):
        objs = L.sample_train_scene(rng, 1, shapes.MAX_OBJECTS)
        images.append(np.asarray(shapes.render(objs)))
        c, s = L.patch_labels(objs)
        colors.append(c)
        shapes_.append(s)
        counts.append(len(objs))
    return (L.pixel_values(images), torch.from_numpy(np.stack(colors)), torch.from_numpy(np.stack(shapes_)),
            torch.tensor(counts))


def run_stage0(model, args, state: dict) -> None:
    tower = model.model.vision_tower
    heads = TowerHeads(model.config.vision_config.hidden_size)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.stage0_lr, weight_decay=0.01)
    tower.train()
    t0 = time.time()
    for step in range(args.stage0_steps):
        rng = np.random.default_rng([args.seed, 0, step])
        px, col, shp, cnt = stage0_batch(rng, args.stage0_batch)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.stage0_steps, args.stage0_lr, max(1, args.stage0_steps // 20))
        hidden, _ = L.vision_features(model, px)
        lc, ls, ln, lr_, lcol = heads(hidden)
        rows, cols = patch_rows_cols(px.shape[0])
        occ = shp > 0
        # shape loss on occupied patches only: averaged over all 64 patches (87% empty) it was diluted
        # ~8x and per-object shape crawled to 46% in 300 steps; on objects only it reached 92% in 150
        loss = F.cross_entropy(lc.flatten(0, 1), col.flatten()) + F.cross_entropy(ls[occ], shp[occ])
        loss = loss + F.cross_entropy(ln, cnt)
        loss = loss + F.cross_entropy(lr_.flatten(0, 1), rows.flatten()) + F.cross_entropy(lcol.flatten(0, 1), cols.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.stage0_steps - 1:
            with torch.no_grad():
                acc_c = (lc.argmax(-1) == col).float().mean().item()
                acc_s = (ls.argmax(-1)[occ] == shp[occ]).float().mean().item()
                acc_n = (ln.argmax(-1) == cnt).float().mean().item()
                acc_rc = ((lr_.argmax(-1) == rows) & (lcol.argmax(-1) == cols)).float().mean().item()
            log(f"stage0 step {step} loss {loss.item():.3f} patch_color {acc_c:.3f} object_shape {acc_s:.3f} "
                f"cls_count {acc_n:.3f} patch_row_col {acc_rc:.3f} ({time.time() - t0:.0f}s)")
    tower.eval()
    state["stage0"] = tower_report(model, heads, args)
    log(f"stage0 done: {json.dumps(state['stage0'])}")


@torch.no_grad()
def tower_report(model, heads: TowerHeads, args) -> dict:
    """Held-out (val split) tower quality: per-patch colour/row/column, per-object shape, CLS count, CLS top-8 on objects."""
    rng = np.random.default_rng([args.seed, 9, 0])
    images, colors, shapes_, counts = [], [], [], []
    for _ in range(256):
        objs = shapes.sample_scene(rng, "val")
        images.append(np.asarray(shapes.render(objs)))
        c, s = L.patch_labels(objs)
        colors.append(c)
        shapes_.append(s)
        counts.append(len(objs))
    px = L.pixel_values(images)
    col, shp, cnt = torch.from_numpy(np.stack(colors)), torch.from_numpy(np.stack(shapes_)), torch.tensor(counts)
    model.config.vision_config._attn_implementation = "eager"
    hidden, out = L.vision_features(model, px, output_attentions=True)
    lc, ls, ln, lr_, lcol = heads(hidden)
    rows, cols = patch_rows_cols(px.shape[0])
    occ = shp > 0
    attn = out.attentions[model.config.vision_feature_layer]  # the layer whose output is the feature layer
    cls_att = attn[:, :, 0, 1:].sum(1)  # [B, 64]
    top8 = cls_att.topk(8, dim=-1).indices
    on_obj = torch.gather(occ, 1, top8).float().mean().item()
    return {
        "patch_color": round((lc.argmax(-1) == col).float().mean().item(), 4),
        "object_shape": round((ls.argmax(-1)[occ] == shp[occ]).float().mean().item(), 4),
        "object_color": round((lc.argmax(-1)[occ] == col[occ]).float().mean().item(), 4),
        "cls_count": round((ln.argmax(-1) == cnt).float().mean().item(), 4),
        "cls_top8_on_objects": round(on_obj, 4),
        "patch_row": round((lr_.argmax(-1) == rows).float().mean().item(), 4),
        "patch_col": round((lcol.argmax(-1) == cols).float().mean().item(), 4),
    }
