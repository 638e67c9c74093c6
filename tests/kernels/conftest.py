"""Kernel tests run the Triton kernels on CPU tensors under the Triton interpreter.

``TRITON_INTERPRET=1`` is set per test (not at import), so the rest of the suite is unaffected;
kernels are jitted lazily per interpreter mode (kernels/_dispatch.py), so this is early enough.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("ACCM_FORCE_TRITON", raising=False)
