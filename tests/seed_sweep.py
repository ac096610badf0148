"""Find tests whose outcome depends on the seed they draw (``make test-seeds``).

Runs the selected tests once under a fresh ``POLAR_TEST_SEED`` and notes which of them drew from it
(tests/conftest.py records that per test); then runs only those again under N-1 more fresh seeds. A test
is seed-dependent when its outcome (passed / failed / skipped) differs between seeds; each is listed with
the seeds that failed and the command that replays one. Writes ``--out`` (JSON) and exits 1 when any test
is seed-dependent, 0 otherwise.

    python -m tests.seed_sweep --seeds 20 -m "not slow"
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_pytest(seed: int, args: list[str]) -> dict[str, dict]:
    """One pytest session under ``POLAR_TEST_SEED=seed``: {nodeid: {"outcome", "draws_seed"}}."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = {**os.environ, "POLAR_TEST_SEED": str(seed), "POLAR_SEED_REPORT": str(report)}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if not report.is_file():  # pytest died before its session ended (collection error, usage error)
            sys.exit(f"seed_sweep: pytest under seed {seed} wrote no report (exit {proc.returncode}):\n"
                     f"{proc.stdout[-3000:]}")
        return json.loads(report.read_text())["tests"]


def seed_dependent(outcomes: dict[int, dict[str, dict]]) -> dict[str, dict[int, str]]:
    """{nodeid: {seed: outcome}} for every test whose outcome is not the same under every seed it ran."""
    by_test: dict[str, dict[int, str]] = {}
    for seed, tests in outcomes.items():
        for nodeid, entry in tests.items():
            by_test.setdefault(nodeid, {})[seed] = entry["outcome"]
    return {t: per_seed for t, per_seed in by_test.items() if len(set(per_seed.values())) > 1}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.seed_sweep", description=__doc__.split("\n\n")[0],
                                epilog="Arguments after the options go to pytest (test paths, -m, -k).")
    p.add_argument("--seeds", type=int, default=20, help="fresh seeds in all, the first included (default 20)")
    p.add_argument("--seed-list", help="comma-separated seeds to use instead of fresh ones (a replay)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "seed-sweep.json", help="JSON report")
    args, pytest_args = p.parse_known_args(argv)
    if args.seed_list:
        seeds = [int(s) for s in args.seed_list.split(",")]
    else:
        draw = random.SystemRandom()
        seeds = [draw.randrange(2**31) for _ in range(args.seeds)]
    start = time.monotonic()
    outcomes = {seeds[0]: run_pytest(seeds[0], pytest_args)}
    drawing = sorted(t for t, e in outcomes[seeds[0]].items() if e["draws_seed"])
    print(f"seed {seeds[0]}: {len(outcomes[seeds[0]])} tests, {len(drawing)} draw from POLAR_TEST_SEED "
          f"({time.monotonic() - start:.0f} s)", flush=True)
    for i, seed in enumerate(seeds[1:], 2):
        if drawing:
            outcomes[seed] = run_pytest(seed, drawing)
        failed = sum(e["outcome"] == "failed" for e in outcomes.get(seed, {}).values())
        print(f"seed {seed} ({i}/{len(seeds)}): {failed} failed ({time.monotonic() - start:.0f} s)", flush=True)
    flaky = seed_dependent(outcomes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seeds": seeds, "pytest_args": pytest_args, "drawing": drawing,
                                    "seed_dependent": flaky, "outcomes": outcomes}, indent=1))
    always_failing = sorted(t for t in drawing if all(o[t]["outcome"] == "failed" for o in outcomes.values()))
    print(f"\n{len(seeds)} seeds, {len(drawing)} seed-drawing tests, {len(flaky)} seed-dependent "
          f"({time.monotonic() - start:.0f} s); report: {args.out}")
    for nodeid, per_seed in sorted(flaky.items()):
        bad = [s for s, o in per_seed.items() if o == "failed"]
        print(f"  {nodeid}: failed under {len(bad)}/{len(per_seed)} seeds; replay: "
              f"POLAR_TEST_SEED={bad[0] if bad else next(iter(per_seed))} python -m pytest '{nodeid}'")
    for nodeid in always_failing:
        print(f"  {nodeid}: fails under every seed (not seed-dependent, just failing)")
    return 1 if flaky else 0


if __name__ == "__main__":
    sys.exit(main())
