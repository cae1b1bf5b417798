"""Kernel arguments of a case are built once per vector width and tensor layout (timed trials bind
thousands of rotation sets), and never served stale when a tensor changes."""
from __future__ import annotations

import torch

from kernels import runner
from kernels.config import KernelConfig, heuristic
from kernels.problem import Problem


def test_cached_per_vector_width_and_rebuilt_when_a_tensor_changes():
    p = Problem("fused_add_rmsnorm", 3, 2048)
    case = runner.make_case(p, device="cpu", seed=0)
    cfg = heuristic(p, 90)
    first = runner._case_kernel_args(case, cfg)
    assert runner._case_kernel_args(case, cfg) is first
    fresh = runner.kernel_args(p, cfg, case.args["x"], case.args["weight"], case.args["residual"], case.args["x"],
                               None, None)
    assert [str(a) for a in first] == [str(a) for a in fresh]  # the cache holds what would be built now
    narrow = KernelConfig(**{**cfg.as_dict(), "vec_bytes": 8})
    assert runner._case_kernel_args(case, narrow) is not first
    case.args["residual"] = case.args["residual"].clone()  # another buffer: the pointers must follow
    moved = runner._case_kernel_args(case, cfg)
    assert moved is not first and str(moved[2]) != str(first[2])


def test_rotation_sets_bind_once_across_trials(monkeypatch):
    """Every trial of a study re-binds the same rotation sets: pointers are built once per set."""
    p = Problem("rmsnorm", 1, 2048)
    cases = [runner.make_case(p, device="cpu", seed=i) for i in range(5)]
    built = []
    real = runner.kernel_args
    monkeypatch.setattr(runner, "kernel_args", lambda *a: built.append(a) or real(*a))
    for threads in (64, 128, 256):  # three trials, same vector width
        cfg = KernelConfig(threads=threads, threads_per_row=64, vec_bytes=16)
        for c in cases:
            runner._case_kernel_args(c, cfg)
    assert len(built) == len(cases)
