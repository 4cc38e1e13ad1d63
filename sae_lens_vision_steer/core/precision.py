"""Backbone precision: `fp32`, `bf16` or `fp16` autocast for the image tower (`--precision`).

- `resolve_precision(name, device)`: the precision to use on `device`, and a note when it differs from
  the one asked for: fp16 autocast on the CPU is mapped to bf16 (the CPU's low-precision type; torch's CPU
  fp16 kernels are few and slow).
- `autocast(precision, device_type)`: `torch.autocast` for bf16/fp16, nothing for fp32.

torch is imported inside the functions: importing the package stays cheap.
"""

from __future__ import annotations

import contextlib
from typing import Any

from .errors import UsageError

PRECISIONS = ("fp32", "bf16", "fp16")


def torch_dtype(precision: str) -> Any:
    import torch

    check_precision(precision)
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return precision


def resolve_precision(precision: str, device: Any) -> tuple[str, str | None]:
    """`(precision to use, note)`: fp16 on a CPU becomes bf16, with a note saying so (None otherwise)."""
    import torch

    check_precision(precision)
    if precision == "fp16" and torch.device(device).type == "cpu":
        return "bf16", "fp16 autocast is not available on the CPU in a useful form; using bf16 (the same 16 bits, " \
                       "a wider range)"
    return precision, None


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """`torch.autocast(device_type, dtype)` for bf16/fp16; a no-op context for fp32."""
    import torch

    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch_dtype(precision))
