"""Write one run's results: JSON (the schema of bench/common.py), a Markdown page, PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .common import format_table

POLAR_COLUMNS = [
    "backend",
    "coefficients",
    "shape",
    "ms",
    "tflops",
    "ceiling_fraction",
    "rel_err",
    "sv_min",
    "sv_max",
    "note",
]
STEP_COLUMNS = [
    "model", "optimizer", "backend", "dtype", "ms", "tflops", "ceiling_fraction", "state_bytes",
    "peak_bytes", "first_s", "note",
]  # fmt: skip
KERNEL_COLUMNS = [
    "kernel", "shape", "backend", "config", "dtype", "ms", "tflops", "ceiling_fraction", "note",
]  # fmt: skip
ELEMENTWISE_COLUMNS = ["backend", "note", "shape", "numel", "dtype", "ms", "gbps"]
GRAPH_COLUMNS = ["model", "optimizer", "backend", "ms", "note"]
INIT_COLUMNS = ["model", "draws", "numel", "touch_s", "first_s", "ms", "tflops", "note"]


def write_json(path: Path, header: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**header, "rows": rows}, indent=1) + "\n")


def markdown(header: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The results page: the run's header, then one table per benchmark."""
    lines = [
        f"# Benchmark results: {header['device']}",
        "",
        f"- suite: `{header.get('suite')}`, command: `{header.get('command')}`",
        f"- commit: `{header['commit']}`, date: {header['date']}",
        f"- torch {header['torch']}, triton {header.get('triton')}, CUDA {header.get('cuda')}, "
        f"{header.get('threads')} threads",
    ]
    for dtype, rate in (header.get("matrix_tflops") or {}).items():
        lines.append(f"- measured in this run: {dtype} matrix rate {rate:.4g} TFLOP/s")
    if header.get("copy_gbps"):
        lines.append(f"- measured in this run: copy bandwidth {header['copy_gbps']:.4g} GB/s")
    lines.append(
        "- TFLOP/s use the dense Newton–Schulz count 5·(4m²n + 2m³) for every backend (docs/math.md"
        " §4), so rows compare; for `svd` it is an equivalent rate."
    )
    for bench, title, columns in (
        ("kernels", "Newton–Schulz products, kernel by kernel", KERNEL_COLUMNS),
        ("polar", "Polar factor", POLAR_COLUMNS),
        ("step", "Optimizer step", STEP_COLUMNS),
        ("graph", "Optimizer step, eager and replayed as a CUDA graph", GRAPH_COLUMNS),
        ("elementwise", "Memory-bound stages", ELEMENTWISE_COLUMNS),
        ("init", "Scion.init() on a whole model", INIT_COLUMNS),
    ):
        sel = [r for r in rows if r["bench"] == bench]
        if sel:
            lines += ["", f"## {title}", "", format_table(sel, columns)]
    return "\n".join(lines) + "\n"


def plots(header: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """PNG plots: polar time against size per backend with the matrix-rate floor drawn, and
    step time per optimizer per model. Returns the files written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    polar = [r for r in rows if r["bench"] == "polar" and r["shape"][0] == 1]
    square = [r for r in polar if r["shape"][1] == r["shape"][2]]
    if square:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series: dict[str, list[tuple[int, float]]] = {}
        for r in square:
            label = r["backend"] + (f" ({r['coefficients']})" if r.get("coefficients") else "")
            series.setdefault(label, []).append((r["shape"][1], r["ms"]))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        sizes = sorted({r["shape"][1] for r in square})
        for (dtype, rate), style in zip(
            (header.get("matrix_tflops") or {}).items(), ("k--", "k:"), strict=False
        ):
            floor = [5 * 6.0 * n**3 / (rate * 1e12) * 1e3 for n in sizes]
            ax.plot(sizes, floor, style, label=f"dense floor, {dtype} at {rate:.3g} TFLOP/s")
        ax.set(xscale="log", yscale="log", xlabel="n (n×n matrix, batch 1)", ylabel="ms (median)")
        ax.set_title(f"Polar factor, 5 Newton–Schulz steps — {header['device']}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{header.get('suite', 'results')}_polar_time.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    step = [r for r in rows if r["bench"] == "step"]
    if step:
        models = sorted({r["model"] for r in step})
        fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4), squeeze=False)
        for ax, model in zip(axes[0], models, strict=True):
            sel = [r for r in step if r["model"] == model]
            labels = [f"{r['optimizer']}\n{r['backend']}" for r in sel]
            ax.barh(labels, [r["ms"] for r in sel])
            ax.set_title(model, fontsize=9)
            ax.set_xlabel("ms per step (median)")
            ax.tick_params(axis="y", labelsize=7)
        fig.suptitle(f"Optimizer step — {header['device']}", fontsize=9)
        fig.tight_layout()
        path = out / f"{header.get('suite', 'results')}_step_time.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write_all(out: Path, header: dict[str, Any], rows: list[dict[str, Any]]) -> list[Path]:
    """``<suite>.json``, ``<suite>.md`` and the plots under ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    suite = header.get("suite", "results")
    write_json(out / f"{suite}.json", header, rows)
    (out / f"{suite}.md").write_text(markdown(header, rows))
    return [out / f"{suite}.json", out / f"{suite}.md", *plots(header, rows, out)]
