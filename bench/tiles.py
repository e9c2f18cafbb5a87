"""Every tile configuration of the Triton Newton–Schulz products, timed at the shapes that
matter: ``python -m bench.tiles [--warm I/N] [--progress FILE] [--out DIR]``.

The step runs each product with one configuration (the first of the policy's ``syrk`` or
``apply`` candidates that fits, :func:`scion_kernels.backends.triton.tuning.default_config`). This
benchmark times each candidate of those lists, plus ``EXTRA_SYRK`` and ``EXTRA_APPLY`` (larger
or narrower tiles not in the lists), on each kernel (``gram``, ``poly``, ``apply``, as in
:mod:`bench.kernels`) at ``SHAPES``: the data for choosing the defaults per shape. Rows are
``kernels`` rows with ``backend="triton"`` and the configuration in ``config``; the default's
row says so in its note.

``--warm I/N`` compiles (runs once, small) the configurations ``I, I+N, …`` and times nothing:
N such processes at once compile them all in parallel into Triton's on-disk cache, then one
timing run loads them. A configuration that cannot run here (too much shared memory) is
recorded as skipped in the log.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import torch

from .common import Context, environment
from .kernels import A, B, C, _dense_flops, _inputs

Shape = tuple[int, int, int]
SHAPES: list[Shape] = [
    (1, 4096, 4096), (1, 1024, 1024), (12, 768, 768), (12, 768, 2304), (24, 768, 3072),
]  # fmt: skip
#: Candidates beyond the step's lists (the products without the fused update).
EXTRA_SYRK = [
    dict(BLOCK=128, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK=64, BLOCK_K=128, num_warps=4, num_stages=3),
]
EXTRA_APPLY = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, num_warps=8, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, num_warps=4, num_stages=3),
]
#: A small shape with the same integer specializations as ``SHAPES`` (multiples of 16): what
#: a warm-up compiles at.
WARM_SHAPE: Shape = (1, 256, 256)


def configs() -> list[tuple[str, dict]]:
    """``(kind, config)`` for every candidate: ``"syrk"`` ones serve ``gram`` and ``poly``."""
    from scion_kernels.backends.triton import APPLY_TMA, SYRK_TMA, Policy

    out = [("syrk", c) for c in [*Policy().syrk, *EXTRA_SYRK, *SYRK_TMA]]
    return out + [("apply", c) for c in [*Policy().apply, *EXTRA_APPLY, *APPLY_TMA]]


def label(config: dict) -> str:
    """``128x128x64 w8 s3`` (``BLOCK`` stands for both tile sides of a syrk; ``tma g8``: the
    persistent TMA kernel, grouped by 8 row tiles)."""
    if "BLOCK" in config:
        tile = f"{config['BLOCK']}x{config['BLOCK']}x{config['BLOCK_K']}"
    else:
        tile = f"{config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']}"
    group = f" g{config['GROUP_M']}" if "GROUP_M" in config else ""
    tma = f" tma{group}" if config.get("TMA") else ""
    return f"{tile} w{config['num_warps']} s{config['num_stages']}{tma}"


def _launches(data: tuple, shape: Shape, kind: str, config: dict, flags: dict):
    """``{kernel: fn}`` running ``kind``'s kernels with ``config`` on ``data`` (``X``, ``A``,
    ``P`` of :func:`bench.kernels._inputs`)."""
    from scion_kernels.backends.triton import newton_schulz as kns

    b, m, n = shape
    x, a, p = data
    a_out, p_out, y = torch.empty_like(a), torch.empty_like(p), torch.empty_like(x)
    if kind == "syrk":
        return {
            "gram": lambda: kns.launch_syrk(x, a_out, n, 1.0, 0.0, config, flags),
            "poly": lambda: kns.launch_syrk(a, p_out, m, C, B, config, flags, has_d=True),
        }
    return {"apply": lambda: kns.launch_apply(p, x, y, n, A, config, flags)}


def run(ctx: Context, shapes: list[Shape] | None = None, part: tuple[int, int] | None = None):
    """Time every configuration at every shape (or, with ``part = (i, n)``, only compile the
    configurations ``i, i+n, …``)."""
    from triton.runtime.errors import OutOfResources

    from scion_kernels.backends.triton import tuning

    todo = configs()
    on_gpu = ctx.device.type == "cuda"
    if not on_gpu:  # Triton's interpreter: plumbing only, one candidate of each kind
        todo = [next(c for c in todo if c[0] == k) for k in ("syrk", "apply")]
    if part is not None:
        todo = todo[part[0] :: part[1]]
        shapes = [WARM_SHAPE if on_gpu else (1, 64, 64)]
    elif shapes is None:
        shapes = SHAPES if on_gpu else [(1, 64, 64)]
    dtype = torch.bfloat16 if on_gpu else torch.float32
    rate = None if part is not None else ctx.matrix_rate(dtype)
    for shape in shapes:
        b, m, n = shape
        bucket = tuning.NSBucket(b, m, n, dtype, ctx.device)
        flags = bucket.flags()
        defaults = {k: label(tuning.default_config(bucket, k)) for k in ("syrk", "apply")}
        data = _inputs(shape, ctx.device, dtype, -(-n // 16) * 16, -(-m // 16) * 16)
        for kind, config in todo:
            try:
                fns = _launches(data, shape, kind, config, flags)
                for kernel, fn in fns.items():
                    if part is not None:
                        fn()
                        continue
                    ms = ctx.time_ms(fn)
                    tflops = _dense_flops(kernel, b, m, n) / (ms * 1e-3) / 1e12
                    default = label(config) == defaults[kind]
                    ctx.add(
                        bench="kernels",
                        backend="triton",
                        kernel=kernel,
                        shape=[b, m, n],
                        dtype=str(dtype).removeprefix("torch."),
                        config=label(config),
                        ms=ms,
                        tflops=tflops,
                        ceiling_fraction=tflops / rate,
                        note="the step's default" if default else "candidate",
                    )
            except OutOfResources as err:
                ctx.log(f"tiles {label(config)} at {shape}: cannot run here ({err})")
            except Exception as err:  # noqa: BLE001 - one candidate must not end the sweep
                first = (str(err).splitlines() or [""])[0]
                ctx.log(f"tiles {label(config)} at {shape}: failed, {type(err).__name__}: {first}")
        ctx.sync()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tiles", description=__doc__)
    p.add_argument("--warm", default=None, help="I/N: only compile every N-th config from I")
    p.add_argument("--progress", default=None, help="append each row to this JSON-lines file")
    p.add_argument("--out", default=None, help="write tiles.json and tiles.md here")
    args = p.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError as err:
        print(f"tiles: skipped, Triton is not importable ({err})", flush=True)
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = Context(device=device, quick=False, suite="check", repeats=3)
    if args.progress:
        ctx.progress = Path(args.progress)
    part = None
    if args.warm:
        i, n = (int(v) for v in args.warm.split("/"))
        part = (i, n)
    t0 = time.perf_counter()
    signal.signal(signal.SIGTERM, _interrupt)  # a stop at a time budget keeps what ran
    try:
        run(ctx, part=part)
    except KeyboardInterrupt:
        print("stopped: writing what was measured", flush=True)
    seconds = time.perf_counter() - t0
    print(f"tiles{' warm ' + args.warm if args.warm else ''}: {seconds:.1f} s", flush=True)
    if args.out and part is None:
        from .report import write_all

        header = environment(device) | {"suite": "tiles", "command": " ".join(sys.argv)}
        header["matrix_tflops"] = dict(ctx.rates)
        write_all(Path(args.out), header, ctx.rows)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
