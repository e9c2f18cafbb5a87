"""The benchmark harness (schema, FLOP counts, report) and the CPU micro-benchmarks.

The micro-benchmarks are ``pytest-benchmark`` tests marked ``benchmark``: deselected from the
normal run, selected with ``pytest -m benchmark``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.common import Context, device_slug, format_table, newton_schulz_flops
from bench.report import write_all
from scion_kernels import RECIPES, Scion, newton_schulz, param_groups

ROOT = Path(__file__).resolve().parents[1]


def _ctx():
    return Context(device=torch.device("cpu"), quick=True, repeats=1, log=lambda s: None)


def test_dense_flop_count_matches_the_design_numbers():
    # docs/math.md §4: five steps on 4096×4096 are 2.06 TFLOP dense; 768×3072 about 8 GFLOP a step.
    assert newton_schulz_flops(4096, 4096) == pytest.approx(2.06e12, rel=5e-3)
    assert newton_schulz_flops(768, 3072, steps=1) == pytest.approx(8.15e9, rel=5e-3)
    assert newton_schulz_flops(3072, 768) == newton_schulz_flops(768, 3072)
    assert newton_schulz_flops(8, 8, batch=32) == 32 * newton_schulz_flops(8, 8)


@pytest.mark.parametrize(
    "row, match",
    [
        ({"bench": "polar", "backend": "torch", "shape": [1, 2, 2]}, "missing"),
        (
            {"bench": "polar", "backend": "torch", "ms": 1.0, "shape": [1, 2, 2], "gflops": 1},
            "unknown",
        ),
        ({"bench": "matmul", "backend": "torch", "ms": 1.0, "shape": [1, 2, 2]}, "unknown bench"),
        ({"bench": "step", "backend": "torch", "ms": 1.0}, "exactly one of shape and model"),
    ],
)
def test_rows_are_validated(row, match):
    with pytest.raises(ValueError, match=match):
        _ctx().add(**row)


def test_report_writes_json_markdown_and_plots(tmp_path):
    ctx = _ctx()
    for n in (64, 128):
        ctx.add(
            bench="polar",
            backend="torch",
            coefficients="classic",
            shape=[1, n, n],
            ms=n / 64,
            tflops=0.1,
            rel_err=0.1,
            sv_min=0.5,
            sv_max=1.1,
        )
    ctx.add(
        bench="step",
        backend="torch",
        model="gpt2-small",
        optimizer="Scion",
        ms=3.0,
        state_bytes=1000,
    )
    header = {
        "device": "Test CPU",
        "commit": "abc",
        "date": "2026-01-01",
        "torch": "x",
        "triton": None,
        "cuda": None,
        "suite": "quick",
        "matrix_tflops": {"bfloat16": 0.5, "float32": 0.1},
    }
    paths = write_all(tmp_path, header, ctx.rows)
    data = json.loads((tmp_path / "quick.json").read_text())
    assert data["device"] == "Test CPU" and len(data["rows"]) == 3
    assert {"device", "commit", "date", "torch", "triton", "cuda", "rows"} <= set(data)
    md = (tmp_path / "quick.md").read_text()
    assert "## Polar factor" in md and "## Optimizer step" in md and "gpt2-small" in md
    assert "float32 matrix rate 0.1 TFLOP/s" in md
    plots = {p.name for p in paths if p.suffix == ".png"}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert plots == set()  # plots are optional: without matplotlib none are written
    else:
        assert plots == {"quick_polar_time.png", "quick_step_time.png"}


def test_helpers():
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    table = format_table([{"a": 1.23456, "b": [1, 2, 3]}], ["a", "b", "c"])
    assert table.splitlines()[2] == "| 1.235 | 1×2×3 |  |"


def test_cpu_timer_measures_something():
    ms = _ctx().time_ms(lambda: sum(range(10000)), repeats=3)
    assert 0 < ms < 1000 and math.isfinite(ms)


def test_host_cost_prints_every_row(capsys):
    from bench import host_cost

    assert host_cost.main(["--steps", "2", "--rounds", "1"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")][2:]
    assert [r.split(" | ")[0] for r in rows] == [
        "| AdamW (foreach)", "| Scion, bf16 Newton–Schulz", "| Scion, float32 Newton–Schulz"
    ]  # fmt: skip
    assert all(float(r.split(" | ")[1]) > 0 for r in rows)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_host_overhead_runs(backend):
    """``bench.host_overhead`` for both backends, in a process of its own (it replaces the
    kernels of the modules it imports): a step's calls are counted, its time printed."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("bench.host_overhead stands in for the Triton kernels: it needs Triton")
    cmd = [sys.executable, "-m", "bench.host_overhead", "--backend", backend, "--layers", "1",
           "--steps", "2"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    calls = re.search(r"(?:native calls|launches) per step: (\d+)", out.stdout)
    assert calls is not None and int(calls.group(1)) > 0, out.stdout
    assert re.search(r"later steps: median \d+\.\d+ ms", out.stdout), out.stdout


# --------------------------------------------------------------------------- micro-benchmarks


@pytest.mark.benchmark(group="polar-512")
@pytest.mark.parametrize("coefficients", ["classic", "polar_express"])
def test_newton_schulz_512(benchmark, coefficients):
    g = torch.randn(512, 512)
    out = benchmark(newton_schulz, g, coefficients)
    assert out.shape == g.shape


@pytest.mark.benchmark(group="polar-512")
def test_svd_512(benchmark):
    g = torch.randn(512, 512)

    def polar():
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        return u @ vh

    assert benchmark(polar).shape == g.shape


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(6)], nn.Linear(256, 10))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


