"""The entry scripts under jobs/ as modules (they are scripts, not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]

# The first world's shipped models (Shapes-VQA v1, 64 visual tokens), named explicitly by the tests written for
# them: the embedded default is proving ground v2.
V1_LVLM = str(ROOT / "models" / "shapes" / "lvlm")
V1_MODEL_ARGS = ["--lvlm", V1_LVLM, "--captioner", str(ROOT / "models" / "shapes" / "captioner"),
                 "--selector", str(ROOT / "models" / "shapes" / "selector")]


def load_job(name: str) -> ModuleType:
    """``jobs/<name>.py`` imported (e.g. ``load_job("sweep_pruning_rates").main([...])``)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
