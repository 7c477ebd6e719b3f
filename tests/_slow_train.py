"""`gradlora train` with a pause after every step (run by test_resume_after_kill.py).

Usage: python _slow_train.py SECONDS train ARGS...

The same code path as ``python -m gradlora.cli train ARGS...``; only every step (and its
checkpoint, if due) is followed by a sleep, so the test can SIGKILL the process in the middle of
the run without needing a big model to make the run last.
"""

from __future__ import annotations

import sys
import time

import gradlora.finetune as finetune
from gradlora.cli import main


def slowed(pause: float):
    real = finetune.train

    def train(*args, on_step=None, **kwargs):
        def step(n, result):
            on_step(n, result)
            time.sleep(pause)

        return real(*args, on_step=step, **kwargs)

    return train


if __name__ == "__main__":
    finetune.train = slowed(float(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
