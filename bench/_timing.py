"""Timing helpers shared by the bench modules: on CUDA, median of CUDA-event timings, CUDA-graph replay, peak memory,
device copy bandwidth; on the CPU, interleaved medians of wall and process CPU time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def cuda_time_ms(fn: Callable[[], object], warmup: int = 5, repeats: int = 30) -> float:
    """Median of ``repeats`` timings with CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_time_ms(fn: Callable[[], object]) -> float:
    """Median replay time of a CUDA graph of ``fn``: the device time, without the host's launch gaps (as in a
    training step whose queue is kept full, or one captured in a graph)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (Triton compiles, cuBLAS/cuDNN pick algorithms) off the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_time_ms(graph.replay)


def peak_mib(fn: Callable[[], object]) -> float:
    """Memory the call allocates at its peak beyond what was allocated before it, MiB."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def cpu_peak_mib(fn: Callable[[], object]) -> float:
    """Memory one call allocates on the CPU at its peak beyond what was allocated before it, MiB: the running sum of
    the allocations and frees the c10 CPU allocator reports to the profiler, in time order (torch has no CPU
    counterpart of ``torch.cuda.max_memory_allocated``). A block allocated before the call and freed during it is not
    subtracted (the profiler does not know its size): a training step that drops the previous step's gradients
    counts up to one set of gradients more than ``torch.cuda.max_memory_allocated`` would."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def copy_bandwidth_gbs(nbytes: int = 2**30) -> tuple[float, float]:
    """Device-to-device copy of a large tensor (clone): (ms, GB/s counting bytes read and written)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    ms = cuda_time_ms(lambda: src.clone(), repeats=20)
    return ms, 2 * nbytes / ms / 1e6


def l2_copy_bandwidth_gbs(nbytes: int = 8 * 2**20, copies: int = 64) -> tuple[float, float]:
    """Copies between two preallocated ``nbytes`` tensors, small enough to stay in L2 (16 MiB together on an H100's
    50 MB), ``copies`` of them per CUDA graph replay so launch gaps do not count: (ms per copy, GB/s counting bytes
    read and written). A torch copy kernel, not a tuned one: a lower bound of what L2 serves."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = graph_time_ms(lambda: [dst.copy_(src) for _ in range(copies)]) / copies
    return ms, 2 * nbytes / ms / 1e6


def time_cuda(fn: Callable[[], object], repeats: int = 5, warmup: int = 2) -> tuple[float, float]:
    """Median milliseconds of ``fn`` (see :func:`cuda_time_ms`) and the process's peak allocated MiB meanwhile."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = cuda_time_ms(fn, warmup=warmup, repeats=repeats)
    return ms, torch.cuda.max_memory_allocated() / 2**20


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved_cpu(steps: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
                    ) -> dict[str, tuple[float, float]]:
    """Median (wall s, CPU s) of every step, the steps run in turn within each repeat, so that a load change on a
    shared machine hits them all alike. CPU time is the steadier number where other jobs share the cores."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            t = timed(step)
            if i >= warmup:
                times[name].append(t)
    return {name: (statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts))
            for name, ts in times.items()}
