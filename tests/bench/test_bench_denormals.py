"""Denormal floats in the bench's workers: flushed to zero by every thread of the pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tests.helpers import denormals_supported

# Runs in a fresh interpreter (no thread pool yet, as in a worker): sets the mode through
# configure_cpu, then multiplies 2^22 denormal floats (split between the pool's threads) and
# reports how many products are not zero; with FORK the work runs in a forked child, as a
# worker forked from the bench's fork server does.
_SCRIPT = """
import json, os, sys
import torch
from precond.bench.worker import configure_cpu

def run():
    flushed = configure_cpu(2, sys.argv[1] == "flush")
    x = torch.full((1 << 22,), 1e-40)  # denormal in float32 (the smallest normal is 1.2e-38)
    y = x * 3.0
    return {"flushed": flushed, "threads": torch.get_num_threads(),
            "nonzero": int(y.count_nonzero()), "n": y.numel()}

if sys.argv[2] == "fork":
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, json.dumps(run()).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    print(os.read(r, 1 << 16).decode())
else:
    print(json.dumps(run()))
"""


def _run(mode: str, how: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode, how],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("how", ["fresh", "fork"])
def test_every_thread_flushes_denormals(how):
    if how == "fork" and not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    if not denormals_supported():
        pytest.skip("this CPU cannot flush denormals (not x86 with DAZ)")
    kept = _run("keep", how)
    assert kept["threads"] == 2 and not kept["flushed"]
    assert kept["nonzero"] == kept["n"]  # the products are denormal, not zero
    flushed = _run("flush", how)
    assert flushed["threads"] == 2 and flushed["flushed"]
    # none is left: every thread of the pool flushes, not only the one that set the mode
    assert flushed["nonzero"] == 0


def test_the_spec_carries_the_setting_to_the_workers():
    from precond.bench.cli import build_parser, spec_from_args
    from precond.bench.runner import configurations

    def spec(*argv):
        return spec_from_args(build_parser().parse_args(["--grid", "smoke", *argv]))[0]

    assert spec().flush_denormals
    assert all(c["flush_denormals"] for c in configurations(spec()))
    kept = spec("--keep-denormals")
    assert not kept.flush_denormals
    assert not any(c["flush_denormals"] for c in configurations(kept))


def test_the_report_says_denormals_are_flushed():
    from precond.bench.report import render_markdown

    md = render_markdown([], {"spec": {"flush_denormals": True, "methods": ["plain"]}})
    assert "denormal floats flushed to zero in every worker" in md
    md = render_markdown([], {"spec": {"flush_denormals": False, "methods": ["plain"]}})
    assert "denormal" not in md
