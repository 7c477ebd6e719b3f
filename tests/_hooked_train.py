"""`gradlora train` with a hook after every step, for the interruption tests.

Usage: python _hooked_train.py pause SECONDS train ARGS...    (sleep after every step)
       python _hooked_train.py stop STEP train ARGS...        (KeyboardInterrupt after STEP)

The same code path as ``python -m gradlora.cli train ARGS...`` (also under torchrun): only what
follows each step (and its checkpoint, if due) changes. "pause" lets test_resume_after_kill.py
SIGKILL the process mid-run without needing a big model to make the run last; "stop" ends every
rank of a torchrun run at the same step (exit 130), as Ctrl-C would.
"""

from __future__ import annotations

import sys
import time

import torch.distributed as dist

import gradlora.cli.loop as finetune
from gradlora.cli.main import main


def hooked(mode: str, value: float):
    real = finetune.train

    def train(*args, on_step=None, **kwargs):
        def step(n, result):
            on_step(n, result)
            if mode == "pause":
                time.sleep(value)
            elif n == int(value):
                if dist.is_initialized():
                    dist.barrier()  # rank 0 has written the checkpoint before anyone stops
                raise KeyboardInterrupt

        return real(*args, on_step=step, **kwargs)

    return train


if __name__ == "__main__":
    if sys.argv[1] not in ("pause", "stop"):
        sys.exit(__doc__)
    finetune.train = hooked(sys.argv[1], float(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
