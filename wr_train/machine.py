"""The machine under a run: glibc's memory reuse, and the FLOP/s that MFU is measured
against (a spec-sheet peak on known GPUs, a short matmul timing elsewhere). Pretraining,
fine-tuning and the benchmarks use these."""
from __future__ import annotations

import torch

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4   # glibc mallopt() parameters


def keep_freed_memory(enable: bool = True) -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS.

    By default every CPU tensor over 32 MB is a fresh mmap, and the kernel zero-fills
    each of its pages on first touch: with a 100k vocab the [masked, V] logits and their
    gradients pay that every step (measured: exp over 600×100k 172 -> 56 ms, zeros_like
    114 -> 12 ms). A training process keeps its peak memory anyway. Linux/glibc only;
    returns whether it applied. enable=False restores glibc's defaults.
    """
    import ctypes
    import ctypes.util
    import sys
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0 if enable else 65536)
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1 if enable else 128 * 1024)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def measure_matmul_flops(dtype=torch.float32, n: int = 1024, seconds: float = 0.25, repeats: int = 4,
                         device="cpu") -> float:
    """The machine's dense matmul rate (FLOP/s) for MFU on devices without a spec sheet:
    the best of a few short timings, so a moment of contention does not lower it."""
    import time
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = 0.0
    for _ in range(repeats):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


# Dense bf16 peaks from vendor spec sheets, for MFU on GPUs.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "V100": 125e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value if dtype != torch.float32 else value / 2
        return measure_matmul_flops(dtype, 4096, device=device)
    if dtype != torch.float32 and not cpu_has_bf16_matmul():
        # emulated 16-bit matmuls: one 2048² product takes ~90 s on such a CPU (five of them
        # were most of a bf16 run's start); a 256² one measures the same slow rate
        return measure_matmul_flops(dtype, 256)
    return measure_matmul_flops(dtype, 2048)  # bf16 on a CPU with AMX runs several times fp32's rate


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 in hardware (Intel AMX tiles): there a bf16 step
    beats fp32 (the demo's tiny step, 2 workers: ~48k vs ~37k tok/s, bench/RESULTS.md);
    elsewhere bf16 is emulated and slower than fp32."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(check and check())
    except RuntimeError:
        return False


def cpu_precision(precision: str) -> str:
    """A recipe's precision on this CPU: bf16 only where AMX multiplies it in hardware."""
    return "fp32" if precision == "bf16" and not cpu_has_bf16_matmul() else precision
