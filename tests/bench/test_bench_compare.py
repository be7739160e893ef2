"""Comparing two benchmark runs: pairing, target counts, spread of the change, the CLI."""

from __future__ import annotations

import json

import pytest

from precond.bench.cli import main
from precond.bench.compare import compare_rows, load_rows, render_comparison


def _row(method, eff, batch=32, interval=1, mem=1.0, status="ok"):
    return {
        "method": method,
        "model": "mlp512",
        "batch_size": batch,
        "interval": interval,
        "status": status,
        "efficiency": eff,
        "peak_over_floor": mem,
    }


def _write(tmp_path, name, rows):
    d = tmp_path / name
    d.mkdir()
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


BEFORE = [
    _row("sgd", None),
    _row("kfac", 0.9),
    _row("kfac", 0.7, interval=10),
    _row("seng", 0.5, mem=1.3),
    _row("muon", 0.85, status="timeout"),  # not measured: left out
]
AFTER = [
    _row("sgd", None),
    _row("kfac", 0.75),
    _row("kfac", 0.95, interval=10),
    _row("seng", 0.6, mem=1.1),
    _row("muon", 0.9),
]


def test_pairs_are_the_configurations_measured_in_both_runs():
    pairs = compare_rows(BEFORE, AFTER)
    assert [p.key for p in pairs] == [
        ("kfac", "mlp512", 32, 1),
        ("kfac", "mlp512", 32, 10),
        ("seng", "mlp512", 32, 1),
    ]
    assert [round(p.delta, 2) for p in pairs] == [-0.15, 0.25, 0.1]
    assert pairs[2].mem == (1.3, 1.1)


def test_report_counts_targets_in_each_both_and_either_run():
    md = render_comparison(compare_rows(BEFORE, AFTER), ("A", "B"))
    # efficiency >= 0.8: A meets kfac T=1; B meets kfac T=10: none in both, two in either.
    assert "| efficiency ≥ 0.8 | 1 | 1 | 0 | 2 |" in md
    assert "| memory ≤ 1.2 × floor | 2 | 3 | 2 | 3 |" in md
    assert "median +0.10; |change| median 0.15" in md
    assert "largest 0.25; 3 of 3 moved by 0.1 or more." in md
    assert "| kfac | 2 | 1 | 1 | +0.05 |" in md
    # Largest change first.
    table = md.split("## Largest changes")[1]
    assert table.index("kfac mlp512 B=32 T=10") < table.index("kfac mlp512 B=32 T=1 ")


def test_runs_without_common_configurations_are_an_error():
    with pytest.raises(ValueError, match="no measured configuration in common"):
        render_comparison(compare_rows(BEFORE, [_row("soap", 1.0)]))


def test_a_directory_without_results_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"Invalid run directory: .*no results.jsonl"):
        load_rows(tmp_path)


def test_cli_prints_the_comparison(tmp_path, capsys):
    a, b = _write(tmp_path, "a", BEFORE), _write(tmp_path, "b", AFTER)
    assert main(["--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# precond bench: {a} vs {b}")
    assert main(["--compare", str(a), str(tmp_path / "missing")]) == 2
    assert "Invalid run directory" in capsys.readouterr().err