@pytest.mark.benchmark(group="step-mlp")
def test_scion_step(benchmark):
    model = _mlp()
    opt = Scion(param_groups(model, "mlp"), lr=0.01, momentum=0.1)
    benchmark(opt.step)


@pytest.mark.benchmark(group="step-mlp")
def test_pytorch_optimizer_scion_step(benchmark):
    po = pytest.importorskip("pytorch_optimizer")
    model = _mlp()
    opt = po.SCION(model.parameters(), lr=0.01, momentum=0.1)
    benchmark(opt.step)


def test_recipes_sweep_writes_its_table(tmp_path):
    """``python -m bench.recipes`` on one model, a few steps: one row per run, in both files."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    from bench import recipes

    argv = ["--models", "llama,nope", "--steps", "3", "--adamw", "0.001", "--init", "0,1"]
    assert recipes.main([*argv, "--seeds", "2", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "recipes.json").read_text())
    rows = record["rows"]
    assert [r["optimizer"] for r in rows if "optimizer" in r] == ["AdamW"] + ["Scion stock"] * 6
    assert rows[-1] == {"model": "nope", "skipped": "unknown model 'nope'"}
    for r in rows[:-1]:
        assert len(r["finals"]) == 2 and all(math.isfinite(f) for f in r["finals"])
        assert r["final"] == pytest.approx(sum(r["finals"]) / 2)
        assert r["finals"][0] != r["finals"][1]  # the seeds differ
    table = (tmp_path / "recipes.md").read_text()
    assert table.count("| llama |") == 7 and "skipped: unknown model" in table


#: Per held-out family: (parameter-name pattern, role, norm, norm options) rows that must hold,
#: and whether the model has a head of its own (untied).
FAMILIES_III = {
    "phi": ([(r"model\.embed_tokens\.weight", "input", "ColNorm", {"transpose": True}),
             (r"lm_head\.weight", "head", "Sign", {"zero_init": True})], True),
    "falcon": ([(r"transformer\.word_embeddings\.weight", "input", "ColNorm",
                 {"transpose": True})], False),
    "deepseekv3": ([(r".*mlp\.experts\.(gate_up_proj|down_proj)", "hidden", "Spectral",
                     {"batch_dims": 1}),
                    (r".*mlp\.gate\.weight", "hidden", "Spectral", {}),
                    (r".*self_attn\.kv_a_proj_with_mqa\.weight", "hidden", "Spectral", {}),
                    (r"lm_head\.weight", "head", "Sign", {"zero_init": True})], True),
    "gemma3": ([(r"model\.embed_tokens\.weight", "input", "ColNorm", {"transpose": True})],
               False),
    "modernbert": ([(r"model\.embeddings\.tok_embeddings\.weight", "input", "ColNorm",
                     {"transpose": True})], False),
    "distilbert": ([(r"distilbert\.embeddings\.word_embeddings\.weight", "input", "ColNorm",
                     {"transpose": True})], False),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILIES_III))
def test_recipes_families_iii_train(family):
    """The sweep's held-out families (causal and masked LMs) build, get groups without a
    warning about guessed layers, with the named parameters' roles, norms and options (stacked
    experts, router, MLA, tied or untied heads), and take finite steps with and without
    ``init()``; the masked task labels every position with the token the mask hid."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    import warnings

    from bench import recipes

    assert set(FAMILIES_III) == set(recipes.FAMILIES_III)
    task = recipes.tasks()[family]
    if isinstance(task, str):
        pytest.skip(task)
    gen = torch.Generator().manual_seed(0)
    x, y = task.batch(gen)
    if task.loss is recipes._masked_loss:
        masked = x == recipes.VOCAB
        assert masked.any() and torch.equal(x[~masked], y[~masked]) and (y < recipes.VOCAB).all()
    for init in (False, True):
        torch.manual_seed(0)
        model = task.build()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            groups = param_groups(model, task.recipe)
        guessed = ("no rule", "could not run", "the model was not run")
        assert not [w for w in caught if str(w.message).startswith(guessed)], family
        rows, has_head = FAMILIES_III[family]
        got = {n: g for g in groups for n in g["param_names"]}
        for pattern, role, norm, kwargs in rows:
            matched = {n: g for n, g in got.items() if re.fullmatch(pattern, n)}
            assert matched, (family, pattern)
            for name, g in matched.items():
                assert (g["role"], g["norm"], dict(g["norm_kwargs"])) == (role, norm, kwargs), name
        assert any(g["role"] == "head" for g in groups) == has_head, family
        scales = RECIPES[task.recipe].tied_lr_scale  # a tied head: the roles' lr scales
        for g in groups:
            want = 1.0 if has_head else scales.get(g["role"], 1.0)
            assert g.get("lr_scale", 1.0) == want, (family, g["role"])
        opt = Scion(groups, lr=2**-7, momentum=0.1)
        if init:
            opt.init()
        losses = []
        for _ in range(2):
            loss = task.loss(model, *task.batch(gen))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(math.isfinite(v) for v in losses), (family, init, losses)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_init_benchmark_layout_and_row():
    """The init benchmark's 1.1B layout has TinyLlama's parameter count and QR count; on a CPU
    the quick suite times the tiny layout and records a row per ``draws``."""
    from bench import init

    with torch.device("meta"):
        big = init.LlamaLayout("llama-1.1b")
    assert sum(p.numel() for p in big.parameters()) == 1_100_048_384
    groups = param_groups(big, head="head", example_inputs=False)
    # Per block: two 2048² and two 2048×256 draws, three 5632×2048.
    square, kv = 8 * 2048**3 / 3, 4 * 2048 * 256**2 - 4 * 256**3 / 3
    mlp = 4 * 5632 * 2048**2 - 4 * 2048**3 / 3
    assert init.qr_flops(groups) == pytest.approx(22 * (2 * square + 2 * kv + 3 * mlp))
    ctx = Context(device=torch.device("cpu"), quick=True, repeats=1)
    init.run(ctx)
    numel = 2 * 1000 * 128 + 128 + 2 * (2 * 128 * 128 + 2 * 32 * 128 + 3 * 352 * 128 + 2 * 128)
    assert [r["draws"] for r in ctx.rows] == ["shared", "independent"]
    for row in ctx.rows:
        assert row["bench"] == "init" and row["model"] == "llama-tiny" and row["ms"] > 0
        assert row["touch_s"] > 0 and row["numel"] == numel
    assert ctx.rows[1]["tflops"] > 0 and ctx.rows[0]["tflops"] is None


