"""The ``layerlock`` command (installed by ``pip install -e .``): ``layerlock <command> ...``.

One dispatcher over the two command lines, without parsers of its own: a command of
``python -m analysis`` (convergence, schedule, compare, agreement, freeze-grid) goes to
:func:`analysis.__main__.main`, every other one to :func:`experiments.cli.main` (pretrain, demo,
study, evaluate, freeze-test, bench, sync). Same arguments, output and exit codes.
"""

from __future__ import annotations

import argparse
import os
import sys

PROG = "layerlock"


def _commands(parser: argparse.ArgumentParser) -> dict[str, str]:
    """A parser's subcommands and their help lines."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return {name: helps.get(name, "") for name in action.choices}
    return {}


def main(argv: list[str] | None = None) -> int:
    # As experiments/__main__.py: before torch starts OpenMP (docs/performance.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from analysis.__main__ import build_parser as analysis_parser
    from analysis.__main__ import main as analysis_main
    from experiments.cli import build_parser as experiments_parser
    from experiments.cli import main as experiments_main

    argv = sys.argv[1:] if argv is None else list(argv)
    analysis_commands = _commands(analysis_parser(PROG))
    if argv and argv[0] in analysis_commands:
        return analysis_main(argv, prog=PROG)
    commands = {**_commands(experiments_parser(PROG)), **analysis_commands}
    if argv and argv[0] in commands:
        return experiments_main(argv, prog=PROG)
    out = sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr
    if argv and out is sys.stderr:
        print(f"error: unknown command {argv[0]!r}", file=out)
    print(f"usage: {PROG} <command> [options]   ({PROG} <command> --help for its options)\n\ncommands:", file=out)
    for name, text in commands.items():
        print(f"  {name:<12}  {text}", file=out)
    return 0 if out is sys.stdout else 2


if __name__ == "__main__":
    sys.exit(main())
