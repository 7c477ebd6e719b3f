"""Integrations of gradlora with training frameworks (transformers Trainer, TRL)."""
