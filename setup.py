"""Build script for scion_kernels: CMake-built native module ``scion_kernels._C``.

Project metadata lives in pyproject.toml; this file only adds the optional native extension.
The package is fully usable without it (pure-PyTorch code paths), so every reason not to build it
(no CUDA toolchain, no CMake, or an explicit opt-out) leads to a pure-Python install and one line
on stderr saying why. A build that is attempted and then fails is an error, not a silent fallback.

Environment variables:

``SCION_SKIP_NATIVE=1``
    Do not build the native module.
``SCION_CUDA_ARCHS``
    Semicolon- or comma-separated CUDA architectures, in CMake's ``CUDA_ARCHITECTURES`` form
    (default: ``ARCHS`` in ``scion_kernels/backends/cuda/__init__.py``, ``80;90a``). ``90a``
    (architecture-specific Hopper features) becomes
    ``--generate-code=arch=compute_90a,code=[compute_90a,sm_90a]``; ``80-real`` omits the PTX.
``SCION_NVCC``
    Path of the nvcc to use. Overrides the search below; if it names no executable file the
    toolchain counts as absent, which is how the pure-Python fallback is exercised on a machine
    that has CUDA (e.g. ``SCION_NVCC=/nonexistent pip install -e . --no-build-isolation``).
``CUDA_HOME`` / ``CUDA_PATH``
    Toolkit root; ``$CUDA_HOME/bin/nvcc`` is tried first when set.
``MAX_JOBS``
    Parallel compile jobs (default: number of CPUs).
``SCION_BUILD_TYPE``
    CMake build type (default ``Release``).

nvcc search order: ``SCION_NVCC``, ``$CUDA_HOME/bin/nvcc``, ``$CUDA_PATH/bin/nvcc``, ``nvcc`` on
``PATH``, ``/usr/local/cuda/bin/nvcc``.

PyTorch is not needed to build: the native code includes no PyTorch headers. pybind11 comes from
the ``pybind11`` package when importable, otherwise from the copy of its headers that PyTorch
installs under ``torch/include`` (located without importing torch), so offline GPU machines can
build with ``pip install -e . --no-build-isolation``.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _declared_archs() -> str:
    """``ARCHS`` of the native backend (``scion_kernels/backends/cuda/__init__.py``), read
    without importing the package: the one place the default architectures are written."""
    source = ROOT / "scion_kernels" / "backends" / "cuda" / "__init__.py"
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
            "ARCHS"
        ]:
            return ast.literal_eval(node.value)
    raise RuntimeError(f"{source} declares no ARCHS")


DEFAULT_CUDA_ARCHS = _declared_archs()


def _is_executable(path: str | os.PathLike[str] | None) -> bool:
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def _find_nvcc() -> tuple[str | None, str]:
    """Return (nvcc path or None, explanation when None)."""
    override = os.environ.get("SCION_NVCC")
    if override:
        if _is_executable(override):
            return override, ""
        return None, f"SCION_NVCC={override} is not an executable file"
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and _is_executable(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc"), ""
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path, ""
    if _is_executable("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc", ""
    return (
        None,
        "no CUDA toolchain found (nvcc not in SCION_NVCC, CUDA_HOME, PATH, /usr/local/cuda)",
    )


def _find_tool(name: str, module: str, attr: str) -> str | None:
    """A build tool from its pip package, next to the interpreter, or on PATH."""
    candidates = []
    if importlib.util.find_spec(module) is not None:
        try:
            mod = __import__(module)
            candidates.append(os.path.join(getattr(mod, attr), name))
        except Exception:  # a broken tool package must not break the search
            pass
    candidates.append(os.path.join(os.path.dirname(sys.executable), name))
    for candidate in candidates:
        if _is_executable(candidate):
            return candidate
    return shutil.which(name)


def _pybind11_cmake_args() -> tuple[list[str], str]:
    """CMake arguments locating pybind11, and a description of the source."""
    try:
        import pybind11

        return [f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"], f"pybind11 {pybind11.__version__}"
    except ImportError:
        pass
    spec = importlib.util.find_spec("torch")
    for location in (spec.submodule_search_locations or []) if spec else []:
        include = Path(location) / "include"
        if (include / "pybind11" / "pybind11.h").is_file():
            return [f"-DSCION_PYBIND11_INCLUDE_DIR={include}"], f"pybind11 headers in {include}"
    raise RuntimeError(
        "building scion_kernels._C needs pybind11: install the 'pybind11' package, or PyTorch "
        "(which ships its headers), or set SCION_SKIP_NATIVE=1 for a pure-Python install"
    )


def _cuda_archs() -> str:
    raw = os.environ.get("SCION_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    archs = [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs:
        raise RuntimeError(f"SCION_CUDA_ARCHS={raw!r} names no architecture")
    # nvcc spells them without the dot; accept "9.0a" as well.
    return ";".join(a.replace(".", "") for a in archs)


def _native_plan() -> tuple[dict[str, str] | None, str]:
    """Return (tool paths, "") if the native module should be built, else (None, reason)."""
    if os.environ.get("SCION_SKIP_NATIVE", "").strip().lower() in ("1", "true", "yes", "on"):
        return None, "SCION_SKIP_NATIVE is set"
    nvcc, why = _find_nvcc()
    if nvcc is None:
        return None, why
    cmake = _find_tool("cmake", "cmake", "CMAKE_BIN_DIR")
    if cmake is None:
        return None, f"CMake not found (nvcc is {nvcc}; pip install cmake)"
    tools = {"nvcc": nvcc, "cmake": cmake}
    ninja = _find_tool("ninja", "ninja", "BIN_DIR")
    if ninja is not None:
        tools["ninja"] = ninja
    return tools, ""


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt, placing the module where setuptools expects it."""

    tools: dict[str, str] = {}

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        # setuptools copies it into the source tree afterwards for in-place/editable builds.
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        archs = _cuda_archs()
        pybind_args, pybind_source = _pybind11_cmake_args()
        build_type = os.environ.get("SCION_BUILD_TYPE", "Release")

        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_CUDA_COMPILER={self.tools['nvcc']}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            f"-DSCION_OUTPUT_DIR={output.parent}",
            *pybind_args,
        ]
        if "ninja" in self.tools:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={self.tools['ninja']}"]
        # A cache from an earlier configure would pin the old compiler, archs and generator.
        cache = build_temp / "CMakeCache.txt"
        if cache.exists():
            cache.unlink()

        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        print(
            f"scion_kernels: building native module {ext.name} with {self.tools['nvcc']} "
            f"for CUDA archs {archs}, {pybind_source}, {jobs} jobs",
            file=sys.stderr,
        )
        self._run([self.tools["cmake"], "-S", str(ROOT), "-B", str(build_temp), *args])
        self._run(
            [self.tools["cmake"], "--build", str(build_temp), "--config", build_type, "-j", jobs]
        )
        ext_suffix = sysconfig.get_config_var("EXT_SUFFIX")
        built = output.parent / f"_C{ext_suffix}"
        if built != output and built.exists():
            shutil.copyfile(built, output)
        if not output.exists():
            raise RuntimeError(f"CMake build finished but {output} was not produced")

    @staticmethod
    def _run(cmd: list[str]) -> None:
        env = dict(os.environ)
        # nvcc and the host compiler must agree with what CMake was told; don't let a stray
        # CUDAARCHS override SCION_CUDA_ARCHS.
        env.pop("CUDAARCHS", None)
        subprocess.run(cmd, check=True, env=env)


def _announce_pure_python(reason: str) -> type[build_py]:
    """build_py that reports, once per build, that the native module is skipped."""

    class AnnouncingBuildPy(build_py):
        def run(self) -> None:
            message = f"scion_kernels: native module scion_kernels._C not built: {reason}"
            stale = sorted((ROOT / "scion_kernels").glob("_C.*"))
            if stale:
                message += f" (an earlier build, {stale[0].name}, remains in the source tree)"
            print(message, file=sys.stderr)
            super().run()

    return AnnouncingBuildPy


tools, skip_reason = _native_plan()
if tools is not None:
    CMakeBuild.tools = tools
    setup(ext_modules=[CMakeExtension("scion_kernels._C")], cmdclass={"build_ext": CMakeBuild})
else:
    setup(ext_modules=[], cmdclass={"build_py": _announce_pure_python(skip_reason)})
