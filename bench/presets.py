"""Every Newton–Schulz coefficient preset against the exact polar factor, on real models' shapes.

For each preset of :data:`scion_kernels.COEFFICIENTS` (its default steps), compute dtype and
shape: the polar factor by the reference :func:`scion_kernels.newton_schulz`, its relative
Frobenius error ``‖X − U·Vᵀ‖_F / ‖U·Vᵀ‖_F`` against the float64 SVD's ``U·Vᵀ``, the range of
its singular values (float64), and its median time over ``--repeats`` calls on the device.

    python -m bench.presets [--device cpu|cuda] [--repeats 3] [--fp16 all|small|none]

Shapes (stored ``rows × cols``, a batch where stacked):

- GPT-2 small: attention ``768 × 768``, MLP ``768 × 3072``;
- Llama-3.2-1B: the MLP's ``8192 × 2048``;
- OLMoE-1B-7B: 8 of its 64 experts, ``8 × 1024 × 2048``;
- the GPT-2 MLP shape again with singular values log-spaced over ``[10⁻³, 1]`` (``cond 1e3``):
  what the presets do to the small singular values gradients have.

Inputs are Gaussian from a fixed seed (the conditioned one built from random orthogonal
factors). On CPUs without fp16 matrix units an fp16 product is about 200× slower than bf16
(GPT-2's 768 × 3072 took 21.6 s on a Zen 4), so ``--fp16 small`` (the CPU default) runs fp16
on the GPT-2 attention shape only. Writes ``bench/results/<device>/presets.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from scion_kernels import COEFFICIENTS, newton_schulz, polar_svd, resolve_coefficients

from .common import RESULTS, device_slug, environment

#: name: (batch, rows, cols, condition number or None for Gaussian).
SHAPES = {
    "GPT-2 attention 768×768": (1, 768, 768, None),
    "GPT-2 MLP 768×3072": (1, 768, 3072, None),
    "Llama-3.2-1B MLP 8192×2048": (1, 8192, 2048, None),
    "OLMoE experts 8×1024×2048": (8, 1024, 2048, None),
    "GPT-2 MLP 768×3072, cond 1e3": (1, 768, 3072, 1e3),
}
SMALL = "GPT-2 attention 768×768"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_input(batch: int, rows: int, cols: int, cond: float | None, seed: int = 0):
    """A float32 batch: Gaussian, or with singular values log-spaced over ``[1/cond, 1]``."""
    gen = torch.Generator().manual_seed(seed)
    if cond is None:
        return torch.randn(batch, rows, cols, generator=gen)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(batch, rows, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(batch, cols, k, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k, dtype=torch.float64)
    return ((u * s) @ v.mT).float()


def measure(device: torch.device, repeats: int, fp16: str) -> list[dict]:
    rows = []
    for shape_name, (batch, r, c, cond) in SHAPES.items():
        G = make_input(batch, r, c, cond).to(device)
        exact = polar_svd(G).double()
        for dtype_name, dtype in DTYPES.items():
            wanted = fp16 == "all" or fp16 == "small" and shape_name == SMALL
            if dtype is torch.float16 and not wanted:
                continue
            for preset in COEFFICIENTS:
                X = newton_schulz(G, preset, dtype=dtype)  # also the warm-up
                err = ((X.double() - exact).norm() / exact.norm()).item()
                sv = torch.linalg.svdvals(X.double())
                times = []
                for _ in range(repeats):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    newton_schulz(G, preset, dtype=dtype)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append((time.perf_counter() - t) * 1e3)
                row = {
                    "shape": shape_name, "dtype": dtype_name, "preset": preset,
                    "steps": len(resolve_coefficients(preset)), "rel_err": err,
                    "sv_min": sv.min().item(), "sv_max": sv.max().item(),
                    "ms": statistics.median(times),
                }  # fmt: skip
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| shape | dtype | preset | steps | ‖X − UVᵀ‖/‖UVᵀ‖ | σ(X) | ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['preset']} | {r['steps']} | {r['rel_err']:.3f} "
            f"| [{r['sv_min']:.3f}, {r['sv_max']:.3f}] | {r['ms']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fp16", choices=("all", "small", "none"), default=None)
    parser.add_argument("--out", default=None, help="results folder (default: by device)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fp16 = args.fp16 or ("all" if device.type == "cuda" else "small")
    header = environment(device)
    header["command"] = "python -m bench.presets " + " ".join(argv or sys.argv[1:])
    header["threads"] = torch.get_num_threads()
    with torch.no_grad():
        rows = measure(device, args.repeats, fp16)
    out = Path(args.out) if args.out else RESULTS / device_slug(header["device"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "presets.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    text = (
        f"# Newton–Schulz presets against the float64 SVD\n\n{header['device']}, torch "
        f"{header['torch']}, {header['threads']} threads, commit {header['commit'][:12]}, "
        f"{header['date']}. Command: `{header['command']}`.\n\n{table(rows)}\n"
    )
    (out / "presets.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
