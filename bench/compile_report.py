"""Compile every Triton kernel of the package for Hopper (sm_90a) without a GPU, and report what
the compiler made of it: registers, spills, shared memory, and whether the main loops use
warp-group MMA (``wgmma``) and asynchronous copies (``cp.async``, software pipelining).

This is what can be known about the kernels' speed before they run: a spill, a missing
``wgmma`` or an unpipelined loop shows here. Pointers are declared 16-byte aligned and the
work buffers' row strides multiples of 16 (they are padded so); the "÷16" rows also declare the
matrix sizes multiples of 16 (what Triton's JIT specializes for such shapes, e.g. 768 or 4096),
the "any" rows do not (e.g. 4097).

    python -m bench.compile_report [--out FILE.json] [--quick]
    python -m bench.compile_report --native     (the CUDA C++ kernels: nvcc -Xptxas -v)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

_SIZES = ("M", "N", "K")


@dataclass
class Variant:
    """One kernel compiled with one set of compile-time constants."""

    kernel: str
    label: str
    pointers: dict[str, str]  # pointer arguments and their element types
    constants: dict[str, Any]  # constexpr arguments
    num_warps: int
    num_stages: int
    aligned: bool = True


@dataclass
class Report:
    kernel: str
    label: str
    aligned: bool
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int | None
    spill_bytes: int | None
    wgmma: bool
    cp_async: bool
    tma: bool


def _kernels() -> dict[str, Any]:
    from scion_kernels.backends.triton import grouped
    from scion_kernels.backends.triton import newton_schulz as kns

    return {
        "prologue": kns._prologue_kernel,
        "scales": kns._scales_kernel,
        "normalize": kns._normalize_kernel,
        "syrk": kns._syrk_kernel,
        "apply": kns._apply_kernel,
        "apply_tma": kns._apply_tma_kernel,
        "syrk_tma": kns._syrk_tma_kernel,
        "small": kns._small_kernel,
        "grouped": grouped._grouped_kernel,
    }


_COMPILED = dict(CAST_F32=False, EMULATE_RNE=False)


def variants(quick: bool = False) -> list[Variant]:
    """The default configurations (``quick``) or every tuning candidate and small-kernel size."""
    from scion_kernels.backends.triton import APPLY_TMA, SYRK_TMA, Policy

    ns_ptr = {"g_like": "fp32", "d_like": "fp32", "p_like": "fp32"}
    out = [
        Variant(
            "prologue", "64x64",
            {"table": "i64", "partials": "fp32", "momentum": "fp32", **ns_ptr},
            dict(HAS_BUF=True, ALPHA_TENSOR=False, EMULATE_RNE=False, BLOCK_M=64, BLOCK_N=64),
            4, 1,
        ),
        Variant(
            "scales", "1024 tiles", {"partials": "fp32", "scales": "fp32"}, dict(BLOCK=1024), 4, 1
        ),
        Variant(
            "normalize", "64x64",
            {"table": "i64", "x0": "bf16", "scales": "fp32", **ns_ptr},
            dict(EMULATE_RNE=False, BLOCK_M=64, BLOCK_N=64), 4, 1,
        ),
        Variant(
            "grouped", "rows 4x256",
            {"strips": "i64", "ints": "i64", "floats": "fp32", "lr": "fp32", "momentum": "fp32",
             **ns_ptr},
            dict(HAS_BUF=True, SIGN=False, ALPHA_TENSOR=False, LR_TENSOR=False,
                 EMULATE_RNE=False, BLOCK_R=4, BLOCK_L=256), 4, 1,
        ),
    ]  # fmt: skip
    syrk_ptr = {"y": "bf16", "z": "bf16", "d": "bf16", "c": "bf16"}
    apply_ptr = {
        "p_mat": "bf16", "x": "bf16", "out": "bf16", "table": "i64", "factors": "fp32",
        "p_like": "fp32", "lr": "fp32",
    }  # fmt: skip
    syrk = Policy().syrk[:1] if quick else Policy().syrk
    apply = Policy().apply[:1] if quick else Policy().apply
    for cfg in syrk:
        c = {k: v for k, v in cfg.items() if not k.startswith("num_")}
        for aligned in (True,) if quick else (True, False):
            out.append(Variant(
                "syrk", f"{c['BLOCK']}x{c['BLOCK']}x{c['BLOCK_K']} b·A+c·A·A", syrk_ptr,
                dict(HAS_D=True, HAS_DIAG=False, **_COMPILED, **c),
                cfg["num_warps"], cfg["num_stages"], aligned,
            ))  # fmt: skip
    # The Gram form's polynomial a·I + b·R + c·R², with the default tiles.
    c = {k: v for k, v in syrk[0].items() if not k.startswith("num_")}
    out.append(Variant(
        "syrk", f"{c['BLOCK']}x{c['BLOCK']}x{c['BLOCK_K']} a·I+b·R+c·R²", syrk_ptr,
        dict(HAS_D=True, HAS_DIAG=True, **_COMPILED, **c), syrk[0]["num_warps"],
        syrk[0]["num_stages"],
    ))  # fmt: skip
    for cfg in apply:
        c = {k: v for k, v in cfg.items() if not k.startswith("num_")}
        for aligned in (True,) if quick else (True, False):
            out.append(Variant(
                "apply", f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} update", apply_ptr,
                dict(UPDATE=True, LR_TENSOR=False, UPDATE_ROWS=32, **_COMPILED, **c),
                cfg["num_warps"], cfg["num_stages"], aligned,
            ))  # fmt: skip
    for cfg in SYRK_TMA[:1] if quick else SYRK_TMA:
        c = {k: v for k, v in cfg.items() if not k.startswith("num_") and k != "TMA"}
        bl, bk = c["BLOCK"], c["BLOCK_K"]
        tma_ptr = {
            "y_desc": f"tensordesc<bf16[1, {bl}, {bk}]>",
            "z_desc": f"tensordesc<bf16[1, {bl}, {bk}]>",
            "d_desc": f"tensordesc<bf16[1, {bl}, {bl}]>",
            "c_desc": f"tensordesc<bf16[1, {bl}, {bl}]>",
        }
        out.append(Variant(
            "syrk_tma", f"{bl}x{bl}x{bk} a·I+b·R+c·R²", tma_ptr,
            dict(HAS_D=True, HAS_DIAG=True, **_COMPILED, **c), cfg["num_warps"],
            cfg["num_stages"],
        ))  # fmt: skip
    for cfg in APPLY_TMA[:1] if quick else APPLY_TMA:
        c = {k: v for k, v in cfg.items() if not k.startswith("num_") and k != "TMA"}
        bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
        tma_ptr = {
            "p_desc": f"tensordesc<bf16[1, {bm}, {bk}]>",
            "x_desc": f"tensordesc<bf16[1, {bk}, {bn}]>",
            "e_desc": f"tensordesc<bf16[1, {bm}, {bn // 2}]>",
            "o_desc": f"tensordesc<bf16[1, {bm}, {bn // 2}]>",
            "out": "bf16", "table": "i64", "p_like": "fp32", "factors": "fp32", "lr": "fp32",
        }  # fmt: skip
        for update in (False, True):
            out.append(Variant(
                "apply_tma", f"{bm}x{bn}x{bk} g{c['GROUP_M']}" + (" update" if update else ""),
                tma_ptr, dict(UPDATE=update, LR_TENSOR=False, UPDATE_ROWS=32, **_COMPILED, **c),
                cfg["num_warps"], cfg["num_stages"],
            ))  # fmt: skip
    small_ptr = {
        "table": "i64", "out": "bf16", "ptable": "i64", "factors": "fp32", "steps": "fp32",
        "lr": "fp32", "momentum": "fp32", **ns_ptr,
    }  # fmt: skip
    sizes = [(64, 128)]
    if not quick:
        sizes = [(16, 16), (32, 64), (64, 64), (32, 128), (64, 128), (32, 256)]
    for bm, bn in sizes:
        warps = 4 if bm * bn <= 4096 else 8
        out.append(Variant(
            "small", f"{bm}x{bn} update", small_ptr,
            dict(STEPS=5, HAS_BUF=True, UPDATE=True, ALPHA_TENSOR=False, LR_TENSOR=False,
                 **_COMPILED, BLOCK_M=bm, BLOCK_N=bn),
            warps, 1,
        ))  # fmt: skip
    return out


def _signature(fn: Any, v: Variant) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in v.constants:
            sig[name] = "constexpr"
        elif name in v.pointers and v.pointers[name].startswith("tensordesc"):
            sig[name] = v.pointers[name]
        elif name in v.pointers:
            sig[name] = "*" + v.pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.startswith("LD"):  # row strides of work buffers: padded to 16, always
            sig[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32" if name in _SIZES or name in ("TILES", "B") else "fp32"
            if name in _SIZES and v.aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _ptxas() -> str | None:
    """The ptxas Triton uses for sm_90 (bundled with the wheel), if found."""
    import triton

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except Exception:  # noqa: BLE001 - older Triton: look for the bundled binaries
        bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        for name in ("ptxas-blackwell", "ptxas"):
            path = os.path.join(bin_dir, name)
            if os.path.exists(path):
                return path
    return None


def _ptxas_version() -> str | None:
    ptxas = _ptxas()
    if ptxas is None:
        return None
    run = subprocess.run([ptxas, "--version"], capture_output=True, text=True)
    lines = run.stdout.strip().splitlines()
    return lines[-2] if len(lines) >= 2 else None


def _ptxas_usage(ptx: str) -> tuple[int | None, int | None]:
    """``(registers, spill store bytes)`` from ``ptxas -v``, or ``None``s if it cannot say."""
    ptxas = _ptxas()
    if ptxas is None:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run(
            [ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
        )
    regs = re.search(r"Used (\d+) registers", run.stderr)
    spill = re.search(r"(\d+) bytes spill stores", run.stderr)
    if run.returncode or regs is None or spill is None:
        return None, None
    return int(regs.group(1)), int(spill.group(1))


def compile_variant(v: Variant) -> Report:
    """Compile one variant for sm_90a and read its resource use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernels()[v.kernel]
    sig, attrs = _signature(fn, v)
    src = ASTSource(fn, sig, constexprs=dict(v.constants), attrs=attrs)
    kernel = triton.compile(
        src,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": v.num_warps, "num_stages": v.num_stages},
    )
    ttgir = kernel.asm["ttgir"]
    registers, spills = _ptxas_usage(kernel.asm["ptx"])
    return Report(
        kernel=v.kernel,
        label=v.label,
        aligned=v.aligned,
        num_warps=v.num_warps,
        num_stages=v.num_stages,
        shared_bytes=int(kernel.metadata.shared),
        registers=registers,
        spill_bytes=spills,
        wgmma="warp_group_dot" in ttgir,
        cp_async="async_copy_global_to_local" in ttgir,
        tma="async_tma" in ttgir or "tensormap" in ttgir,
    )


