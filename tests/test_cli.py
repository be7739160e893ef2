from __future__ import annotations

import subprocess
import sys

import precond
from precond.cli import main


def test_list_prints_every_method(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in precond.methods():
        assert name in out


def test_python_dash_m_entry_point():
    res = subprocess.run(
        [sys.executable, "-m", "precond", "list"], capture_output=True, text=True, check=True
    )
    assert "plain" in res.stdout


def test_demo_runs_and_prints_a_table(capsys):
    assert main(["demo", "--epochs", "1", "--methods", "plain", "--width", "16"]) == 0
    out = capsys.readouterr().out
    assert "| method | lr | momentum | damping | final train loss | test accuracy |" in out
    assert "| plain |" in out


def test_bad_method_is_a_clear_error(capsys):
    assert main(["demo", "--methods", "nope"]) == 2
    assert "Invalid method: 'nope'" in capsys.readouterr().err
