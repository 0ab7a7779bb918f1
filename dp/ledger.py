"""The privacy ledger: one JSON line per logical DP step, on disk before the step's update is applied.

Each entry records (step, sigma, q, clip). It is appended, flushed and fsynced before the noisy
gradient of that step touches the model, so a kill at any point leaves a ledger that counts every step
whose update might have been applied. A truncated last line (a kill while writing) still counts as a
spent step: counting too many steps only overstates epsilon. On resume the ledger is continued, and
steps taken after the last checkpoint still count although their updates were lost.
"""

import json
import os
import time

from dp.accountant import compute_epsilon
from ldm.errors import UserError


class PrivacyLedger:
    def __init__(self, path):
        self.path = path
        self.entries = []
        self.truncated = 0
        if os.path.exists(path):
            self._read()

    def _read(self):
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                self.entries.append(json.loads(line))
            except json.JSONDecodeError:
                if i != len(lines) - 1:  # only the last, unterminated line may be cut short
                    raise UserError(f"privacy ledger {self.path} is corrupt at line {i + 1}; "
                                    f"it cannot be trusted, start a new run") from None
                self.truncated += 1  # a kill while writing the last entry: count it as spent

    @property
    def steps(self):
        """Logical steps spent, including a truncated last entry."""
        return len(self.entries) + self.truncated

    def record(self, step, sigma, q, clip):
        """Append one step and make it durable before the caller applies the update."""
        entry = {"step": step, "sigma": sigma, "q": q, "clip": clip, "time": round(time.time(), 3)}
        with open(self.path, "a") as f:
            if self.truncated:  # finish the broken line so the file stays one object per line
                f.write("\n")
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)

    def mechanism(self):
        """The one (sigma, q) of every entry; a ledger that mixes several is refused."""
        kinds = {(e["sigma"], e["q"]) for e in self.entries}
        if len(kinds) > 1:
            raise UserError(f"privacy ledger {self.path} mixes several (sigma, q): {sorted(kinds)}; "
                            f"this accountant composes one mechanism only")
        return kinds.pop() if kinds else None

    def epsilon(self, delta, sigma=None, q=None):
        """Accounted (epsilon, delta) of every spent step: an EpsilonResult (see dp/accountant.py)."""
        kind = self.mechanism() or (sigma, q)
        if self.steps == 0 or kind[0] is None:
            return None
        return compute_epsilon(sigma=kind[0], q=kind[1], steps=self.steps, delta=delta)
