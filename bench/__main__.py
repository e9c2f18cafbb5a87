"""Run the benchmark suite: ``python -m bench [--quick | --full | --check] [--only polar,...]``.

``--quick`` (the default) fits a 2-core CPU in a few minutes: the reference path, SVD and the
peers on sizes that fit. ``--full`` is the GPU suite. ``--check`` is the GPU check's
(``bench/gpu_check.py``) few minutes: the polar factor at 1024², 4096², 8192², GPT-2 small's
matrices and 2048×5464 at batch 32 (classic coefficients), whole steps on GPT-2 small, the
copy bandwidth and matrix rates; on a CPU it shrinks to sizes that only exercise the plumbing.
Results go to ``bench/results/<device>/<suite>.{json,md}`` with PNG plots beside them. A run
stopped by SIGTERM or Ctrl-C still writes what it measured (``"partial": true``).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import signal
import sys
import time
from pathlib import Path

import torch

from .common import BENCHES, RESULTS, Context, device_slug, environment
from .report import write_all


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    suite = p.add_mutually_exclusive_group()
    suite.add_argument("--quick", action="store_true", help="the CPU-sized suite (default)")
    suite.add_argument("--full", action="store_true", help="the full GPU suite")
    suite.add_argument("--check", action="store_true", help="the GPU check's few minutes")
    p.add_argument(
        "--only",
        default=None,
        help=f"comma list of {BENCHES} (default: all; on a CPU all but kernels)",
    )
    p.add_argument(
        "--polar-shapes",
        default=None,
        help="the polar benchmark's shapes instead of its suite's, e.g. 1x4096x4096,8x768x768",
    )
    p.add_argument(
        "--polar-backends", default=None, help="comma list: time only these polar backends"
    )
    p.add_argument(
        "--progress",
        default=None,
        help="append every row to this file as one JSON line the moment it is measured",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats on a CPU")
    p.add_argument("--out", default=None, help="results folder (default bench/results/<device>)")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.only is None:  # the kernels' rows say little on a CPU (no Triton kernels there)
        benches = [b for b in BENCHES if device.type == "cuda" or b != "kernels"]
    else:
        benches = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = [b for b in benches if b not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {BENCHES}")
    try:
        polar_shapes = _shapes(args.polar_shapes) if args.polar_shapes else None
    except ValueError as err:
        p.error(str(err))
    polar_backends = args.polar_backends.split(",") if args.polar_backends else None
    name = "full" if args.full else "check" if args.check else "quick"
    quick = name == "quick"
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None

    header = environment(device)
    header["suite"] = name
    header["command"] = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    repeats = args.repeats or (3 if device.type == "cpu" else 10)
    log = tqdm.write if tqdm else (lambda s: print(s, flush=True))
    ctx = Context(device=device, quick=quick, repeats=repeats, log=log, suite=name)
    if args.progress:
        ctx.progress = Path(args.progress)
        ctx.progress.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # before the header: see _interrupt
    try:
        print(
            f"scion_kernels benchmarks ({header['suite']}) on {header['device']}, "
            f"torch {header['torch']}, commit {header['commit'][:12]}",
            flush=True,
        )
        bar = tqdm(benches, unit="bench", file=sys.stdout) if tqdm else benches
        if name == "check":
            ctx.matrix_rate(torch.bfloat16)
        for bench in bar:
            if tqdm:
                bar.set_description(bench)
            module = importlib.import_module(f"bench.{bench}")
            if bench == "polar":
                module.run(ctx, polar_shapes, backends=polar_backends)
            else:
                module.run(ctx)
            if getattr(module, "LAST_COPY_GBPS", None):
                header["copy_gbps"] = module.LAST_COPY_GBPS
    except KeyboardInterrupt:
        header["partial"] = True
        print("\nstopped: writing what was measured", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    header["matrix_tflops"] = dict(sorted(ctx.rates.items()))
    header["seconds"] = round(time.perf_counter() - t0, 1)

    out = RESULTS / device_slug(header["device"]) if args.out is None else Path(args.out)
    paths = write_all(out, header, ctx.rows)
    print(f"\n{len(ctx.rows)} rows in {header['seconds']} s; wrote:")
    for path in paths:
        print(f"  {path}")
    print("\n" + paths[1].read_text())
    return 0


def _shapes(text: str) -> list[tuple[int, int, int]]:
    """``"1x4096x4096,8x768x768"`` → ``[(1, 4096, 4096), (8, 768, 768)]``."""
    out = []
    for item in text.split(","):
        dims = item.strip().lower().replace("×", "x").split("x")
        if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise ValueError(f"a shape is batch x m x n, e.g. 1x4096x4096; got {item!r}")
        out.append((int(dims[0]), int(dims[1]), int(dims[2])))
    return out


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a stage's time budget ran out) stops the run as Ctrl-C does. It is handled from
    the moment the header is printed, so a caller may stop the run as soon as it sees it."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
