"""Peak FLOP/s per device, the denominator of MFU.

GPUs: the datasheet's dense bf16 tensor-core peak (half of it for tf32 when training in fp32). CPUs have no
single datasheet figure for the matmul paths torch uses, so the peak is measured once per process as the fp32
matmul throughput of this machine with torch's current thread count: MFU on CPU reads as the fraction of the
best a large matmul achieves here, and `logging.peak_flops` overrides either.
"""

from __future__ import annotations

import functools
import time

import torch

# Dense (not sparse) bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name().
GPU_BF16_PEAK = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
}


@functools.lru_cache(maxsize=None)
def measured_cpu_peak(n: int = 1024, repeats: int = 12) -> float:
    """The fastest of several single matmuls: the least disturbed by other processes sharing the cores."""
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    b = torch.randn(n, n, generator=torch.Generator().manual_seed(1))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops(device: torch.device, bf16: bool) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_BF16_PEAK.items():
            if key in name:
                return peak if bf16 else peak / 2
        return 0.0
    return measured_cpu_peak()
