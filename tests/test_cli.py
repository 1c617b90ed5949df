"""The installed console script, run as a real subprocess: help, version, models, python -m."""
import os
import subprocess
import sys

import pytest

import bigseg

ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=120)


def test_version():
    r = run("bigseg", "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"bigseg {bigseg.__version__}"


@pytest.mark.parametrize("args", [("bigseg", "--help"), (sys.executable, "-m", "bigseg", "--help")])
def test_help_lists_the_commands(args):
    r = run(*args)
    assert r.returncode == 0
    for command in ("predict", "models", "--install-completion"):
        assert command in r.stdout


def test_predict_help_documents_the_options():
    r = run("bigseg", "predict", "--help")
    assert r.returncode == 0
    for option in ("--model", "--out", "--tile", "--overlap", "--batch-size", "--device", "--precision",
                   "--bands", "--probs", "--overlay", "--cog", "--json", "--recursive", "--overwrite"):
        assert option in r.stdout, option


def test_models_table_lists_the_ladders_with_published_sizes():
    r = run("bigseg", "models")
    assert r.returncode == 0, r.stderr
    assert "ladder-dn121" in r.stdout and "ladder-dn169" in r.stdout and "ladder-dn161" in r.stdout
    assert "10.31 M" in r.stdout and "16.34 M" in r.stdout and "31.24 M" in r.stdout
    from bigseg.catalogue import ARCHITECTURES

    names = [line.split()[0] for line in r.stdout.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert set(ARCHITECTURES) <= set(names), "every architecture's name stands apart from its figures"


def test_user_mistake_is_one_line_without_traceback(tmp_path):
    r = run("bigseg", "predict", str(tmp_path / "missing.tif"), "--model", str(tmp_path / "none.pt"))
    assert r.returncode == 1
    assert r.stderr.strip().startswith("Error: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_cli_run_in_a_test_leaves_no_signal_handler_behind(capsys):
    """The suite's own fixture puts back what the CLI installed: pytest keeps the handlers it had,
    so `timeout 600 python -m pytest` stops the suite as it should."""
    import signal

    from tests.cli_helpers import run_cli

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    run_cli(capsys, "predict", "no-such-file.tif")  # the CLI starts, installs its handlers, fails
    installed = {s: signal.getsignal(s) for s in before}
    assert installed != before, "the CLI installs its stop handlers (else this test shows nothing)"


def test_the_handlers_of_the_test_before_are_gone():
    import signal

    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or \
        getattr(signal.getsignal(signal.SIGTERM), "__module__", "") != "bigseg.runtime"
