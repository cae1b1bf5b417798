"""Compile kernels once per (op, dtypes, C, heads, layout, knobs, arch) with T dynamic.

Compilation needs no GPU: fake tensors carry the signature, CUTE_DSL_ARCH names the target. Compiled
objects are kept in memory and on disk (LUTFORGE_CACHE_DIR, default ~/.cache/lutforge) so spawned
compile workers and later processes share them.
"""
from __future__ import annotations

import contextlib
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
_CACHE_VERSION = "1"  # bump when the kernel source changes incompatibly with cached objects


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


def cache_key(problem: Problem, cfg: KernelConfig, arch: str) -> str:
    p = canonical(problem)
    raw = repr((_CACHE_VERSION, p, sorted(cfg.as_dict().items()), arch, _kernel_source_hash()))
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


_SRC_HASH: str | None = None


def _kernel_source_hash() -> str:
    """Cached objects are invalid once the kernel source changes."""
    global _SRC_HASH
    if _SRC_HASH is None:
        here = Path(__file__).parent
        h = hashlib.sha256()
        for name in ("norm_kernel.py", "config.py", "problem.py", "compile_cache.py"):
            h.update((here / name).read_bytes())
        _SRC_HASH = h.hexdigest()[:16]
    return _SRC_HASH


def _dump_dir_for_cubins() -> None:
    """--keep-cubin (resource usage) writes files; keep them out of the caller's working directory."""
    if "CUTE_DSL_DUMP_DIR" not in os.environ:
        d = cache_dir() / "dump"
        d.mkdir(exist_ok=True)
        os.environ["CUTE_DSL_DUMP_DIR"] = str(d)


def cache_dir() -> Path:
    d = Path(os.environ.get("LUTFORGE_CACHE_DIR", Path.home() / ".cache" / "lutforge"))
    d.mkdir(parents=True, exist_ok=True)
    return d


_MEM: dict[str, object] = {}
_LOCK = threading.Lock()  # CuTe-DSL compilation is not thread-safe


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
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_stream, make_fake_tensor

    dt = {"bf16": cutlass.BFloat16, "fp16": cutlass.Float16}[problem.in_dtype]
    v = vec_elems(problem, cfg)
    vb = cfg.vec_bytes
    C, H = problem.C, problem.heads
    T = cute.sym_int()

    def strides(div):
        return (cute.sym_int(64, divisibility=div), cute.sym_int(64, divisibility=div), 1)

    x = make_fake_tensor(dt, (T, H, C), stride=strides(v), assumed_align=vb)
    w = make_fake_tensor(dt, (C,), stride=(1,), assumed_align=vb)
    res = None
    if problem.spec.residual:
        res = make_fake_tensor(dt, (T, C), stride=(cute.sym_int(64, divisibility=v), 1), assumed_align=vb)
    sf = gs = None
    if problem.out_format in FP4_BLOCK:
        y = make_fake_tensor(cutlass.Uint8, (T, H, C // 2), stride=strides(v // 2), assumed_align=max(1, v // 2))
        if problem.scale_layout == "swizzled":
            sf = make_fake_tensor(cutlass.Uint8, (cute.sym_int(),), stride=(1,), assumed_align=4)
        else:
            n_sf = C // FP4_BLOCK[problem.out_format]
            sf = make_fake_tensor(cutlass.Uint8, (cute.sym_int(), n_sf), stride=(cute.sym_int(64), 1), assumed_align=1)
        if problem.spec.fp4_scales:
            gs = make_fake_tensor(cutlass.Float32, (1,), stride=(1,), assumed_align=4)
    else:
        ydt = cutlass.Float8E4M3FN if problem.out_format == "fp8" else dt
        e_out = ELEM_BYTES[problem.out_format]
        y = make_fake_tensor(ydt, (T, H, C), stride=strides(v), assumed_align=v * e_out)
    return (x, w, res, y, sf, gs, cutlass.Float32(1e-6), cutlass.Float32(1.0), cutlass.Int32(1),
            make_fake_stream())


def _compile(problem: Problem, cfg: KernelConfig, arch: str):
    import cutlass.cute as cute

    from .norm_kernel import KernelSpec, NormKernel

    why = violations(problem, cfg, arch_number(arch))
    if why:
        raise ValueError(f"invalid config {cfg.short()} for {problem}: {'; '.join(why)}")
    kernel = NormKernel(KernelSpec(canonical(problem), cfg, arch_number(arch)))
    _dump_dir_for_cubins()
    with _LOCK, _target_arch(arch):
        try:
            return cute.compile(kernel, *_fake_args(problem, cfg), options="--keep-cubin")
        except Exception as e:  # the DSL raises many exception types
            raise KernelCompileError(f"{problem.op}/{problem.out_format} C={problem.C} {cfg.short()} {arch}: "
                                     f"{type(e).__name__}: {e}") from e


def precompile(problem: Problem, cfg: KernelConfig, arch: str) -> CompileInfo:
    """Compile one config for `arch` and store it in the disk cache (idempotent, no GPU needed)."""
    key = cache_key(problem, cfg, arch)
    path = cache_dir() / f"{key}.o"
    if path.exists():
        return CompileInfo(0.0, None, None, True)
    t0 = time.perf_counter()
    compiled = _compile(problem, cfg, arch)
    dt = time.perf_counter() - t0
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(compiled.dump_to_object(f"lf_{key}"))
    os.replace(tmp, path)
    with _LOCK:
        _MEM[key] = compiled
    return CompileInfo(dt, *resource_usage(compiled), from_cache=False)


def get_compiled(problem: Problem, cfg: KernelConfig, arch: str):
    """The callable for (problem, cfg, arch): memory cache, then disk cache, then compile."""
    key = cache_key(problem, cfg, arch)
    fn = _MEM.get(key)
    if fn is not None:
        return fn
    path = cache_dir() / f"{key}.o"
    if path.exists():
        from cutlass.cute.runtime import load_module

        with _LOCK:
            try:
                fn = getattr(load_module(str(path)), f"lf_{key}")
            except Exception:  # a stale or truncated object: recompile below
                fn = None
    if fn is None:
        precompile(problem, cfg, arch)
        fn = _MEM.get(key)
        if fn is None:  # another process wrote the object between our checks
            from cutlass.cute.runtime import load_module

            fn = getattr(load_module(str(path)), f"lf_{key}")
    with _LOCK:
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
