"""The collapse alarm (img2vec/collapse.py): when it speaks, how often, and what the summary says."""
import logging

import pytest

from img2vec.collapse import COLLAPSE_FRACTION, CollapseAlarm

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
    assert not alarm.fired and "no diversity reading" in alarm.summary()


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
