"""The GPU check in one short call: ``python -m bench.gpu_check [--dry-run] [--out DIR]``.

Runs these stages in order, each as its own process stopped at its own time budget (SIGTERM,
then SIGKILL 15 s later), so that one stage that hangs or runs long leaves the later ones their
time. Everything the stages write goes into one archive, ``DIR/gpu_check.tar.gz``, beside one
short ``DIR/summary.md`` (two files: the GPU machine returns at most eight). ``DIR`` defaults
to ``$OUT`` or ``bench/results/gpu-check``.

======================  ======  =========  ==================================================
stage                   budget  predicted  what
======================  ======  =========  ==================================================
``env``                    10 s       2 s  GPU, driver, torch/Triton/CUDA/nvcc versions, commit
``build``                  90 s      40 s  the native module for ``sm_90a`` only
                                           (``SCION_CUDA_ARCHS=90a``, ``pip install -e .``)
``tests``                 120 s      90 s  the GPU parity tests of both backends:
                                           ``test_backends.py``, ``test_native_ns.py``,
                                           ``test_triton.py``, ``test_triton_training.py``
                                           (not the host emulation's cases, which CI runs),
                                           then the ``gpu``-marked tests of ``test_optim.py``
``sanitizer``              45 s      30 s  ``compute-sanitizer --tool memcheck`` over 12 of
                                           the native kernels' tests
``bench``                 200 s     170 s  ``python -m bench --check``: matrix rate, copy
                                           bandwidth, GPT-2 small steps, the polar factor
``table``                  10 s       3 s  the ``backend="auto"`` table from those timings
======================  ======  =========  ==================================================

The budgets add up to 475 s (7.9 min). The predictions and their reasoning are in
``bench/NOTES.md`` ("The GPU check's time budget"). ``--dry-run`` runs every stage's plumbing
on any machine, a CPU included, in well under two minutes:
- ``build`` imports the package instead of building it;
- ``tests`` and ``sanitizer`` collect their selections (``--collect-only``) instead of running
  them;
- ``bench`` runs the check suite, which on a CPU shrinks to plumbing sizes;
- ``table`` writes into the archive, never into ``scion_kernels/``.
A test in CI runs it.

Exit status: 0 when every stage passed or was skipped for want of a tool (say, no
``compute-sanitizer``), else 1.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 15.0
#: The GPU parity tests: every test of these files runs on the GPU when there is one.
PARITY_TESTS = [
    "tests/test_backends.py", "tests/test_native_ns.py", "tests/test_triton.py",
    "tests/test_triton_training.py",
]  # fmt: skip
#: Files whose ``gpu``-marked tests run after them (their other tests are CPU tests).
MARKED_TESTS = ["tests/test_optim.py"]
#: The native kernels' GPU tests run under compute-sanitizer: the one-block and tiled
#: Newton–Schulz paths, a whole optimizer step and the row-wise step (12 tests).
SANITIZED_TESTS = ["tests/test_backends.py", "tests/test_native_ns.py"]
SANITIZED_SELECTION = (
    "(one_block_path_limits or bucket_above_one_argument_block or deterministic"
    " or optimizer_matches_reference_step_by_step or rowwise_zero_and_tiny)"
    " and not triton and not emulated and not torch"
)
#: docs/performance.md's targets, reported against in the summary.
TARGET_NS_4096_MS = 1.8
TARGET_NS_SPEEDUP = 1.4
TARGET_STEP_MS = 4.0


@dataclass
class Stage:
    name: str
    budget: float
    predicted: float
    run: Callable[[Check, float], StageResult]


@dataclass
class StageResult:
    status: str  # "ok", "failed", "timeout", "skipped"
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Check:
    work: Path
    dry_run: bool
    python: str = sys.executable

    def command(self, name: str, cmd: list[str], deadline: float, env: dict | None = None) -> int:
        """Run ``cmd`` in the repository, its output appended to ``logs/<name>.log``; stop it
        at ``deadline`` (``time.monotonic()``). Returns its exit status, or ``-1`` when it was
        stopped."""
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                stdout=f,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                start_new_session=True,
            )
            try:
                return proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=GRACE_S)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
                f.write(f"\n[stopped at the stage's time budget: {shlex.join(cmd[:4])} …]\n")
                return -1

    def log_tail(self, name: str, lines: int = 1) -> str:
        path = self.work / "logs" / f"{name}.log"
        text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        return " / ".join(t.strip() for t in text[-lines:])


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _outcome(rc: int, detail: str = "") -> StageResult:
    status = "ok" if rc == 0 else "timeout" if rc == -1 else "failed"
    return StageResult(status, detail)


# --------------------------------------------------------------------------------- stages
def stage_env(check: Check, deadline: float) -> StageResult:
    """Versions and hardware, in ``env.json`` and ``env.txt``."""
    probe = (
        "import json, torch\n"
        "try:\n import triton; tv = triton.__version__\n"
        "except Exception as e:\n tv = f'not importable: {e}'\n"
        "cuda = torch.cuda.is_available()\n"
        "print(json.dumps({'torch': torch.__version__, 'torch_cuda': torch.version.cuda,\n"
        " 'triton': tv, 'gpu': torch.cuda.get_device_name() if cuda else None,\n"
        " 'capability': list(torch.cuda.get_device_capability()) if cuda else None,\n"
        " 'cpu_capability': torch.backends.cpu.get_cpu_capability()}))\n"
    )
    facts: dict[str, object] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dry_run": check.dry_run,
    }
    out = subprocess.run(
        [check.python, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    if out.returncode == 0:
        facts.update(json.loads(out.stdout.strip().splitlines()[-1]))
    else:
        facts["torch"] = f"not importable: {out.stderr.strip()[-300:]}"
    facts["driver"] = _first_line(
        ["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"]
    )
    facts["nvcc"] = _first_line(["nvcc", "--version"], index=-2)  # "… release 13.0, V13.0.48"
    facts["cmake"] = _first_line(["cmake", "--version"])
    (check.work / "env.json").write_text(json.dumps(facts, indent=1))
    (check.work / "env.txt").write_text("".join(f"{k}: {v}\n" for k, v in facts.items()))
    gpu = facts.get("gpu") or "no GPU"
    return StageResult("ok", f"{gpu}; torch {facts.get('torch')}, triton {facts.get('triton')}")


def stage_build(check: Check, deadline: float) -> StageResult:
    """The native module for sm_90a only, into this checkout (editable install)."""
    build = [check.python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps"]
    build += ["-e", "."]
    probe = [
        check.python,
        "-c",
        "import scion_kernels as s; print('native:', s.native_available())",
    ]
    if check.dry_run:
        rc = check.command("build", probe, deadline)
        return _outcome(rc, f"dry run: not built (would run {shlex.join(build)})")
    env = {"SCION_CUDA_ARCHS": "90a", "MAX_JOBS": str(os.cpu_count() or 1)}
    rc = check.command("build", build, deadline, env)
    if rc != 0:
        return _outcome(rc, check.log_tail("build", 3))
    rc = check.command("build", probe, deadline)
    return _outcome(rc, check.log_tail("build"))


def stage_tests(check: Check, deadline: float) -> StageResult:
    """The GPU parity tests, then the gpu-marked ones; every failure listed."""
    # The host emulation's cases are CPU tests (CI runs them); its build alone takes minutes.
    runs = [
        ("parity", PARITY_TESTS, ["-k", "not emulated"]),
        ("gpu-marked", MARKED_TESTS, ["-m", "gpu"]),
    ]
    details, codes = [], []
    for name, files, extra in runs:
        xml = check.work / "tests" / f"{name}.xml"
        xml.parent.mkdir(exist_ok=True)
        cmd = [
            check.python,
            "-m",
            "pytest",
            "-q",
            "-rfEs",
            "--maxfail=30",
            "-p",
            "no:cacheprovider",
        ]
        cmd += [f"--junitxml={xml}", *extra, *files]
        if check.dry_run:
            cmd.append("--collect-only")
        codes.append(check.command("tests", cmd, deadline))
        details.append(f"{name}: {_pytest_counts(check.log_tail('tests', 3))}")
    rc = -1 if -1 in codes else next((c for c in codes if c != 0), 0)
    return _outcome(rc, "; ".join(details))


def stage_sanitizer(check: Check, deadline: float) -> StageResult:
    """One compute-sanitizer memcheck pass over a small selection of the native kernels'
    tests (on a GPU they run the kernels; without one, their host emulation)."""
    tool = shutil.which("compute-sanitizer") or _cuda_tool("compute-sanitizer")
    pytest = [check.python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    pytest += ["-k", SANITIZED_SELECTION, *SANITIZED_TESTS]
    if check.dry_run:
        rc = check.command("sanitizer", [*pytest, "--collect-only"], deadline)
        found = f"found at {tool}" if tool else "not found"
        return _outcome(rc if rc != 5 else 0, f"dry run: collected only; compute-sanitizer {found}")
    if tool is None:
        return StageResult("skipped", "compute-sanitizer not found")
    cmd = [tool, "--tool", "memcheck", "--error-exitcode", "9", *pytest]
    rc = check.command("sanitizer", cmd, deadline)
    log = (check.work / "logs" / "sanitizer.log").read_text(errors="replace")
    if rc != 0 and "Device not supported" in log:
        # Some sandboxed runtimes (gVisor) refuse the device to compute-sanitizer.
        return StageResult("skipped", "compute-sanitizer: «Device not supported» on this machine")
    return _outcome(rc, check.log_tail("sanitizer", 2))


def stage_bench(check: Check, deadline: float) -> StageResult:
    """``python -m bench --check`` into ``bench/``; a run stopped at the budget keeps its rows."""
    cmd = [check.python, "-m", "bench", "--check", "--only", "elementwise,step,polar"]
    cmd += ["--out", str(check.work / "bench")]
    rc = check.command("bench", cmd, deadline)
    results = check.work / "bench" / "check.json"
    if not results.exists():
        return _outcome(rc or 1, "no results written")
    rows = len(json.loads(results.read_text())["rows"])
    return _outcome(rc, f"{rows} rows" + (" (partial)" if rc == -1 else ""))


def stage_table(check: Check, deadline: float) -> StageResult:
    """The ``auto`` table regenerated from the check's timings, into the archive."""
    results = check.work / "bench" / "check.json"
    if not results.exists():
        return StageResult("skipped", "no benchmark results")
    out = check.work / "_backend_table.py"
    cmd = [check.python, "-m", "bench.choose_backends", str(results), "--out", str(out)]
    rc = check.command("table", cmd, deadline)
    return _outcome(rc, "_backend_table.py in the archive; " + check.log_tail("table"))


