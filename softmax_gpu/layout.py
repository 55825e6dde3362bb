"""Views an N-d tensor as 2-D rows along one dim, and back."""
import torch


def as_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x with `dim` moved last, as an (n_rows, n_cols) tensor whose columns are contiguous.

    A view when the layout allows (any row stride is fine, the kernels take it as an
    argument); a copy otherwise, e.g. for a reduction dim that is not the innermost.
    """
    moved = x.movedim(dim, -1) if x.dim() else x.reshape(1)
    rows = moved.reshape(moved.shape[:-1].numel(), moved.shape[-1])  # not -1: ambiguous for 0 columns
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows


def from_rows(rows: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of as_rows for a freshly allocated contiguous rows tensor: a tensor shaped
    like `like`, contiguous in that shape (copied only when dim was not the last)."""
    if like.dim() == 0:
        return rows.reshape(())
    moved_shape = like.movedim(dim, -1).shape
    out = rows.view(moved_shape).movedim(-1, dim)
    return out if dim == like.dim() - 1 else out.contiguous()


def batch_first(x, batch_dim, batch_size: int):
    """For a torch.func vmap rule: x with its batch dim (batch_dim; None: unbatched, expanded
    without a copy) first. None stays None."""
    if x is None:
        return None
    if batch_dim is None:
        return x.unsqueeze(0).expand(batch_size, *x.shape)
    return x.movedim(batch_dim, 0)


def batch_rows(x, batch_dim, batch_size: int):
    """For a torch.func vmap rule over a row-wise op: x's batch dim first (batch_first), then
    merged with the next dim, the rows: (B, N, ...) -> (B * N, ...). None stays None."""
    x = batch_first(x, batch_dim, batch_size)
    return None if x is None else x.reshape(-1, *x.shape[2:])
