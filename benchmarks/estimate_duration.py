"""Expected worker time of a grid under the current sampling rules, from the rows of a run.

Wall-clock times on a shared machine are inflated by other processes; the step times of a run
on idle cores are not. This script replays, for every row of such a run, the sampling rules of
:func:`precond.bench.measure.run_steps` with that row's median step times (warm-up, repeats,
``--sample-time``, ``--min-time``, ``--max-steps``, fast-forward), keeps the row's time outside
the timed steps (code warm-up, SGD steps, floor kernels) as measured, and adds the live-tensor
pass (two update steps, and one idle step when ``T > 1``)::

    python benchmarks/estimate_duration.py benchmarks/results/cpu/results.jsonl

It prints the worker seconds per method and in total under the old rules (as run) and the new.
The rows must come from a run on idle cores (the ``other_cores`` column near 0).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

#: The ``cpu`` preset's sampling settings.
RULES: dict[str, Any] = {
    "warmup": 3,
    "repeats": 7,
    "rare_repeats": 3,
    "min_time": 0.5,
    "sample_time": 5.0,
    "max_steps": 40,
    "budget_s": 120.0,
    "fast_forward": True,
}
#: Model, gradient maker and profiler start and stop of the live-tensor pass (seconds).
LIVE_OVERHEAD_S = 0.2


def steps_seconds(interval: int, idle_s: float, update_s: float, rules: dict[str, Any]) -> float:
    """Seconds of warm-up and timed steps of one configuration under ``rules``."""

    def kind_of(step: int) -> str:
        return "update" if step % interval == 0 else "idle"

    median = {"idle": idle_s, "update": update_s}
    main = "update" if interval == 1 else "idle"
    wanted = {main, "update"}
    target = {k: rules["repeats"] if k == main else rules["rare_repeats"] for k in wanted}
    fewer = {k: min(target[k], 3 if k == main else 2) for k in wanted}
    counts = dict.fromkeys(wanted, 0)
    seconds = dict.fromkeys(wanted, 0.0)

    def enough(k: str) -> bool:
        slow = rules["sample_time"] > 0 and seconds[k] >= rules["sample_time"]
        return counts[k] >= target[k] or (slow and counts[k] >= fewer[k])

    warm = 0.0
    for s in range(rules["warmup"]):  # warm-up stops once it adds up to sample_time
        warm += median[kind_of(s)]
        if 0 < rules["sample_time"] <= warm:
            break
    step, n, elapsed = rules["warmup"], 0, 0.0
    while True:
        kind = kind_of(step)
        elapsed += median[kind]
        counts[kind] += 1
        seconds[kind] += median[kind]
        n, step = n + 1, step + 1
        have_all = all(counts[k] >= 1 for k in wanted)
        if all(enough(k) for k in wanted) and elapsed >= rules["min_time"]:
            break
        if n >= rules["max_steps"] and have_all and elapsed >= rules["min_time"]:
            break
        if elapsed > rules["budget_s"]:
            break
        if rules["fast_forward"] and enough(main) and any(not enough(k) for k in wanted):
            step = -(-step // interval) * interval
    return warm + elapsed


def estimate(
    rows: list[dict[str, Any]], rules: dict[str, Any], as_run: dict[str, Any]
) -> dict[str, float]:
    """Worker seconds per method under ``rules`` (``"total"`` too); ``as_run``: the run's."""
    old_rules = {**rules, **as_run}
    # SGD steps in the worker's process last at least half of min_time.
    sgd_saved = 0.5 * max(0.0, float(old_rules["min_time"]) - float(rules["min_time"]))
    out: dict[str, float] = {}
    for r in rows:
        seconds = float(r.get("worker_s") or 0.0)
        if r.get("status") == "ok" and r.get("kinds"):
            kinds = r["kinds"]
            idle = float(kinds.get("idle", {}).get("time_ms", 0.0)) / 1e3
            update = float(kinds.get("update", {}).get("time_ms", 0.0)) / 1e3 or idle
            interval = 1 if r["method"] == "plain" else int(r["interval"])
            if "parts_s" in r:  # a run with the current rules: its own parts
                seconds -= float(r["parts_s"].get("live", 0.0))
            else:  # an older run: replace its steps by the current rules' steps
                seconds -= steps_seconds(interval, idle, update, old_rules)
                seconds = max(0.0, seconds) + steps_seconds(interval, idle, update, rules)
                if r["method"] != "plain":
                    seconds -= sgd_saved
            seconds += LIVE_OVERHEAD_S + 2 * update + (idle if interval > 1 else 0.0)
        out[r["method"]] = out.get(r["method"], 0.0) + seconds
    out["total"] = sum(out.values())
    return out


def main() -> None:
    """Print the estimate of each results file given."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="results.jsonl of a run on idle cores")
    p.add_argument(
        "--as-run",
        default='{"sample_time": 0, "fast_forward": false, "min_time": 1.0}',
        help="JSON: the sampling settings the rows were measured with (where they differ "
        "from the current preset; default: the committed run of the cpu grid)",
    )
    args = p.parse_args()
    as_run = json.loads(args.as_run)
    grand = 0.0
    for path in args.results:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        est = estimate(rows, RULES, as_run)
        as_run = sum(float(r.get("worker_s") or 0.0) for r in rows)
        print(f"{path}: {len(rows)} rows, workers {as_run / 60:.1f} min as run, ", end="")
        print(f"{est['total'] / 60:.1f} min with the current rules")
        for m, s in sorted(est.items(), key=lambda kv: -kv[1]):
            if m != "total":
                print(f"  {m:14s} {s:7.0f} s")
        grand += est["total"]
    print(f"total {grand / 60:.1f} min inside workers")


if __name__ == "__main__":
    main()
