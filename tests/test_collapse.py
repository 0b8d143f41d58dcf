"""The collapse alarm (img2vec/collapse.py): when it speaks, how often, and what the summary says."""
import logging

import pytest

from img2vec.collapse import COLLAPSE_FRACTION, CollapseAlarm

# div_pred, div_target readings every 25 steps of the embedded default (200 steps, warm-up 16):
# the random ResNet-50 run as measured (ends at 0.0016 / 0.276), and a healthy one
COLLAPSED = [(0, 0.31, 0.28), (25, 0.02, 0.277), (50, 0.008, 0.276), (100, 0.003, 0.276), (200, 0.0016, 0.276)]
HEALTHY = [(0, 0.30, 0.62), (25, 0.35, 0.62), (50, 0.41, 0.61), (100, 0.45, 0.62), (200, 0.47, 0.62)]


def _feed(alarm, readings):
    return [alarm.update(*r) for r in readings]


def test_collapsed_run_warns_once_per_window_and_the_summary_repeats_it(caplog):
    alarm = CollapseAlarm(warmup_steps=16)
    with caplog.at_level(logging.WARNING, logger="img2vec.collapse"):
        lines = _feed(alarm, COLLAPSED)
    warned = [l for l in lines if l]
    assert len(warned) == 1 and lines[1] is warned[0]  # the first low reading after warm-up, only
    assert len(caplog.records) == 1 and "\n" not in warned[0]
    assert "step 25" in warned[0] and "one vector for every patch" in warned[0] and "Try" in warned[0]
    assert alarm.fired and alarm.windows == [[25, 200]]
    s = alarm.summary()
    assert "COLLAPSED" in s and "25-200" in s and "0.0058" in s and "still collapsed" in s


def test_healthy_run_stays_quiet():
    alarm = CollapseAlarm(warmup_steps=16)
    assert _feed(alarm, HEALTHY) == [None] * len(HEALTHY)
    assert not alarm.fired
    assert "quiet" in alarm.summary() and f"{0.35 / 0.62:.3f}" in alarm.summary()


def test_warm_up_and_unusable_readings_are_ignored():
    alarm = CollapseAlarm(warmup_steps=50)
    assert alarm.update(25, 0.001, 0.3) is None  # inside warm-up: a student starts near-constant
    assert alarm.update(60, float("nan"), 0.3) is None
    assert alarm.update(70, 0.0, 0.0) is None  # targets with no diversity: nothing to compare
    assert not alarm.fired and "no diversity reading" in alarm.summary()


def test_a_new_window_after_recovery_warns_again():
    alarm = CollapseAlarm(warmup_steps=0)
    ratios = [0.5, 0.05, 0.04, 0.5, 0.03, 0.6]
    lines = [alarm.update(10 * (i + 1), r, 1.0) for i, r in enumerate(ratios)]
    assert [bool(l) for l in lines] == [False, True, False, False, True, False]
    assert alarm.windows == [[20, 30], [50, 50]] and "recovered" in alarm.summary()


def test_threshold_is_between_collapsed_and_healthy_measurements():
    assert COLLAPSED[-1][1] / COLLAPSED[-1][2] < COLLAPSE_FRACTION < min(p / t for _, p, t in HEALTHY[1:])
    with pytest.raises(ValueError):
        CollapseAlarm(10, fraction=1.5)
