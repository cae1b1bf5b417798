"""`lutforge export`, `lutforge validate` and `lutforge explain`: the LUT stage of the command line.
Heavy imports (pandas, cutlass, torch) happen inside the commands so `lutforge --help` stays quick."""
from __future__ import annotations

from pathlib import Path

import click

from kernels.problem import IN_DTYPES, OPS, SCALE_LAYOUTS

MAX_NOTES = 20  # export notes printed before summarising the rest


def _fail(e: Exception) -> click.ClickException:
    return click.ClickException(str(e))


@click.command("export")
@click.option("--results", type=click.Path(file_okay=False, path_type=Path),
              help="Results directory (Parquet rows) to export winners from.")
@click.option("--arch", default=None, help="Arch to export, e.g. sm90 (default: the only one in the rows).")
@click.option("--device-class", default=None, help="Device class, e.g. h100 (default: the only one in the rows).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Module to write (default kernels/luts/sm<arch>_<device class>.py; outside kernels/luts/ any "
                   "name but another LUT's). Entries of a module already there stay unless the rows measured "
                   "them anew.")
@click.option("--replace", is_flag=True,
              help="Build the module from the rows alone instead of merging into the one at the destination.")
@click.option("--allow-synthetic", is_flag=True,
              help="TEST ONLY: accept synthetic-backend rows; refuses to write inside kernels/luts/.")
@click.option("--wheel", is_flag=True, help="Build the standalone lutforge_kernels runtime wheel.")
@click.option("--dist", type=click.Path(file_okay=False, path_type=Path), default=Path("dist"), show_default=True,
              help="Where --wheel writes the wheel.")