def _table(reports: list[Report]) -> str:
    columns = "kernel variant sizes warps stages smem-KiB regs spill-B wgmma cp.async tma".split()
    rows = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in reports:
        rows.append(
            f"| {r.kernel} | {r.label} | {'÷16' if r.aligned else 'any'} | {r.num_warps} | "
            f"{r.num_stages} | {r.shared_bytes / 1024:.0f} | {r.registers or '?'} | "
            f"{'?' if r.spill_bytes is None else r.spill_bytes} | {'yes' if r.wgmma else 'no'} | "
            f"{'yes' if r.cp_async else 'no'} | {'yes' if r.tma else 'no'} |"
        )
    return "\n".join(rows)


#: The native sources holding kernels (ns_launch.cu launches every Newton–Schulz kernel).
_NATIVE_SOURCES = ("ns_launch.cu", "grouped.cu")


def native_report() -> str:
    """The CUDA C++ kernels compiled for sm_90a by the nvcc ``setup.py`` finds, with ptxas's
    per-kernel report (``-Xptxas -v``): a markdown table of registers, spills, static shared
    memory (the products' pipeline is dynamic shared memory: ``Tiling::kSmemBytes``,
    ``WgmmaTiling::smem_bytes``) and ptxas's performance warnings (C75xx: wgmma products it
    serializes)."""
    import shutil

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    nvcc = os.environ.get("SCION_NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    rows = ["| kernel | registers | spill stores (B) | static smem (B) | ptxas warnings |"]
    rows.append("| --- | --- | --- | --- | --- |")
    for source in _NATIVE_SOURCES:
        with tempfile.TemporaryDirectory() as tmp:
            run = subprocess.run(
                [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr",
                 "--generate-code=arch=compute_90a,code=sm_90a", "-Xptxas=-v",
                 f"-I{os.path.join(root, 'csrc')}", "-c", os.path.join(root, "csrc", source),
                 "-o", os.path.join(tmp, "k.o")],
                capture_output=True, text=True,
            )  # fmt: skip
        if run.returncode:
            raise RuntimeError(f"nvcc failed on {source}: {run.stderr[-2000:]}")
        warned: dict[str, list[str]] = {}
        for line in run.stderr.splitlines():
            loss = re.search(r"\((C75\d\d)\) Potential Performance Loss.*function '(\S+)'", line)
            if loss:
                warned.setdefault(loss.group(2), []).append(loss.group(1))
        name = None
        for line in run.stderr.splitlines():
            found = re.search(r"Compiling entry function '(\S+)'", line)
            if found:
                name, spill, smem = _demangled(found.group(1)), "?", "0"
                warnings = ", ".join(warned.get(found.group(1), [])) or "none"
            elif name and "spill stores" in line:
                spill = re.search(r"(\d+) bytes spill stores", line).group(1)
            elif name and "Used" in line and "registers" in line:
                regs = re.search(r"Used (\d+) registers", line).group(1)
                shared = re.search(r"(\d+) bytes smem", line)
                smem = shared.group(1) if shared else smem
                rows.append(f"| `{name}` | {regs} | {spill} | {smem} | {warnings} |")
                name = None
    tool = (version.strip().splitlines() or ["nvcc ?"])[-1]
    head = (
        f"CUDA C++ kernels for sm_90a, {tool}; command: `python -m bench.compile_report "
        "--native`. The products' pipelines are dynamic shared memory: 3 stages, 30 KiB for "
        "the 64 tile and 60 KiB for the 128 tile (`Tiling::kSmemBytes` in csrc/ns_gemm.cuh); "
        "the wgmma products 4 TMA stages and a staging tile of their own, 162 KiB, and 3 "
        "stages, 210 KiB, on 128×256 tiles (`WgmmaTiling<256, ·>` for a·X + B·X, `<·, 256>` for "
        "the symmetric products; `WgmmaTiling::smem_bytes`, csrc/ns_wgmma.cuh). "
        "ptxas warnings: C75xx, wgmma products it serializes (none is the goal)."
    )
    return head + "\n\n" + "\n".join(rows)


def _demangled(symbol: str) -> str:
    """``symbol`` through c++filt where there is one, without the namespaces."""
    try:
        run = subprocess.run(["c++filt", symbol], capture_output=True, text=True)
        name = run.stdout.strip() or symbol
    except OSError:
        name = symbol
    name = name.replace("scion::ns::", "").replace("scion::", "")
    for code, product in enumerate(("kGram", "kPoly", "kApply")):  # ns_gemm.cuh's Product
        name = name.replace(f"(Product){code}", product)
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the reports as JSON here")
    parser.add_argument("--quick", action="store_true", help="default configurations only")
    parser.add_argument("--native", action="store_true", help="the CUDA C++ kernels instead")
    args = parser.parse_args(argv)
    if args.native:
        print(native_report())
        return 0
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default; no warning
    import triton

    reports = []
    for v in variants(args.quick):
        reports.append(compile_variant(v))
        print(f"compiled {v.kernel} {v.label}", file=sys.stderr)
    print(_table(reports))
    if args.out:
        import datetime

        import torch

        from .common import git_commit

        meta = {
            "target": "sm_90a (compiled only, no GPU)",
            "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "triton": triton.__version__,
            "torch": torch.__version__,
            "ptxas": _ptxas_version(),
            "command": "python -m bench.compile_report " + " ".join(argv or sys.argv[1:]),
        }
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "kernels": [asdict(r) for r in reports]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
