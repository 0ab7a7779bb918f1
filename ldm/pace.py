"""A GPU preset on a CPU: after the first steps of a stage, one line with the time the stage will take.

The `paper-*` presets are sized for GPUs (the original work's configurations). When one runs on a CPU, each
stage measures its first PACE_STEPS steps (after one warm-up step) and prints its estimated duration and the
suggestion `--preset quick` once; then it goes on, since the user may mean it.
Public stages only: the private stage's step time depends on the Poisson-sampled batch sizes, which must not
leave the run, so it prints no timing.
"""

import sys
import time

PACE_STEPS = 3  # timed steps, after one warm-up step


class Pace:
    """Call `step()` after every step of a stage's loop; prints at most one line, only for paper-* on a CPU."""

    def __init__(self, cfg, device, stage, remaining, main=True):
        self.active = main and cfg.preset.startswith("paper") and device.type == "cpu" and remaining > PACE_STEPS + 1
        self.stage, self.remaining, self.preset, self.seen, self.start = stage, remaining, cfg.preset, 0, None

    def step(self):
        if not self.active:
            return
        self.seen += 1
        if self.seen == 1:
            self.start = time.perf_counter()  # after the warm-up step
        elif self.seen == PACE_STEPS + 1:
            per_step = (time.perf_counter() - self.start) / PACE_STEPS
            hours = per_step * (self.remaining - self.seen) / 3600
            print(f"{self.stage}: {per_step:.2f} s per step on this CPU, about {hours:.1f} h for the remaining "
                  f"{self.remaining - self.seen:,} steps; --preset {self.preset} is sized for a GPU: try --preset "
                  f"quick for a CPU run (going on)", file=sys.stderr)
            self.active = False