def test_step_benchmark_models_get_the_roles_it_checks():
    """The step benchmark refuses to time a model whose groups are not what it expects; each of
    its models passes that check (GPT-2 with 1 block, to stay small)."""
    from bench import models, step

    for name, build, recipe in [
        ("gpt2-small-1L", lambda: models.GPT2(n_layer=1), "gpt"),
        ("vit-s16", models.ViT, "vit"),
        ("resnet18", models.ResNet18, "cnn"),
    ]:
        model = build()
        step.check_groups(name, model, param_groups(model, recipe))


def test_gpu_check_dry_run_fits_and_writes_two_files(tmp_path):
    """``python -m bench.gpu_check --dry-run``: every stage runs its plumbing and passes, the
    output is one archive and one summary, the archive holds every stage's log and the
    benchmark results, the summary leads with the headline figures, and the package's ``auto``
    table is left alone. The plan fits the run's budget by its own predictions (nothing here
    asserts a speed: the summary records each stage's time)."""
    import tarfile

    from bench import gpu_check
    from bench.choose_backends import TABLE_FILE

    table_before = TABLE_FILE.read_bytes()
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.tar.gz", "summary.md"]
    assert TABLE_FILE.read_bytes() == table_before
    with tarfile.open(tmp_path / "gpu_check.tar.gz") as tar:
        names = set(tar.getnames())
        headline = json.loads(tar.extractfile("gpu_check/bench/headline/check.json").read())
        rest = json.loads(tar.extractfile("gpu_check/bench/rest/check.json").read())
        gram = json.loads(tar.extractfile("gpu_check/bench/gram/check.json").read())
        graphs = json.loads(tar.extractfile("gpu_check/bench/graphs/check.json").read())
    for stage in ("build", "warm-kernels", "warm-polar", "headline", "gram", "graphs", "parity"):
        assert f"gpu_check/logs/{stage}.log" in names
    for stage in ("marked", "memcheck", "racecheck", "rest", "tiles", "table", "warm-tiles0"):
        assert f"gpu_check/logs/{stage}.log" in names
    for name in ("env.json", "summary.md", "auto_table.py", "tests/parity.xml"):
        assert f"gpu_check/{name}" in names
    assert {r["bench"] for r in headline["rows"]} == {"kernels", "polar", "step"}
    assert {r["bench"] for r in rest["rows"]} == {"polar", "elementwise", "init"}
    assert {r["backend"] for r in gram["rows"]} >= {"torch", "torch-gram"}
    assert {(r["optimizer"], r["backend"]) for r in graphs["rows"]} >= {
        ("Scion", "torch"),
        ("AdamW", "torch.optim"),
    }
    summary = (tmp_path / "summary.md").read_text()
    triton = gpu_check._has("triton")  # .ci/run's second pass hides it
    for stage in gpu_check.STAGES:
        ok = "ok" if triton or stage.name != "tiles" else "skipped"  # nothing to time
        assert f"| {stage.name} | {ok} |" in summary
    assert summary.index("## Headline") < summary.index("## Stages")
    assert "eager and replayed as a CUDA graph" in summary
    for figure in ("matrix rate", "| gram |", "Newton–Schulz 5 steps", "Cold Triton compilation"):
        assert figure in summary
    for figure in ("Tile candidates", "Whole optimizer step")[0 if triton else 1 :]:
        assert figure in summary
    assert "tests collected" in summary
    assert gpu_check.PREDICTED_S <= gpu_check.TOTAL_BUDGET_S <= 6 * 60


