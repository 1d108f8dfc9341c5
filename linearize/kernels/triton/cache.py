"""On-disk cache of generated kernel sources, keyed by the spec's hash, loaded lazily.

`load(spec)` renders the source only if `<cache dir>/<key>.py` is missing, writes it atomically, imports it as a
module (Triton's @jit needs real source files) and memoises the module per process. Nothing is generated or
imported until a kernel of that spec is first needed. The directory is $LINEARIZE_KERNEL_CACHE, else
~/.cache/linearize/triton.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from . import generator
from .spec import KernelSpec

_modules: dict[str, ModuleType] = {}
_lock = threading.Lock()
stats = {"generated": 0, "loaded": 0}  # for tests: sources written / modules imported in this process


def cache_dir() -> Path:
    env = os.environ.get("LINEARIZE_KERNEL_CACHE")
    root = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "linearize" / "triton"
    root.mkdir(parents=True, exist_ok=True)
    return root


def source_path(spec: KernelSpec) -> Path:
    return cache_dir() / f"{spec.key()}.py"


def ensure_source(spec: KernelSpec) -> Path:
    """Path of the spec's generated source, rendering and writing it if the cache lacks it."""
    path = source_path(spec)
    if path.is_file():
        return path
    text = generator.render(spec)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{spec.key()}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # atomic: concurrent writers produce identical text
    stats["generated"] += 1
    return path


def load(spec: KernelSpec, interpret: bool = False) -> ModuleType:
    """The imported module of the spec's kernels (memoised).

    interpret=True sets TRITON_INTERPRET=1 before importing, so @triton.jit gives the interpreter's kernels (CPU
    tensors, no GPU).
    """
    key = spec.key()
    memo = (key, interpret)
    mod = _modules.get(memo)
    if mod is not None:
        return mod
    with _lock:
        mod = _modules.get(memo)
        if mod is not None:
            return mod
        path = ensure_source(spec)
        name = f"linearize_generated_{key}{'_interp' if interpret else ''}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = mod
        if interpret:
            # Process-wide on purpose: Triton reads the flag at decoration and again at launch time
            # (its own library functions too), so a CPU process that runs the kernels stays in interpreter mode.
            from . import prepare_interpreter

            prepare_interpreter()
        try:
            module_spec.loader.exec_module(mod)
        except Exception:
            sys.modules.pop(name, None)
            raise
        _modules[memo] = mod
        stats["loaded"] += 1
        return mod


def clear_memory() -> None:
    """Forget imported modules (the files stay); the next load re-imports."""
    with _lock:
        for key, interpret in list(_modules):
            sys.modules.pop(f"linearize_generated_{key}{'_interp' if interpret else ''}", None)
        _modules.clear()
