"""lutforge as a user calls it: the public op (each family runner's `public_launcher`: `kernels.ops` for the
row family, `kernels.channel_first_op.channel_first_rmsnorm`, `kernels.fused_moe.fused_moe`) on a
problem's case tensors, so what the report calls "lutforge" includes everything the op does per call on the GPU (validation-cached runtime
dispatch: LUT tier or fallback; any extra launch), not only the kernel a sweep timed."""
from __future__ import annotations

from kernels.family import family_of


def measure_op(problem) -> dict:
    """Check then time the public op on rotated buffers (in the timing process, on the GPU)."""
    from .trial_worker import check_then_time

    make = family_of(problem).runner.public_launcher

    def make_launch(case):
        launch = make(problem, case)
        return launch, launch

    return check_then_time(problem, make_launch)
