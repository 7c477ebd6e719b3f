"""The gradient inits: capture G, decompose it, compute A0 and B0 (``initialize``)."""
