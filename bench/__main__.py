"""Run the benchmark suite: ``python -m bench [--quick | --full] [--only polar,step,...]``.

``--quick`` (the default) fits a 2-core CPU in a few minutes: the reference path, SVD and the
peers on sizes that fit. ``--full`` is the GPU suite. Results go to
``bench/results/<device>/<suite>.{json,md}`` with PNG plots beside them.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
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
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma list of {BENCHES}")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats on a CPU")
    p.add_argument("--out", default=None, help="results folder (default bench/results/<device>)")
    args = p.parse_args(argv)

    benches = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = [b for b in benches if b not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {BENCHES}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = not args.full
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None

    header = environment(device)
    header["suite"] = "quick" if quick else "full"
    header["command"] = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    repeats = args.repeats or (3 if device.type == "cpu" else 10)
    print(
        f"scion_kernels benchmarks ({header['suite']}) on {header['device']}, "
        f"torch {header['torch']}, commit {header['commit'][:12]}",
        flush=True,
    )

    bar = tqdm(benches, unit="bench", file=sys.stdout) if tqdm else benches
    log = tqdm.write if tqdm else (lambda s: print(s, flush=True))
    ctx = Context(device=device, quick=quick, repeats=repeats, log=log)
    t0 = time.perf_counter()
    for bench in bar:
        if tqdm:
            bar.set_description(bench)
        module = importlib.import_module(f"bench.{bench}")
        module.run(ctx)
        if getattr(module, "LAST_COPY_GBPS", None):
            header["copy_gbps"] = module.LAST_COPY_GBPS
    header["matrix_tflops"] = dict(sorted(ctx.rates.items()))
    header["seconds"] = round(time.perf_counter() - t0, 1)

    out = RESULTS / device_slug(header["device"]) if args.out is None else Path(args.out)
    paths = write_all(out, header, ctx.rows)
    print(f"\n{len(ctx.rows)} rows in {header['seconds']} s; wrote:")
    for path in paths:
        print(f"  {path}")
    print("\n" + paths[1].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
