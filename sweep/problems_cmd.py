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
            rows = [[s.name, len(s.shapes), "per-head" if s.per_head else "rows", s.description]
                    for s in map(problem_sets.load, problem_sets.list_sets())]
            click.echo(_table(["set", "shapes", "kind", "description"], rows))
            return
        ps = problem_sets.load(name)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="NAME") from None
    click.echo(f"{ps.name}: {ps.description}")
    if ps.per_head:
        rows = [[t, h, c, t * h] for t, c, h in ps.shapes]
        click.echo(_table(["tokens", "heads", "head_dim", "rows"], rows))
    else:
        click.echo(_table(["tokens", "hidden"], [[t, c] for t, c, _ in ps.shapes]))
    click.echo(f"{len(ps.shapes)} shapes")
