"""The `lutforge` command line: one click group; each subcommand lives beside the code it drives."""
from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="lutforge")
def main():
    """Tune RMSNorm-family GPU kernels, export the winners as lookup tables, look at the results."""


# Subcommands register here, one line each.
