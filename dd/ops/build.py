"""Building and loading the native (C++ CPU / CUDA) op from ``csrc/``.

The project installs and runs without a compiler: the native op is optional. It reaches a
process in one of three ways, tried in this order by :func:`load_native`:

1. prebuilt: ``DD_BUILD_EXT=1 pip install --no-build-isolation -e .`` compiled it into
   ``dd/ops/_native*.so`` through ``setup.py`` (:func:`setup_extensions`);
2. cached: an earlier first use compiled it into the cache directory
   (``$DD_EXT_CACHE``, default ``~/.cache/dd/torch_extensions``), in a folder named after a
   hash of the sources, the compiler flags, torch and Python, so a cached build is never stale
   and later runs load it in milliseconds;
3. first use: :func:`torch.utils.cpp_extension.load` compiles it into that folder (about
   half a minute on two cores), which needs a C++ compiler and ninja.

The CUDA source joins the build only where a CUDA build of torch and a CUDA toolkit (nvcc)
are both present. The library registers its kernels with ``torch.library`` under the
``dd_native`` namespace (``acl_forward``, ``acl_backward``, ``build_info``).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import logging
import os
import platform
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dd.errors import DDError

log = logging.getLogger("dd.ops")

#: Library namespace the native sources register (``torch.ops.dd_native``).
NAMESPACE = "dd_native"
CPP_SOURCES = ("artifact_confidence.cpp",)
CUDA_SOURCES = ("artifact_confidence_cuda.cu",)
HEADERS = ("artifact_confidence.h",)
BUILD_HINT = (
    "run `DD_BUILD_EXT=1 pip install --no-build-isolation -e .`, or install a C++ compiler "
    "and ninja so that it compiles on first use"
)


def csrc_dir() -> Path | None:
    """The ``csrc/`` folder of a source checkout, or None for an installed wheel."""
    d = Path(__file__).resolve().parents[2] / "csrc"
    return d if all((d / f).is_file() for f in CPP_SOURCES + CUDA_SOURCES + HEADERS) else None


def source_hash() -> str:
    """Hash of the native sources (what ``build_info()`` of a build reports)."""
    d = csrc_dir()
    if d is None:
        return "unknown"
    h = hashlib.sha256()
    for name in sorted(CPP_SOURCES + CUDA_SOURCES + HEADERS):
        h.update(name.encode())
        h.update((d / name).read_bytes())
    return h.hexdigest()[:16]


def cuda_toolkit() -> str | None:
    """Why the CUDA part cannot be built here, or None when it can."""
    import torch

    if torch.version.cuda is None:
        return "this torch is a CPU build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return None


def cxx_flags() -> list[str]:
    """C++ flags: optimised, OpenMP where the platform's compiler has it.

    ``-fno-trapping-math`` lets GCC vectorise the clamps of the exp polynomial (the op
    never relies on floating-point traps).
    """
    flags = ["-O3", "-fno-trapping-math", f"-DDD_NATIVE_SOURCE_HASH={source_hash()}"]
    if sys.platform.startswith("linux"):
        flags.append("-fopenmp")
    return flags


def ld_flags() -> list[str]:
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def cuda_flags() -> list[str]:
    return ["-O3"]


def cache_root() -> Path:
    """Where first-use builds are cached: ``$DD_EXT_CACHE`` or ``~/.cache/dd/torch_extensions``."""
    env = os.environ.get("DD_EXT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dd" / "torch_extensions"


def build_key(with_cuda: bool) -> str:
    """Cache key: sources, flags, compiler, torch, Python and platform."""
    import torch

    parts = [
        source_hash(),
        " ".join(cxx_flags() + ld_flags()),
        " ".join(cuda_flags()) if with_cuda else "cpu-only",
        os.environ.get("CXX", "c++"),
        torch.__version__,
        sys.implementation.cache_tag,
        platform.machine(),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def build_dir(with_cuda: bool) -> Path:
    return cache_root() / f"{NAMESPACE}_{build_key(with_cuda)}"


def _library_name(with_cuda: bool) -> str:
    return f"{NAMESPACE}_{build_key(with_cuda)}"


def prebuilt_path() -> Path | None:
    """The library ``setup.py`` built into the package, if there is one."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = here / f"_native{suffix}"
        if p.is_file():
            return p
    return None


