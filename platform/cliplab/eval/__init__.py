"""Held-out evaluation: zero-shot classification and image-text retrieval, for single- and multi-branch models."""
