"""bench.traffic_model.ours against the kernels themselves: for each benchmarked op and each
path, forced on small shapes, the op runs as bench/gpu.py's runner calls it, in Triton's
interpreter, and the model's bytes must equal the bytes TrafficCounter tallies and its
launches the Triton launches counted at the interpreter's launch entry, exactly. Then the
paths the model names at real GPU shapes, with the SM count the split decision depends on."""
import contextlib

import pytest
import torch
from helpers import edge_elements as edge_elements_by_row

import softmax_gpu
from bench.traffic_model import OPS, PATHS, edge_elements, min_bytes, ours
from softmax_gpu import config
from softmax_gpu.ops.cross_entropy import cross_entropy_split
from softmax_gpu.traffic import TrafficCounter

interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="counted in Triton's interpreter")

# The SM count the launchers assume off CUDA (config.sm_count): the model is asked with it.
SMS = config.DEFAULT_SM_COUNT


def _forced(*contexts):
    def enter():
        stack = contextlib.ExitStack()
        for make, arg in contexts:
            stack.enter_context(make(arg) if arg is not None else make())
        return stack

    return enter


# How each path is reached on small shapes. 150 columns are no whole number of 16-byte
# vectors in float32 (4) or 16 bits (8), so the looped rows have heads and tails (read once
# where the body is read twice), and each of the 3 rows starts at another alignment.
NATURAL = _forced()
NO_SPLIT = _forced((config.no_split, None))
LOOPED = _forced((config.block_limit, 32), (config.no_split, None))
SPLIT = _forced((config.block_limit, 16), (config.force_split, 32))  # 5 chunks of 150 columns

SHORT = (3, 150)  # a 256-wide block: 4 rows a program (3 live)
WIDE = (2, 2100)  # a 4096-wide block, one row a program

# (shape, forcing, the path the model must name); every op, float32 and bfloat16.
PATH_CASES = {
    "tiles": (SHORT, NATURAL, "tiles"),
    "single": (WIDE, NATURAL, "single"),
    "looped": (SHORT, LOOPED, "looped"),
    "split": (SHORT, SPLIT, "split"),
}
CASES = [
    (op, dtype, *PATH_CASES[path])
    for op in OPS
    for dtype in (torch.float32, torch.bfloat16)
    for path in PATH_CASES
]
# float16 cross-entropy defers the gradient to a backward kernel that always streams its row
# (and splits on its own terms: 2 rows of 2100 classes split at 132 SMs in the backward only).
CASES += [
    ("ce_fwd_bwd", torch.float16, SHORT, NATURAL, "tiles+looped"),
    ("ce_fwd_bwd", torch.float16, WIDE, NO_SPLIT, "single+looped"),
    ("ce_fwd_bwd", torch.float16, WIDE, NATURAL, "single+split"),
    ("ce_fwd_bwd", torch.float16, SHORT, LOOPED, "looped"),
    ("ce_fwd_bwd", torch.float16, SHORT, SPLIT, "split"),
    # whole vectors: no edge on any path
    ("softmax_bwd", torch.bfloat16, (3, 96), LOOPED, "looped"),
    ("ce_fwd_bwd", torch.float32, (3, 96), LOOPED, "looped"),
]


def _call(op: str, x: torch.Tensor, target: torch.Tensor, dy: torch.Tensor):
    """One call of `op` as bench/gpu.py's runner makes it for an autograd provider; the
    softmax backward's forward runs here, before the call."""
    if op == "softmax_fwd":
        return lambda: softmax_gpu.softmax(x)
    if op == "log_softmax_fwd":
        return lambda: softmax_gpu.log_softmax(x)
    if op == "softmax_bwd":
        leaf = x.detach().requires_grad_()
        y = softmax_gpu.softmax(leaf)
        return lambda: torch.autograd.grad(y, leaf, dy, retain_graph=True)[0]
    if op == "ce_fwd":

        def forward():
            with torch.no_grad():
                return softmax_gpu.cross_entropy(x, target)

        return forward
    if op == "ce_fwd_bwd":
        leaf = x.detach().requires_grad_()
        return lambda: torch.autograd.grad(softmax_gpu.cross_entropy(leaf, target), leaf)[0]
    raise ValueError(op)


