"""Programmatic dependent launch, the kernel side: every kernel launched with programmatic stream
serialisation waits for its predecessor's grid before touching memory (griddepcontrol.wait) and then lets its
own dependents launch at once, so the next grid's launch and CTA start-up overlap this one's tail."""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import const_expr


@cute.jit
def await_predecessor_and_release(enabled: cutlass.Constexpr):
    """griddepcontrol.wait, then griddepcontrol.launch_dependents; nothing when the kernel is compiled for
    plain launches (`enabled` False)."""
    if const_expr(enabled):
        cute.arch.griddepcontrol_wait()
        cute.arch.griddepcontrol_launch_dependents()
