"""The run's metrics log, <out>/metrics.jsonl: one JSON object per logged event, appended and flushed at once."""

import json
import time


class MetricsLog:
    """Append-only JSON-lines log. path None: a process that does not write (ranks other than 0)."""

    def __init__(self, path):
        self.path = path

    def write(self, **record):
        if self.path is None:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