def compiler_missing() -> str | None:
    """Why a first-use build cannot run here (no sources, compiler or ninja), or None."""
    if csrc_dir() is None:
        return "the csrc/ sources are not part of this installation"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx}) on PATH"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401
        except ImportError:
            return "ninja is not installed (pip install ninja)"
    return None


@dataclass
class NativeState:
    """What :func:`load_native` found: where the library came from, or why it is missing."""

    loaded: bool = False
    origin: str = ""
    path: Path | None = None
    has_cuda: bool = False
    error: str | None = None


_state = NativeState()
_lock = threading.Lock()


def _load_library(path: Path) -> None:
    import torch

    torch.ops.load_library(str(path))


def _has_cuda_kernels() -> bool:
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::acl_forward", "CUDA")


def _try_prebuilt() -> bool:
    import torch

    path = prebuilt_path()
    if path is None:
        return False
    try:
        _load_library(path)
    except OSError as e:  # built against another torch, or a missing runtime library
        log.debug("prebuilt native op %s does not load: %s", path, e)
        return False
    built_from = torch.ops.dd_native.build_info()
    if csrc_dir() is not None and built_from != source_hash():
        # The library is loaded now and cannot be replaced in this process.
        _state.error = (
            f"the prebuilt native op {path.name} was built from other sources "
            f"({built_from}, csrc/ is {source_hash()})"
        )
        return False
    _state.loaded, _state.origin, _state.path = True, "prebuilt", path
    return True


def _cached_library(with_cuda: bool) -> Path | None:
    d = build_dir(with_cuda)
    lib = d / f"{_library_name(with_cuda)}.so"
    # a lock file means another process is still writing the library
    return lib if lib.is_file() and not (d / "lock").exists() else None