STAGES = [
    Stage("env", 10, 2, stage_env),
    Stage("build", 90, 40, stage_build),
    Stage("tests", 120, 90, stage_tests),
    Stage("sanitizer", 45, 30, stage_sanitizer),
    Stage("bench", 200, 170, stage_bench),
    Stage("table", 10, 3, stage_table),
]


# ------------------------------------------------------------------------------- helpers
def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _first_line(cmd: list[str], index: int = 0) -> str:
    """Line ``index`` of what ``cmd`` prints (the first by default), or why there is none."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"not available ({type(e).__name__})"
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not lines:
        return f"not available (exit {out.returncode})"
    return lines[max(-len(lines), min(index, len(lines) - 1))]


def _cuda_tool(name: str) -> str | None:
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / name).exists():
            return str(Path(root) / "bin" / name)
    return None


def _pytest_counts(tail: str) -> str:
    """``"12 passed, 1 skipped"`` from pytest's last lines (or what it printed last)."""
    kinds = r"passed|failed|skipped|errors?|xfailed|deselected|tests? collected"
    found = re.findall(rf"(\d+)(?:/\d+)? ({kinds})", tail)
    if not found:
        return tail[-160:] or "no output"
    return ", ".join(f"{n} {what}" for n, what in found)


def _failures(work: Path) -> list[str]:
    """``file::test: message`` for every failed or erroring test in the JUnit files."""
    out = []
    for xml in sorted((work / "tests").glob("*.xml")):
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError:
            out.append(f"{xml.name}: unreadable (the run was stopped)")
            continue
        for case in root.iter("testcase"):
            for bad in [*case.findall("failure"), *case.findall("error")]:
                msg = (bad.get("message") or "").splitlines()[0][:200] if bad.get("message") else ""
                out.append(f"{case.get('classname')}::{case.get('name')}: {msg}")
    return out


