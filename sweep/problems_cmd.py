"""`lutforge problems [NAME]`: list the problem sets, or the shapes of one set."""
from __future__ import annotations

import click

import problem_sets


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@click.command("problems")
@click.argument("name", required=False)
def problems_command(name: str | None):
    """List the problem sets (name, shapes, description), or the shapes of set NAME."""
    try:
        if name is None:
            rows = [[s.name, len(s.moe_problems), "moe", s.description] if s.family == "moe" else
                    [s.name, len(s.shapes), "per-head" if s.per_head else "rows", s.description]
                    for s in map(problem_sets.load, problem_sets.list_sets())]
            click.echo(_table(["set", "shapes", "kind", "description"], rows))
            return
        ps = problem_sets.load(name)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="NAME") from None
    click.echo(f"{ps.name}: {ps.description}")
    if ps.family == "moe":
        _echo_moe(ps)
        return
    if ps.per_head:
        rows = [[t, h, c, t * h] for t, c, h in ps.shapes]
        click.echo(_table(["tokens", "heads", "head_dim", "rows"], rows))
    else:
        click.echo(_table(["tokens", "hidden"], [[t, c] for t, c, _ in ps.shapes]))
    click.echo(f"{len(ps.shapes)} shapes")


def _echo_moe(ps) -> None:
    """A fused-MoE set: its layers, then the lists crossed with them (one line each, in file order)."""
    from kernels.moe_problem import layer_label

    layers = dict.fromkeys((n, p.E, p.top_k, p.H, p.I, p.activation, p.local_experts or "all", layer_label(p))
                           for n, p in zip(ps.moe_names, ps.moe_problems))
    click.echo(_table(["layer", "E", "top_k", "H", "I", "activation", "local", "label"], [list(r) for r in layers]))
    for what, attr in (("tokens", "T"), ("routing", "routing"), ("quant modes", "quant_mode")):
        values = dict.fromkeys(getattr(p, attr) for p in ps.moe_problems)
        click.echo(f"{what}: {', '.join(map(str, values))}")
    click.echo(f"{len(ps.moe_problems)} problems")
