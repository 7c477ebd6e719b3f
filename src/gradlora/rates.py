"""A guard on the learning rate: one WARNING when a model initialized by gradlora is trained at a
rate far above every rate at which its init was measured to work (docs/benchmarks.md, "The
learning-rate window").

On gradlora's three benchmark tasks, LoRA-GA with its default stable scale and gamma = 16 had
its best validation loss at 0.10 to 0.25x LoRA's best rate, and its window (the rates within 2%
of the untrained-to-LoRA's-best gap of its best; the highest is 5e-4 on all three) never
overlapped LoRA's: at LoRA's rate it is far behind. The
other inits (LoRA-One's, LoRA-GA with the matched scale) overlapped LoRA's windows, so nothing is
said for them. The windows are absolute rates on small models (MiniLM, SmolLM2-135M): a rate
above all of them is a warning, not an error, and the user's rate is never changed.
``initialize`` records the method on the model (``INIT_ATTRIBUTE``); ``create_optimizer`` and
``GradLoraCallback`` call ``warn_if_far``.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("gradlora")

INIT_ATTRIBUTE = "gradlora_init"  # on the PeftModel: (method, options) of its gradlora init
# benchmarks/results/lr_windows.json, lora-ga (stable scale, gamma 16): task -> (low, high,
# best rate, LoRA's best rate); tests/test_rates.py checks these against that file
LORA_GA_WINDOWS = {
    "MiniLM / Rotten Tomatoes": (5e-4, 5e-4, 5e-4, 2e-3),
    "SmolLM2 / Hamlet": (5e-4, 5e-4, 5e-4, 5e-3),
    "SmolLM2 / arithmetic": (1e-4, 5e-4, 2e-4, 2e-3),
}


def measured_window(method: str, options: dict[str, Any]) -> dict[str, tuple] | None:
    """The measured windows of an init, or None where none was measured apart from LoRA's (every
    init but LoRA-GA with scale "stable" and gamma 16)."""
    stable = options.get("scale", "stable") == "stable" and float(options.get("gamma", 16)) == 16
    return LORA_GA_WINDOWS if method == "lora-ga" and stable else None


def warn_if_far(model: Any, lr: float, where: str) -> bool:
    """Log one WARNING (and return True) if ``model``'s gradlora init has measured windows and
    ``lr`` is above the highest rate of all of them; ``where`` names the caller."""
    init = getattr(model, INIT_ATTRIBUTE, None)
    windows = None if init is None else measured_window(*init)
    if windows is None or not isinstance(lr, int | float):
        return False
    highest = max(high for _, high, _, _ in windows.values())
    if lr <= highest:
        return False
    ratios = [best / lora for _, _, best, lora in windows.values()]
    log.warning(
        "gradlora: %s trains a LoRA-GA init (stable scale, gamma 16) at lr=%g, above every rate "
        "at which it was within tolerance of its best on gradlora's three benchmark tasks "
        "(highest %g); there its best rates were %.2f-%.2fx LoRA's best (docs/benchmarks.md, "
        "benchmarks/results/lr_windows.md). Try about a quarter to a tenth of your LoRA rate; "
        "the windows are from small models, so check on yours",
        where,
        lr,
        highest,
        min(ratios),
        max(ratios),
    )
    return True
