"""Generated Triton kernels for the linearize ops (issue #5).

spec.py (what a kernel is specialised on) -> generator.py + templates.py (Triton source) -> cache.py (on-disk
cache keyed by the spec's hash, lazy import) -> launch.py (grids and launches, the bodies of the
`linearize::triton_*` ops registered in linearize/lowering/triton_ops.py).

On CUDA the kernels compile normally. On CPU they run through Triton's interpreter (TRITON_INTERPRET=1), which is
how CI tests them; `prepare_interpreter()` makes that work even when Triton was already imported in compiled mode
(torch.compile imports it), by switching Triton's own @jit library functions to interpreted ones.
"""
from __future__ import annotations

import importlib.util
import os

from .spec import KernelSpec, UnsupportedSpec

__all__ = ["KernelSpec", "UnsupportedSpec", "available", "prepare_interpreter"]


def available() -> bool:
    """Triton is importable."""
    return importlib.util.find_spec("triton") is not None


_patched = False


def prepare_interpreter() -> None:
    """Make Triton run @jit kernels in its interpreter from now on (CPU tensors, no GPU needed)."""
    global _patched
    os.environ["TRITON_INTERPRET"] = "1"
    if _patched:
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    # Triton decorates its library functions (tl.zeros, tl.cumsum, ...) at import time: if that happened before
    # TRITON_INTERPRET=1 they are compiled-mode JITFunctions, which the interpreter cannot call. Swap them.
    modules = [tl, tl.standard, tl.math, tl.core]
    for module in modules:
        for name, member in list(vars(module).items()):
            if isinstance(member, JITFunction):
                setattr(module, name, InterpretedFunction(member.fn))
    _patched = True