def _key_numbers(work: Path) -> list[str]:
    """The figures the check exists for, each beside its target."""
    path = work / "bench" / "check.json"
    if not path.exists():
        return ["no benchmark results"]
    data = json.loads(path.read_text())
    rows, lines = data["rows"], []
    rates = data.get("matrix_tflops") or {}
    if rates:
        lines.append("matrix rate: " + ", ".join(f"{k} {v:.4g} TFLOP/s" for k, v in rates.items()))
    if data.get("copy_gbps"):
        lines.append(f"copy bandwidth: {data['copy_gbps']:.4g} GB/s")
    polar = [r for r in rows if r.get("bench") == "polar"]
    for shape in sorted({tuple(r["shape"]) for r in polar}, key=lambda s: (-s[1] * s[2], s)):
        at = {r["backend"]: r["ms"] for r in polar if tuple(r["shape"]) == shape}
        ref = at.get("torch")
        cells = []
        for backend, ms in sorted(at.items(), key=lambda kv: kv[1]):
            ratio = f" ({ref / ms:.2f}× torch)" if ref and backend != "torch" else ""
            cells.append(f"{backend} {ms:.4g} ms{ratio}")
        lines.append(f"polar {'×'.join(map(str, shape))}: " + "; ".join(cells))
    big = [r for r in polar if tuple(r["shape"]) == (1, 4096, 4096)]
    ref = next((r["ms"] for r in big if r["backend"] == "torch"), None)
    for r in big:
        if r["backend"] in ("triton", "cuda"):
            ok = (
                r["ms"] <= TARGET_NS_4096_MS
                and ref is not None
                and ref / r["ms"] >= TARGET_NS_SPEEDUP
            )
            lines.append(
                f"target Newton–Schulz 4096² ≤ {TARGET_NS_4096_MS} ms and ≥ {TARGET_NS_SPEEDUP}× "
                f"torch: {r['backend']} {r['ms']:.4g} ms — {'met' if ok else 'not met'}"
            )
    for r in rows:
        if r.get("bench") == "step" and r.get("optimizer") == "Scion":
            line = f"step {r.get('model')} Scion ({r['backend']}): {r['ms']:.4g} ms"
            if r.get("model") == "gpt2-small":
                met = "met" if r["ms"] <= TARGET_STEP_MS else "not met"
                line += f" (target ≤ {TARGET_STEP_MS} ms: {met})"
            lines.append(line)
    return lines or ["no rows"]


