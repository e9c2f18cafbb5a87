"""The demo (``python -m scion_kernels.demo``) end to end on tiny settings, and the norm
monitor against ``torch.linalg.matrix_norm(ord=2)``."""

from __future__ import annotations

import importlib.util
import json
import math
import zlib

import pytest
import torch

from scion_kernels import Scion, param_groups
from scion_kernels.demo import OPTIMIZERS, TinyGPT, char_data, make_optimizer, train
from scion_kernels.demo.__main__ import main
from scion_kernels.monitor import NormMonitor, spectral_norm

PLOTS = importlib.util.find_spec("matplotlib") is not None
TINY = ["--size", "tiny"]


def _finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def test_compare_end_to_end(tmp_path):
    main(["compare", *TINY, "--out", str(tmp_path)])
    result = json.loads((tmp_path / "compare.json").read_text())
    names = [n for n in OPTIMIZERS if n != "muon" or hasattr(torch.optim, "Muon")]
    for name in names:
        run = result[name]
        assert len(run["losses"]) == 4 and not run["diverged"]
        assert _finite(run["train_loss"]) and _finite(run["val_loss"])
        assert run["ms_per_step"] > 0
    assert (tmp_path / "compare.png").exists() == PLOTS


def test_lr_transfer_end_to_end(tmp_path):
    main(["lr-transfer", *TINY, "--multipliers", "1,2", "--scion-lrs", "0.01,0.02",
          "--adamw-lrs", "0.004", "--out", str(tmp_path)])  # fmt: skip
    result = json.loads((tmp_path / "lr_transfer.json").read_text())
    assert result["widths"] == [8, 16]
    assert set(result["results"]["scion"]["16"]) == {"0.01", "0.02"}
    assert all(_finite(v) for w in result["results"]["adamw"].values() for v in w.values())
    assert (tmp_path / "lr_transfer.png").exists() == PLOTS


def test_norms_end_to_end(tmp_path):
    main(["norms", *TINY, "--steps", "6", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "norms.json").read_text())
    for name in ("scion", "uscion"):
        history = result[name]["history"]
        # 2-layer... 1 block: qkv, proj, fc, out (the embeddings and head use Sign).
        assert set(history) == {"blocks.0.qkv.weight", "blocks.0.proj.weight",
                                "blocks.0.fc.weight", "blocks.0.out.weight"}  # fmt: skip
        assert all(len(h) == 6 for h in history.values())
    assert (tmp_path / "norms.png").exists() == PLOTS


def test_bad_optimizer_name():
    with pytest.raises(SystemExit):
        main(["compare", *TINY, "--optimizers", "sgd"])
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("sgd", torch.nn.Linear(2, 2))


def test_constrained_scion_stays_in_its_ball():
    """Constrained Scion, started on the sphere (opt.init), keeps every hidden layer's
    ‖W‖₂ within ρ·s times the largest singular value Newton–Schulz leaves (≤ 1.25 for the
    classic coefficients); unconstrained Scion at a large learning rate leaves it."""
    data, val, vocab = char_data()
    worst = {}
    for name, lr in (("scion", 0.2), ("uscion", 0.2)):
        torch.manual_seed(0)
        model = TinyGPT(vocab, dim=32, layers=1, heads=2, ctx=16)
        opt = make_optimizer(name, model, lr=lr)
        monitor = NormMonitor(opt)
        train(name, model, opt, data, val, steps=30, batch=4, ctx=16, val_batches=1,
              on_step=lambda step, loss, m=monitor: m.record(step))  # fmt: skip
        worst[name] = monitor.worst_ratio()
    assert worst["scion"] <= 1.25
    assert worst["uscion"] > 2.0


@pytest.mark.parametrize(
    "shape",
    [(64, 64), (7, 129), (129, 7), (1, 33), (48, 16, 3)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("kind", ["gaussian", "near_orthogonal", "decaying"])
def test_monitor_norms_match_matrix_norm(shape, kind):
    """NormMonitor's power iteration against torch.linalg.matrix_norm(ord=2) within 1%: on the
    first record (60 Lanczos steps) and after the weights move (10 warm-started ones)."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, kind)).encode()))
    w = torch.randn(shape, generator=gen)
    m = w.reshape(shape[0], -1)
    if kind != "gaussian":
        u, _, vh = torch.linalg.svd(m, full_matrices=False)
        k = min(m.shape)
        if kind == "near_orthogonal":  # what Scion's updates are made of: a flat spectrum
            s = 1 + 0.01 * torch.rand(k, generator=gen)
        else:
            s = torch.logspace(0, -3, k)
        m = u @ torch.diag(s) @ vh
        w = m.reshape(shape)
    param = torch.nn.Parameter(w.clone())
    opt = Scion([param], norm="Auto", scale=2.0)
    monitor = NormMonitor(opt)
    for step in range(2):
        ratios = monitor.record(step)
        exact = torch.linalg.matrix_norm(param.detach().reshape(shape[0], -1).double(), ord=2)
        (name,) = monitor.names
        _, sigma, radius = monitor.history[name][-1]
        assert sigma == pytest.approx(exact.item(), rel=0.01)
        assert ratios[name] == pytest.approx(sigma / radius)
        with torch.no_grad():  # move the weights as a step would
            param.add_(
                0.05 * torch.randn(shape, generator=gen) * exact.item() / math.sqrt(m.numel())
            )


def test_monitor_watches_spectral_layers_with_names():
    model = TinyGPT(11, dim=16, layers=1, heads=2, ctx=8)
    opt = Scion(param_groups(model, "gpt"))
    monitor = NormMonitor(opt)
    assert monitor.names == ["blocks.0.qkv.weight", "blocks.0.proj.weight",
                             "blocks.0.fc.weight", "blocks.0.out.weight"]  # fmt: skip
    # ρ·s with the gpt recipe's hidden radius 50 and s = √(d_out/d_in).
    radii = [r for _, _, r in monitor._watched]
    assert radii == pytest.approx([50 * math.sqrt(3), 50.0, 50 * 2.0, 50 * 0.5])


def test_spectral_norm_of_zero_and_rank_one():
    assert spectral_norm(torch.zeros(5, 3))[0] == 0.0
    a, b = torch.randn(6, 1), torch.randn(1, 4)
    assert spectral_norm(a @ b)[0] == pytest.approx((a.norm() * b.norm()).item(), rel=1e-5)


def test_quickstart_example_runs():
    """examples/quickstart.py, shortened: both optimizers train and the table prints."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    done = subprocess.run(
        [sys.executable, str(root / "examples" / "quickstart.py"), "--steps", "3", "--batch", "2"],
        capture_output=True, text=True, timeout=300, check=False, cwd=root,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout.splitlines()[-2:]
    assert [line.split()[0] for line in table] == ["Scion", "AdamW"]
    assert all(math.isfinite(float(x)) for line in table for x in line.split()[1:])
