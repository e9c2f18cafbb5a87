"""The GPU check in one short call: ``python -m bench.gpu_check [--dry-run] [--out DIR]``.

A GPU machine is lent rarely and briefly, so this check is built to return answers however it
ends. It runs the stages below, each as its own process group stopped at its own time budget,
the whole run at most ``TOTAL_BUDGET_S`` (a stage that no longer fits is skipped, saying so).
``DIR/summary.md`` (default ``$OUT``, else ``bench/results/gpu-check``) is rewritten every few
seconds while a stage runs and after every stage, with the headline figures first and the rows
measured so far; ``DIR/gpu_check.tar.gz`` (logs, JUnit XML, benchmark JSON and JSON lines, the
regenerated ``auto`` table) is rewritten after every stage. A run killed at any point leaves
both, as of its last stage (summary: its last few seconds).

=============  ======  =========  ===============================================================
stage          budget  predicted  what
=============  ======  =========  ===============================================================
``env``          15 s       5 s   GPU, driver, torch/Triton/CUDA/nvcc versions, commit
``build``       120 s      45 s   in the background from the start: the native module for
                                  ``sm_90a`` only, offline (``pip --no-index -v``), with
                                  ``-Xptxas -v`` (registers, spills) in its log
``warm``         60 s      35 s   the Triton kernels the measurements use, compiled cold in
                                  parallel processes (``bench.warm``, ``bench.tiles --warm``):
                                  the compile-time figure
``headline``     90 s      63 s   ``bench --check`` kernels (each product at 4096² and GPT-2
                                  small's buckets, beside cuBLAS), Newton–Schulz at 4096² per
                                  backend (the native one on mma.sync and on wgmma), GPT-2
                                  small steps with peak memory
``gram``         30 s      28 s   Newton–Schulz at 4096×16384 (an MLP matrix of aspect 4) and
                                  GPT-2's 768×3072, plain and in the Gram form, per backend
``graphs``       45 s      25 s   a GPT-2-small step eager and replayed as a CUDA graph, per
                                  backend, beside fused AdamW and Muon (``bench.graph``)
``parity``      110 s      80 s   the parity tests of every backend (``pytest -n 8``; the host
                                  emulation's cases are CPU tests, left to CI)
``marked``       20 s      10 s   the ``gpu``-marked tests of ``test_optim.py``
``memcheck``     40 s      25 s   ``compute-sanitizer --tool memcheck`` over 14 native tests,
                                  PyTorch's caching allocator off (so overruns are seen)
``racecheck``    30 s      20 s   ``compute-sanitizer --tool racecheck`` over 5 native tests
``rest``         60 s      34 s   the polar factor at the check's other shapes, the memory-bound
                                  stages, ``init()`` on a 1.1B Llama layout (``bench.init``)
``tiles``        50 s      30 s   every tile candidate of the Triton products at 4096², 1024²
                                  and GPT-2 small's buckets (``bench.tiles``)
``table``        10 s       3 s   the ``backend="auto"`` table from the timings, into the archive
=============  ======  =========  ===============================================================

Predicted on the H200: about 358 s of the ``TOTAL_BUDGET_S`` = 360 s (bench/NOTES.md, "First
contact with an H200", gives the reasoning and the first run's figures per stage). Tests are
stopped with SIGINT first, so pytest still writes its summary and JUnit XML; benchmarks with
SIGTERM, on which they write what they measured.

``--dry-run`` runs every stage's plumbing on any machine, a CPU included, in about a minute:
``build`` imports the package instead of building it; ``warm`` and the kernel rows run in
Triton's interpreter at plumbing sizes (the ``step`` warm target is left out: minutes there);
the tests and sanitizer stages collect their selections (``--collect-only``); the benchmarks
shrink to plumbing sizes; ``table`` writes into the archive, never into ``scion_kernels/``.
A test in CI runs it, and stops one with SIGTERM midway.

Exit status: 0 when every stage passed or was skipped for want of a tool (say, no
``compute-sanitizer``), else 1.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: The whole run, in seconds (6 minutes: a rerun still fits the 15 minutes of a lease).
TOTAL_BUDGET_S = 360.0
#: A stage stopped at its budget gets this long after its first signal, then SIGKILL.
GRACE_S = 10.0
#: How often the summary is rewritten while a stage runs.
REFRESH_S = 5.0
#: What stopping a stage at its budget can take: ``GRACE_S``, then SIGTERM and SIGKILL.
STOP_S = GRACE_S + 6.0
#: A stage is not started with less than this left of the whole run.
MIN_STAGE_S = 5.0

#: The parity tests: every backend's test of these files runs on the GPU when there is one.
PARITY_TESTS = [
    "tests/test_backends.py", "tests/test_native_ns.py", "tests/test_triton.py",
    "tests/test_triton_training.py",
]  # fmt: skip
#: Files whose ``gpu``-marked tests run after them (their other tests are CPU tests).
MARKED_TESTS = ["tests/test_optim.py"]
#: The native kernels' GPU tests run under compute-sanitizer: the one-block and tiled
#: Newton–Schulz paths, a whole optimizer step, the grouped step and the wgmma products, one
#: block per tile and persistent (14 tests) for memcheck, the five that launch every native
#: kernel once for racecheck (much slower per launch).
SANITIZED_TESTS = ["tests/test_backends.py", "tests/test_native_ns.py"]
_NATIVE_ONLY = " and not triton and not emulated and not torch"
SANITIZED_SELECTION = (
    "(one_block_path_limits or bucket_above_one_argument_block or deterministic"
    " or optimizer_matches_reference_step_by_step or grouped_zero_and_tiny or wgmma_on_device"
    " or wgmma_persistent)" + _NATIVE_ONLY
)
RACECHECK_SELECTION = (
    "(one_block_path_limits or bucket_above_one_argument_block or deterministic"
    " or wgmma_on_device)" + _NATIVE_ONLY
)
#: The headline's polar factor: docs/performance.md's target shape, every step backend and
#: the peers that take no compilation (``torch_compile`` is left to the full suite).
HEADLINE_POLAR = "1x4096x4096"
POLAR_BACKENDS = (
    "torch,triton,cuda,cuda-wgmma,cuda-wgmma-smem,cuda-wgmma-wide-apply,cuda-wgmma-wide,"
    "cuda-wgmma-persistent,torch.optim.Muon,svd"
)
#: The other polar shapes of the check (bench/polar.py's ``CHECK_SHAPES`` after 4096²).
REST_POLAR = "1x768x768,1x768x2304,1x768x3072,1x3072x768,32x2048x5464,1x1024x1024,1x8192x8192"
#: The Gram form's shapes (issue 28's 4096×16384 target, and GPT-2's MLP matrices) and backends.
GRAM_POLAR = "1x4096x16384,12x768x3072"
GRAM_BACKENDS = (
    "torch,triton,cuda,torch-gram,triton-gram,cuda-gram,cuda-wgmma-gram,cuda-wgmma-smem-gram,"
    "cuda-wgmma-wide-apply-gram,cuda-wgmma-wide-gram,cuda-wgmma-persistent-gram"
)
#: Processes compiling the tile candidates of bench/tiles.py in the warm stage.
TILE_WARM_PROCESSES = 6
#: docs/performance.md's targets, reported against in the summary.
TARGET_NS_4096_MS = 1.8
TARGET_NS_SPEEDUP = 1.4
TARGET_STEP_MS = 4.0
#: Issue 28's target for 5 steps on a 4096×16384 matrix through the Gram form.
TARGET_GRAM_MS = 4.0
#: Issue 26's target for a GPT-2-small Scion step replayed as a CUDA graph (bench/NOTES.md).
TARGET_GRAPH_STEP_MS = 2.5


class Stopped(Exception):
    """The check itself was sent SIGTERM or SIGINT."""


@dataclass
class Stage:
    name: str
    budget: float
    predicted: float
    run: Callable[[Check, float], StageResult]


@dataclass
class StageResult:
    status: str  # "ok", "failed", "timeout", "skipped", "running", "stopped"
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Job:
    """A command running in its own process group, its output appended to a log."""

    name: str
    cmd: list[str]
    proc: subprocess.Popen
    log: Any
    started: float
    #: The first signal at the budget, and whether it goes to the whole process group or to
    #: the leading process only (as Ctrl-C reaches pytest's xdist controller, which then
    #: stops its workers and still writes its summary and XML).
    stop: int = signal.SIGTERM
    stop_group: bool = True


@dataclass
class Check:
    work: Path
    dry_run: bool
    out: Path | None = None
    python: str = sys.executable
    results: dict[str, StageResult] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    command_line: str = ""
    jobs: list[Job] = field(default_factory=list)
    _refreshed: float = 0.0

    # -------------------------------------------------------------------------- processes
    def spawn(
        self,
        name: str,
        cmd: list[str],
        env: dict | None = None,
        stop: int = signal.SIGTERM,
        stop_group: bool = True,
    ) -> Job:
        """Start ``cmd`` in the repository, in a new process group (killed with the check
        if the check itself is killed), its output appended to ``logs/<name>.log``."""
        path = self.work / "logs" / f"{name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        log = path.open("a")
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        # No signal between the start and the bookkeeping: a stop must see every child.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            job = Job(name, cmd, proc, log, time.monotonic(), stop, stop_group)
            self.jobs.append(job)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return job

    def wait(self, jobs: list[Job], deadline: float) -> list[int]:
        """Wait for ``jobs``, rewriting the summary every ``REFRESH_S``; at ``deadline`` stop
        the ones still running (:func:`_stop_all`). Returns each job's exit status, ``-1`` for
        one that was stopped."""
        while any(j.proc.poll() is None for j in jobs) and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            self.refresh()
        late = [j for j in jobs if j.proc.poll() is None]
        for job in late:
            job.log.write(f"\n[stopped at the stage's time budget: {shlex.join(job.cmd[:4])} …]\n")
            job.log.flush()
        _stop_all(late, GRACE_S)
        codes = []
        for job in jobs:
            codes.append(-1 if job in late else job.proc.returncode)
            _kill_group(job)  # whatever it left behind
            job.log.close()
            if job in self.jobs:
                self.jobs.remove(job)
        return codes

    def command(
        self,
        name: str,
        cmd: list[str],
        deadline: float,
        env: dict | None = None,
        stop: int = signal.SIGTERM,
        stop_group: bool = True,
    ) -> int:
        """Run ``cmd`` (see :meth:`spawn`) and wait for it until ``deadline``
        (``time.monotonic()``). Returns its exit status, or ``-1`` when it was stopped."""
        return self.wait([self.spawn(name, cmd, env, stop, stop_group)], deadline)[0]

    def stop_all(self, grace: float = 3.0) -> None:
        """Stop every running job at once (the check itself is being stopped)."""
        jobs = list(self.jobs)
        _stop_all(jobs, grace)
        for job in jobs:
            _kill_group(job)
            job.log.close()
        self.jobs.clear()

    def log_tail(self, name: str, lines: int = 1) -> str:
        path = self.work / "logs" / f"{name}.log"
        text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        return " / ".join(t.strip() for t in text[-lines:])

    # ---------------------------------------------------------------------------- outputs
    def refresh(self, force: bool = False) -> None:
        """Rewrite summary.md (in the work folder and ``out``), at most every ``REFRESH_S``
        unless ``force``."""
        now = time.monotonic()
        if not force and now - self._refreshed < REFRESH_S:
            return
        self._refreshed = now
        try:
            text = summary(self, now - self.started)
        except Exception as e:  # noqa: BLE001 - a report's own bug must not stop the check
            text = f"# GPU check\n\nThe summary could not be written: {type(e).__name__}: {e}\n"
        (self.work / "summary.md").write_text(text)
        if self.out is not None:
            _atomic_write(self.out / "summary.md", text.encode())

    def archive(self) -> None:
        """Rewrite gpu_check.tar.gz from the work folder."""
        if self.out is None:
            return
        tmp = self.out / ".gpu_check.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(self.work, arcname="gpu_check")
        os.replace(tmp, self.out / "gpu_check.tar.gz")


def _stop_all(jobs: list[Job], grace: float) -> None:
    """Stop ``jobs`` together: each its own first signal, then, for those still running after
    ``grace`` seconds, SIGTERM and 3 s later SIGKILL to their whole groups."""
    for job in jobs:
        _signal(job, job.stop, group=job.stop_group)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        until = time.monotonic() + (grace if sig == signal.SIGTERM else 3.0)
        while any(j.proc.poll() is None for j in jobs) and time.monotonic() < until:
            time.sleep(0.05)
        for job in jobs:
            if job.proc.poll() is None:
                _signal(job, sig, group=True)
    for job in jobs:
        try:
            job.proc.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            pass


def _signal(job: Job, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(job.proc.pid, sig)
        else:
            os.kill(job.proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group(job: Job) -> None:
    """SIGKILL whatever is left of a job's process group (its leader has exited)."""
    _signal(job, signal.SIGKILL, group=True)


