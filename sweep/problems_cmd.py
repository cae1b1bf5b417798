"""`lutforge problems [NAME]`: list the problem sets, or the shapes of one set."""
from __future__ import annotations

import click

import problem_sets

from .families import harness


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
            rows = []
            for s in map(problem_sets.load, problem_sets.list_sets()):
                count, kind, _ = harness(s.family).describe_set(s)
                rows.append([s.name, count, kind, s.description])
            click.echo(_table(["set", "shapes", "kind", "description"], rows))
            return
        ps = problem_sets.load(name)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="NAME") from None
    click.echo(f"{ps.name}: {ps.description}")
    _, _, (headers, rows, footer) = harness(ps.family).describe_set(ps)
    click.echo(_table(headers, rows))
    for line in footer:
        click.echo(line)
