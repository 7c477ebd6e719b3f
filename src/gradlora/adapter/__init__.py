"""What an init leaves on a model: the offset, and the adapter files that carry it."""
