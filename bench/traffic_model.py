"""Minimum bytes each benchmarked op must move: the denominator of every GB/s figure.

M rows of N classes, s bytes an element. Per-row extras (targets, losses) are the O(M) terms.
"""

OPS = ("softmax_fwd", "softmax_bwd", "log_softmax_fwd", "ce_fwd", "ce_fwd_bwd")

TARGET_BYTES = 8  # an int64 class index per row
LOSS_BYTES = 4  # a float32 loss per row


def min_bytes(op: str, rows: int, cols: int, itemsize: int) -> int:
    """Bytes an ideal kernel moves for `op` on a rows x cols input of `itemsize`-byte elements.

    softmax / log_softmax forward: read x, write y           2 M N s
    softmax backward:              read y and dy, write dx   3 M N s
    cross-entropy forward:         read the logits once      M N s + M (8 + 4)
    cross-entropy fwd+bwd:         read logits, write grad   2 M N s + M (8 + 4)
    """
    element = rows * cols * itemsize
    per_row = rows * (TARGET_BYTES + LOSS_BYTES)
    if op in ("softmax_fwd", "log_softmax_fwd"):
        return 2 * element
    if op == "softmax_bwd":
        return 3 * element
    if op == "ce_fwd":
        return element + per_row
    if op == "ce_fwd_bwd":
        return 2 * element + per_row
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