@click.option("--aot-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="AOT kernel library folder the wheel ships (default kernels/aot/, built by `lutforge aot`).")
def export_command(results, arch, device_class, out, replace, allow_synthetic, wheel, dist, aot_dir):
    """Export tuned winners into a LUT module (merged into the one there) and/or build the runtime wheel."""
    if results is None and (arch or device_class or out or replace or allow_synthetic):
        raise click.UsageError("--arch/--device-class/--out/--replace/--allow-synthetic need --results")
    if results is None and not wheel:
        raise click.UsageError("give --results DIR to export a LUT, --wheel to build the runtime wheel, or both")
    if results is not None:
        from .export import export_lut

        try:
            r = export_lut(results, out=out, arch=arch, device_class=device_class, allow_synthetic=allow_synthetic,
                           merge=not replace)
        except (ValueError, TypeError) as e:
            raise _fail(e) from None
        click.echo(f"wrote {r.path}: sm{r.arch}/{r.device_class} ({r.backend}), {r.exact} exact entries, "
                   f"{r.ranges} range families in {r.segments} segments")
        click.echo(f"  {r.merge_text(replace)}")
        for note in r.notes[:MAX_NOTES]:
            click.echo(f"  note: {note}")
        if len(r.notes) > MAX_NOTES:
            click.echo(f"  ... and {len(r.notes) - MAX_NOTES} more notes")
    if wheel:
        from .wheel import build_wheel

        try:
            path = build_wheel(dist, aot_dir)
        except ValueError as e:
            raise _fail(e) from None
        click.echo(f"built {path}")


@click.command("validate")
@click.argument("modules", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--compile", "compile_", is_flag=True, help="Also compile every entry for its arch (CPU is enough).")
@click.option("--gpu", is_flag=True, help="Also check correctness and re-time against the heuristic on this GPU.")
def validate_command(modules, compile_, gpu):
    """Validate LUT modules (default: every shipped kernels/luts/sm*.py)."""
    from .validate import shipped_paths, validate_file

    paths = list(modules) or shipped_paths()
    if not paths:
        click.echo("no LUT modules in kernels/luts/; nothing to validate")
        return
    failed = 0
    for path in paths:
        errs = validate_file(path, compile=compile_, gpu=gpu)
        if errs:
            failed += 1
            click.echo(f"FAIL {path}")
            for e in errs:
                click.echo(f"  {e}")
        else:
            click.echo(f"ok   {path}")
    if failed:
        raise click.ClickException(f"{failed} of {len(paths)} LUT modules failed validation")


def _shape(text: str) -> tuple[int, int, int]:
    try:
        parts = [int(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (2, 3):
        raise click.BadParameter(f"expected T,C or T,C,heads (integers), got {text!r}", param_hint="--shape")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else 1


@click.command("explain")
@click.option("--op", required=True, type=click.Choice(sorted(OPS)))
@click.option("--shape", required=True, help="T,C or T,C,heads (per-head ops: C = head_dim).")
@click.option("--out", "out_format", default=None, help="Output format: bf16|fp16|fp8|nvfp4|mxfp4 (default: input dtype).")
@click.option("--in-dtype", default="bf16", show_default=True, type=click.Choice(IN_DTYPES))
@click.option("--scale-layout", default="rowmajor", show_default=True, type=click.Choice(SCALE_LAYOUTS))
@click.option("--arch", default="sm90", show_default=True)
@click.option("--device-class", default=None, help="e.g. h100; default: any LUT module of the arch.")
@click.option("--row-stride", type=int, default=None, help="Elements between rows when not C.")
@click.option("--ptr-align", type=int, default=16, show_default=True, help="Byte alignment of the data pointers.")
@click.option("--lut", "luts", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Look up in these LUT module files instead of the shipped ones.")
def explain_command(op, shape, out_format, in_dtype, scale_layout, arch, device_class, row_stride, ptr_align, luts):
    """Show which dispatch tier answers a problem and the knobs it picks."""
    from kernels.dispatch import Dispatcher, default_dispatcher
    from kernels.problem import Problem

    from .winners import parse_arch

    T, C, heads = _shape(shape)
    try:
        sm = parse_arch(arch)
        p = Problem(op=op, T=T, C=C, in_dtype=in_dtype, out_format=out_format or in_dtype, heads=heads,
                    scale_layout=scale_layout)
        d = Dispatcher.from_paths(luts) if luts else default_dispatcher()
        s = d.lookup(p, sm, device_class, row_stride, ptr_align)
    except (ValueError, TypeError) as e:
        raise _fail(e) from None
    click.echo(f"problem: {p.op} {p.in_dtype}->{p.out_format} ({p.scale_layout}) T={p.T} C={p.C} heads={p.heads} "
               f"on sm{sm}{'/' + device_class if device_class else ''}")
    click.echo(f"tier:    {s.tier}" + (f" (from {s.source}, key {s.key})" if s.source else ""))
    click.echo("knobs:   " + " ".join(f"{k}={v}" for k, v in s.config.as_dict().items()))
    click.echo(f"LUTs:    {', '.join(d.modules) or 'none'}")


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise click.BadParameter(f"expected a comma list of positive integers, got {text!r}", param_hint=what)
    return vals


def _family_options(f):
    """--heads, --in-dtype and --out: the problem families `aot` and `warmup` cover besides op and C."""
    for opt in reversed([
            click.option("--heads", type=click.IntRange(min=1), default=1, show_default=True,
                         help="Heads of per-head ops."),
            click.option("--in-dtype", "in_dtypes", default="bf16", show_default=True, help="Comma list of bf16, fp16."),
            click.option("--out", "outs", default=None, help="Output formats (default: all the op has).")]):
        f = opt(f)
    return f


@click.command("aot")
@click.option("--arch", default="sm_90a", show_default=True, help="Compile target (sm_90a, sm_100a).")
@click.option("--device-class", "classes", default=None,
              help="Comma list of device classes whose dispatch answers to cover (default: every shipped LUT's).")
@click.option("--op", "ops", default=None, help="Declared ops (comma list) to cover besides the LUT families.")
@click.option("--hidden", default=None, help="Row lengths C for the declared ops (comma list; per-head ops: head_dim).")
@_family_options
@click.option("--no-luts", is_flag=True, help="Cover only the declared families, not the shipped LUTs' ones.")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Library folder (default kernels/aot/, which the runtime and the wheel pick up).")
@click.option("--jobs", type=click.IntRange(min=1), default=None, help="Compile processes (default: CPU count).")
def aot_command(arch, classes, ops, hidden, heads, in_dtypes, outs, no_luts, dest, jobs):
    """Compile, without a GPU, every kernel dispatch can return for the covered families, into one library."""
    import os

    from kernels import aot
    from kernels.compile_cache import arch_number

    from .aot_entries import declared_families, entries

    if bool(ops) != bool(hidden):
        raise click.UsageError("--op and --hidden go together")
    try:
        declared = declared_families(ops.split(","), _ints(hidden, "--hidden"), in_dtypes.split(","),
                                     outs.split(",") if outs else None, heads) if ops else []
        sm = arch_number(arch)
        todo = entries(sm, classes.split(",") if classes else None, declared)
        if no_luts:
            keep = set(declared)
            todo = [(f, c) for f, c in todo if f in keep]
    except (ValueError, TypeError) as e:
        raise _fail(e) from None
    click.echo(f"{len(todo)} kernels for {arch} ({len({f for f, _ in todo})} problem families)")
    aot.build_library(todo, arch, dest or aot.package_dir(), jobs or os.cpu_count() or 1, log=click.echo)


@click.command("warmup")
@click.option("--op", "ops", required=True, help="Op or comma list of ops.")
@click.option("--hidden", required=True, help="Row lengths C (comma list; per-head ops: head_dim).")
@_family_options
@click.option("--arch", default=None, help="Without a GPU: compile target (e.g. sm_90a) to fill the disk cache for.")
@click.option("--device-class", default=None, help="With --arch: whose dispatch answers to cover (e.g. h200).")
def warmup_command(ops, hidden, heads, in_dtypes, outs, arch, device_class):
    """Load or compile every kernel dispatch can return for these ops and row lengths at any T (disk cache)."""
    from kernels.warmup import warmup

    if device_class and not arch:
        raise click.UsageError("--device-class goes with --arch (on a GPU the device names its class)")
    total = compiled = 0
    try:
        for op in ops.split(","):
            r = warmup(op.strip(), _ints(hidden, "--hidden"), in_dtypes.split(","), outs.split(",") if outs else None,
                       heads, arch=arch, device_class=device_class)
            click.echo(f"{op}: {r.kernels} kernels over {r.families} families, {r.compiled} compiled now")
            total, compiled = total + r.kernels, compiled + r.compiled
    except (ValueError, TypeError) as e:
        raise _fail(e) from None
    click.echo(f"{total} kernels ready ({compiled} compiled now and cached on disk, the rest from the AOT library or "
               "the disk cache)")
