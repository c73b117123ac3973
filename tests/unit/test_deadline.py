"""Per-step deadlines scaled by the step's size and measured step times."""

from molinkd.engine.deadline import StepClock


def test_generous_until_measured():
    c = StepClock(initial=120.0, warmup=3)
    assert c.budget(1) == 120.0
    c.observe(1, 0.05)
    c.observe(1, 0.05)
    assert c.budget(1) == 120.0
    c.observe(1, 0.05)
    assert c.budget(1) == c.floor  # decode steps of 50 ms: the floor


def test_scales_with_tokens_and_measurements():
    c = StepClock(floor=3.0, factor=6.0, initial=120.0, warmup=2)  # explicit: the test's arithmetic
    for _ in range(5):
        c.observe(4, 0.1)
        c.observe(1000, 2.1)  # 0.1 s fixed + 2 ms per token
    assert abs(c.base - 0.1) < 1e-6 and abs(c.per_token - 0.002) < 1e-6
    assert c.budget(1) == 3.0
    assert abs(c.budget(2000) - 6.0 * (0.1 + 4.0)) < 1e-6
    assert c.budget(10**7) == 120.0  # never beyond the initial allowance


def test_slow_machine_gets_longer_budgets():
    fast, slow = StepClock(warmup=1), StepClock(warmup=1)
    for _ in range(10):
        fast.observe(8, 0.05)
        slow.observe(8, 2.0)
    assert fast.budget(8) == fast.floor
    assert slow.budget(8) > 10.0


def test_bad_measurements_are_ignored():
    c = StepClock(warmup=1)
    c.observe(-1, 1.0)
    c.observe(1, -1.0)
    assert c.seen == 0 and c.budget(1) == c.initial