def _die_with_parent() -> None:
    """In a child before it runs: SIGKILL it when the check dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
        "p = torch.cuda.get_device_properties(0) if cuda else None\n"
        "print(json.dumps({'torch': torch.__version__, 'torch_cuda': torch.version.cuda,\n"
        " 'triton': tv, 'gpu': torch.cuda.get_device_name() if cuda else None,\n"
        " 'capability': list(torch.cuda.get_device_capability()) if cuda else None,\n"
        " 'sms': p.multi_processor_count if p else None,\n"
        " 'memory_gib': round(p.total_memory / 2**30, 1) if p else None,\n"
        " 'cpu_capability': torch.backends.cpu.get_cpu_capability()}))\n"
    )
    facts: dict[str, object] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "dry_run": check.dry_run,
    }
    try:
        out = subprocess.run(
            [check.python, "-c", probe],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=max(1.0, deadline - time.monotonic()),
        )
        if out.returncode == 0:
            facts.update(json.loads(out.stdout.strip().splitlines()[-1]))
        else:
            facts["torch"] = f"not importable: {out.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired:
        facts["torch"] = "probe timed out"
    facts["driver"] = _first_line(
        ["nvidia-smi", "--query-gpu=driver_version,memory.total,clocks.sm", "--format=csv,noheader"]
    )
    facts["nvcc"] = _first_line(["nvcc", "--version"], index=-2)  # "… release 13.0, V13.0.48"
    facts["cmake"] = _first_line(["cmake", "--version"])
    facts["plugins"] = {m: _has(m) for m in ("xdist", "pytest_timeout", "transformers")}
    (check.work / "env.json").write_text(json.dumps(facts, indent=1))
    (check.work / "env.txt").write_text("".join(f"{k}: {v}\n" for k, v in facts.items()))
    gpu = facts.get("gpu") or "no GPU"
    return StageResult("ok", f"{gpu}; torch {facts.get('torch')}, triton {facts.get('triton')}")


def _build_command(check: Check) -> list[str]:
    cmd = [check.python, "-m", "pip", "install", "--no-index", "--no-build-isolation"]
    return cmd + ["--no-deps", "--disable-pip-version-check", "-v", "-e", "."]


#: Run after the build (and instead of it in a dry run): whether the native module loads.
NATIVE_PROBE = (
    "from scion_kernels.backends.cuda import native as n; "
    "print('native:', n.native_available(), n.native_import_error() or '')"
)


def start_build(check: Check) -> Job:
    """The native module for sm_90a only, into this checkout (editable install), offline, its
    log verbose; or, in a dry run, an import of the package."""
    if check.dry_run:
        return check.spawn("build", [check.python, "-c", NATIVE_PROBE])
    env = {
        "SCION_CUDA_ARCHS": "90a",
        "MAX_JOBS": str(os.cpu_count() or 1),
        "CUDAFLAGS": "-Xptxas=-v",  # CMake's initial CUDA flags: ptxas's per-kernel report
    }
    return check.spawn("build", _build_command(check), env)


def finish_build(check: Check, job: Job, deadline: float) -> StageResult:
    rc = check.wait([job], deadline)[0]
    if check.dry_run:
        return _outcome(rc, f"dry run: not built (would run {shlex.join(_build_command(check))})")
    if rc != 0:
        return _outcome(rc, check.log_tail("build", 3))
    rc = check.command("build", [check.python, "-c", NATIVE_PROBE], deadline + 20)
    return _outcome(rc, check.log_tail("build") + "; " + _ptxas_report(check))


def _ptxas_report(check: Check) -> str:
    """One line from ptxas's per-kernel reports in the build log: kernels, most registers,
    any spills or stack."""
    path = check.work / "logs" / "build.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    regs = [int(n) for n in re.findall(r"Used (\d+) registers", text)]
    spills = [
        int(a) + int(b)
        for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    ]
    if not regs:
        return "no ptxas report in the log"
    spilled = sum(1 for s in spills if s)
    return f"ptxas: {len(regs)} kernels, ≤ {max(regs)} registers, {spilled} spill"


def stage_warm(check: Check, deadline: float) -> StageResult:
    """The Triton kernels the measurements use, compiled cold in parallel processes."""
    py = [check.python, "-m"]
    targets = {t: [*py, "bench.warm", t] for t in ("kernels", "polar", "step")}
    parts = 1 if check.dry_run else TILE_WARM_PROCESSES
    for i in range(parts):
        targets[f"tiles{i}"] = [*py, "bench.tiles", "--warm", f"{i}/{parts}"]
    if check.dry_run:
        del targets["step"]  # minutes in the interpreter
    env = {"TRITON_INTERPRET": "1"} if check.dry_run else {}
    t0 = time.monotonic()
    jobs = [check.spawn(f"warm-{t}", cmd, env) for t, cmd in targets.items()]
    codes = check.wait(jobs, deadline)
    wall = time.monotonic() - t0
    parts = []
    for t, rc in zip(targets, codes, strict=True):
        line = check.log_tail(f"warm-{t}")
        found = re.search(r": ([\d.]+) s", line)
        if found:
            parts.append(f"{t} {found.group(1)} s")
        else:
            why = "skipped" if "skipped" in line else "stopped" if rc == -1 else "failed"
            parts.append(f"{t} {why}")
    rc = -1 if -1 in codes else next((c for c in codes if c != 0), 0)
    (check.work / "compile.json").write_text(json.dumps({"wall_s": wall, "targets": parts}))
    return _outcome(
        rc,
        f"cold compile, {len(targets)} processes at once: {wall:.1f} s wall ({', '.join(parts)})",
    )


def _bench(check: Check, name: str, args: list[str], deadline: float) -> StageResult:
    """``python -m bench --check`` with ``args`` into ``bench/<name>``; rows also as JSON lines
    the moment they are measured; a run stopped at the budget keeps its rows."""
    folder = check.work / "bench" / name
    cmd = [check.python, "-m", "bench", "--check", *args, "--out", str(folder)]
    cmd += ["--progress", str(check.work / "bench" / f"{name}.jsonl")]
    env = {"TRITON_INTERPRET": "1"} if check.dry_run else {}
    rc = check.command(name, cmd, deadline, env)
    rows = _jsonl(check.work / "bench" / f"{name}.jsonl")
    written = (folder / "check.json").exists()
    detail = (
        f"{len(rows)} rows"
        + ("" if written else ", no results file")
        + (" (partial)" if rc == -1 else "")
    )
    return _outcome(rc if written or rc == -1 else rc or 1, detail)


def stage_headline(check: Check, deadline: float) -> StageResult:
    args = ["--only", "kernels,polar,step", "--polar-backends", POLAR_BACKENDS]
    args += ["--polar-shapes", "1x64x64" if check.dry_run else HEADLINE_POLAR]
    return _bench(check, "headline", args, deadline)


def stage_gram(check: Check, deadline: float) -> StageResult:
    """Newton–Schulz on wide matrices, plain and in the Gram form (``polar="gram"``)."""
    args = ["--only", "polar", "--polar-backends", GRAM_BACKENDS]
    args += ["--polar-shapes", "1x32x96" if check.dry_run else GRAM_POLAR]
    return _bench(check, "gram", args, deadline)


def stage_graphs(check: Check, deadline: float) -> StageResult:
    """A GPT-2-small optimizer step eager and replayed as a CUDA graph (bench/graph.py)."""
    return _bench(check, "graphs", ["--only", "graph"], deadline)


def stage_tiles(check: Check, deadline: float) -> StageResult:
    """Every tile candidate of the Triton products at the shapes that matter (bench/tiles.py),
    compiled by the warm stage."""
    folder = check.work / "bench" / "tiles"
    progress = check.work / "bench" / "tiles.jsonl"
    cmd = [check.python, "-m", "bench.tiles", "--progress", str(progress), "--out", str(folder)]
    env = {"TRITON_INTERPRET": "1"} if check.dry_run else {}
    rc = check.command("tiles", cmd, deadline, env)
    if rc == 0 and "skipped" in check.log_tail("tiles"):
        return StageResult("skipped", check.log_tail("tiles"))
    return _outcome(rc, f"{len(_jsonl(progress))} rows" + (" (partial)" if rc == -1 else ""))


def stage_rest(check: Check, deadline: float) -> StageResult:
    args = ["--only", "polar,elementwise,init", "--polar-backends", POLAR_BACKENDS]
    args += ["--polar-shapes", "2x48x96" if check.dry_run else REST_POLAR]
    return _bench(check, "rest", args, deadline)


def _pytest(
    check: Check,
    name: str,
    files: list[str],
    extra: list[str],
    deadline: float,
    *,
    workers: int = 0,
    prefix: list[str] | None = None,
    env: dict | None = None,
) -> StageResult:
    """One pytest run with its JUnit XML, stopped with SIGINT at the budget (so it still
    writes both its summary and the XML)."""
    xml = check.work / "tests" / f"{name}.xml"
    xml.parent.mkdir(exist_ok=True)
    cmd = [*(prefix or []), check.python, "-m", "pytest", "-q", "-rfEs", "--maxfail=50"]
    cmd += ["-p", "no:cacheprovider", f"--junitxml={xml}", *extra, *files]
    xdist = bool(workers) and _has("xdist") and not check.dry_run
    if xdist:
        cmd += ["-n", str(workers)]
    if _has("pytest_timeout") and not check.dry_run:
        cmd += ["--timeout=60"]  # one hung test fails alone instead of eating the stage
    if check.dry_run:
        cmd.append("--collect-only")
    # SIGINT as Ctrl-C sends it: to xdist's controller alone (it stops its workers), else to
    # the whole group (compute-sanitizer and the pytest under it).
    rc = check.command(name, cmd, deadline, env, stop=signal.SIGINT, stop_group=not xdist)
    counts = _pytest_counts(check.log_tail(name, 12))
    if rc == 5 and check.dry_run:  # nothing selected without a GPU: collection worked
        rc = 0
    return _outcome(rc, counts)


def stage_parity(check: Check, deadline: float) -> StageResult:
    """The parity tests of every backend against the reference."""
    # The host emulation's cases are CPU tests (CI runs them); its build alone takes minutes.
    return _pytest(check, "parity", PARITY_TESTS, ["-k", "not emulated"], deadline, workers=8)


def stage_marked(check: Check, deadline: float) -> StageResult:
    return _pytest(check, "marked", MARKED_TESTS, ["-m", "gpu"], deadline)


def _sanitizer(check: Check, name: str, tool: str, selection: str, deadline: float) -> StageResult:
    exe = shutil.which("compute-sanitizer") or _cuda_tool("compute-sanitizer")
    if exe is None and not check.dry_run:
        return StageResult("skipped", "compute-sanitizer not found")
    prefix = [] if check.dry_run else [exe, "--tool", tool, "--error-exitcode", "9"]
    # Without PyTorch's caching allocator every tensor is its own allocation: memcheck sees
    # an overrun past a tensor's end, which inside a cached block it cannot.
    env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    r = _pytest(check, name, SANITIZED_TESTS, ["-k", selection], deadline, prefix=prefix, env=env)
    log = (check.work / "logs" / f"{name}.log").read_text(errors="replace")
    if r.status != "ok" and "Device not supported" in log:
        return StageResult("skipped", "compute-sanitizer: «Device not supported» on this machine")
    errors = re.search(r"ERROR SUMMARY: (\d+) errors?", log)
    hazards = re.search(
        r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", log
    )
    found = []
    if errors:
        found.append(f"{errors.group(1)} sanitizer errors")
    if hazards:
        found.append(f"{hazards.group(2)} race errors, {hazards.group(3)} warnings")
    if check.dry_run:
        found.append(
            f"dry run: collected only; compute-sanitizer {'at ' + exe if exe else 'not found'}"
        )
    r.detail = "; ".join([r.detail, *found])
    return r


def stage_memcheck(check: Check, deadline: float) -> StageResult:
    return _sanitizer(check, "memcheck", "memcheck", SANITIZED_SELECTION, deadline)


def stage_racecheck(check: Check, deadline: float) -> StageResult:
    return _sanitizer(check, "racecheck", "racecheck", RACECHECK_SELECTION, deadline)


def stage_table(check: Check, deadline: float) -> StageResult:
    """The ``auto`` table regenerated from the check's timings, into the archive."""
    results = [p for p in (check.work / "bench").glob("*/check.json")]
    if not results:
        return StageResult("skipped", "no benchmark results")
    out = check.work / "auto_table.py"
    cmd = [
        check.python,
        "-m",
        "bench.choose_backends",
        *map(str, sorted(results)),
        "--out",
        str(out),
    ]
    rc = check.command("table", cmd, deadline)
    return _outcome(rc, "auto_table.py in the archive; " + check.log_tail("table"))


