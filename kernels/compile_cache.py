"""Compile kernels once per (op, dtypes, C, heads, layout, knobs, arch) with T dynamic.

Compilation needs no GPU: fake arguments carry the signature, CUTE_DSL_ARCH names the target. Kernels are
compiled with TVM-FFI (`--enable-tvm-ffi`): the host function is a `tvm_ffi.Function` that takes integer
pointers, Python ints/floats and a raw stream, so a launch costs a C call instead of the DSL's Python
argument packing. A compiled function is found, in order: in memory; in the ahead-of-time library shipped
in the package (kernels/aot.py: no cutlass import, no compile); in the disk cache (LUTFORGE_CACHE_DIR,
default ~/.cache/lutforge, one TVM-FFI object per key, shared by spawned compile workers and later
processes); else it is compiled. `compile_count()` counts compiles in this process (a serving process
that only meets covered shapes shows 0).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .config import KernelConfig, vec_elems, violations
from .problem import ELEM_BYTES, FP4_BLOCK, Problem

ARCHS = {"sm_90a": 90, "sm_100a": 100}
_CACHE_VERSION = "3"  # bump when cached objects change format (2: TVM-FFI host functions; 3: --gpu-arch)
_SOURCE_FILES = ("norm_kernel.py", "pdl.py", "config.py", "problem.py")  # what the generated kernel depends on


class KernelCompileError(RuntimeError):
    """A config that passed the constraints but did not compile (a kernel bug or a missing constraint)."""


@dataclass(frozen=True)
class CompileInfo:
    compile_s: float
    registers: int | None
    smem_bytes: int | None
    from_cache: bool


def arch_number(arch: str) -> int:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    return ARCHS[arch]


def arch_name(sm: int) -> str:
    """Compile target for a device's compute capability (major*10+minor)."""
    if sm >= 100:
        return "sm_100a"
    if sm >= 90:
        return "sm_90a"
    raise ValueError(f"lutforge kernels need SM90 or newer, got sm_{sm}")


def canonical(problem: Problem) -> Problem:
    """The compile-relevant part of a problem (T does not matter)."""
    return Problem(problem.op, 0, problem.C, problem.in_dtype, problem.out_format, problem.heads,
                   problem.scale_layout)


@functools.lru_cache(maxsize=4096)  # asked once per rotation set of every timed trial
def cache_key(problem: Problem, cfg: KernelConfig, arch: str) -> str:
    p = canonical(problem)
    raw = repr((_CACHE_VERSION, p, sorted(cfg.as_dict().items()), arch, kernel_source_hash()))
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


_SRC_HASH: str | None = None


def files_hash(names) -> str:
    """A source version: the hash of these files of kernels/ (a kernel family's sources)."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in names:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def kernel_source_hash() -> str:
    """The kernel's source version: cached objects, studies and measured rows belong to one version."""
    global _SRC_HASH
    if _SRC_HASH is None:
        _SRC_HASH = files_hash(_SOURCE_FILES)
    return _SRC_HASH


def cache_dir() -> Path:
    d = Path(os.environ.get("LUTFORGE_CACHE_DIR", Path.home() / ".cache" / "lutforge"))
    d.mkdir(parents=True, exist_ok=True)
    return d


_MEM: dict[str, object] = {}
_LOCK = threading.Lock()  # CuTe-DSL compilation is not thread-safe
_COMPILES = 0


def compile_count() -> int:
    """Kernels compiled by this process so far (not loaded from the AOT library or the disk cache)."""
    return _COMPILES


def symbol(key: str) -> str:
    """The TVM-FFI function name of a cache key in objects and in the AOT library."""
    return f"lf_{key}"


@contextlib.contextmanager
def _target_arch(arch: str):
    old = os.environ.get("CUTE_DSL_ARCH")
    os.environ["CUTE_DSL_ARCH"] = arch
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CUTE_DSL_ARCH", None)
        else:
            os.environ["CUTE_DSL_ARCH"] = old


