"""The closing summary of bench/device_check.sh: what passed, and the headline ratios.

    python -m bench.summary OUT_DIR [--rc tests=0 memcheck=0 ...] [--seconds N]

Reads what the run left in OUT_DIR (gpu_tests.txt, memcheck.txt, scoreboard.json,
linear_ce.json) and prints one screen. Exits 1 if a step failed, a test failed, memcheck
found an error, or our own provider failed a gate.
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path


def _last_match(path: Path, pattern: str) -> str:
    if not path.exists():
        return f"{path.name}: missing"
    lines = [line for line in path.read_text(errors="replace").splitlines() if re.search(pattern, line)]
    return lines[-1].strip("= ") if lines else f"{path.name}: no summary line (cut short?)"


def _geomean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def scoreboard_lines(data: dict, ours: str = "softmax_gpu"):
    rows = data["results"]
    by_case = {}
    for r in rows:
        by_case.setdefault((r["op"], r["dtype"], r["rows"], r["cols"]), {})[r["provider"]] = r
    lines = []
    wrong = [r for r in rows if r["status"] == "wrong"]
    errors = [r for r in rows if r["status"] in ("error", "oom")]
    lines.append(f"scoreboard: {len(by_case)} cases, {sum(r['status'] == 'ok' for r in rows)} rows timed, "
                 f"{len(wrong)} failed the gate, {len(errors)} errors")  # fmt: skip
    for r in wrong + errors:
        lines.append(f"  {r['status']}: {r.get('label') or r['provider']} {r['op']} {r['dtype']} {r['rows']}x{r['cols']}: "
                     f"{r.get('gate') or r.get('note')}")  # fmt: skip
    labels = {r["provider"]: r.get("label") or r["provider"] for r in rows}
    for op, dtype in dict.fromkeys((k[0], k[1]) for k in by_case):
        cases = [v for k, v in by_case.items() if k[:2] == (op, dtype)]
        mine = [c.get(ours) for c in cases]
        pct = [m["pct_copy"] for m in mine if m and m.get("pct_copy")]
        parts = [f"{op:<16}{dtype:<9} ours {min(pct, default=0):.0f}-{max(pct, default=0):.0f}% of copy"]
        for p in labels:
            if p == ours:
                continue
            figures = []
            for clock, mark in (("device_ms", ""), ("eager_ms", "e")):
                ratios = [c[p][clock] / c[ours][clock] for c in cases
                          if p in c and ours in c and c[p].get(clock) and c[ours].get(clock)]  # fmt: skip
                g = _geomean(ratios)
                if g:
                    figures.append(f"{g:.2f}x{mark}")
            if figures:
                parts.append(f"{labels[p]} {'/'.join(figures)}")
        lines.append("  " + "; ".join(parts))
    lines.append("  (vs X: geometric mean of X's time over ours across the shapes, device time, then eager time"
                 " marked e; > 1: we are faster)")  # fmt: skip
    return lines


def linear_lines(data: dict):
    rows = data["results"]
    lines = [f"linear cross-entropy: {len(rows)} rows"]
    for r in rows:
        if r["status"] == "ok" and r.get("device_ms"):
            figures = f"{r['device_ms']:.2f} ms, {r.get('tflops') or 0:.0f} TFLOP/s (device)"
        elif r["status"] == "ok":
            figures = f"{r['eager_ms']:.2f} ms, {r.get('tflops_eager') or 0:.0f} TFLOP/s (eager)"
        else:
            figures = f"{r['status']}: {r.get('gate') or r.get('note')}"
        lines.append(f"  {r['op']:<18}{r['shape']:<18}{r['label']:<22}{figures}")
    return lines


def logprobs_lines(data: dict):
    rows = data["results"]
    lines = [f"token log-probabilities: {len(rows)} rows"]
    for r in rows:
        if r["status"] == "ok":
            clock = "device" if r.get("device_ms") else "eager"
            ms = r.get("device_ms") or r["eager_ms"]
            pct = f", {r['pct_copy']:.0f}% of copy" if r.get("pct_copy") else ""
            if r.get("tflops"):
                pct = f", {r['tflops']:.0f} TFLOP/s"
            figures = f"{ms:.3f} ms ({clock}){pct}"
        else:
            figures = f"{r['status']}: {r.get('gate') or r.get('note')}"
        lines.append(f"  {r['op']:<18}{r['shape']:<14}{r['label']:<22}{figures}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.summary")
    parser.add_argument("out")
    parser.add_argument("--rc", nargs="*", default=[], metavar="STEP=CODE")
    parser.add_argument("--seconds", type=int, default=None)
    args = parser.parse_args(argv)
    out = Path(args.out)
    failed = False
    print("== summary" + (f" ({args.seconds} s)" if args.seconds is not None else ""))
    for item in args.rc:
        step, code = item.split("=")
        if code != "0":
            failed = True
            print(f"step {step}: exit {code}" + (" (cut by its timeout)" if code in ("124", "137") else ""))
    if (out / "gpu_cooperative_tests.txt").exists():
        print("cooperative: " + _last_match(out / "gpu_cooperative_tests.txt",
                                            r"\b(passed|failed|error)\b.* in [0-9.]+s|skipped in a dry run"))
        if re.search(r"\b\d+ failed\b", (out / "gpu_cooperative_tests.txt").read_text(errors="replace")):
            failed = True
    print("tests:    " + _last_match(out / "gpu_tests.txt", r"\b(passed|failed|error)\b.* in [0-9.]+s"))
    print("memcheck: " + _last_match(out / "memcheck.txt", r"ERROR SUMMARY|skipped|not found"))
    tests = (out / "gpu_tests.txt").read_text(errors="replace") if (out / "gpu_tests.txt").exists() else ""
    if re.search(r"\b\d+ failed\b", tests):
        failed = True
    # (file, its lines, what to call it when missing, which providers are ours: a row of ours
    # that is wrong, in error or out of memory fails the run)
    boards = (
        ("scoreboard.json", scoreboard_lines, "scoreboard", lambda p: p == "softmax_gpu"),
        ("linear_ce.json", linear_lines, "linear cross-entropy", lambda p: p.startswith("softmax_gpu")),  # both modes
        ("logprobs.json", logprobs_lines, "token log-probabilities", lambda p: p == "softmax_gpu"),
    )
    for name, lines, label, ours in boards:
        path = out / name
        if not path.exists():
            print(f"{label}: missing")
            continue
        data = json.loads(path.read_text())
        if name == "scoreboard.json" and data["meta"].get("dry_run"):
            print("DRY RUN on CPU: no figure below is a GPU measurement")
        for line in lines(data):
            print(line)
        if any(r["status"] != "ok" and ours(r["provider"]) for r in data["results"]):
            failed = True
    if (out / "hf_trainer.txt").exists():
        print("hf trainer: " + _last_match(out / "hf_trainer.txt", r"^peak memory.*|not importable"))
        print("            " + _last_match(out / "hf_trainer.txt", r"^largest difference.*"))
    print(f"files in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
