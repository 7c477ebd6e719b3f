"""The one exception type gradlora raises for bad input; its message names the fix."""


class GradLoraError(ValueError):
    """Bad input to gradlora: the message says what is wrong and how to fix it.

    Raised before anything in the model changes; a model is never left half-initialized.
    """
