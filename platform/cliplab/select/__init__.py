"""Data selection with a frozen teacher CLIP: embed a pool, score it, select a subset (issue 12)."""
