"""Result files of a benchmark run: JSON and CSV with every figure, and PNG plots.

Files are named by card and date: bench/results/<card>_<YYYY-MM-DD>.{json,csv,png}.
"""
import csv
import datetime
import json
import re
from pathlib import Path

DRY_RUN_MARK = "DRY RUN on CPU, not GPU measurements: "  # leads the plot title and Markdown of a dry run
FIELDS = (
    "op", "dtype", "rows", "cols", "provider", "status", "ms", "gbps", "pct_copy", "pct_datasheet",
    "peak_extra_bytes", "min_bytes", "note",
)  # fmt: skip


def slug(card: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") or "unknown-card"


def stem(meta: dict, day: datetime.date = None) -> str:
    return f"{slug(meta['card'])}_{(day or datetime.date.today()).isoformat()}"


def write_results(rows, meta: dict, out_dir, day: datetime.date = None):
    """Writes <stem>.json (meta + rows) and <stem>.csv (rows, meta repeated as leading columns)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = out / stem(meta, day)
    json_path, csv_path = base.with_suffix(".json"), base.with_suffix(".csv")
    json_path.write_text(json.dumps({"meta": meta, "results": list(rows)}, indent=1, default=str) + "\n")
    meta_cols = ("card", "driver", "torch", "triton", "copy_gbps", "dry_run")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=meta_cols + FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: meta.get(k) for k in meta_cols}, **{k: row.get(k) for k in FIELDS}})
    return json_path, csv_path


def plot_results(rows, meta: dict, out_dir, day: datetime.date = None, min_elements: int = 2**20):
    """One PNG: a panel per (op, dtype), GB/s against classes, a line per provider, and the
    measured copy bandwidth as the ceiling. Latency shapes (fewer than min_elements) and
    failed runs are left out; where several row counts share a class count, the largest is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["rows"] * r["cols"] >= min_elements]
    panels = sorted({(r["op"], r["dtype"]) for r in ok})
    if not panels:
        return None
    ncols = len({d for _, d in panels})
    ops = sorted({o for o, _ in panels})
    dtypes = sorted({d for _, d in panels})
    # One colour per provider across every panel, and one legend for the figure.
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {p: palette[i % len(palette)] for i, p in enumerate(sorted({r["provider"] for r in ok}))}
    fig, axes = plt.subplots(len(ops), ncols, figsize=(5 * ncols, 3.4 * len(ops) + 1.0), squeeze=False)
    for i, op in enumerate(ops):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            panel = [r for r in ok if r["op"] == op and r["dtype"] == dtype]
            for provider in sorted({r["provider"] for r in panel}):
                best = {}
                for r in panel:
                    if r["provider"] == provider and r["rows"] >= best.get(r["cols"], {"rows": -1})["rows"]:
                        best[r["cols"]] = r
                xs = sorted(best)
                ax.plot(xs, [best[x]["gbps"] for x in xs], marker="o", color=colors[provider], label=provider)
            ax.axhline(meta["copy_gbps"], color="black", linestyle="--", linewidth=1, label="copy bandwidth")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op} {dtype}")
            ax.set_xlabel("classes")
            ax.set_ylabel("GB/s")
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", label=p) for p, c in colors.items()]
    handles.append(plt.Line2D([], [], color="black", linestyle="--", label="copy bandwidth"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 3 * ncols), fontsize=7)
    title = f"{meta['card']} ({meta.get('date', '')})"
    if meta.get("dry_run"):
        title = DRY_RUN_MARK + title
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.8 / fig.get_figheight(), 1, 1 - 0.2 / fig.get_figheight()))
    path = Path(out_dir) / f"{stem(meta, day)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(rows, title: str = "") -> str:
    head = f"{'op':<16}{'dtype':<9}{'shape':>16}  {'provider':<14}{'ms':>9}{'GB/s':>9}{'%copy':>7}  note"
    lines = ([f"== {title}"] if title else []) + [head]
    for r in rows:
        shape = f"{r['rows']}x{r['cols']}"
        if r["status"] == "ok":
            figures = f"{r['ms']:>9.4f}{r['gbps']:>9.1f}{r['pct_copy']:>7.1f}"
        else:
            figures = f"{r['status']:>25}"
        note = r.get("note") or ""
        if r.get("peak_extra_bytes") is not None:
            note = f"peak extra {r['peak_extra_bytes'] / 2**20:.0f} MiB " + note
        lines.append(f"{r['op']:<16}{r['dtype']:<9}{shape:>16}  {r['provider']:<14}{figures}  {note}")
    return "\n".join(lines)


def markdown_table(rows, meta: dict, ours: str = "softmax_gpu") -> str:
    """A Markdown table of one run: per op, dtype and shape, our time, GB/s and % of the copy
    bandwidth measured in the same run, then each other provider's time over ours (> 1: we
    are faster); '—' where a provider has no such op, its status where it did not run."""
    others = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != ours]
    head = ["op", "dtype", "shape", "ms", "GB/s", "% copy"] + [f"vs {p}" for p in others]
    lines = [
        (DRY_RUN_MARK if meta.get("dry_run") else "")
        + f"{meta['card']}, driver {meta['driver']}, torch {meta['torch']}, triton {meta['triton']}; "
        f"copy {meta['copy_gbps']:.0f} GB/s measured in the same run",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    cases = dict.fromkeys((r["op"], r["dtype"], r["rows"], r["cols"]) for r in rows)
    by_key = {(r["op"], r["dtype"], r["rows"], r["cols"], r["provider"]): r for r in rows}
    for op, dtype, n_rows, n_cols in cases:
        mine = by_key.get((op, dtype, n_rows, n_cols, ours))
        if mine is None or mine["status"] != "ok":
            cells = ["", "", mine["status"] if mine else "—"]
        else:
            cells = [f"{mine['ms']:.4f}", f"{mine['gbps']:.0f}", f"{mine['pct_copy']:.1f}"]
        for p in others:
            theirs = by_key.get((op, dtype, n_rows, n_cols, p))
            if theirs is None or theirs["status"] == "n/a":
                cells.append("—")
            elif theirs["status"] != "ok":
                cells.append(theirs["status"])
            elif mine is None or mine["status"] != "ok":
                cells.append(f"{theirs['ms']:.4f} ms")
            else:
                cells.append(f"{theirs['ms'] / mine['ms']:.2f}×")
        lines.append(f"| {op} | {dtype} | {n_rows}×{n_cols} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    # python -m bench.results RUN.json [--plot]: the Markdown table of a run; --plot redraws its
    # PNG beside it from the JSON (same figures, current plotting code).
    import sys

    path = Path(sys.argv[1])
    data = json.loads(path.read_text())
    print(markdown_table(data["results"], data["meta"]))
    if "--plot" in sys.argv[2:]:
        day = datetime.date.fromisoformat(data["meta"]["date"])
        print(plot_results(data["results"], data["meta"], path.parent, day=day))
