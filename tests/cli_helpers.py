"""Run the CLI in-process (fast) exactly as the console script does, capturing exit code and output."""
from __future__ import annotations

import sys

import pytest


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    from bigseg import cli
    from bigseg.cli import render

    render._printed.clear()
    old = sys.argv
    sys.argv = ["bigseg", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
            raise SystemExit(0)
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    code = exit_info.value.code
    return (code if isinstance(code, int) else (0 if code is None else 1)), captured.out, captured.err
