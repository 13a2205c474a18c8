"""A worker that never reads its channel (``python -m tests.stalled_worker LISTEN_FD
CONTROL_FD``): what a worker stuck in a blocking call looks like to the supervisor."""

from __future__ import annotations

import time

if __name__ == "__main__":
    while True:
        time.sleep(60)
