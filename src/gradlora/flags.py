"""Snapshot and restore of the mutable flags gradlora touches on a model: every parameter's
``requires_grad`` and every module's train/eval mode. One helper for the capture (restore
always) and for the adapter loader (restore on error)."""

from __future__ import annotations

from torch import nn


class ModuleFlags:
    """The ``requires_grad`` of every parameter and the ``training`` flag of every module of
    ``model`` at construction; ``restore()`` puts them back."""

    def __init__(self, model: nn.Module):
        self.requires = [(p, p.requires_grad) for p in model.parameters()]
        self.modes = [(m, m.training) for m in model.modules()]

    def restore(self) -> None:
        for p, flag in self.requires:
            p.requires_grad_(flag)
        for module, flag in self.modes:
            module.training = flag
