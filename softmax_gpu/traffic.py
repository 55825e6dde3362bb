"""Exact memory traffic of Triton kernels run in the interpreter (TRITON_INTERPRET=1).

Inside ``with TrafficCounter() as t:`` every masked load and store the interpreter
executes is tallied as (active mask lanes) x (element size). For memory-bound kernels
bytes moved / minimum bytes is the figure that decides speed, and here it is exact.

Given ``buffers``, the counter also checks every active lane's address against those
tensors' allocations and raises on the first access outside all of them, so a test
proves that nothing is read or written out of bounds.
"""
import numpy as np


class OutOfBoundsAccess(AssertionError):
    """An active load/store lane touched memory outside every registered buffer."""


class TrafficCounter:
    def __init__(self, buffers=()):
        self.bytes_loaded = 0
        self.bytes_stored = 0
        self._ranges = [
            (t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
            for t in buffers
        ]
        self._saved = None

    @property
    def bytes_moved(self) -> int:
        return self.bytes_loaded + self.bytes_stored

    def _tally(self, kind, ptrs, mask):
        active = np.broadcast_to(mask.data, ptrs.data.shape)
        lanes = int(np.count_nonzero(active))
        elem_bytes = ptrs.get_element_ty().primitive_bitwidth // 8
        if self._ranges and lanes:
            self._check_bounds(kind, ptrs.data[active].astype(np.uint64), elem_bytes)
        return lanes * elem_bytes

    def _check_bounds(self, kind, addresses, elem_bytes):
        inside = np.zeros(addresses.shape, dtype=bool)
        for lo, hi in self._ranges:
            inside |= (addresses >= lo) & (addresses + elem_bytes <= hi)
        if not inside.all():
            bad = int(addresses[~inside][0])
            raise OutOfBoundsAccess(f"{kind} of {elem_bytes}-byte element at address {bad:#x} is outside every buffer")

    def __enter__(self):
        from triton.runtime.interpreter import InterpreterBuilder

        load, store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store
        counter = self

        # The trailing cache/eviction arguments differ between triton releases (3.6: cache_modifier,
        # eviction_policy; 3.9: cache_policy), so they are passed through untouched.
        def counted_load(builder, ptrs, mask, *args, **kwargs):
            counter.bytes_loaded += counter._tally("load", ptrs, mask)
            return load(builder, ptrs, mask, *args, **kwargs)

        def counted_store(builder, ptrs, value, mask, *args, **kwargs):
            counter.bytes_stored += counter._tally("store", ptrs, mask)
            return store(builder, ptrs, value, mask, *args, **kwargs)

        self._saved = (InterpreterBuilder, load, store)
        InterpreterBuilder.create_masked_load = counted_load
        InterpreterBuilder.create_masked_store = counted_store
        return self

    def __exit__(self, *exc):
        builder, load, store = self._saved
        builder.create_masked_load, builder.create_masked_store = load, store
        return False
