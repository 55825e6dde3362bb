"""Input checks shared by every op; each raises before any kernel is launched."""
import torch


def check_tensor(fn: str, name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}(): argument '{name}' must be Tensor, not {type(x).__name__}")


def check_floating(fn: str, name: str, x: torch.Tensor) -> None:
    check_tensor(fn, name, x)
    if not x.is_floating_point():
        raise TypeError(f"{fn}(): expected a floating-point tensor for '{name}', but got {x.dtype}")


def check_out_dtype(fn: str, dtype) -> None:
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"{fn}(): dtype must be a floating-point torch.dtype or None, but got {dtype}")


def normalize_dim(dim: int, ndim: int) -> int:
    """Wraps a negative dim like torch; a 0-d tensor accepts 0 and -1."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, but got {type(dim).__name__}")
    rank = max(ndim, 1)
    if not -rank <= dim < rank:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-rank}, {rank - 1}], but got {dim})")
    return dim % rank


def check_same_device(fn: str, **tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise RuntimeError(f"{fn}(): expected all tensors to be on the same device, but got {listed}")
