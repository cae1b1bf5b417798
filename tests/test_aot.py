"""Compiling ahead of time: objects target the arch asked for (whatever the process compiled before), the
dispatch walk over T finds every answer, and after a warm-up no T compiles again."""
from __future__ import annotations

import random
import struct

import pytest

from kernels import compile_cache
from kernels.config import heuristic
from kernels.dispatch import T_MAX, default_dispatcher
from kernels.problem import Problem
from kernels.warmup import reachable_configs, warmup


def _cubin_sm(obj: bytes) -> int:
    """SM number in the e_flags of the first cubin embedded in a host object (CUDA ELF ABI 8 moved it from
    bits 0-7 to bits 8-15)."""
    i = obj.find(b"\x7fELF", 1)
    assert i > 0, "no embedded cubin"
    flags = struct.unpack_from("<I", obj, i + 0x30)[0]
    return (flags >> 8) & 0xFF if obj[i + 8] >= 8 else flags & 0xFF


def test_objects_target_the_requested_arch(tmp_path, monkeypatch):
    monkeypatch.setenv("LUTFORGE_CACHE_DIR", str(tmp_path))
    p = Problem("rmsnorm", 0, 256)
    cfg = heuristic(p, 90)
    for arch, sm in (("sm_100a", 100), ("sm_90a", 90), ("sm_100a", 100)):  # order must not matter
        compile_cache.precompile(p, cfg, arch)
        obj = (tmp_path / f"{compile_cache.cache_key(p, cfg, arch)}.o").read_bytes()
        assert _cubin_sm(obj) == sm, arch


@pytest.mark.parametrize("family", [Problem("rmsnorm", 0, 4096), Problem("fused_rmsnorm_silu", 0, 64),
                                    Problem("fused_rmsnorm_silu", 0, 512, out_format="fp8"),
                                    Problem("qk_rmsnorm", 0, 128, heads=32),
                                    Problem("rmsnorm_fp4quant", 0, 4096, out_format="nvfp4", scale_layout="swizzled")],
                         ids=lambda p: f"{p.op}-{p.out_format}-{p.C}")
@pytest.mark.parametrize("device_class", ["h100", "h200", None])
def test_segments_cover_every_T(family, device_class):
    d = default_dispatcher()
    segs = d.segments(family, 90, device_class)
    assert segs[0][0] == 1 and segs[-1][1] == T_MAX
    for (a0, a1, _), (b0, _, _) in zip(segs, segs[1:]):
        assert a0 <= a1 and b0 == a1 + 1
    rng = random.Random(0)
    samples = {1, 2, T_MAX} | {rng.randint(1, 1 << rng.randint(1, 24)) for _ in range(400)}
    samples |= {t + dt for a, b, _ in segs for t in (a, b) for dt in (-1, 0, 1) if 1 <= t + dt <= T_MAX}
    for T in sorted(samples):
        sel = d.lookup(Problem(family.op, T, family.C, family.in_dtype, family.out_format, family.heads,
                               family.scale_layout), 90, device_class)
        (run,) = [s for a, b, s in segs if a <= T <= b]
        assert run == sel, T


def test_no_compile_after_warmup(tmp_path, monkeypatch):
    from kernels import aot

    monkeypatch.setenv("LUTFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LUTFORGE_AOT", "0")  # a checkout may hold a built library: compile here
    monkeypatch.setattr(compile_cache, "_MEM", {})
    aot.forget()
    report = warmup("fused_rmsnorm_silu", 64, out_formats=["bf16"], arch="sm_90a", device_class="h200")
    fam = Problem("fused_rmsnorm_silu", 0, 64)
    assert report.kernels == len(reachable_configs(fam, 90, "h200")) and report.compiled == report.kernels
    before = compile_cache.compile_count()
    for T in (1, 7, 779, 780, 1560, 3119, 50000, 399360, 10 ** 6):
        p = Problem("fused_rmsnorm_silu", T, 64)
        cfg = default_dispatcher().lookup(p, 90, "h200").config
        compile_cache.get_compiled(p, cfg, "sm_90a")
    assert compile_cache.compile_count() == before
    again = warmup("fused_rmsnorm_silu", 64, out_formats=["bf16"], arch="sm_90a", device_class="h200")
    assert again.compiled == 0


def test_warmup_command_compiles_once(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from kernels import aot
    from sweep.cli import main

    monkeypatch.setattr(compile_cache, "_MEM", {})
    aot.forget()
    env = {"LUTFORGE_CACHE_DIR": str(tmp_path), "LUTFORGE_AOT": "0"}
    args = ["warmup", "--op", "rmsnorm", "--hidden", "2048", "--out", "bf16", "--arch", "sm_90a",
            "--device-class", "h100"]
    first = CliRunner().invoke(main, args, env=env)
    assert first.exit_code == 0, first.output
    n = len(reachable_configs(Problem("rmsnorm", 0, 2048), 90, "h100"))
    assert f"{n} kernels ready ({n} compiled now" in first.output
    again = CliRunner().invoke(main, args, env=env)
    assert f"{n} kernels ready (0 compiled now" in again.output
    bad = CliRunner().invoke(main, ["warmup", "--op", "rmsnorm", "--hidden", "x", "--arch", "sm_90a"])
    assert bad.exit_code != 0 and "positive integers" in bad.output