STAGES = [
    Stage("env", 15, 5, stage_env),
    Stage("build", 120, 45, lambda c, d: StageResult("failed", "run by main, in the background")),
    Stage("warm", 60, 35, stage_warm),
    Stage("headline", 90, 63, stage_headline),
    Stage("gram", 30, 28, stage_gram),
    Stage("graphs", 45, 25, stage_graphs),
    Stage("parity", 110, 80, stage_parity),
    Stage("marked", 20, 10, stage_marked),
    Stage("memcheck", 40, 25, stage_memcheck),
    Stage("racecheck", 30, 20, stage_racecheck),
    Stage("rest", 60, 34, stage_rest),
    Stage("tiles", 50, 30, stage_tiles),
    Stage("table", 10, 3, stage_table),
]
#: The build runs beside ``warm`` (it needs CPUs, warm mostly the GPU and one CPU each), so its
#: prediction does not add to the run's.
PREDICTED_S = sum(s.predicted for s in STAGES if s.name != "build")


# ------------------------------------------------------------------------------- helpers
def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


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


def _jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file; a line cut off by a kill is skipped."""
    rows = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _pytest_counts(tail: str) -> str:
    """``"12 passed, 1 skipped"`` from pytest's closing line in ``tail`` (lines joined by
    " / "), or what was printed last when there is none."""
    kinds = r"passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?|tests? collected"
    for line in reversed(tail.split(" / ")):
        if re.search(rf"\d+(?:/\d+)? (?:{kinds})\b.* in [\d.]+s", line):
            found = re.findall(rf"(\d+)(?:/\d+)? ({kinds})\b", line)
            return ", ".join(f"{n} {what}" for n, what in found if not what.startswith("warning"))
    return tail[-160:] or "no output"


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
                out.append(f"{xml.stem}: {case.get('classname')}::{case.get('name')}: {msg}")
    return out


def _fmt_ms(r: dict[str, Any]) -> str:
    rate = f", {r['tflops']:.4g} TFLOP/s" if r.get("tflops") else ""
    return f"{r['ms']:.4g} ms{rate}"


def headline(work: Path) -> list[str]:
    """The figures the check exists for, from the rows measured so far, each beside its
    baseline or target."""
    rows = [r for f in ("headline", "gram", "rest") for r in _jsonl(work / "bench" / f"{f}.jsonl")]
    lines: list[str] = []
    rate = next((r["tflops"] / r["ceiling_fraction"] for r in rows
                 if r.get("dtype") == "bfloat16" and r.get("ceiling_fraction")), None)  # fmt: skip
    if rate:
        lines.append(f"bf16 matrix rate measured (torch.mm): {rate:.4g} TFLOP/s")
    kern = [r for r in rows if r["bench"] == "kernels"]
    if kern:
        lines += [
            "",
            "Newton–Schulz products, one launch each (dense-FLOP rate; gram and poly compute"
            " about half of it, one triangle):",
            "",
        ]
        lines += [
            "| shape | kernel | triton | torch (cuBLAS) | triton speed-up |",
            "|---|---|---|---|---|",
        ]
        for shape in dict.fromkeys(tuple(r["shape"]) for r in kern):
            for k in ("gram", "poly", "apply"):
                at = {
                    r["backend"]: r for r in kern if tuple(r["shape"]) == shape and r["kernel"] == k
                }
                if not at:
                    continue
                t, ref = at.get("triton"), at.get("torch")
                ratio = f"{ref['ms'] / t['ms']:.2f}×" if t and ref else ""
                lines.append(
                    f"| {'×'.join(map(str, shape))} | {k} | {_fmt_ms(t) if t else '—'} "
                    f"| {_fmt_ms(ref) if ref else '—'} | {ratio} |"
                )
        lines.append("")
    polar = [r for r in rows if r["bench"] == "polar"]
    for shape in dict.fromkeys(tuple(r["shape"]) for r in polar):
        at = {r["backend"]: r for r in polar if tuple(r["shape"]) == shape}
        ref = at.get("torch")
        cells = []
        for backend, r in sorted(at.items(), key=lambda kv: kv[1]["ms"]):
            ratio = f", {ref['ms'] / r['ms']:.2f}× torch" if ref and backend != "torch" else ""
            err = f", err {r['rel_err']:.2g}" if r.get("rel_err") is not None else ""
            cells.append(f"{backend} {_fmt_ms(r)}{ratio}{err}")
        lines.append(f"Newton–Schulz 5 steps {'×'.join(map(str, shape))}: " + "; ".join(cells))
        if shape == (1, 4096, 4096):
            for backend in (
                "triton", "cuda", "cuda-wgmma", "cuda-wgmma-smem", "cuda-wgmma-wide-apply",
                "cuda-wgmma-wide", "cuda-wgmma-persistent",
            ):  # fmt: skip
                r = at.get(backend)
                if r is None:
                    continue
                ok = (
                    r["ms"] <= TARGET_NS_4096_MS
                    and ref is not None
                    and ref["ms"] / r["ms"] >= TARGET_NS_SPEEDUP
                )
                lines.append(
                    f"target Newton–Schulz 4096² ≤ {TARGET_NS_4096_MS} ms and "
                    f"≥ {TARGET_NS_SPEEDUP}× torch: {backend} {r['ms']:.4g} ms — "
                    + ("met" if ok else "not met")
                )
        if shape == (1, 4096, 16384):
            for backend in (
                "triton-gram", "cuda-gram", "cuda-wgmma-gram", "cuda-wgmma-smem-gram",
                "cuda-wgmma-wide-apply-gram", "cuda-wgmma-wide-gram", "cuda-wgmma-persistent-gram",
            ):  # fmt: skip
                r = at.get(backend)
                if r is not None:
                    ok = r["ms"] <= TARGET_GRAM_MS
                    lines.append(
                        f"target Newton–Schulz 4096×16384 ≤ {TARGET_GRAM_MS} ms through the "
                        f"Gram form: {backend} {r['ms']:.4g} ms — " + ("met" if ok else "not met")
                    )
    step = [r for r in rows if r["bench"] == "step"]
    if step:
        lines += [
            "",
            "Whole optimizer step, "
            + step[0]["model"]
            + " (peak: allocated memory beyond parameters and gradients during the first step):",
            "",
        ]
        lines += [
            "| optimizer | backend | ms | peak MiB | state MiB | first step s |",
            "|---|---|---|---|---|---|",
        ]
        for r in sorted(step, key=lambda r: r["ms"]):
            peak = f"{r['peak_bytes'] / 2**20:.1f}" if r.get("peak_bytes") is not None else ""
            first = f"{r['first_s']:.2f}" if r.get("first_s") is not None else ""
            lines.append(f"| {r['optimizer']} | {r['backend']} | {r['ms']:.4g} | {peak} "
                         f"| {r.get('state_bytes', 0) / 2**20:.1f} | {first} |")  # fmt: skip
        scion = [
            r for r in step if r["optimizer"] == "Scion" and r["backend"] in ("triton", "cuda")
        ]
        for r in scion:
            if r["model"] == "gpt2-small":
                met = "met" if r["ms"] <= TARGET_STEP_MS else "not met"
                lines.append(
                    f"target GPT-2 small Scion step ≤ {TARGET_STEP_MS} ms: "
                    f"{r['backend']} {r['ms']:.4g} ms — {met}"
                )
        lines.append("")
    lines += _graph_lines(_jsonl(work / "bench" / "graphs.jsonl"))
    lines += _tile_lines(_jsonl(work / "bench" / "tiles.jsonl"))
    compile_json = work / "compile.json"
    if compile_json.exists():
        c = json.loads(compile_json.read_text())
        lines.append(
            f"Cold Triton compilation (warm stage): {c['wall_s']:.1f} s wall; "
            + ", ".join(c["targets"])
        )
    return lines or ["no figures yet"]


def _graph_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per optimizer and backend: the eager step, the replayed one, and the target."""
    if not rows:
        return []
    lines = [f"Optimizer step, {rows[0]['model']}, eager and replayed as a CUDA graph "
             "(bench/graph.py):", "", "| optimizer | backend | eager ms | replayed ms |",
             "|---|---|---|---|"]  # fmt: skip
    table: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        mode = "replayed" if r.get("note", "").endswith("replayed") else "eager"
        table.setdefault((r["optimizer"], r["backend"]), {})[mode] = r["ms"]
    for (optimizer, backend), ms in table.items():
        cells = [f"{ms[m]:.4g}" if m in ms else "—" for m in ("eager", "replayed")]
        lines.append(f"| {optimizer} | {backend} | {cells[0]} | {cells[1]} |")
    for (optimizer, backend), ms in table.items():
        if optimizer == "Scion" and "replayed" in ms and rows[0]["model"] == "gpt2-small":
            met = "met" if ms["replayed"] <= TARGET_GRAPH_STEP_MS else "not met"
            lines.append(f"target replayed GPT-2 small Scion step ≤ {TARGET_GRAPH_STEP_MS} ms: "
                         f"{backend} {ms['replayed']:.4g} ms — {met}")  # fmt: skip
    return [*lines, ""]


