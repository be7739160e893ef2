"""The ``precond bench`` command: a smoke run of the real harness and argument errors."""

from __future__ import annotations

import json

import pytest

from precond.bench.cli import GRIDS, _parse_options, main
from precond.cli import main as precond_main


def test_smoke_grid_runs_end_to_end(tmp_path, capsys):
    # The CI smoke run: one model, plain and kfac, B=8, T=1, a few steps, real subprocesses.
    assert main(["--grid", "smoke", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "2/2 configurations measured" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["status"]) for r in rows] == [("plain", "ok"), ("kfac", "ok")]
    kfac = rows[1]
    assert kfac["env"]["command"].startswith("python -m precond.bench --grid smoke")
    for key in ("time_ms", "throughput_ratio", "floor_throughput_ratio", "efficiency",
                "peak_mb", "mem_ratio", "mem_floor_ratio", "mem_over_floor"):  # fmt: skip
        assert kfac[key] is not None and kfac[key] > 0, key
    assert set(kfac["phases_ms"]) == {"fb", "extra_backward", "curvature", "refresh", "apply"}
    assert kfac["floor_costs_ms"]["refresh"] > 0
    assert {k["kind"] for k in kfac["floor_kernels"]} >= {"bmm", "cholesky", "backward"}
    md = (tmp_path / "results.md").read_text()
    assert "| kfac | 8 | 1 |" in md
    assert (tmp_path / "poster.png").exists() and (tmp_path / "targets.png").exists()
    # Re-rendering from the rows gives the same table.
    assert main(["--render", str(tmp_path), "--no-figures"]) == 0
    assert (tmp_path / "results.md").read_text().split("## Summary")[1] == md.split("## Summary")[1]


def test_bench_is_a_precond_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        precond_main(["bench", "--help"])
    assert exc.value.code == 0
    assert "--batch-sizes" in capsys.readouterr().out


def test_errors_are_clear(capsys):
    assert main(["--methods", "nope", "--out", "unused"]) == 2
    assert "Invalid method: 'nope'" in capsys.readouterr().err
    assert precond_main(["bench", "--models", "nope"]) == 2
    assert "Invalid model: 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"Invalid option: 'damping=1'\. Use METHOD\.KEY=VALUE"):
        _parse_options(["damping=1"])


def test_options_parse_json_values():
    assert _parse_options(["kfac.damping=0.01", "kfac.solver=eigh", "kfac.n_mc_samples=2"]) == {
        "kfac": {"damping": 0.01, "solver": "eigh", "n_mc_samples": 2}
    }


def test_cpu_grid_is_the_target_grid():
    cpu = GRIDS["cpu"]
    assert cpu["models"] == ["mlp512", "cnn_small"]
    assert cpu["batch_sizes"] == [32, 128, 512] and cpu["intervals"] == [1, 10, 100]
    assert cpu["threads"] == 2 and cpu["methods"] == "scalable"
    import precond
    from precond.bench.cli import DENSE_METHODS, build_parser, spec_from_args

    spec, _ = spec_from_args(build_parser().parse_args(["--grid", "cpu"]))
    # every registered method is benchmarked: the scalable ones here, the dense ones in cpu-dense
    assert set(spec.methods) | set(DENSE_METHODS) == set(precond.methods())
    assert not set(spec.methods) & set(DENSE_METHODS)
    dense, _ = spec_from_args(build_parser().parse_args(["--grid", "cpu-dense"]))
    assert set(DENSE_METHODS) <= set(dense.methods)


def test_allocator_live_memory_and_process_options():
    from precond.bench.cli import build_parser, spec_from_args

    def spec(*argv):
        return spec_from_args(build_parser().parse_args(["--grid", "cpu", *argv]))[0]

    default = spec()
    assert default.live_memory and default.fork_server and default.sample_time == 5.0
    assert default.malloc_env == {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}
    s = spec("--malloc-env", "MALLOC_ARENA_MAX=1", "--no-live-memory", "--fresh-processes")
    assert s.malloc_env == {"MALLOC_ARENA_MAX": "1"}
    assert not s.live_memory and not s.fork_server
    assert spec("--malloc-env", "none").malloc_env == {}
    with pytest.raises(ValueError, match=r"Invalid malloc env: 'X'\. Use NAME=VALUE"):
        spec("--malloc-env", "X")


def test_process_repeat_options():
    from precond.bench.cli import build_parser, spec_from_args

    def spec(*argv, grid="cpu"):
        return spec_from_args(build_parser().parse_args(["--grid", grid, *argv]))[0]

    default = spec()
    assert (default.processes, default.processes_below_s) == (3, 3.0)
    assert spec("--processes", "5", "--processes-below", "10").processes_below_s == 10.0
    assert spec(grid="smoke").processes == 1
    with pytest.raises(ValueError, match=r"Invalid processes: 0\. Must be >= 1\."):
        spec("--processes", "0")
    with pytest.raises(ValueError, match=r"Invalid processes_below_s: -1\.0\. Must be >= 0"):
        spec("--processes-below", "-1")


def test_own_model_file_runs_end_to_end(tmp_path, monkeypatch, capsys):
    # Workers are fresh processes: they load the problem again from the name given.
    (tmp_path / "own.py").write_text(
        "from torch import nn\n"
        "from precond.bench import Problem\n"
        "problem = Problem('own', lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(),"
        " nn.Linear(16, 3)), (12,), 3, 'my 12-16-3 MLP')\n"
    )
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    args = ["--grid", "smoke", "--models", "own.py:problem", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert "2/2 configurations measured" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["model"], r["status"]) for r in rows] == [
        ("plain", "own.py:problem", "ok"),
        ("kfac", "own.py:problem", "ok"),
    ]
    assert rows[1]["efficiency"] > 0
    assert "## own.py:problem: my 12-16-3 MLP" in (out / "results.md").read_text()