def summary(
    check: Check, results: list[tuple[Stage, StageResult]], total: float, command: str
) -> str:
    """The short report: facts, one row per stage, the key figures, the failed tests."""
    env = (
        json.loads((check.work / "env.json").read_text())
        if (check.work / "env.json").exists()
        else {}
    )
    lines = [
        "# GPU check" + (" (dry run)" if check.dry_run else ""),
        "",
        f"{env.get('date', '?')}, commit {env.get('commit', '?')}"
        f"{' (dirty)' if env.get('dirty') else ''}; {env.get('gpu') or 'no GPU'}, driver "
        f"{env.get('driver', '?')}; torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda')}),"
        f" triton {env.get('triton', '?')}, Python {env.get('python', '?')}; nvcc "
        f"{env.get('nvcc', '?')}. Command: `{command}`.",
        "",
        "| stage | status | seconds | budget | predicted (GPU) | detail |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for stage, r in results:
        detail = r.detail.replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {stage.name} | {r.status} | {r.seconds:.1f} | {stage.budget:g} "
            f"| {stage.predicted:g} | {detail} |"
        )
    lines += ["", f"Total {total:.1f} s of {sum(s.budget for s in STAGES):g} s budgeted.", ""]
    lines += ["## Results", "", *(f"- {line}" for line in _key_numbers(check.work)), ""]
    failures = _failures(check.work)
    lines += ["## Failed tests", ""]
    lines += [f"- {f}" for f in failures] if failures else ["none"]
    lines += [
        "",
        "Everything else (logs, JUnit XML, benchmark JSON/Markdown/plots, the regenerated",
        "`_backend_table.py`, env.json) is in `gpu_check.tar.gz`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    p.add_argument("--dry-run", action="store_true", help="every stage's plumbing, on any machine")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench/results/gpu-check"))
    p.add_argument("--only", default="", help="comma list of stages (default: all)")
    args = p.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - {s.name for s in STAGES}
    if unknown:
        p.error(f"unknown stage(s) {sorted(unknown)}; stages are {[s.name for s in STAGES]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-")) / "gpu_check"
    work.mkdir()
    check = Check(work=work, dry_run=args.dry_run)
    results: list[tuple[Stage, StageResult]] = []
    start = time.monotonic()
    for stage in STAGES:
        if only and stage.name not in only:
            continue
        t0 = time.monotonic()
        print(f"== {stage.name} (budget {stage.budget:g} s)", flush=True)
        try:
            r = stage.run(check, t0 + stage.budget)
        except Exception as e:  # noqa: BLE001 - a stage's own bug must not stop the others
            r = StageResult("failed", f"{type(e).__name__}: {e}")
        r.seconds = time.monotonic() - t0
        print(f"   {r.status} in {r.seconds:.1f} s: {r.detail}", flush=True)
        results.append((stage, r))
    command = shlex.join(
        ["python", "-m", "bench.gpu_check", *(argv if argv is not None else sys.argv[1:])]
    )
    text = summary(check, results, time.monotonic() - start, command)
    (work / "summary.md").write_text(text)
    (out / "summary.md").write_text(text)
    with tarfile.open(out / "gpu_check.tar.gz", "w:gz") as tar:
        tar.add(work, arcname="gpu_check")
    shutil.rmtree(work.parent, ignore_errors=True)
    print(text)
    print(f"wrote {out / 'summary.md'} and {out / 'gpu_check.tar.gz'}")
    return 0 if all(r.status in ("ok", "skipped") for _, r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