@pytest.fixture
def launches(monkeypatch):
    """The names of the Triton kernels launched while it is in use (every `kernel[grid](...)`
    in the interpreter goes through InterpretedFunction.run; a jit function called from
    another, as the split stats kernel calls the prepare kernel's body, does not)."""
    from triton.runtime.interpreter import InterpretedFunction

    launched = []
    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        if not kwargs.get("warmup", False):
            launched.append(self.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counted)
    return launched


@interpreter_only
@pytest.mark.parametrize(
    "op, dtype, shape, forced, path", CASES, ids=[f"{c[0]}-{str(c[1])[6:]}-{c[4]}-{c[2][1]}" for c in CASES]
)
def test_model_matches_interpreter(op, dtype, shape, forced, path, launches):
    rows, cols = shape
    x = (3 * torch.randn(rows, cols)).to(dtype)
    target = torch.randint(0, cols, (rows,))
    dy = torch.randn(rows, cols).to(dtype)
    with forced():
        model = ours(op, rows, cols, dtype, SMS)
        call = _call(op, x, target, dy)
        launches.clear()
        with TrafficCounter() as counted:
            call()
    assert model.path == path
    assert model.launches == len(launches), launches
    assert model.bytes == counted.bytes_moved, (model.bytes, counted.bytes_loaded, counted.bytes_stored)
    assert model.bytes >= min_bytes(op, rows, cols, x.element_size())


