"""What crosses the DataLoader: only the objective's fields, a packed cursor that resumes exactly, pinning."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from loader_setup import NORM, TOK, cfg

from cliplab.config import CaptionsConfig, DataConfig, ViewsConfig, validate_tree
from cliplab.data.cursor import pack, unpack
from cliplab.data.pipeline import make_train_loader, resolve_pin_memory
from cliplab.errors import ConfigError
from cliplab.objectives.registry import get_spec


def first_batch(c: DataConfig, objective: str) -> dict:
    loader, _ = make_train_loader(c, TOK, *NORM, 0, 1, None, get_spec(objective).batch_fields)
    return next(iter(loader))


def test_the_reader_emits_only_the_objectives_fields(shards) -> None:
    assert set(first_batch(cfg(shards), "clip")) == {"image", "text", "__cursor__"}
    views = cfg(shards, views=ViewsConfig(count=2))
    assert set(first_batch(views, "clip")) == {"image", "text", "__cursor__"}  # views made only when read
    assert set(first_batch(views, "mcd")) == {
        "image",
        "text",
        "crop_box",
        "views",
        "view_boxes",
        "view_jitter",
        "__cursor__",
    }
    slots = cfg(shards, captions=CaptionsConfig(slots=["txt", "colour"]))
    assert set(first_batch(slots, "holistic")) == {"image", "texts", "caption_own", "__cursor__"}
    everything = next(iter(make_train_loader(cfg(shards), TOK, *NORM, 0, 1, None)[0]))
    assert set(everything) == {"image", "text", "crop_box", "flip", "key", "json", "__cursor__"}


@pytest.mark.parametrize("gauss", [None, 0.123456789])
def test_a_packed_cursor_is_one_int64_array_and_unpacks_to_the_same_cursor(gauss) -> None:
    version, state, _ = random.Random(3).getstate()
    cursor = {
        "reader": 3,
        "readers": 4,
        "read": [2, 1, 17, 47],
        "buffer": [[2, 0, i, i + 30] for i in range(25)] + [[1, 5, 29, 119]],
        "rng": [version, list(state), gauss],
        "emitted": 96,
        "skipped": {"samples": 2, "shards": 1},
    }
    packed = pack(cursor)
    assert isinstance(packed, np.ndarray) and packed.dtype == np.int64 and packed.ndim == 1
    assert unpack(packed) == cursor
    empty = {**cursor, "buffer": []}
    assert unpack(pack(empty)) == empty


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_packed_cursors_continues_sample_for_sample(shards, workers) -> None:
    c = cfg(shards, num_workers=workers, hflip=True)
    fields = frozenset({"image", "text", "key"})
    loader, position = make_train_loader(c, TOK, *NORM, 1, 2, None, fields)
    it, ref, state = iter(loader), [], None
    for i in range(12):  # 60 samples per rank per epoch = 7.5 batches: crosses an epoch boundary
        batch = next(it)
        assert isinstance(batch["__cursor__"], np.ndarray)
        position.update(batch)
        ref.append(batch)
        if i == 4:
            state = json.loads(json.dumps(position.state_dict()))  # as it travels through a checkpoint
    resumed, _ = make_train_loader(c, TOK, *NORM, 1, 2, state, fields)
    it2 = iter(resumed)
    for i in range(5, 12):
        batch = next(it2)
        assert batch["key"] == ref[i]["key"], f"batch {i}"
        assert torch.equal(batch["image"], ref[i]["image"]) and torch.equal(batch["text"], ref[i]["text"])


@pytest.mark.parametrize(
    ("setting", "device", "pinned"),
    [(None, "cuda", True), (None, "cpu", False), (False, "cuda", False), (True, "cpu", True)],
)
def test_pin_memory_defaults_to_on_for_gpu_workers(shards, setting, device, pinned) -> None:
    assert resolve_pin_memory(cfg(shards, pin_memory=setting), torch.device(device)) is pinned


def _tree(shards: str, **data) -> dict:
    return {
        "name": "t",
        "data": {"train_shards": shards, **data},
        "model": {"name": "ViT-B-32"},
        "train": {"steps": 10},
    }


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"pin_memory": "sometimes"}, "data.pin_memory"),
        ({"decode": "gpu"}, "data.decode"),
    ],
)
def test_bad_data_loading_values_are_refused_naming_the_field(shards, data, message) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        validate_tree(_tree(shards, **data), "x.yaml")
    assert str(err.value).count("\n") == 1  # that field is the only error


def test_device_decode_with_views_is_refused_naming_both_fields(shards) -> None:
    with pytest.raises(ConfigError) as err:
        validate_tree(_tree(shards, decode="device", views={"count": 2}), "x.yaml")
    assert "decode: device" in str(err.value) and "data.views.count" in str(err.value)
    assert validate_tree(_tree(shards, decode="device"), "x.yaml").data.decode == "device"
