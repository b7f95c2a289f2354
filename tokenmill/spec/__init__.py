"""Speculative decoding (proposers and verification) and distillation of draft models."""
