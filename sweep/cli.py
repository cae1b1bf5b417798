"""The `lutforge` command line: one click group; each subcommand lives beside the code it drives."""
from __future__ import annotations

import signal
import sys
import threading

import click


def exit_on_sigterm(signum, frame):
    sys.exit(128 + signum)  # unwinds like Ctrl-C: `finally` blocks flush buffered rows and stop workers


@click.group()
@click.version_option(package_name="lutforge")
def main():
    """Tune RMSNorm-family GPU kernels, export the winners as lookup tables, look at the results."""
    if threading.current_thread() is threading.main_thread():  # `timeout`/`kill` stop a sweep or bench cleanly
        signal.signal(signal.SIGTERM, exit_on_sigterm)


# Subcommands register here, one line each.
from .heatmap import heatmap_command  # noqa: E402
main.add_command(heatmap_command)
from .report import report_command  # noqa: E402
main.add_command(report_command)
from .problems_cmd import problems_command  # noqa: E402
main.add_command(problems_command)
from lut_export.cli import aot_command, explain_command, export_command, validate_command, warmup_command  # noqa: E402
main.add_command(aot_command)
main.add_command(warmup_command)
main.add_command(export_command)
main.add_command(validate_command)
main.add_command(explain_command)
from .sweep_cmd import sweep_command  # noqa: E402
main.add_command(sweep_command)
from .bench_cmd import bench_command  # noqa: E402
main.add_command(bench_command)
from .tune_cmd import tune_command  # noqa: E402
main.add_command(tune_command)
from .compile_check_cmd import compile_check  # noqa: E402
main.add_command(compile_check)
from .fallback_fit import fit_fallback_command  # noqa: E402
main.add_command(fit_fallback_command)


if __name__ == "__main__":
    main()
