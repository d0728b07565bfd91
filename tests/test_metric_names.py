"""Metric-name rules in one place: held-out vs training metrics, headline numbers, comparison rows."""

from __future__ import annotations

from cliplab.metrics import compare_keys, is_headline, is_held_out, is_train_metric


def test_families() -> None:
    assert is_headline("zeroshot/shape/top1") and not is_headline("zeroshot/shape/top5")
    assert is_headline("retrieval/i2t_R1") and not is_headline("retrieval/colour/i2t_R1")
    assert is_headline("probe/spearman_scale") and not is_headline("loss")
    assert is_held_out("branch0/colour/i2t_R1") and not is_held_out("loss_clip")
    assert is_train_metric("loss_contrast") and is_train_metric("samples_per_s") and not is_train_metric("lr_x")


def test_compare_rows_keep_the_headline_order_then_caption_slots() -> None:
    have = {"loss", "retrieval/t2i_R1", "retrieval/shape/i2t_R1", "retrieval/colour/i2t_R1", "branch0/x/i2t_R1"}
    assert compare_keys(have) == ["retrieval/t2i_R1", "loss", "retrieval/colour/i2t_R1", "retrieval/shape/i2t_R1"]