def test_gpu_check_stopped_midway_leaves_a_summary(tmp_path):
    """A check sent SIGTERM while a stage runs stops that stage, marks it stopped, and leaves
    summary.md and the archive with the stages done."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out)],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:  # stop it once the env stage is done and the next one runs
        if line.startswith("== warm"):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, rest
    summary = (out / "summary.md").read_text()
    assert "| env | ok |" in summary
    assert "| warm | stopped |" in summary
    assert "| parity | pending |" in summary
    assert (out / "gpu_check.tar.gz").exists()


def test_a_stage_past_its_budget_is_stopped_and_the_next_runs(tmp_path):
    """A command that outlives its stage's deadline is stopped (status ``timeout``); the
    check goes on to the next stage."""
    import time

    from bench.gpu_check import Check

    check = Check(work=tmp_path, dry_run=True)
    start = time.monotonic()
    rc = check.command("slow", ["sleep", "30"], deadline=start + 1)
    assert rc == -1 and time.monotonic() - start < 25  # stopped, not run to its 30 s
    assert "stopped at the stage's time budget" in (tmp_path / "logs" / "slow.log").read_text()
    assert check.command("quick", ["true"], deadline=time.monotonic() + 10) == 0


def test_benchmark_stopped_by_sigterm_writes_what_it_measured(tmp_path):
    """The check's bench stage is stopped by SIGTERM at its budget; the run must still write
    its results, marked partial."""
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "bench", "--check", "--device", "cpu", "--only", "step,polar"]
    proc = subprocess.Popen(
        [*cmd, "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:  # the header: SIGTERM is handled from here on
        if line.startswith("scion_kernels benchmarks"):
            break
    proc.send_signal(signal.SIGTERM)  # long before the run could end, on any CPU
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, rest
    data = json.loads((tmp_path / "check.json").read_text())
    assert data.get("partial") is True, rest