def _fake_args(problem: Problem, cfg: KernelConfig):
    """Compile-time stand-ins for the kernel's runtime arguments (see NormKernel.__call__)."""
    import cutlass
    from cutlass.cute.runtime import make_fake_stream, nullptr
    from cutlass.base_dsl.enums import AddressSpace

    dt = {"bf16": cutlass.BFloat16, "fp16": cutlass.Float16}[problem.in_dtype]
    vb = cfg.vec_bytes
    v = vec_elems(problem, cfg)

    def ptr(dtype, align):
        return nullptr(dtype, AddressSpace.gmem, assumed_align=align)

    x = ptr(dt, vb)
    w = ptr(dt, vb)
    res = ptr(dt, vb) if problem.spec.residual else None
    sf = gs = None
    if problem.out_format in FP4_BLOCK:
        y = ptr(cutlass.Uint8, max(1, v // 2))
        sf = ptr(cutlass.Uint8, 4 if problem.scale_layout == "swizzled" else 1)
        if problem.spec.fp4_scales and problem.out_format == "nvfp4":
            gs = ptr(cutlass.Float32, 4)  # always passed (ops substitute 1.0 when the caller gives none)
    else:
        ydt = cutlass.Float8E4M3FN if problem.out_format == "fp8" else dt
        y = ptr(ydt, v * ELEM_BYTES[problem.out_format])
    i64 = cutlass.Int64(0)
    return (x, w, res, y, sf, gs, cutlass.Int32(0), i64, i64, i64, i64, i64, cutlass.Int32(0), i64,
            cutlass.Float32(1e-6), cutlass.Float32(1.0), cutlass.Int32(1), make_fake_stream(use_tvm_ffi_env_stream=False))


def compile_kernel(problem: Problem, cfg: KernelConfig, arch: str):
    """Compile one config for `arch` (no GPU needed) as a TVM-FFI function; raises KernelCompileError when
    the DSL fails."""
    global _COMPILES
    from .norm_kernel import KernelSpec, NormKernel

    why = violations(problem, cfg, arch_number(arch))
    if why:
        raise ValueError(f"invalid config {cfg.short()} for {problem}: {'; '.join(why)}")
    kernel = NormKernel(KernelSpec(canonical(problem), cfg, arch_number(arch)))
    compiled = compile_dsl(kernel, _fake_args(problem, cfg), arch,
                           f"{problem.op}/{problem.out_format} C={problem.C} {cfg.short()}")
    _COMPILES += 1
    return compiled


def compile_dsl(kernel, fake_args: tuple, arch: str, label: str):
    """`cute.compile` of a kernel object of any family for `arch` as a TVM-FFI function (one at a time: the
    DSL is not thread-safe); KernelCompileError naming `label` when the DSL fails."""
    import cutlass.cute as cute

    with _LOCK, _target_arch(arch):
        try:
            # --keep-cubin lets resource_usage read registers/smem; its files go to the cache, not the cwd
            dump = cache_dir() / "dump"
            dump.mkdir(exist_ok=True)
            # The target is an explicit option: CUTE_DSL_ARCH is read once, when cutlass is first imported, so
            # setting it later (as _target_arch does) did not reach a DSL imported earlier in the process, whose
            # objects were then built for the DSL's default (sm_100 without a GPU).
            return cute.compile(kernel, *fake_args,
                                options=f"--enable-tvm-ffi --gpu-arch {arch} --keep-cubin --dump-dir {dump}")
        except Exception as e:  # the DSL raises many exception types
            raise KernelCompileError(f"{label} {arch}: {type(e).__name__}: {e}") from e


def export_object(compiled, key: str, path: Path) -> None:
    """Write a compiled function as a relocatable TVM-FFI object exporting only `__tvm_ffi_<symbol(key)>`
    (the AOT library links many of them into one shared library)."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp.o")
    compiled.export_to_c(str(tmp), function_name=symbol(key), export_only_tvm_ffi_symbols=True)
    os.replace(tmp, path)


def precompile(problem: Problem, cfg: KernelConfig, arch: str) -> CompileInfo:
    """Compile one config for `arch` and store its object in the disk cache (idempotent, no GPU needed)."""
    return precompile_key(cache_key(problem, cfg, arch), lambda: compile_kernel(problem, cfg, arch))


def precompile_key(key: str, compile_fn) -> CompileInfo:
    """Store `compile_fn()`'s object in the disk cache under `key` unless it is there (any kernel family)."""
    path = cache_dir() / f"{key}.o"
    if path.exists():
        return CompileInfo(0.0, None, None, True)
    t0 = time.perf_counter()
    compiled = compile_fn()
    dt = time.perf_counter() - t0
    export_object(compiled, key, path)
    return CompileInfo(dt, *resource_usage(compiled), from_cache=False)


def _load_object(path: Path, key: str):
    """The tvm_ffi.Function in a cached object, linked in-process against the CuTe-DSL runtime."""
    import tvm_ffi
    from cutlass._mlir._mlir_libs._cutlass_ir._execution_engine import BinaryExecutionEngine
    from cutlass.base_dsl.env_manager import get_prefix_dsl_libs

    libs = get_prefix_dsl_libs("CUTE_DSL")
    engine = BinaryExecutionEngine(path.read_bytes(), libs.split(os.pathsep) if libs else [], True)
    ptr = engine.lookup(f"__tvm_ffi_{symbol(key)}")
    if not ptr:
        raise KeyError(f"{path} does not export {symbol(key)}")
    return tvm_ffi.Function.__from_extern_c__(ptr, keep_alive_object=engine)


def get_compiled(problem: Problem, cfg: KernelConfig, arch: str):
    """The launchable tvm_ffi.Function for (problem, cfg, arch): memory, the shipped AOT library, the disk
    cache, then compile. Its arguments are those of NormKernel.__call__, pointers as ints."""
    return cached_function(cache_key(problem, cfg, arch), arch, lambda: compile_kernel(problem, cfg, arch))


def cached_function(key: str, arch: str, compile_fn):
    """The tvm_ffi.Function cached under `key` (any kernel family): process memory, the AOT library, the
    disk cache, else `compile_fn()` exported to the disk cache and loaded."""
    fn = _MEM.get(key)
    if fn is not None:
        return fn
    from . import aot

    fn = aot.lookup(arch, symbol(key))
    if fn is None:
        path = cache_dir() / f"{key}.o"
        with _LOCK:
            if path.exists():
                try:
                    fn = _load_object(path, key)
                except Exception:  # a stale or truncated object: recompile below
                    fn = None
        if fn is None:
            export_object(compile_fn(), key, path)
            with _LOCK:
                fn = _load_object(path, key)
    _MEM[key] = fn
    return fn


def resource_usage(compiled) -> tuple[int | None, int | None]:
    """(registers per thread, static shared memory bytes) read from the compiled cubin's ELF notes."""
    try:
        cubin = compiled.artifacts.CUBIN
    except Exception:
        cubin = None
    if not cubin:
        return None, None
    return _parse_cubin_resources(cubin if isinstance(cubin, bytes) else Path(cubin).read_bytes())


def _parse_cubin_resources(cubin: bytes) -> tuple[int | None, int | None]:
    """Registers from the .nv.info.<kernel> EIATTR_REGCOUNT note; smem from .nv.shared.<kernel> size."""
    import struct

    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        return None, None
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    stroff = secs[shstrndx][4]

    def name(off):
        end = cubin.index(b"\0", stroff + off)
        return cubin[stroff + off:end].decode()

    regs = smem = None
    for s in secs:
        n = name(s[0])
        if (n == ".nv.info" or n.startswith(".nv.info.")) and regs is None:
            data = cubin[s[4]:s[4] + s[5]]
            i = 0
            while i + 4 <= len(data):
                fmt, attr, size = data[i], data[i + 1], struct.unpack_from("<H", data, i + 2)[0]
                if fmt == 0x04:  # EIFMT_SVAL: size bytes follow
                    if attr == 0x2F and size >= 8:  # EIATTR_REGCOUNT: (function index, count)
                        regs = max(regs or 0, struct.unpack_from("<I", data, i + 8)[0])
                    i += 4 + size
                else:
                    i += 4
        elif re.match(r"\.nv\.shared\.", n):
            smem = (smem or 0) + s[5]
    return regs, smem
