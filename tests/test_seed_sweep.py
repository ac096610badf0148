"""The seed sweep (``make test-seeds``) flags exactly the tests whose outcome differs between seeds."""

from tests.seed_sweep import seed_dependent


def test_only_tests_with_differing_outcomes_are_seed_dependent():
    """Catches a sweep that reports every failing test (a test failing under every seed is broken, not flaky) or
    one that misses a test failing under a single seed of many."""
    ok, bad = {"outcome": "passed", "draws_seed": True}, {"outcome": "failed", "draws_seed": True}
    outcomes = {1: {"a": ok, "b": bad, "c": ok}, 2: {"a": ok, "b": bad, "c": ok}, 3: {"a": ok, "b": bad, "c": bad}}
    assert seed_dependent(outcomes) == {"c": {1: "passed", 2: "passed", 3: "failed"}}
