"""The fork server: rows, time-outs, crashes and failures as from fresh worker processes."""

from __future__ import annotations

import os

import pytest
from tests.helpers import denormals_supported

from precond.bench import forkserver, runner
from precond.bench.runner import ForkServer, worker_env

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


# A server whose children run a fake worker chosen by the spec's method (no torch: fast).
_FAKE_SERVER = """
import importlib.util, json, os, signal, sys, time
spec = importlib.util.spec_from_file_location("fs", sys.argv[1])
forkserver = importlib.util.module_from_spec(spec)
spec.loader.exec_module(forkserver)  # without the package: no torch import, a fast start

def fake(spec_path, result_path):
    spec = json.load(open(spec_path))
    action = spec["method"]
    if action == "sleep":
        time.sleep(60)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "fail":
        print("boom", file=sys.stderr)
        return 3
    row = {"status": "ok", "method": action, "pid": os.getpid(), "ppid": os.getppid(),
           "env": os.environ.get("MALLOC_ARENA_MAX")}
    json.dump(row, open(result_path, "w"))
    print("USDT: profiler noise", file=sys.stderr)
    return 0

forkserver.run_worker = fake
sys.stdout.write(json.dumps({"ready": os.getpid()}) + "\\n")
sys.stdout.flush()
forkserver.serve(sys.stdin, sys.stdout)
"""


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(ForkServer, "SERVER_ARGS", ["-c", _FAKE_SERVER, forkserver.__file__])
    with ForkServer() as s:
        yield s


def test_children_are_fresh_processes_of_one_server(server, tiny_config):
    a = server(tiny_config, timeout=30)
    b = server(tiny_config, timeout=30)
    assert a["status"] == b["status"] == "ok"
    assert a["pid"] != b["pid"] and a["ppid"] == b["ppid"] != os.getpid()


def test_timeout_crash_and_failure_become_rows_and_the_server_goes_on(server, tiny_config):
    row = server({**tiny_config, "method": "sleep"}, timeout=0.5)
    assert row["status"] == "timeout" and row["reason"] == "timed out after 0.5 s"
    row = server({**tiny_config, "method": "kill"}, timeout=30)
    assert row["status"] == "crashed"
    assert row["reason"] == "worker killed by SIGKILL (out of memory?)"
    row = server({**tiny_config, "method": "fail"}, timeout=30)
    assert row["status"] == "crashed" and row["reason"] == "worker failed: boom"
    assert server(tiny_config, timeout=30)["status"] == "ok"


def test_a_new_environment_starts_a_new_server(server, tiny_config):
    a = server(tiny_config, timeout=30)
    b = server({**tiny_config, "malloc_env": {"MALLOC_ARENA_MAX": "1"}}, timeout=30)
    assert a["env"] is None and b["env"] == "1"
    assert a["ppid"] != b["ppid"]


def test_a_dead_server_is_restarted(server, tiny_config):
    a = server(tiny_config, timeout=30)
    os.kill(a["ppid"], 9)
    server._proc.wait()
    assert server(tiny_config, timeout=30)["status"] == "ok"


def test_real_worker_row_through_the_fork_server(tiny_config):
    with ForkServer() as s:
        row = s({**tiny_config, "min_time": 0.0, "repeats": 2, "max_steps": 3}, timeout=120)
    assert row["status"] == "ok", row
    assert row["time_ms"] > 0 and row["growth_mb"] >= 0
    assert row["live_end_mb"] > 0
    # the default: flushed where possible
    assert row["denormals_flushed"] is denormals_supported()


def test_worker_env_sets_threads_and_allocator_variables():
    env = worker_env({"threads": 2, "malloc_env": {"MALLOC_ARENA_MAX": "1"}}, base={"A": "b"})
    assert env == {
        "A": "b",
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
        "OPENBLAS_NUM_THREADS": "2",
        "MALLOC_ARENA_MAX": "1",
    }
    assert worker_env({"threads": 0}, base={}) == {}


def test_profiler_lines_are_left_out_of_stderr_tails():
    assert runner._stderr_tail("USDT: x\nreal error\n") == "real error"
