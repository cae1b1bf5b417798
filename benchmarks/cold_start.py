"""Cold start of a serving process: import + first call of a covered shape, in a fresh interpreter each time.

    python benchmarks/cold_start.py [--op rmsnorm --shape 32x4096] [--out FILE.json]

Each run starts a new Python with an empty disk cache (LUTFORGE_CACHE_DIR in a temp folder), so a kernel
comes from the shipped AOT library or is compiled; runs with LUTFORGE_AOT=0 show the JIT path for
comparison. Reported: import torch, import kernels.ops, CUDA context (torch's, not ours), first call."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from kernels import compile_cache, ops
t2 = time.perf_counter()
T, C = {T}, {C}
x = torch.randn(T, C, device="cuda", dtype=torch.bfloat16)
w = torch.rand(C, device="cuda", dtype=torch.bfloat16) + 0.5
torch.cuda.synchronize()
t3 = time.perf_counter()
y = ops.{op}(x, w)
torch.cuda.synchronize()
t4 = time.perf_counter()
ref = torch.nn.functional.rms_norm(x.float(), (C,), w.float(), 1e-6)
err = ((y.float() - ref).norm() / ref.norm()).item()
print(json.dumps({{"import_torch_s": t1 - t0, "import_kernels_s": t2 - t1, "cuda_init_s": t3 - t2,
                  "first_call_s": t4 - t3, "kernels_import_plus_first_call_s": (t2 - t1) + (t4 - t3),
                  "compiles": compile_cache.compile_count(), "cutlass_imported": "cutlass" in sys.modules,
                  "rel_err": err}}))
"""


def run(op: str, T: int, C: int, aot: bool) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, LUTFORGE_CACHE_DIR=cache, LUTFORGE_AOT="1" if aot else "0")
        r = subprocess.run([sys.executable, "-c", CHILD.format(op=op, T=T, C=C)], env=env, capture_output=True,
                           text=True, timeout=600)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", default="rmsnorm")
    ap.add_argument("--shape", default="32x4096")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    T, C = (int(v) for v in a.shape.split("x"))
    res = {"aot": [run(a.op, T, C, True) for _ in range(a.runs)], "jit": [run(a.op, T, C, False)]}
    for mode, runs in res.items():
        for r in runs:
            print(f"{mode}: " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if a.out:
        from pathlib import Path

        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"op": a.op, "T": T, "C": C, **res}, indent=1) + "\n")


if __name__ == "__main__":
    main()
