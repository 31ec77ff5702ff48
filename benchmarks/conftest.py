"""Shared fixtures for the GPU benchmarks (pytest-benchmark).

Each benchmark calls ``measure(fn, flops=..., **labels)``: it warms ``fn`` up, times it with
pytest-benchmark (the function synchronizes the device, so host timing is the device time), records
the peak device memory of one call and the labels in ``extra_info``. With ``calls=n`` a round is
``n`` calls back to back and one synchronization (a stream of calls, as the layers of a model issue
them: each call's host work overlaps the kernels of the calls before it); ``extra_info['calls']``
records ``n`` and the report divides by it. ``benchmarks/report.py`` turns
the JSON of a run (``--benchmark-json``) into the tables of ``benchmarks/RESULTS.md``, with TFLOP/s
computed from the FLOP convention of shared MATH.md section 6 (``entropy_attn.flops``).
"""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="GPU benchmark: needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def measure(benchmark):
    def run(fn, *, flops=None, rounds=20, warmup=3, calls=1, **labels):
        torch.cuda.synchronize()

        def call():
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()

        for _ in range(warmup):
            call()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        peak = torch.cuda.max_memory_allocated() - base
        benchmark.extra_info.update(labels)
        benchmark.extra_info["flops"] = flops
        benchmark.extra_info["peak_bytes"] = peak
        if calls > 1:
            benchmark.extra_info["calls"] = calls
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)

    return run
