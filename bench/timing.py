"""The scoreboard's two clocks, each named in the results it produces.

device_ms ("graph-diff"): GPU time alone. Two CUDA graphs are captured: A replays
    k x [prepare; flush L2; call], B replays k x [prepare; flush L2]. Replays of A and B
    alternate, each timed with CUDA events; device_ms = median(A - B) / k. The host is out
    of it (a graph replays with no Python in between), every call starts with a cold L2 (the
    flush, after `prepare`, writes twice the L2), and `prepare` (a fresh copy of the input for a peer that
    writes over it) is timed in both graphs, so it cancels. A call that cannot be captured
    (a host synchronisation inside, say) raises NotCapturable with the first error of the
    chain; an error in the warm-up calls, or running out of memory, is the call's own and
    propagates as it is. A median difference below zero (noise around a call of no cost)
    is reported as 0.

eager_ms ("eager-events"): the call as a Python user makes it, host included. Each
    repetition prepares, flushes L2, waits for the GPU to go idle, then records an event,
    makes the call and records another: the events' difference covers the host's time to
    issue every launch as well as the GPU's time to run them. The median of the repetitions.

A case is timed several times, interleaved with the other providers, by the sweep
(bench/gpu.py); the median and the spread of those medians are reported.
"""
import statistics
from typing import Callable, Optional

import torch

DEVICE_TIMER = "graph-diff"
EAGER_TIMER = "eager-events"
TIMERS = {
    DEVICE_TIMER: "CUDA graph of k x [prepare, L2 flush, call] minus a graph of k x [prepare, L2 flush], "
    "median over alternating replays, divided by k: GPU time alone, cold L2",
    EAGER_TIMER: "CUDA events around one eager call after an L2 flush and a device sync, median over "
    "repetitions: host time to issue the launches included",
}
TARGET_REPLAY_MS = 2.0  # k is chosen so one replay of graph A lasts about this long
MAX_CALLS_PER_GRAPH = 64


class NotCapturable(RuntimeError):
    """The call cannot be recorded in a CUDA graph; the reason is the message."""


def flush_buffer(device) -> torch.Tensor:
    """Twice the L2 (at least 64 MiB): writing it evicts whatever a call left there."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
    return torch.empty(max(2 * l2, 64 * 2**20) // 4, dtype=torch.int32, device=device)


def eager_ms(call: Callable, flush: torch.Tensor, prepare: Optional[Callable] = None, reps: int = 10) -> float:
    times = []
    for _ in range(reps):
        if prepare is not None:  # before the flush, so the fresh copy is not left in L2
            prepare()
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def calls_per_graph(estimate_ms: float, flush_ms: float) -> int:
    """k: enough calls that a replay lasts about TARGET_REPLAY_MS, between 1 and MAX_CALLS_PER_GRAPH."""
    per_call = max(estimate_ms, 1e-3) + flush_ms
    return max(1, min(MAX_CALLS_PER_GRAPH, round(TARGET_REPLAY_MS / per_call)))


def _capture(body: Callable, pool) -> "torch.cuda.CUDAGraph":
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        body()
    return graph


def device_ms(call: Callable, flush: torch.Tensor, prepare: Optional[Callable] = None, k: int = 8,
              replays: int = 7) -> float:  # fmt: skip
    """GPU time of one call: see the module docstring. Raises NotCapturable."""

    def flushed(with_call: bool):
        def body():
            for _ in range(k):
                if prepare is not None:
                    prepare()
                flush.zero_()
                if with_call:
                    call()

        return body

    # Warm up on a side stream, as graph capture asks (lazy initialisation, autograd state);
    # errors here are the call's own and propagate as they are.
    side = _side_stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            if prepare is not None:
                prepare()
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    pool = torch.cuda.graph_pool_handle()
    try:
        graph_a = _capture(flushed(True), pool)
        graph_b = _capture(flushed(False), pool)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:  # what a capture refuses varies: syncs, host reads, allocator calls
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
        raise NotCapturable(_root_cause(exc)) from exc
    graph_a.replay()
    graph_b.replay()
    diffs = []
    for _ in range(replays):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        events[0].record()
        graph_a.replay()
        events[1].record()
        events[2].record()
        graph_b.replay()
        events[3].record()
        events[3].synchronize()
        diffs.append(events[0].elapsed_time(events[1]) - events[2].elapsed_time(events[3]))
    del graph_a, graph_b
    return max(statistics.median(diffs), 0.0) / k


_SIDE_STREAMS = {}


def _side_stream() -> "torch.cuda.Stream":
    """One warm-up stream per device for the whole run: a new stream per call would spread
    CuPy's per-stream memory arenas over torch's stream pool."""
    device = torch.cuda.current_device()
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream()
    return _SIDE_STREAMS[device]


def _root_cause(exc: BaseException) -> str:
    """The first error in the chain (torch reports a failed capture as 'operation failed due to
    a previous error during capture'; the previous error is the one that says why)."""
    while exc.__context__ is not None and exc.__context__ is not exc:
        exc = exc.__context__
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def flush_ms(flush: torch.Tensor, reps: int = 10) -> float:
    """Time of one L2 flush alone, for choosing k."""
    return eager_ms(lambda: flush.zero_(), flush, reps=reps)
