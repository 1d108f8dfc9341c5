"""The accumulation dtype every kernel and reference uses: fp64 inputs stay fp64 (so gradcheck can run in double),
every other dtype (fp32, fp16, bf16) accumulates in fp32."""
from __future__ import annotations

import torch


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32
