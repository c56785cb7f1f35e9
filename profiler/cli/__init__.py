"""The ``attnprof`` command: run, merge, demo, validate, plot, report, compare, figure.

A package: the parser (parser.py: one builder per subcommand, shared options in ``_add_input_options``), one
module per command (``cmd_<name>``) and the helpers they share (common.py). Bad input exits with status 2 and a
one-line ``attnprof: error: ...`` that names the problem and the fix.
"""

from __future__ import annotations

import sys
import warnings

from .. import warnings_log
from ..signals import Terminated, terminate_as_interrupt
from .common import EXIT_USAGE
from .compare import cmd_compare
from .demo import cmd_demo
from .figure import cmd_figure
from .merge import cmd_merge
from .parser import build_parser
from .plot import cmd_plot
from .report import cmd_report
from .run import cmd_run
from .validate import cmd_validate

__all__ = ["build_parser", "main"]

#: Each subcommand's function (the parser knows their options only).
COMMANDS = {"run": cmd_run, "merge": cmd_merge, "demo": cmd_demo, "validate": cmd_validate, "plot": cmd_plot,
            "report": cmd_report, "compare": cmd_compare, "figure": cmd_figure}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"attnprof: warning: {message}", file=sys.stderr if file is None else file)
    warnings_log.note(message)  # run.json and report.html list it too


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "argv"):
        args.argv = None if argv is None else list(argv)
    previous = warnings.showwarning
    warnings.showwarning = _show_warning  # one plain line per warning, without source lines
    try:
        with warnings_log.recording(), terminate_as_interrupt():
            return COMMANDS[args.command](args)
    except (ValueError, OSError) as e:  # bad input; anything else is a bug: show its traceback
        print(f"attnprof: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:  # SIGINT, and SIGTERM (Terminated) the same way
        print(f"attnprof: interrupted{' (SIGTERM)' if isinstance(e, Terminated) else ''}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        warnings.showwarning = previous
