"""Every Triton kernel compiles for Hopper (sm_90a) — no GPU needed — and its default tile
configuration keeps the properties its speed depends on: warp-group MMA and software-pipelined
loads in the matrix products, no register spills.

The compiler runs in a subprocess: the test session itself runs the kernels in Triton's
interpreter, whose decorated functions cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, list[dict]]:
    """Each kernel's compiled variants (the default configurations: ``--quick``)."""
    if not _has_nvidia_backend():
        pytest.skip("this Triton has no CUDA backend")
    out = tmp_path_factory.mktemp("sm90") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "bench.compile_report", "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    found: dict[str, list[dict]] = {}
    for r in json.loads(out.read_text())["kernels"]:
        found.setdefault(r["kernel"], []).append(r)
    return found


def test_every_kernel_compiles(reports):
    assert set(reports) == {
        "prologue", "scales", "normalize", "grouped", "syrk", "syrk_tma", "apply", "apply_tma",
        "small",
    }  # fmt: skip
    for r in (r for variants in reports.values() for r in variants):
        assert r["shared_bytes"] <= 227 * 1024, r  # an H100's shared memory per block


@pytest.mark.parametrize("kernel", ["syrk", "apply"])
def test_products_use_wgmma_and_pipelined_loads(reports, kernel):
    assert all(r["wgmma"] and r["cp_async"] for r in reports[kernel])


def test_tma_syrk_uses_wgmma_and_tma(reports):
    """Hopper's persistent syrk: wgmma, TMA copies, pipelined (more than one stage of its
    128×64 operand pair, 32 KiB, in shared memory)."""
    for r in reports["syrk_tma"]:
        assert r["wgmma"] and r["tma"], r
        assert r["shared_bytes"] > 2 * (2 * 128 * 64) * 2, r


def test_tma_apply_uses_wgmma_and_tma_and_pipelines(reports):
    """Hopper's persistent apply, without and with the update: wgmma, TMA copies, and more
    shared memory than one stage of its 128×256×64 operands takes (48 KiB), so the loop's
    loads are multi-buffered (unpipelined, the update's variant once took exactly that)."""
    assert {r["label"].endswith("update") for r in reports["apply_tma"]} == {False, True}
    for r in reports["apply_tma"]:
        assert r["wgmma"] and r["tma"], r
        assert r["shared_bytes"] > 2 * (128 * 64 + 64 * 256) * 2, r


def test_small_kernel_uses_wgmma(reports):
    assert all(r["wgmma"] for r in reports["small"])  # 64 rows: one warp group per MMA


def test_no_register_spills(reports):
    measured = [r for v in reports.values() for r in v if r["spill_bytes"] is not None]
    if not measured:
        pytest.skip("ptxas not found next to Triton: registers and spills unknown")
    assert all(r["spill_bytes"] == 0 for r in measured), measured