@interpreter_only
@pytest.mark.parametrize("op", ["softmax_fwd", "log_softmax_fwd", "softmax_bwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_matches_interpreter_cooperative(op, dtype, launches):
    """The cooperative paths: the model counts the GPU's one launch; the interpreter runs its
    two halves, which read the rows once more (forward: x; backward: y and dy). Everything
    else the same, exactly."""
    rows, cols = SHORT
    x = (3 * torch.randn(rows, cols)).to(dtype)
    dy = torch.randn(rows, cols).to(dtype)
    with config.force_cooperative(32, 12):
        model = ours(op, rows, cols, dtype, SMS)
        call = _call(op, x, None, dy)
        launches.clear()
        with TrafficCounter() as counted:
            call()
    assert model.path == "cooperative"
    assert model.launches + 1 == len(launches) == 2, launches
    arrays = 2 if op == "softmax_bwd" else 1
    assert model.bytes + arrays * rows * cols * x.element_size() == counted.bytes_moved
    fields = 1 if op == "softmax_bwd" else 2  # partials a chunk: (max, sum), or the backward's sum
    assert model.bytes - min_bytes(op, rows, cols, x.element_size()) == rows * 5 * fields * 4 * (1 + 5)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_matches_interpreter_reduce_launch(dtype, launches, monkeypatch):
    """Cross-entropy forward + backward with the reduction in its own launch (forced here
    with a threshold of 0 tiles an SM; at the shipped one, 2, it needs 264 row tiles): one
    launch more than the done-counter's route, the same bytes, exactly; the same loss to
    rounding."""
    rows, cols = WIDE
    x = (3 * torch.randn(rows, cols)).to(dtype)
    target = torch.randint(0, cols, (rows,))
    counted = {}
    shipped = config.REDUCE_LAUNCH_TILES_PER_SM
    for tiles_per_sm in (shipped, 0):
        monkeypatch.setattr(config, "REDUCE_LAUNCH_TILES_PER_SM", tiles_per_sm)
        model = ours("ce_fwd_bwd", rows, cols, dtype, SMS)
        launches.clear()
        leaf = x.detach().requires_grad_()
        with TrafficCounter() as traffic:
            loss = softmax_gpu.cross_entropy(leaf, target)
            torch.autograd.grad(loss, leaf)
        assert model.launches == len(launches) and model.bytes == traffic.bytes_moved, (tiles_per_sm, launches)
        counted[tiles_per_sm] = (list(launches), traffic.bytes_moved, loss.detach())
    before, after = counted[shipped], counted[0]
    assert after[0] == before[0][:2] + ["cross_entropy_reduce_kernel"] + before[0][2:], (before[0], after[0])
    assert after[1] == before[1]
    torch.testing.assert_close(after[2], before[2], rtol=1e-6, atol=0)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_matches_interpreter_cooperative_cross_entropy(dtype, launches):
    """Cross-entropy forward + backward on cooperative rows: the model counts the GPU's one
    launch; the interpreter's two halves read the logits and each program's class index once
    more and launch once more. Everything else the same, exactly."""
    rows, cols = SHORT
    x = (3 * torch.randn(rows, cols)).to(dtype)
    target = torch.randint(0, cols, (rows,))
    with config.force_cooperative(32, 12):
        model = ours("ce_fwd_bwd", rows, cols, dtype, SMS)
        call = _call("ce_fwd_bwd", x, target, None)
        launches.clear()
        with TrafficCounter() as counted:
            call()
    assert model.path == "cooperative"
    assert model.launches + 1 == len(launches) == 4, launches
    chunks = 5
    assert model.bytes + rows * cols * x.element_size() + rows * chunks * 8 == counted.bytes_moved


@pytest.mark.parametrize(
    "op, dtype, rows, cols, sms, path",
    [
        # bfloat16 softmax: 4096 columns fit one block; 128256 loop, unless the rows are so
        # few (at most half the SMs) that they split.
        ("softmax_fwd", torch.bfloat16, 32768, 4096, 132, "single"),
        ("softmax_fwd", torch.bfloat16, 4096, 128256, 132, "looped"),
        ("softmax_fwd", torch.bfloat16, 32, 128256, 132, "split"),
        ("softmax_fwd", torch.bfloat16, 32768, 128, 132, "tiles"),
        ("log_softmax_fwd", torch.float32, 32, 32768, 132, "single"),  # the forward's block holds 32768
        ("softmax_bwd", torch.bfloat16, 32, 32768, 132, "split"),  # the backward's 16384 does not
        ("softmax_bwd", torch.bfloat16, 4096, 32768, 132, "looped"),
        ("softmax_bwd", torch.float32, 100, 128256, 132, "looped"),  # 100 rows: more than half of 132 SMs
        ("softmax_bwd", torch.float32, 100, 128256, 264, "split"),  # but not of 264
        # cross-entropy's plain block: 32768 classes in 16 bits, 16384 in float32
        ("ce_fwd", torch.bfloat16, 4096, 32000, 132, "looped"),  # without the gradient: streamed, read once
        ("ce_fwd", torch.bfloat16, 4096, 8192, 132, "single"),
        ("ce_fwd", torch.float32, 4096, 32000, 132, "looped"),
        ("ce_fwd", torch.float32, 32, 32768, 132, "split"),
        ("ce_fwd", torch.bfloat16, 32, 32768, 132, "single"),
        ("ce_fwd_bwd", torch.bfloat16, 32768, 4096, 132, "single"),
        ("ce_fwd_bwd", torch.bfloat16, 4096, 128256, 132, "looped"),
        ("ce_fwd_bwd", torch.bfloat16, 32, 128256, 132, "split"),
        ("ce_fwd_bwd", torch.float16, 32768, 4096, 132, "single+looped"),
        ("ce_fwd_bwd", torch.float16, 32, 32768, 132, "single+split"),
        ("ce_fwd_bwd", torch.float16, 4096, 128256, 132, "looped"),
    ],
)
def test_paths_at_gpu_shapes(op, dtype, rows, cols, sms, path):
    model = ours(op, rows, cols, dtype, sms)
    assert model.path == path
    # A softmax: one launch, two split (stats, then output with the merge). Cross-entropy: two
    # for the loss on every path (prepare + loss, or stats + combine), a third for the backward;
    # where the forward writes the gradient over many rows (bfloat16 and float32, not split) a
    # fourth, the reduction's own (config.reduce_launch).
    stored = op == "ce_fwd_bwd" and dtype != torch.float16 and path != "split"
    assert model.launches == {"ce_fwd": 2, "ce_fwd_bwd": 3 + stored}.get(op, 2 if path == "split" else 1)
    assert all(part in PATHS for part in path.split("+"))
    minimum = min_bytes(op, rows, cols, dtype.itemsize)
    if path in ("single", "tiles") and op in ("softmax_fwd", "softmax_bwd"):
        assert model.bytes == minimum
    assert minimum <= model.bytes <= 1.7 * minimum  # at worst the backward's 4 reads + 1 write of 3


def test_cross_entropy_split_mirror():
    """The model's copy of ops/cross_entropy.py's split decision (which asks the device for
    its SM count) agrees with the op at the default SM count, forward and backward."""
    from bench.traffic_model import _cross_entropy_split

    for rows in (1, 2, 32, 66, 67, 4096):
        for cols in (1000, 1025, 8192, 16384, 16385, 32768, 32769, 50257, 128256):
            for size in (2, 4):
                for streaming in (False, True):
                    ops_split = cross_entropy_split(rows, cols, size, streaming=streaming, plain=True)
                    assert _cross_entropy_split(rows, cols, size, SMS, streaming) == ops_split, (rows, cols, size)


def test_edge_elements_periodic_sum():
    for vec in (1, 4, 8):
        for cols in (1, 3, 8, 96, 150, 50257):
            for rows in (1, 2, 7, 17):
                assert edge_elements(rows, cols, vec) == edge_elements_by_row(rows, cols, cols, vec)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown op"):
        ours("softmax", 2, 2, torch.float32, SMS)
    with pytest.raises(ValueError, match="dtype"):
        ours("softmax_fwd", 2, 2, torch.float64, SMS)


def test_cooperative_path_at_gpu_shapes(monkeypatch):
    """With SOFTMAX_GPU_COOPERATIVE=1 the softmax forward's and backward's long rows (more than
    half the SM count of them) are read once, in one launch: the partials (each chunk reads its
    row's from L2) add under 1%. Rows that fit a block, and few rows, keep their paths."""
    monkeypatch.setattr(config, "COOPERATIVE", True)
    for cols in (50257, 128256, 151936, 262144):
        model = ours("softmax_fwd", 4096, cols, torch.bfloat16, 132)
        assert (model.path, model.launches) == ("cooperative", 1)
        assert 1 < model.bytes / min_bytes("softmax_fwd", 4096, cols, 2) < 1.01
    for cols in (32000, 128256):
        model = ours("softmax_bwd", 4096, cols, torch.bfloat16, 132)
        assert (model.path, model.launches) == ("cooperative", 1)
        assert 1 < model.bytes / min_bytes("softmax_bwd", 4096, cols, 2) < 1.01
    assert ours("softmax_bwd", 4096, 16384, torch.bfloat16, 132).path == "single"
    for cols in (50257, 128256):  # cross-entropy with its gradient: the logits read once, the gradient written
        model = ours("ce_fwd_bwd", 4096, cols, torch.bfloat16, 132)
        assert (model.path, model.launches) == ("cooperative", 3)
        assert 1 < model.bytes / min_bytes("ce_fwd_bwd", 4096, cols, 2) < 1.03
    assert ours("ce_fwd_bwd", 4096, 32000, torch.bfloat16, 132).path == "single"
    assert ours("ce_fwd", 4096, 128256, torch.bfloat16, 132).path == "looped"  # (read once already)
    assert ours("softmax_fwd", 32, 128256, torch.bfloat16, 132).path == "split"
    assert ours("softmax_fwd", 4096, 32000, torch.bfloat16, 132).path == "single"
