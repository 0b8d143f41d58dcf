"""The collapse alarm: say so when the student predicts one vector for every patch.

A student that regresses layer-normed teacher features can lower its loss by predicting
their mean, the same vector for every patch; its loss falls and nothing else shows it. The
collapse probe (img2vec.token_diversity.collapse_probe) reads, every diversity_every steps,
the token diversity of the predictions (`div_pred`) and of the targets they regress
(`div_target`) as device scalars; PendingReading holds them until the next log interval reads
them, once, with the step they were taken at. After warm-up, a ratio div_pred / div_target below
COLLAPSE_FRACTION raises the alarm: one warning line per occurrence window (consecutive low
readings), and `summary()` for the run's last lines.

COLLAPSE_FRACTION, by measurement on the embedded default (vit_tiny, 96 px, 200 steps of 32,
warm-up 16 steps, readings every 25 steps on the whole micro-batch of 32 images), ratios at steps 25..175:
    random ResNet-50 teacher (the old default)  .045 .013 .009 .008 .006 .008 .008
    HOG teacher, the default recipe             .223 .142 .125 .131 .152 .147 .166
    HOG teacher, base_lr 2e-3, 400 steps        lowest .084
0.03 sits a factor ~2.3 above the collapsed run's highest reading from step 50 on (0.013) and
~2.8 below the lowest reading of any HOG run at base_lr <= 2e-3. Earlier readings on 4 images
(docs/collapse.md) swung by up to 5x between neighbours; on 32 they move by about 1.5x. A window
that opens and closes at once is worth a look, a window that lasts to the end of the run is a collapse.
"""
from __future__ import annotations

import logging
import math

COLLAPSE_FRACTION = 0.03  # alarm when div_pred < COLLAPSE_FRACTION * div_target after warm-up

log = logging.getLogger("img2vec.collapse")


class PendingReading:
    """The collapse probe's latest reading, held as device scalars from the optimizer step it was
    taken at until a log interval reads it: each reading is read once, under its own step.

    pending = PendingReading()
    pending.hold(step, collapse_probe(pred, target, ids_masked))  # device scalars: no host sync
    pending.take()  # {"div_pred", "div_target", "div_step"} (a host sync), then {} until the next hold

    A reading not yet taken when the next one is held is replaced (diversity_every < log_every).
    """

    def __init__(self):
        self.step: int | None = None
        self.values: dict = {}  # name -> device scalar

    def hold(self, step: int, values: dict) -> None:
        self.step, self.values = step, values

    def take(self) -> dict:
        if not self.values:
            return {}
        reading = {name: value.item() for name, value in self.values.items()}
        self.values = {}
        return {**reading, "div_step": self.step}


class CollapseAlarm:
    """Decides, from host floats at log time, whether the student is collapsing, and says it.

    alarm = CollapseAlarm(warmup_steps, every=diversity_every)
    alarm.update(step, div_pred, div_target)  # step: when the probe was taken; a repeated step is ignored
    alarm.summary(last_step)                  # one line for the end of the run
    """

    def __init__(self, warmup_steps: int, fraction: float = COLLAPSE_FRACTION, every: int = 0,
                 logger: logging.Logger = log):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"collapse fraction must be in (0, 1), got {fraction}")
        self.warmup_steps, self.fraction, self.every, self.logger = warmup_steps, fraction, every, logger
        self.windows: list[list[int]] = []  # [first step, last step] of each low window
        self.low = False  # inside a window
        self.lowest: tuple[float, int] | None = None  # (ratio, step), after warm-up
        self.span: tuple[int, int] | None = None  # (first, last) step of the readings, warm-up included
        self.early = self.unusable = 0  # readings by the end of warm-up; after it, not finite or flat targets

    def update(self, step: int, div_pred: float, div_target: float) -> str | None:
        """Record one reading; return (and log as a warning) the line that opens a new window.

        `step` is the optimizer step at which the probe was taken (not the step it is logged at):
        a reading logged again at the next log interval, same step, is ignored.
        """
        if self.span is not None and step <= self.span[1]:
            return None
        self.span = (step if self.span is None else self.span[0], step)
        if step <= self.warmup_steps:  # a student starts near-constant: nothing to judge yet
            self.early += 1
            return None
        if not (math.isfinite(div_pred) and math.isfinite(div_target)) or div_target <= 1e-6:
            self.unusable += 1  # not finite, or targets with no diversity: nothing to compare against
            return None
        ratio = div_pred / div_target
        if self.lowest is None or ratio < self.lowest[0]:
            self.lowest = (ratio, step)
        if ratio >= self.fraction:
            self.low = False
            return None
        if self.low:
            self.windows[-1][1] = step
            return None
        self.low = True
        self.windows.append([step, step])
        line = (f"collapse alarm at step {step}: the predictions' token diversity {div_pred:.4f} is "
                f"{100 * ratio:.1f}% of the targets' {div_target:.4f} (alarm below {100 * self.fraction:.0f}%): "
                "the student predicts nearly one vector for every patch, so a falling loss only means it "
                "learned the mean target. Try a teacher with image structure (teacher hog or pixels, or "
                "real teacher_weights), a lower base_lr or a longer warmup_epochs")
        self.logger.warning("%s", line)
        return line

    @property
    def fired(self) -> bool:
        return bool(self.windows)

    def summary(self, last_step: int | None = None) -> str:
        """One line: how often the alarm fired and the lowest ratio, that it stayed quiet, or why
        it judged nothing. `last_step`: the run's last optimizer step, to say when the next reading
        would have come."""
        if self.lowest is None:
            return f"collapse alarm: {self._why_not_judged(last_step)}"
        low, at = self.lowest
        if not self.windows:
            return (f"collapse alarm: quiet; div_pred / div_target stayed >= {low:.3f} after warm-up "
                    f"(alarm below {self.fraction:g})")
        spans = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in self.windows)
        end = ("still collapsed at the end" if self.low else "recovered by the end")
        return (f"collapse alarm: the student COLLAPSED (div_pred / div_target below {self.fraction:g} at steps "
                f"{spans}; lowest {low:.4f} at step {at}; {end}): its features are not to be trusted; "
                "try teacher hog or pixels, real teacher_weights, or a lower base_lr")

    def _why_not_judged(self, last_step: int | None) -> str:
        if self.span is None:
            return "off (diversity_every = 0)" if not self.every else "nothing to judge: no diversity reading"
        if self.unusable:
            return (f"nothing to judge: no usable diversity reading after warm-up ({self.unusable} not finite or "
                    "with flat targets)")
        first, last = self.span
        which = (f"the only diversity reading (step {last})" if self.early == 1
                 else f"all {self.early} diversity readings (steps {first}-{last})")
        line = f"nothing to judge: {which} came by the end of warm-up (step {self.warmup_steps})"
        if self.every and last_step is not None:  # a reading at step s is taken during step s + 1
            line += f", and the next (step {last + self.every}) needs more than this run's {last_step} steps"
        return line
