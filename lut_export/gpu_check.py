"""On a GPU: every EXACT entry of a LUT module must give correct results, and must not be slower than
the analytical heuristic by more than noise (re-timed here, interleaved, with rotated buffers)."""
from __future__ import annotations

from typing import NamedTuple

from kernels.family import family_of_key
from kernels.luts import LutModule

from .winners import TIE


class Finding(NamedTuple):
    """What the GPU check found: `key` the entry (None: the whole module), `kind` one of module | failed |
    wrong | slower, and the message."""
    key: tuple | None
    kind: str
    message: str

ROUNDS = 2  # interleaved tuned/heuristic timing rounds; the best median of each counts
MAX_SETS = 256  # rotation sets per config; tinier problems are launch-bound, L2 residency barely moves them


def _time(run, problem, cfg, cases, arch: str):
    from sweep.timer import time_launchers

    launchers = [run.launcher(problem, cfg, c, arch) for c in cases]
    return time_launchers(launchers, set_bytes=cases[0].nbytes)


def gpu_check(lut: LutModule, device: int = 0, keys=None, record=None) -> list[Finding]:
    """Problems found by running the module's EXACT entries (those in `keys` when given: `tune` checks
    what its run exported) on GPU `device` (empty list = all good). `record(problem, config, source, timing)`
    receives each re-timing (source "search" for the entry, "heuristic"): `tune` keeps them as re-bench rows,
    so the next export sees this head-to-head instead of re-adding an entry the check rejected."""
    import torch

    from kernels.compile_cache import arch_name
    from kernels.dispatch import device_class_of
    from kernels.runner import arch_of
    from sweep.timer import l2_bytes, rotation_sets

    if not torch.cuda.is_available():
        return [Finding(None, "module", "--gpu needs a CUDA device; none is visible")]
    torch.cuda.set_device(device)
    arch = arch_name(lut.metadata["arch"])
    here = arch_of(device)
    if here != arch:
        return [Finding(None, "module", f"{lut.name} is for {arch} but this GPU is {here}")]
    cls = device_class_of(torch.cuda.get_device_name(device))
    if cls != lut.metadata["device_class"]:
        return [Finding(None, "module", f"{lut.name} was tuned on {lut.metadata['device_class']} but this GPU is {cls}; "
                "re-time it on its own device class")]
    errs = []
    for key, knobs in lut.exact.items():
        if keys is not None and key not in keys:
            continue
        fam = family_of_key(key)
        p, run = fam.problem_of_key(key), fam.runner
        cfg = fam.config_type(**knobs)
        where = f"EXACT[{key!r}] {cfg.short()}"
        try:
            case = run.make_case(p, seed=0)
            run.launcher(p, cfg, case, arch)()
            torch.cuda.synchronize()
            res = run.check(p, case)
        except Exception as e:  # a CUDA fault or compile failure is a finding, not a crash of the validator
            errs.append(Finding(key, "failed", f"{where}: failed to run: {type(e).__name__}: {e}"))
            continue
        if not res.ok:
            errs.append(Finding(key, "wrong", f"{where}: wrong result: {res.message}"))
            continue
        if fam.positions(p) == 0:
            continue  # nothing to time
        h = fam.heuristic(p, lut.metadata["arch"])
        if h == cfg:
            continue
        sets = min(MAX_SETS, rotation_sets(max(1, case.nbytes), l2_bytes(device)))
        cases = [case] + run.make_cases(p, sets - 1, seed=1)  # sets >= 2
        best = {"tuned": None, "heuristic": None}
        for _ in range(ROUNDS):
            for name, c in (("tuned", cfg), ("heuristic", h)):
                t = _time(run, p, c, cases, arch)
                if best[name] is None or t.median_us < best[name].median_us:
                    best[name] = t
        tuned, heur = best["tuned"], best["heuristic"]
        if record is not None:
            record(p, cfg, "search", tuned)
            record(p, h, "heuristic", heur)
        spread = sum((t.p80_us - t.p20_us) / t.median_us for t in (tuned, heur))
        noise = max(TIE, spread)
        if tuned.median_us > heur.median_us * (1 + noise):
            errs.append(Finding(key, "slower", f"{where}: {tuned.median_us:.2f} us, slower than the heuristic "
                                f"{h.short()} ({heur.median_us:.2f} us) by more than noise ({100 * noise:.1f} %)"))
        del cases
    return errs