def _compile(with_cuda: bool) -> Path:
    from torch.utils import cpp_extension

    d = build_dir(with_cuda)
    d.mkdir(parents=True, exist_ok=True)
    src = csrc_dir()
    if src is None:
        raise RuntimeError("the csrc/ sources are not part of this installation")
    sources = [str(src / s) for s in CPP_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    log.info("compiling the native op into %s (first use; cached afterwards)", d)
    cpp_extension.load(
        name=_library_name(with_cuda),
        sources=sources,
        extra_cflags=cxx_flags(),
        extra_cuda_cflags=cuda_flags() if with_cuda else None,
        extra_ldflags=ld_flags(),
        extra_include_paths=[str(src)],
        build_directory=str(d),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=False,
    )
    return d / f"{_library_name(with_cuda)}.so"


def _first_error(output: str) -> str:
    """The first compiler error line of a failed build (the whole log goes to debug)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower() and not ln.startswith(("Error building", "[")):
            return ln
    return lines[0] if lines else "unknown error"


def load_native(build: bool = True) -> NativeState:
    """Load the native op once per process (prebuilt, cached, or compiled when ``build``).

    Never raises: the returned state says what happened; :func:`require_native` turns a
    failure into a :class:`DDError`.
    """
    with _lock:
        if _state.loaded or (_state.error is not None and _state.origin == "failed"):
            return _state
        if _try_prebuilt():
            _state.has_cuda = _has_cuda_kernels()
            return _state
        if _state.error is not None:  # a stale prebuilt library occupies the namespace
            _state.origin = "failed"
            return _state
        with_cuda = cuda_toolkit() is None
        cached = _cached_library(with_cuda)
        if cached is None and not build:
            return _state
        if cached is None:
            missing = compiler_missing()
            if missing is not None:
                _state.error, _state.origin = f"the C++ op is not built: {missing}", "failed"
                return _state
            try:
                cached = _compile(with_cuda)
            except Exception as e:  # compiler errors arrive as RuntimeError/CalledProcessError
                log.debug("native op build failed:\n%s", e)
                _state.error = f"the C++ op failed to compile: {_first_error(str(e))}"
                _state.origin = "failed"
                return _state
            origin = "compiled"
        else:
            origin = "cached"
        try:
            _load_library(cached)
        except OSError as e:
            _state.error, _state.origin = f"the C++ op does not load: {e}", "failed"
            return _state
        _state.loaded, _state.origin, _state.path = True, origin, cached
        _state.has_cuda = _has_cuda_kernels()
        return _state


def require_native() -> NativeState:
    """Load (building if needed) the native op, or raise a :class:`DDError` naming the fix."""
    state = load_native(build=True)
    if not state.loaded:
        raise DDError(state.error or "the C++ op is not built", hint=BUILD_HINT)
    return state


def native_status() -> tuple[bool, str | None]:
    """For ``dd env``: can the native op run here, without compiling anything now."""
    if _state.loaded:
        return True, None
    if _state.error is not None:
        return False, _state.error
    if prebuilt_path() is not None:
        return True, None
    with_cuda = cuda_toolkit() is None
    if _cached_library(with_cuda) is not None:
        return True, None
    missing = compiler_missing()
    if missing is not None:
        return False, f"not built, and cannot compile on first use: {missing}"
    return True, f"compiles on first use into {build_dir(with_cuda)}"


def compile_cuda_object(out_dir: Path, arch: str = "sm_90") -> Path:
    """Compile the CUDA source to an object file with nvcc: a compile check that needs
    neither a GPU nor a CUDA build of torch.

    A CPU build of torch ships the CUDA headers except one that its build generates,
    ``c10/cuda/impl/cuda_cmake_macros.h``; when it is missing, the standard one-line
    version is written under ``out_dir`` and put on the include path.
    """
    import torch
    from torch.utils import cpp_extension

    src = csrc_dir()
    if src is None:
        raise DDError("the csrc/ sources are not part of this installation")
    home = cpp_extension.CUDA_HOME
    nvcc = str(Path(home) / "bin" / "nvcc") if home else shutil.which("nvcc")
    if nvcc is None or not Path(nvcc).exists():
        raise DDError("no CUDA toolkit (nvcc) found", hint="install one, or set CUDA_HOME")
    out_dir.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{src}"]
    torch_include = Path(cpp_extension.include_paths()[0])
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        shim = out_dir / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        shim.parent.mkdir(parents=True, exist_ok=True)
        shim.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes += ["-isystem", str(out_dir / "include")]
    for path in cpp_extension.include_paths():
        includes += ["-isystem", path]
    import sysconfig

    includes += ["-isystem", sysconfig.get_paths()["include"]]
    obj = out_dir / "artifact_confidence_cuda.o"
    cmd = [
        nvcc,
        "-c",
        str(src / CUDA_SOURCES[0]),
        "-o",
        str(obj),
        *includes,
        "-std=c++20",
        f"-arch={arch}",
        "-Xcompiler",
        "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        *cpp_extension.COMMON_NVCC_FLAGS,
        *cuda_flags(),
    ]
    import subprocess

    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise DDError(f"nvcc failed: {_first_error(res.stderr + res.stdout)}")
    return obj


def setup_extensions() -> dict[str, Any]:
    """``setup()`` keyword arguments that build ``dd.ops._native`` (``DD_BUILD_EXT=1``)."""
    try:
        from torch.utils import cpp_extension
    except ImportError as e:
        raise DDError(
            "DD_BUILD_EXT=1 needs torch in the build environment",
            hint="install torch first, then `DD_BUILD_EXT=1 pip install --no-build-isolation -e .`",
        ) from e
    src = csrc_dir()
    if src is None:
        raise DDError("DD_BUILD_EXT=1 needs the csrc/ sources next to the dd package")
    root = src.parent
    with_cuda = cuda_toolkit() is None
    sources = [str((src / s).relative_to(root)) for s in CPP_SOURCES]
    if with_cuda:
        sources += [str((src / s).relative_to(root)) for s in CUDA_SOURCES]
        ext_cls = cpp_extension.CUDAExtension
        compile_args: dict[str, list[str]] = {"cxx": cxx_flags(), "nvcc": cuda_flags()}
    else:
        ext_cls = cpp_extension.CppExtension
        compile_args = {"cxx": cxx_flags()}
    ext = ext_cls(
        name="dd.ops._native",
        sources=sources,
        include_dirs=[str(src)],
        extra_compile_args=compile_args,
        extra_link_args=ld_flags(),
        py_limited_api=False,
    )
    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m dd.ops.build [--check-cuda DIR]``: build/load the native op and say how."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m dd.ops.build", description=main.__doc__)
    p.add_argument("--check-cuda", type=Path, metavar="DIR", help="nvcc-compile the .cu into DIR")
    p.add_argument("--arch", default="sm_90", help="GPU architecture for --check-cuda")
    args = p.parse_args(argv)
    try:
        if args.check_cuda:
            print(f"compiled {compile_cuda_object(args.check_cuda, args.arch)}")
            return 0
        state = require_native()
    except DDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"native op: {state.origin} {state.path} (CUDA kernels: {state.has_cuda})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
