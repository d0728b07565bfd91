"""Multi-caption samples: slots from a json dict or list, the plain caption as a slot, fallback on gaps,
and caption slots in train and eval batches."""

from __future__ import annotations

import pytest

from cliplab.config import CaptionsConfig, DataConfig, ModelConfig
from cliplab.data.captions import caption_slots, tokenize_slots
from cliplab.data.pipeline import eval_batches, make_train_loader
from cliplab.data.synth import SynthSpec, write_synthscenes
from cliplab.data.tokenize import build_tokenizer

TOK = build_tokenizer(ModelConfig(config={"embed_dim": 8, "vision_cfg": {}, "text_cfg": {"context_length": 16}}))
SLOTS = CaptionsConfig(slots=["txt", "colour", "shape"])


def test_slots_from_a_dict_with_the_plain_caption_first() -> None:
    texts, own = caption_slots("a red star", {"captions": {"colour": "red colour", "shape": " star shape "}}, SLOTS)
    assert texts == ["a red star", "red colour", "star shape"] and own == [True, True, True]


def test_missing_or_empty_slots_fall_back_to_the_plain_caption_and_are_flagged() -> None:
    texts, own = caption_slots("a red star", {"captions": {"colour": "", "size": "big"}}, SLOTS)
    assert texts == ["a red star"] * 3 and own == [True, False, False]
    texts, own = caption_slots("a red star", {}, SLOTS)
    assert own == [True, False, False]
    texts, own = caption_slots("a red star", {"captions": 7}, SLOTS)
    assert own == [True, False, False]


def test_slots_from_a_list_by_position() -> None:
    cfg = CaptionsConfig(field="caption", slots=["web", "detail", "nouns"])
    texts, own = caption_slots("plain", {"caption": ["web caption", "a detailed one"]}, cfg)
    assert texts == ["web caption", "a detailed one", "plain"] and own == [True, True, False]


def test_tokenised_slots_have_batch_slot_token_shape() -> None:
    rows = [caption_slots("a red star", {"captions": {"colour": "red"}}, SLOTS)] * 4
    out = tokenize_slots(rows, TOK)
    assert out["texts"].shape == (4, 3, 16) and out["caption_own"].tolist() == [[True, True, False]] * 4
    assert (out["texts"][:, 0] == TOK(["a red star"])).all()


def test_duplicate_slot_names_are_refused() -> None:
    with pytest.raises(ValueError, match="slot names must be unique"):
        CaptionsConfig(slots=["colour", "colour"])


def test_train_and_eval_batches_carry_every_slot(tmp_path) -> None:
    write_synthscenes(str(tmp_path), SynthSpec(num_samples=32, samples_per_shard=16, image_size=32))
    spec = f"{tmp_path}/{{00000..00001}}.tar"
    slots = CaptionsConfig(slots=["colour", "shape", "layout", "count", "long"])
    cfg = DataConfig(train_shards=spec, batch_size=8, num_workers=0, shuffle_buffer=8, image_size=32, captions=slots)
    loader, _ = make_train_loader(cfg, TOK, (0.5,) * 3, (0.5,) * 3, 0, 1, None)
    batch = next(iter(loader))
    assert batch["texts"].shape == (8, 5, 16) and batch["caption_own"].all()
    want = TOK([batch["json"][0]["captions"]["layout"]])[0]
    assert (batch["texts"][0, 2] == want).all()
    held_out = next(eval_batches(spec, 8, 32, (0.5,) * 3, (0.5,) * 3, TOK, "txt", 0, 1, 16, slots))
    assert held_out["texts"].shape == (8, 5, 16) and held_out["text"].shape == (8, 16)
