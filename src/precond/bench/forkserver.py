"""Fresh worker processes without paying for ``import torch`` each time.

Importing torch and precond takes 1.1-1.7 s per process on the development machine, about a
third of a typical configuration's measurement. The fork server is a process that imports them
once, runs no tensor operation (so no OpenMP or MKL thread pool exists yet, and a forked child
can start its own), and forks one child per configuration. The child is a new process, with the
interpreter state of a process that has just imported the worker module: the same heap, the
same environment (thread counts and ``MALLOC_*`` variables are read when the server starts, and
the server is started with the worker's environment), and nothing measured before it.

Protocol (one JSON object per line): the runner writes ``{"spec": path, "result": path, "log":
path}`` to the server's stdin; the server forks, answers ``{"pid": pid}``, waits for the child
and answers ``{"pid": pid, "returncode": code}`` (negative: killed by that signal). The child
writes its row to ``result`` (:func:`precond.bench.worker.main`) and its stdout and stderr to
``log``; it leads its own process group, so that the runner can kill it on a time-out. The
server exits at end of input.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from typing import IO

__all__ = ["main", "run_worker", "serve"]


def _child(command: dict[str, str]) -> int:
    with contextlib.suppress(OSError):  # already a group leader
        os.setpgid(0, 0)
    fd = os.open(command["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return run_worker(command["spec"], command["result"])


def run_worker(spec_path: str, result_path: str) -> int:
    """What a child runs: :func:`precond.bench.worker.main` (tests substitute a fake)."""
    from . import worker

    return worker.main([spec_path, result_path])


def serve(commands: IO[str], answers: IO[str]) -> None:
    """Fork a child per command line until the input ends.

    Args:
        commands: Where commands come from.
        answers: Where the pids and return codes go.
    """
    for line in commands:
        if not line.strip():
            continue
        command = json.loads(line)
        answers.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: measure, never return into the loop
            code = 1
            try:
                code = _child(command)
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        answers.write(json.dumps({"pid": pid}) + "\n")
        answers.flush()
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        answers.write(json.dumps({"pid": pid, "returncode": code}) + "\n")
        answers.flush()


def main() -> int:
    """Entry point: ``python -m precond.bench.forkserver`` (commands on stdin)."""
    from . import worker  # noqa: F401  (the import is the point: torch and every method)

    sys.stdout.write(json.dumps({"ready": os.getpid()}) + "\n")
    sys.stdout.flush()
    serve(sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
