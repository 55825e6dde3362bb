"""Workarounds for two bugs of Triton's interpreter (TRITON_INTERPRET=1), applied by the tests
and by the benchmark's CPU runs so that interpreted kernels compute what compiled ones do.

Call `apply_fixes()` after triton is imported with the interpreter on; it is idempotent.
"""
import torch

_applied = False


def apply_fixes() -> None:
    global _applied
    if not _applied:
        _round_bf16_to_nearest_even()
        _dot_bfloat16_as_values()
        _applied = True


def _round_bf16_to_nearest_even():
    """Workaround: triton's interpreter (3.9) truncates float32 -> bfloat16 casts (its
    InterpreterBuilder.cast_impl calls _convert_float with rounding_mode=None), while the GPU
    rounds to nearest even. Without this, every bfloat16 store in the tests would carry up to
    one ulp of error that the compiled kernels do not have."""
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == interpreter.tl.float32 and dst_type.scalar == interpreter.tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16)
            return interpreter.TensorHandle(rounded.numpy().view(np.uint16), dst_type.scalar)
        return original(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


def _dot_bfloat16_as_values():
    """Workaround: triton's interpreter (3.9) stores bfloat16 as its uint16 bit patterns and its
    InterpreterBuilder.create_dot hands those straight to np.matmul, so a bfloat16 tl.dot
    multiplies integers. Widen both operands to float32 first (exact), which is what the
    tensor cores compute too: exact products, float32 sums."""
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype.scalar != interpreter.tl.bfloat16:
            return handle
        bits = np.ascontiguousarray(handle.data).astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), interpreter.tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot
