"""The privacy ledger: one JSON line per logical DP step, on disk before the step's update is applied.

Each entry records (step, sigma, q, clip). It is appended, flushed and fsynced before the noisy
gradient of that step touches the model, so a kill at any point leaves a ledger that counts every step
whose update might have been applied. A truncated last line (a kill while writing) still counts as a
spent step: it is replaced, atomically, by a complete entry marked "recovered". Counting too many steps
only overstates epsilon. On resume the ledger is continued, and steps taken after the last checkpoint
still count although their updates were lost.
"""

import json
import os
import time

from dp.accountant import compute_epsilon
from ldm.checkpoint import atomic_write_bytes
from ldm.errors import UserError


class PrivacyLedger:
    def __init__(self, path, sigma, q, clip, writer=True):
        """Open (or start) the ledger at `path` for a run with this mechanism (sigma, q, clip).

        writer=False: read only (ranks other than 0 of a distributed run); a truncated entry is counted
        but the file is left to the writer.
        """
        self.path = path
        self.writer = writer
        self.mechanism_now = dict(sigma=sigma, q=q, clip=clip)
        self.entries = []
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
                self._recover()

    def _recover(self):
        """A kill while writing the last entry: that step counts as spent. Rewrite the file with it complete."""
        self.entries.append({"step": len(self.entries), **self.mechanism_now, "recovered": True})
        if not self.writer:
            return
        text = "".join(json.dumps(e) + "\n" for e in self.entries).encode()
        atomic_write_bytes(self.path, lambda f: f.write(text))

    @property
    def steps(self):
        """Logical steps spent."""
        return len(self.entries)

    def record(self, step):
        """Append one step and make it durable before the caller applies the update."""
        assert self.writer, "only the writing process records steps"
        entry = {"step": step, **self.mechanism_now, "time": round(time.time(), 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)

    def check_mechanism(self):
        """Every recorded step used this run's (sigma, q, clip); a ledger that mixes several is refused."""
        now = self.mechanism_now
        other = [e for e in self.entries if any(e[k] != now[k] for k in now)]
        if other:
            raise UserError(f"privacy ledger {self.path} has steps with sigma={other[0]['sigma']}, q={other[0]['q']}, "
                            f"clip={other[0]['clip']} but this run uses {now}; resume with the same settings "
                            f"or choose another --out")

    def epsilon(self, delta):
        """Accounted (epsilon, delta) of every spent step: an EpsilonResult (see dp/accountant.py), or None."""
        if not self.entries:
            return None
        return compute_epsilon(sigma=self.mechanism_now["sigma"], q=self.mechanism_now["q"], steps=self.steps,
                               delta=delta)
