"""The collapse alarm (img2vec/collapse.py): when it speaks, how often, and what the summary says."""
import logging

import pytest
import torch

from img2vec.collapse import COLLAPSE_FRACTION, CollapseAlarm, PendingReading

# (step, div_pred, div_target) readings of the embedded default at 200 steps (warm-up 16), measured
# with the probe on the whole micro-batch of 32: the random ResNet-50 run (the old default: mask 0.75,
# base_lr 2e-3), every reading
COLLAPSED = [(0, 0.0637, 0.2096), (25, 0.0118, 0.2628), (50, 0.0033, 0.2582), (75, 0.0021, 0.2316),
             (100, 0.0019, 0.2259), (125, 0.0016, 0.2575), (150, 0.0018, 0.2399), (175, 0.0017, 0.2265)]
# the HOG run at the default recipe (mask 0.5, base_lr 1e-3), every reading
HEALTHY = [(0, 0.0791, 0.8193), (25, 0.1851, 0.8287), (50, 0.1207, 0.8490), (75, 0.0991, 0.7899),
           (100, 0.1100, 0.8369), (125, 0.1232, 0.8108), (150, 0.1219, 0.8277), (175, 0.1434, 0.8651)]


def _feed(alarm, readings):
    return [alarm.update(*r) for r in readings]


def test_collapsed_run_warns_once_per_window_and_the_summary_repeats_it(caplog):
    alarm = CollapseAlarm(warmup_steps=16)
    with caplog.at_level(logging.WARNING, logger="img2vec.collapse"):
        lines = _feed(alarm, COLLAPSED)
    warned = [l for l in lines if l]
    assert len(warned) == 1 and lines[2] is warned[0]  # the first reading below 3% (step 25 reads 4.5%), only
    assert len(caplog.records) == 1 and "\n" not in warned[0]
    assert "step 50" in warned[0] and "1.3%" in warned[0] and "(alarm below 3%)" in warned[0]
    assert "one vector for every patch" in warned[0] and "Try" in warned[0]
    assert alarm.fired and alarm.windows == [[50, 175]]
    assert alarm.update(175, 0.0017, 0.2265) is None and alarm.windows == [[50, 175]]  # logged again: ignored
    s = alarm.summary()
    assert "COLLAPSED" in s and "50-175" in s and "0.0062" in s and "still collapsed" in s


def test_healthy_run_stays_quiet():
    alarm = CollapseAlarm(warmup_steps=16)
    assert _feed(alarm, HEALTHY) == [None] * len(HEALTHY)
    assert not alarm.fired
    assert "quiet" in alarm.summary() and f"{0.0991 / 0.7899:.3f}" in alarm.summary()


def test_warm_up_and_unusable_readings_are_ignored():
    alarm = CollapseAlarm(warmup_steps=50)
    assert alarm.update(25, 0.001, 0.3) is None  # inside warm-up: a student starts near-constant
    assert alarm.update(60, float("nan"), 0.3) is None
    assert alarm.update(70, 0.0, 0.0) is None  # targets with no diversity: nothing to compare
    assert not alarm.fired
    assert alarm.summary() == ("collapse alarm: nothing to judge: no usable diversity reading after warm-up "
                               "(2 not finite or with flat targets)")


def test_a_run_whose_readings_all_came_in_warm_up_says_so_and_when_the_next_was_due():
    """The embedded default cut to 20 steps: warm-up 16, one reading every 25 steps, at step 0 only."""
    alarm = CollapseAlarm(warmup_steps=16, every=25)
    alarm.update(0, 0.0791, 0.8193)
    alarm.update(0, 0.0791, 0.8193)  # logged again: still one reading
    assert alarm.summary(last_step=20) == ("collapse alarm: nothing to judge: the only diversity reading (step 0) "
                                          "came by the end of warm-up (step 16), and the next (step 25) needs more "
                                          "than this run's 20 steps")
    alarm = CollapseAlarm(warmup_steps=60, every=25)
    _feed(alarm, HEALTHY[:3])
    assert alarm.summary(last_step=75) == ("collapse alarm: nothing to judge: all 3 diversity readings (steps 0-50) "
                                          "came by the end of warm-up (step 60), and the next (step 75) needs more "
                                          "than this run's 75 steps")
    assert alarm.summary().endswith("came by the end of warm-up (step 60)")  # no end step: no next
    assert CollapseAlarm(16).summary(20) == "collapse alarm: off (diversity_every = 0)"
    assert CollapseAlarm(16, every=25).summary(20) == "collapse alarm: nothing to judge: no diversity reading"


def test_a_held_reading_is_read_once_with_the_step_it_was_taken_at():
    pending = PendingReading()
    assert pending.take() == {}
    pending.hold(0, {"div_pred": torch.tensor(0.25), "div_target": torch.tensor(0.5)})  # device scalars
    assert pending.take() == {"div_pred": 0.25, "div_target": 0.5, "div_step": 0}
    assert pending.take() == {}  # the next log interval: nothing new
    pending.hold(25, {"div_pred": torch.tensor(0.125), "div_target": torch.tensor(0.5)})
    pending.hold(50, {"div_pred": torch.tensor(0.375), "div_target": torch.tensor(0.5)})  # two before a log
    assert pending.take() == {"div_pred": 0.375, "div_target": 0.5, "div_step": 50}


def test_a_new_window_after_recovery_warns_again():
    alarm = CollapseAlarm(warmup_steps=0)
    ratios = [0.5, 0.01, 0.025, 0.5, 0.003, 0.6]
    lines = [alarm.update(10 * (i + 1), r, 1.0) for i, r in enumerate(ratios)]
    assert [bool(l) for l in lines] == [False, True, False, False, True, False]
    assert alarm.windows == [[20, 30], [50, 50]] and "recovered" in alarm.summary()


def test_threshold_is_between_collapsed_and_healthy_measurements():
    assert COLLAPSED[-1][1] / COLLAPSED[-1][2] < COLLAPSE_FRACTION < min(p / t for _, p, t in HEALTHY[1:])
    with pytest.raises(ValueError):
        CollapseAlarm(10, fraction=1.5)
