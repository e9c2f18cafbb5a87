"""Build the native module ``_C`` against the host emulation, so its kernels run on the CPU.

Every ``csrc/*.cu`` is compiled as C++ with ``SCION_HOST_EMULATION`` and ``emulation.h``
force-included, linked with ``emulation.cpp`` and the unchanged ``python/bindings.cpp`` into an
extension module with the real module's interface, marked ``EMULATED = True``; the wrappers in
``scion_kernels.backends.cuda.native`` then accept CPU tensors and pass stream 0. Needs a C++
compiler, the CUDA headers (from a CUDA toolkit) and pybind11; the build is kept in the
temporary directory under a hash of its sources and of every header in ``csrc/``
(``*.h``, ``*.cuh``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def cuda_include() -> Path | None:
    """The CUDA toolkit's include directory, found as setup.py finds nvcc."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = os.environ.get("SCION_NVCC") or shutil.which("nvcc")
    if nvcc:
        roots.insert(0, str(Path(nvcc).resolve().parents[1]))
    for root in roots:
        if root and (Path(root) / "include" / "cuda_bf16.h").is_file():
            return Path(root) / "include"
    return None


def unavailable_reason() -> str | None:
    """Why the emulated module cannot be built here, or ``None``."""
    if cuda_include() is None:
        return "no CUDA toolkit headers (cuda_bf16.h) found"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler"
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 is not installed"
    return None


def _sources() -> list[Path]:
    return sorted((ROOT / "csrc").glob("*.cu"))


def build() -> ModuleType:
    """Compile (once per source hash) and import the emulated ``_C``."""
    import pybind11

    cxx = os.environ.get("CXX", "g++")
    headers = sorted([*(ROOT / "csrc").glob("*.h"), *(ROOT / "csrc").glob("*.cuh")])
    inputs = [*_sources(), *headers, HERE / "emulation.h", HERE / "emulation.cpp",
              ROOT / "python" / "bindings.cpp"]  # fmt: skip
    # Hidden symbols, bound inside the module: the emulated CUDA runtime functions must never
    # resolve to (or be taken by) a real libcudart that a CUDA build of PyTorch has loaded.
    visibility = ["-fvisibility=hidden"]
    digest = hashlib.sha256(sys.version.encode() + " ".join(visibility).encode())
    for path in inputs:
        digest.update(path.name.encode() + path.read_bytes())
    out = Path(tempfile.gettempdir()) / f"scion-emulated-{digest.hexdigest()[:16]}"
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    module_path = out / f"_C{suffix}"
    if not module_path.exists():
        work = Path(tempfile.mkdtemp(prefix="build-", dir=out.parent))
        common = ["-std=c++20", "-O2", "-fPIC", *visibility, f"-I{cuda_include()}"]
        common.append(f"-I{ROOT / 'csrc'}")
        emulate = ["-x", "c++", "-DSCION_HOST_EMULATION", "-include", str(HERE / "emulation.h")]
        py = [f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}"]
        jobs = [[cxx, *common, *emulate, "-c", str(s), "-o", str(work / f"{s.stem}.o")]
                for s in _sources()]  # fmt: skip
        jobs.append([cxx, *common, "-c", str(HERE / "emulation.cpp"), "-o", str(work / "emu.o")])
        binding = str(ROOT / "python" / "bindings.cpp")
        jobs.append([cxx, *common, *py, "-c", binding, "-o", str(work / "bindings.o")])

        def compile_one(cmd: list[str]) -> subprocess.CompletedProcess:
            return subprocess.run(cmd, capture_output=True, text=True)

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            results = list(pool.map(compile_one, jobs))
        for cmd, res in zip(jobs, results, strict=True):
            if res.returncode != 0:
                raise RuntimeError(f"emulated build failed: {' '.join(cmd)}\n{res.stderr}")
        objects = sorted(str(p) for p in work.glob("*.o"))
        link = [cxx, "-shared", "-Wl,-Bsymbolic", "-o", str(work / module_path.name), *objects]
        link = subprocess.run(link, capture_output=True, text=True)
        if link.returncode != 0:
            raise RuntimeError(f"emulated link failed:\n{link.stderr}")
        out.mkdir(exist_ok=True)
        os.replace(work / module_path.name, module_path)
        shutil.rmtree(work, ignore_errors=True)
    spec = importlib.util.spec_from_file_location("_C", module_path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.EMULATED = True
    return module
