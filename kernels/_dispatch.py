"""Shared dispatch helpers: decide kernel vs. reference, and jit kernels lazily.

Kernels are written as plain module-level functions (with string annotations, so the modules import
without triton) and are wrapped by ``triton.jit`` on first launch. Triton decides at *decoration*
time whether a kernel runs compiled or under the CPU interpreter (``TRITON_INTERPRET=1``); jitting
lazily, keyed on that flag, means importing a kernels module early never fixes the mode.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

FORCE_ENV = "ACCM_FORCE_TRITON"


@functools.cache
def triton_available() -> bool:
    """True when triton imports (it may still have no GPU driver: then only the interpreter works)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install: fall back to the references
        return False
    return True


def interpreting() -> bool:
    """True when triton kernels run on CPU tensors under the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def forced() -> bool:
    return os.environ.get(FORCE_ENV, "0").lower() in ("1", "true", "yes", "on")


def should_use_kernel(x: torch.Tensor, use_kernel: bool | None) -> bool:
    """Dispatch rule shared by every kernel.

    ``use_kernel`` True/False overrides; otherwise the kernel runs for CUDA tensors (or any tensor
    when ``ACCM_FORCE_TRITON=1``) provided triton imports, else the PyTorch reference runs.
    """
    if use_kernel is not None:
        if use_kernel and not triton_available():
            raise RuntimeError("use_kernel=True but triton is not importable")
        return use_kernel
    if not triton_available():
        return False
    return x.is_cuda or forced()


@functools.cache
def _jit_cached(fn: Callable[..., Any], interpret: bool) -> Any:
    import triton

    return triton.jit(fn)


def jit(fn: Callable[..., Any]) -> Any:
    """``triton.jit(fn)``, built once per interpreter mode (see module docstring)."""
    return _jit_cached(fn, interpreting())


@functools.cache
def _stdlib_swaps() -> tuple[tuple[Any, str, Any, Any], ...]:
    """(module, name, compiled, interpreted) for triton.language's own ``@jit`` helpers.

    Triton decorates its standard library (``tl.sum``, ``tl.cumsum``, ``tl.zeros``...) when
    ``triton`` is first imported. If that happened without ``TRITON_INTERPRET=1`` (e.g. transformers
    or DeepSpeed imported triton before a test set the variable), those helpers are compiled-mode
    objects that the interpreter refuses to call. We keep interpreted twins to swap in.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    twins: dict[int, Any] = {}
    swaps = []
    for module in (tl, tl.standard, tl.random):
        for name, value in list(vars(module).items()):
            if type(value) is JITFunction:
                twin = twins.setdefault(id(value), InterpretedFunction(value.fn))
                swaps.append((module, name, value, twin))
    return tuple(swaps)


@contextlib.contextmanager
def _interpretable_stdlib() -> Iterator[None]:
    swaps = _stdlib_swaps()
    for module, name, _, twin in swaps:
        setattr(module, name, twin)
    try:
        yield
    finally:
        for module, name, original, _ in swaps:
            setattr(module, name, original)


def launch(fn: Callable[..., Any], grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """Jit ``fn`` for the current mode and launch it on ``grid``.

    Under the interpreter, triton's standard library is temporarily made interpretable when it was
    imported in compiled mode, so kernel tests do not depend on who imported triton first.
    """
    kernel = jit(fn)
    if not interpreting():
        kernel[grid](*args, **kwargs)
        return
    with _interpretable_stdlib():
        kernel[grid](*args, **kwargs)


def check_kernel_device(*tensors: torch.Tensor) -> None:
    """A compiled kernel needs CUDA tensors; CPU tensors are only valid under the interpreter."""
    if interpreting():
        return
    for t in tensors:
        if not t.is_cuda:
            raise RuntimeError(
                "triton kernel called on a CPU tensor without TRITON_INTERPRET=1; "
                "unset ACCM_FORCE_TRITON or pass use_kernel=False to use the PyTorch reference"
            )
