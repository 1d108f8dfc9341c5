"""Kernel specs: everything a generated kernel is specialised on, as one frozen, hashable record.

A spec is what the rule chose for a site (gate, feature map, window and mix, chunk size) plus what the tensors
fix (head dims, GQA group size, dtype). `generator.render(spec)` turns it into Triton source; `cache.load(spec)`
keys the on-disk cache by `spec.key()`.

Gate kinds (log g <= 0, natural log, per token):
    none    no decay (plain causal linear attention)
    scalar  one log gate per token and head (mamba2-style); from k it is gate_fn(mean over channels of k) /
            gate_normalizer
    fixed   one constant log decay per KV head (RetNet-style), from a [Hkv] tensor, no gradient
    vector  one log gate per token and key channel (GLA / Liger / hgrn2-style)
Gate sources (`gate_fn`): a function of the raw (pre-feature-map) key, fused into the kernel and differentiated
back into k (`logsigmoid`, `neg_softplus`, `neg_relu` ... see GATE_FNS), or `given`: a separate log-gate tensor
(gradient returned for it).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

GATE_KINDS = ("none", "scalar", "fixed", "vector")
# gate_fn -> (expression of x in natural log, written out in the generated source)
GATE_FNS = ("logsigmoid", "neg_softplus", "given")
FEATURE_MAPS = ("identity", "softmax", "elu+1", "relu")
MIX_MODES = ("sum", "shared")
DTYPES = ("float32", "float16", "bfloat16")
SUB_CHUNK = 16
# Generator version: bump when templates change so stale cached sources are not reused.
GENERATOR_VERSION = 3


class UnsupportedSpec(ValueError):
    """The generated kernels cannot take this spec or these shapes; the caller falls back to the reference."""


@dataclass(frozen=True)
class KernelSpec:
    # linear branch
    linear: bool = True
    gate: str = "vector"
    gate_fn: str = "logsigmoid"
    gate_normalizer: float = 16.0
    feature_map: str = "softmax"
    scale: float = 1.0  # linear-branch scale (o = scale * q S)
    # window branch (sliding-window softmax on separate, usually RoPE'd, q and k)
    window: Optional[int] = None
    sinks: int = 0  # attention sinks: the first `sinks` keys stay visible to every query of the window branch
    mix: tuple = (0.5, 0.5)  # (window weight, linear weight); both branches are mixed before the store
    mix_mode: str = "sum"  # "sum": w0*swa + w1*gla; "shared": one normaliser over both (not generated yet)
    causal: bool = True
    # tiling and shapes
    chunk: int = 64
    head_k: int = 64
    head_v: int = 64
    group: int = 1  # query heads per KV head (GQA)
    dtype: str = "float32"  # input/output dtype; accumulation and inter-chunk state are always fp32
    extras: tuple = field(default_factory=tuple)  # reserved: (name, value) pairs for future fields

    def __post_init__(self):
        if self.gate not in GATE_KINDS:
            raise UnsupportedSpec(f"gate kind {self.gate!r} not in {GATE_KINDS}")
        if self.gate_fn not in GATE_FNS:
            raise UnsupportedSpec(f"gate_fn {self.gate_fn!r} not in {GATE_FNS}")
        if self.feature_map not in FEATURE_MAPS:
            raise UnsupportedSpec(f"feature map {self.feature_map!r} not in {FEATURE_MAPS}")
        if self.mix_mode not in MIX_MODES:
            raise UnsupportedSpec(f"mix mode {self.mix_mode!r} not in {MIX_MODES}")
        if self.dtype not in DTYPES:
            raise UnsupportedSpec(f"dtype {self.dtype!r} not in {DTYPES}")
        if not self.linear and self.window is None:
            raise UnsupportedSpec("a spec needs a linear branch, a window, or both")

    # ---- derived
    @property
    def has_window(self) -> bool:
        return self.window is not None

    @property
    def sub_chunk(self) -> int:
        return min(SUB_CHUNK, self.chunk)

    @property
    def gate_channels(self) -> int:
        return self.head_k if self.gate == "vector" else 1

    @property
    def gate_from_k(self) -> bool:
        return self.gate in ("scalar", "vector") and self.gate_fn != "given"

    @property
    def gate_given(self) -> bool:
        return self.gate in ("scalar", "vector") and self.gate_fn == "given"

    def gate_expression(self) -> str:
        if self.gate == "none":
            return "0"
        if self.gate == "fixed":
            return "decay[h]"
        if self.gate_fn == "given":
            return "g"
        arg = "mean_c(k)" if self.gate == "scalar" else "k"
        return f"{self.gate_fn}({arg})/{self.gate_normalizer:g}"

    def check_shapes(self) -> None:
        """Raise UnsupportedSpec for what the templates cannot tile."""
        for name, d in (("head dim K", self.head_k), ("head dim V", self.head_v)):
            if d < 16 or d % 16 or d & (d - 1):
                raise UnsupportedSpec(f"{name} = {d}: the generated kernels need a power of two >= 16")
        if self.chunk < 16 or self.chunk % 16 or self.chunk & (self.chunk - 1):
            raise UnsupportedSpec(f"chunk {self.chunk}: needs a power of two >= 16")
        if self.mix_mode == "shared":
            raise UnsupportedSpec("mix_mode 'shared' (one normaliser over both branches) is not generated yet")
        if self.has_window and self.window < 1:
            raise UnsupportedSpec(f"window {self.window} must be >= 1")
        if self.sinks and (not self.has_window or not 0 < self.sinks <= SUB_CHUNK):
            raise UnsupportedSpec(f"sinks {self.sinks}: the generated kernels take 1..{SUB_CHUNK} sinks, with a window")
        if not self.causal:
            raise UnsupportedSpec("only causal kernels are generated")

    # ---- identity
    def to_dict(self) -> dict:
        d = asdict(self)
        d["mix"] = [float(x) for x in self.mix]
        d["extras"] = [list(x) for x in self.extras]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "KernelSpec":
        d = json.loads(text)
        d["mix"] = tuple(d["mix"])
        d["extras"] = tuple(tuple(x) for x in d.get("extras", ()))
        return cls(**d)

    def key(self) -> str:
        from .templates import TEMPLATE  # the template's text is part of the key: edits invalidate the cache

        template = hashlib.sha256(TEMPLATE.encode()).hexdigest()[:12]
        payload = f"v{GENERATOR_VERSION}:{template}:{self.to_json()}"
        return hashlib.sha256(payload.encode()).hexdigest()[:20]

    def name(self) -> str:
        parts = []
        if self.linear:
            gate = self.gate if self.gate in ("none", "fixed") else f"{self.gate}-{self.gate_fn}"
            parts.append(f"gla-{gate}-{self.feature_map}".replace("+", "p"))
        if self.has_window:
            parts.append(f"swa{self.window}" + (f"s{self.sinks}" if self.sinks else ""))
        parts.append(f"c{self.chunk}-k{self.head_k}-v{self.head_v}-g{self.group}-{self.dtype}")
        return "_".join(parts)

    def with_(self, **changes) -> "KernelSpec":
        return replace(self, **changes)


def dtype_name(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise UnsupportedSpec(f"dtype {name} not supported by the generated kernels")
    return name
