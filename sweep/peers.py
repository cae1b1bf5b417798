"""Peer implementations `lutforge bench` times beside lutforge, on the same timer and the same inputs.

Each peer does the op the way its users call it: torch eager and torch.compile run the reference formula
(fp32 inside) writing into the preallocated outputs; quack, liger and flashinfer are called through their
public APIs. Which peers a family has and how each is called is the family's (sweep/families: the row norms
have all five; channel-first norms the torch formula of diffusers' WanRMS_norm; the fused MoE torch's
grouped GEMM on dequantised bf16 weights). A peer is checked against lutforge's reference (the family
runner's check) before it is timed, so a peer that computes something else is recorded wrong_result, not
compared. A peer that cannot do an op/output format is skipped with the reason `unsupported` gives.
"""
from __future__ import annotations

import importlib.util
from typing import Callable

from .families import harness_of

PEERS = ("torch_eager", "torch_compile", "quack", "liger", "flashinfer")
_MODULE = {"torch_eager": "torch", "torch_compile": "torch", "quack": "quack", "liger": "liger_kernel",
           "flashinfer": "flashinfer"}


def parse_peers(spec: str) -> list[str]:
    """'all', 'none' (lutforge alone: comparing versions of our own kernel) or a comma list of PEERS names."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"peers must be 'all', 'none' or a comma list of {PEERS}")
    if spec.strip() == "all":
        return list(PEERS)
    if spec.strip() == "none":
        return []
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in PEERS]
    if bad:
        raise ValueError(f"unknown peers {bad}; known: {', '.join(PEERS)}")
    return list(dict.fromkeys(names))


def unsupported(problem, impl: str) -> str | None:
    """Why `impl` cannot run `problem` here (None = it can). Checks importability without importing, then asks
    the problem's family."""
    if impl not in PEERS:
        raise ValueError(f"unknown peer {impl!r}; known: {', '.join(PEERS)}")
    if importlib.util.find_spec(_MODULE[impl]) is None:
        return f"{_MODULE[impl]} is not installed"
    return harness_of(problem).peer_unsupported(problem, impl)


_COMPILED: dict = {}


def torch_peer(impl: str, p, case, make_fn):
    """The eager function, or its torch.compile'd graph (one per problem, shared by its rotation sets)."""
    import torch

    fn = make_fn(p, case.eps, case.scale)
    if impl == "torch_compile":
        key = (p, case.eps, case.scale)
        if key not in _COMPILED:
            torch._dynamo.reset()  # forget earlier problems' graphs: no recompile-limit fallback
            _COMPILED.clear()
            _COMPILED[key] = torch.compile(fn, dynamic=False)
        fn = _COMPILED[key]
    return fn


def build(impl: str, problem, case) -> tuple[Callable[[], object], Callable[[object], None]]:
    """(launch, write_back): launch runs the peer once on `case`; write_back puts a returned result into
    the case's output tensors so the family runner's check can judge it (no-op for peers writing in place)."""
    return harness_of(problem).peer_build(impl, problem, case)


def measure_peer(problem, impl: str) -> dict:
    """Check then time one peer on rotated buffers (runs in the timing process, on the GPU)."""
    from .trial_worker import check_then_time

    reason = unsupported(problem, impl)
    if reason:
        raise ValueError(f"{impl} cannot run {problem.op}/{problem.out_format}: {reason}")

    def make_launch(case):
        launch, write_back = build(impl, problem, case)
        return launch, lambda: write_back(launch())

    return check_then_time(problem, make_launch)