def _tile_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per shape and kernel: the step's default tile and the fastest candidate."""
    if not rows:
        return []
    lines = ["Tile candidates (bench/tiles.py):", ""]
    lines += ["| shape | kernel | default | fastest | speed-up |", "|---|---|---|---|---|"]
    for shape in dict.fromkeys(tuple(r["shape"]) for r in rows):
        for k in ("gram", "poly", "apply"):
            at = [r for r in rows if tuple(r["shape"]) == shape and r["kernel"] == k]
            if not at:
                continue
            best = min(at, key=lambda r: r["ms"])
            default = next((r for r in at if r.get("note") == "the step's default"), None)
            cell = f"{default['config']}: {_fmt_ms(default)}" if default else "—"
            gain = f"{default['ms'] / best['ms']:.2f}×" if default else ""
            lines.append(
                f"| {'×'.join(map(str, shape))} | {k} | {cell} "
                f"| {best['config']}: {_fmt_ms(best)} | {gain} |"
            )
    return [*lines, ""]


def summary(check: Check, elapsed: float) -> str:
    """The report: facts, the headline figures, one row per stage, the failed tests."""
    path = check.work / "env.json"
    env = json.loads(path.read_text()) if path.exists() else {}
    lines = [
        "# GPU check" + (" (dry run)" if check.dry_run else ""),
        "",
        f"{env.get('date', '?')}, commit {env.get('commit', '?')}"
        f"{' (dirty)' if env.get('dirty') else ''}; {env.get('gpu') or 'no GPU'}, driver "
        f"{env.get('driver', '?')}; torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda')}),"
        f" triton {env.get('triton', '?')}, Python {env.get('python', '?')}; nvcc "
        f"{env.get('nvcc', '?')}. Command: `{check.command_line}`.",
        "",
        "## Headline",
        "",
        *headline(check.work),
        "",
        "## Stages",
        "",
        "| stage | status | seconds | budget | predicted (GPU) | detail |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for stage in STAGES:
        r = check.results.get(stage.name)
        if r is None:
            lines.append(f"| {stage.name} | pending | | {stage.budget:g} | {stage.predicted:g} | |")
            continue
        detail = r.detail.replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {stage.name} | {r.status} | {r.seconds:.1f} | {stage.budget:g} "
            f"| {stage.predicted:g} | {detail} |"
        )
    lines += [
        "",
        f"{elapsed:.1f} s so far of the run's {TOTAL_BUDGET_S:g} s (predicted {PREDICTED_S:g} s).",
        "",
    ]
    failures = _failures(check.work)
    lines += ["## Failed tests", ""]
    lines += [f"- {f}" for f in failures] if failures else ["none"]
    lines += [
        "",
        "Everything else (logs, JUnit XML, benchmark JSON and JSON lines, the regenerated",
        "`auto_table.py`, env.json) is in `gpu_check.tar.gz`.",
    ]
    return "\n".join(lines) + "\n"


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


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
    check = Check(work=work, dry_run=args.dry_run, out=out)
    check.command_line = shlex.join(
        ["python", "-m", "bench.gpu_check", *(argv if argv is not None else sys.argv[1:])]
    )
    # Stages end early enough that stopping them (GRACE_S, then SIGTERM and SIGKILL) and the
    # last summary still fit the run's budget.
    end = check.started + TOTAL_BUDGET_S - STOP_S
    wanted = [s for s in STAGES if not only or s.name in only]
    build = next((s for s in wanted if s.name == "build"), None)
    build_job: Job | None = None
    previous = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGTERM, signal.SIGINT)}
    current = None
    try:
        check.refresh(force=True)
        for stage in wanted:
            current = stage
            t0 = time.monotonic()
            if stage is build:  # joined before the first stage that runs kernels
                build_job = start_build(check)
                check.results["build"] = StageResult("running", "in the background")
                build_deadline = min(t0 + stage.budget, end)
                continue
            if build_job is not None and stage.name not in ("env", "warm"):
                r = finish_build(check, build_job, build_deadline)
                r.seconds = time.monotonic() - build_job.started
                check.results["build"] = r
                build_job = None
                _report("build", r)
                t0 = time.monotonic()
            left = end - t0
            if left < MIN_STAGE_S:
                r = StageResult(
                    "skipped", f"out of time: {left:.0f} s left of the run's {TOTAL_BUDGET_S:g}"
                )
            else:
                print(f"== {stage.name} (budget {stage.budget:g} s)", flush=True)
                check.results[stage.name] = StageResult("running")
                check.refresh(force=True)
                try:
                    r = stage.run(check, t0 + min(stage.budget, left))
                except Stopped:
                    raise
                except Exception as e:  # noqa: BLE001 - a stage's own bug must not stop the others
                    r = StageResult("failed", f"{type(e).__name__}: {e}")
            r.seconds = time.monotonic() - t0
            check.results[stage.name] = r
            _report(stage.name, r)
            check.refresh(force=True)
            check.archive()
        if build_job is not None:
            r = finish_build(check, build_job, build_deadline)
            r.seconds = time.monotonic() - build_job.started
            check.results["build"] = r
    except Stopped as why:
        # Stopped once is enough: further signals would cut the cleanup that writes the results.
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        check.refresh(force=True)
        check.stop_all()
        for name, r in check.results.items():
            if r.status == "running":
                r.status, r.detail = "stopped", f"the check was sent {why}"
                r.seconds = time.monotonic() - check.started if name == "build" else r.seconds
        if current is not None and current.name not in check.results:
            check.results[current.name] = StageResult("stopped", f"the check was sent {why}")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    try:
        check.refresh(force=True)
    finally:
        check.archive()
    text = (out / "summary.md").read_text()
    shutil.rmtree(work.parent, ignore_errors=True)
    print(text)
    print(f"wrote {out / 'summary.md'} and {out / 'gpu_check.tar.gz'}")
    return 0 if all(r.status in ("ok", "skipped") for r in check.results.values()) else 1


def _report(name: str, r: StageResult) -> None:
    print(f"   {name}: {r.status} in {r.seconds:.1f} s: {r.detail}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
