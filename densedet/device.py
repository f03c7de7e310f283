"""Where and in which precision to run.

bf16 is only fast where the hardware multiplies bf16 natively: CUDA GPUs, and CPUs with AMX or
AVX512-BF16. On an AVX2-only CPU PyTorch emulates it and a bf16 matmul runs ~100x slower than fp32
(measured on this project's 2-core AVX2 machine: 1.3 vs 142 GFLOP/s; ``densedet bench``), so
``auto`` picks fp32 there.
"""

from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["cpu_has_fast_bf16", "resolve_precision", "autocast", "fast_autocast", "default_device", "flush_denormals",
           "fused_adam_ok"]


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU multiplies bf16 in hardware (AMX-BF16 or AVX512-BF16).

    Read from the ``flags`` line of ``/proc/cpuinfo``. ``torch.backends.cpu.get_cpu_capability()``
    names the vector ISA PyTorch dispatches to ("AVX2", "AVX512", ...), which does not tell whether
    AVX512 includes the BF16 extension, so it is only used when cpuinfo is unreadable, and then
    only an "AMX" answer counts.
    """
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return bool(set(line.split(":", 1)[1].split()) & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return "AMX" in str(torch.backends.cpu.get_cpu_capability()).upper()


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """``auto`` | ``fp32`` | ``bf16`` → the autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype`` on ``device``; a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def fast_autocast(device: torch.device | str, precision: str = "auto"):
    """bf16 autocast where it is fast (``auto``), always (``bf16``) or never (``fp32``)."""
    device = torch.device(device)
    return autocast(device, resolve_precision(precision, device))


def flush_denormals() -> None:
    """Treat denormal floats as zero on the CPU.

    Late in training, tiny gradients, zero-initialised residual scales and near-zero activations
    produce denormals, which x86 CPUs process up to ~100x slower: measured on the demo's trained
    RetinaNet R18 (4 images at 320 px), 6.1 s per forward without this and 0.48 s with it. The
    values involved (< 1.2e-38) are far below anything a detector's output depends on.
    """
    torch.set_flush_denormal(True)


def fused_adam_ok(params) -> bool:
    """Whether AdamW can take its fused kernel for these parameters (floating point, all on the CPU
    or all on CUDA): one pass per tensor instead of a dozen elementwise ops. For the demo model's
    12.9M trainable parameters on the 2-core CPU it is 1.66x faster (``python benchmarks/train_kernels.py
    --config configs/demo_digits.yaml``); the values agree to float rounding (tests)."""
    params = list(params)
    devices = {p.device.type for p in params}
    return bool(params) and all(p.is_floating_point() for p in params) and len(devices) == 1 \
        and devices <= {"cpu", "cuda"}
