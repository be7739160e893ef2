"""The figure writer: poster layout from synthetic rows, failed points as marks with reasons."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from precond.bench.figures import poster_figure, targets_figure, write_figures
from precond.bench.ratios import attach_ratios


def _rows():
    rows = []
    for model in ("mlp512", "cnn_small"):
        for b in (32, 128, 512):
            rows.append(
                {
                    "method": "plain",
                    "model": model,
                    "batch_size": b,
                    "interval": 1,
                    "device": "cpu",
                    "status": "ok",
                    "time_ms": 1.0 * b,
                    "peak_mb": 50.0 + b / 10,
                }
            )
            for t in (1, 10, 100):
                status = "oom" if (model, b, t) == ("cnn_small", 512, 1) else "ok"
                rows.append(
                    {
                        "method": "kfac",
                        "model": model,
                        "batch_size": b,
                        "interval": t,
                        "device": "cpu",
                        "status": status,
                        "reason": "out of memory" if status != "ok" else None,
                        "time_ms": 2.0 * b + 100 / t,
                        "peak_mb": 80.0 + b / 10,
                        "floor_costs_ms": {"refresh": 50.0, "apply": 0.5 * b},
                        "state_mb": 20.0,
                    }
                )
    return attach_ratios(rows)


def test_poster_has_three_rows_and_one_column_per_model():
    fig = poster_figure(_rows())
    axes = fig.get_axes()
    assert len(axes) == 3 * 2
    titles = [ax.get_title() for ax in axes if ax.get_title()]
    assert titles == ["MLP 784-512-512-10", "small CNN (conv 16, conv 32, linear) on 32×32"]
    ylabels = [ax.get_ylabel() for ax in axes if ax.get_ylabel()]
    assert ylabels == [
        "peak memory / SGD (T=1)",
        "throughput / SGD (T=1)",
        "throughput / SGD (B=128)",
    ]
    assert [ax.get_xlabel() for ax in axes[4:]] == ["interval T", "interval T"]
    # Each panel has a measured and a floor line of kfac (plus the SGD line).
    assert len(axes[2].get_lines()) >= 3
    texts = " ".join(t.get_text() for t in fig.texts)
    assert "kfac cnn_small B=512 T=1: oom: out of memory" in texts
    plt.close(fig)


def test_targets_figure_has_one_row_per_interval_and_a_memory_row():
    fig = targets_figure(_rows())
    assert len(fig.get_axes()) == (3 + 1) * 2
    plt.close(fig)


def test_write_figures_writes_pngs(tmp_path):
    paths = write_figures(_rows(), tmp_path)
    assert [p.name for p in paths] == ["poster.png", "targets.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_figures([r for r in _rows() if r["method"] == "plain"], tmp_path / "x") == []
