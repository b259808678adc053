"""The compute ceiling the CPU benchmarks are judged against: the measured dense matmul rate of
this machine at the benchmark's thread count (not a datasheet number)."""
from __future__ import annotations

import statistics
import time

import torch


def matmul_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """Median GFLOP/s of an n x n x n torch.matmul on the CPU with the current torch thread count."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)  # warm-up: thread pool, BLAS dispatch
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def distance_to_floor(flops: float, seconds: float, ceiling_gflops: float) -> dict[str, float]:
    """How far a measured time is from the floor = flops at the measured matmul rate."""
    floor_s = flops / (ceiling_gflops * 1e9)
    return {"floor_s": floor_s, "times_floor": seconds / floor_s, "fraction_of_matmul_rate": floor_s / seconds}
