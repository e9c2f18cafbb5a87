"""Regenerate ``scion_kernels/backends/auto_table.py``, the table behind ``backend="auto"``.

    python -m bench.choose_backends bench/results/<device>/full.json [more results ...]

For every GPU in the given benchmark results (JSON written by ``python -m bench``), per class:

- ``spectral-small|medium|large`` (short side < 256, < 1024, ≥ 1024): among ``torch``,
  ``triton`` and ``cuda``, the backend with the least total time over the polar shapes of the
  class that every candidate ran (same coefficient set and dtype); a fused backend whose
  ``rel_err`` on some shape exceeds twice the reference's is not eligible for the class.
- the same classes with ``-gram`` (``spectral-large-gram``): the same choice among the Gram
  form's rows (``torch-gram``, ``triton-gram``, ``cuda-gram``), on the shapes it runs on
  (``uses_gram``: at least twice as wide as tall, coefficients it takes in that dtype);
  ``backend="auto"`` takes them for ``polar="gram"`` parameters, the plain class where absent.
- ``grouped``: the backend of the fastest whole ``Scion`` step (the grouped parameters are
  a small part of a step, and the step benchmark is where they run).

Devices already in the table and absent from the results are kept.
"""

from __future__ import annotations

import argparse
import json
import pprint
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from scion_kernels.backends import GRAM_SUFFIX, spectral_class
from scion_kernels.newton_schulz import resolve_coefficients, uses_gram

from .polar import STEPS

ROOT = Path(__file__).resolve().parents[1]
TABLE_FILE = ROOT / "scion_kernels" / "backends" / "auto_table.py"
CANDIDATES = ("torch", "triton", "cuda")


def choose(results: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """``{device: {class: backend}}`` from benchmark result files' contents."""
    table: dict[str, dict[str, str]] = {}
    for data in results:
        device, rows = data["device"], data["rows"]
        polar: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
        for r in rows:
            backend = str(r.get("backend"))
            base = backend.removesuffix(GRAM_SUFFIX)
            if r.get("bench") != "polar" or base not in CANDIDATES:
                continue
            suffix = backend[len(base) :]
            if suffix and not _gram_runs(r):
                continue  # a Gram row of a shape the Gram form leaves to the plain iteration
            key = (tuple(r["shape"]), r.get("coefficients"), r.get("dtype"), suffix)
            polar[key][base] = r
        totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        barred: dict[str, set[str]] = defaultdict(set)
        for (shape, _, _, suffix), by_backend in polar.items():
            if set(by_backend) != {b for b in CANDIDATES if _ran(rows, b + suffix)}:
                continue  # compare only shapes every candidate ran
            kind = spectral_class(min(shape[-2:])) + suffix
            ref_err = by_backend.get("torch", {}).get("rel_err")
            for backend, r in by_backend.items():
                totals[kind][backend] += r["ms"]
                err = r.get("rel_err")
                if backend != "torch" and ref_err is not None and err is not None:
                    if err > 2 * ref_err:
                        barred[kind].add(backend)
        choice = {}
        for kind, per_backend in totals.items():
            eligible = {b: ms for b, ms in per_backend.items() if b not in barred[kind]}
            if eligible:
                choice[kind] = min(eligible, key=eligible.__getitem__)
        steps = [r for r in rows if r.get("bench") == "step" and r.get("optimizer") == "Scion"
                 and r.get("backend") in CANDIDATES]  # fmt: skip
        if steps:
            choice["grouped"] = min(steps, key=lambda r: r["ms"])["backend"]
        if choice:
            table[device] = dict(sorted(choice.items()))
    return table


def _gram_runs(row: dict[str, Any]) -> bool:
    """Whether the Gram form ran on a polar row's shape with its coefficients and dtype."""
    m, n = sorted(row["shape"][-2:])
    table = resolve_coefficients(row.get("coefficients") or "classic", STEPS)
    return uses_gram(m, n, table, getattr(torch, row.get("dtype") or "bfloat16"))


def _ran(rows: list[dict[str, Any]], backend: str) -> bool:
    return any(r.get("bench") == "polar" and r.get("backend") == backend for r in rows)


def write(table: dict[str, dict[str, str]], path: Path = TABLE_FILE) -> None:
    """Rewrite the ``TABLE = ...`` assignment of ``path``, keeping its docstring."""
    text = path.read_text()
    head = text[: text.index("TABLE:")]
    body = pprint.pformat(table, width=96, sort_dicts=True)
    path.write_text(f"{head}TABLE: dict[str, dict[str, str]] = {body}\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="benchmark result JSON files")
    parser.add_argument(
        "--out", type=Path, default=TABLE_FILE, help="the table file (default: the package's)"
    )
    args = parser.parse_args(argv)
    from scion_kernels.backends.auto_table import TABLE

    table = dict(TABLE)
    table.update(choose([json.loads(p.read_text()) for p in args.results]))
    if args.out != TABLE_FILE:
        args.out.write_text(TABLE_FILE.read_text())
    write(table, args.out)
    print(f"{args.out}: {len(table)} device(s)")
    for device, choice in table.items():
        print(f"  {device}: {choice}")


if __name__ == "__main__":
    main()
