"""Test-only fault selection shared by the synthetic and GPU backends.

An environment variable holds a JSON list of {"when": {name: value, ...}, "fault": kind}; a trial
matches an entry when its knobs and problem fields (T, C, op, out_format) equal every entry of "when".
"""
from __future__ import annotations

import json
import os

from kernels.config import KernelConfig
from kernels.problem import Problem


def fault_for(env: str, kinds: tuple[str, ...], p: Problem, cfg: KernelConfig) -> str | None:
    """The fault kind `env` selects for this trial, or None; ValueError names a malformed variable."""
    raw = os.environ.get(env)
    if not raw:
        return None
    try:
        faults = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{env} is not JSON: {e}") from e
    if not isinstance(faults, list) or not all(isinstance(f, dict) and f.get("fault") in kinds
                                               and isinstance(f.get("when"), dict) for f in faults):
        raise ValueError(f"{env} must be a list of {{'when': {{knob: value}}, 'fault': one of {kinds}}}")
    d = {**cfg.as_dict(), "T": getattr(p, "T", None), "C": p.C, "op": p.op, "out_format": p.out_format}
    for f in faults:
        if all(d.get(k) == v for k, v in f["when"].items()):
            return f["fault"]
    return None
