"""Evaluation metrics on hand-built features with known answers, and the cross-worker gather."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cliplab.eval.embed import embed_batches
from cliplab.eval.retrieval import retrieval_metrics
from cliplab.eval.zeroshot import lookup, zeroshot_accuracy


def unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_identical_pairs_retrieve_perfectly() -> None:
    x = unit(20, 16)
    m = retrieval_metrics(x, x)
    assert m["i2t_R1"] == m["t2i_R1"] == 1.0 and m["i2t_mean_rank"] == 1.0


def test_a_permuted_text_set_has_known_recall() -> None:
    x = unit(10, 32)
    x[1] = F.normalize(x[0] + 0.1 * x[1], dim=-1)  # 0 and 1 are near-duplicates
    text = x.clone()
    text[[0, 1]] = text[[1, 0]]  # their captions swapped: both pairs drop to rank 2
    m = retrieval_metrics(x, text)
    assert m["i2t_R1"] == pytest.approx(0.8, rel=1e-5) and m["i2t_R5"] == 1.0
    assert m["t2i_mean_rank"] == pytest.approx(1.2, rel=1e-5)


def test_identical_captions_count_as_correct_matches_with_groups() -> None:
    x = unit(6, 16)
    x[1] = F.normalize(x[0] + 0.1 * x[1], dim=-1)  # images 0 and 1 look alike ...
    text = x.clone()
    text[1] = text[0]  # ... and have the same caption
    captions = ["a", "a", "b", "c", "d", "e"]
    plain = retrieval_metrics(x, text)
    grouped = retrieval_metrics(x, text, groups=captions)
    assert plain["i2t_R1"] == pytest.approx(4 / 6) and plain["t2i_R1"] == pytest.approx(5 / 6)  # ties, wrong pair
    assert grouped["i2t_R1"] == 1.0 and grouped["t2i_R1"] == 1.0
    wrong = retrieval_metrics(x, text, groups=["a", "z", "b", "c", "d", "e"])  # now only pairs match
    assert wrong["i2t_R1"] == plain["i2t_R1"]


def test_zeroshot_counts_unknown_labels_and_scores_known_ones() -> None:
    classes = unit(6, 8, seed=1)
    images = classes[[0, 1, 2, 3, 4, 5, 0]]
    labels = ["a", "b", "c", "d", "e", "f", "zzz"]
    m = zeroshot_accuracy(images, classes, labels, ["a", "b", "c", "d", "e", "f"])
    assert m["top1"] == 1.0 and m["top5"] == 1.0 and m["n_excluded"] == 1 and m["n"] == 6
    wrong = zeroshot_accuracy(images, classes, ["b", "a", "c", "d", "e", "f", None], list("abcdef"))
    assert wrong["top1"] == pytest.approx(4 / 6, rel=1e-5)


def test_zeroshot_takes_class_index_labels_and_warns_once_about_unusable_ones(caplog) -> None:
    classes = unit(6, 8, seed=1)
    images = classes[[0, 1, 2, 3, 4, 5, 0, 0, 0]]
    labels = [0, 1, 2, 3, 4, "f", 6, True, [0]]  # an index, a name, out of range, a bool, a list
    with caplog.at_level("WARNING", logger="cliplab.eval"):
        m = zeroshot_accuracy(images, classes, labels, list("abcdef"), task="ids")
        again = zeroshot_accuracy(images, classes, labels, list("abcdef"), task="ids")
    assert m == again and m["top1"] == 1.0 and m["n"] == 6 and m["n_excluded"] == 3
    warnings = [r.getMessage() for r in caplog.records if "zeroshot ids" in r.getMessage()]
    assert len(warnings) == 1 and "3 of 9 labels" in warnings[0] and "6" in warnings[0]


def test_multi_branch_scores_average_branches_and_can_pick_one() -> None:
    x = unit(12, 16)
    same = torch.stack([x, x, x], dim=1)
    assert retrieval_metrics(same, x) == retrieval_metrics(x, x)
    noisy = torch.stack([x, unit(12, 16, seed=5), unit(12, 16, seed=6)], dim=1)
    assert retrieval_metrics(noisy, x, branch=0)["i2t_R1"] == 1.0
    assert retrieval_metrics(noisy, x, branch=1)["i2t_R1"] < 0.5


def test_lookup_of_dotted_fields() -> None:
    meta = {"labels": {"colour": "red"}}
    assert lookup(meta, "labels.colour") == "red" and lookup(meta, "labels.shape") is None


class Identity(torch.nn.Module):
    def encode_image(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return x

    def encode_text(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return x


def _batches(rank: int) -> list[dict]:
    rows = {0: range(0, 5), 1: range(5, 7), 2: range(0)}[rank]  # unequal shares, one empty
    out = [
        {
            "image": torch.full((1, 3), float(i)),
            "text": torch.full((1, 3), -float(i)),
            "key": [f"k{i:02d}"],
            "json": [{"i": i}],
        }
        for i in rows
    ]
    return out


def _gather_worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    got = embed_batches(Identity(), _batches(rank), torch.device("cpu"))
    out[rank] = (got["image"][:, 0].tolist(), got["key"], [m["i"] for m in got["json"]])
    dist.destroy_process_group()


def test_every_worker_gets_the_same_global_arrays() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(3, port, out), nprocs=3, join=True)
    expected = ([float(i) for i in range(7)], [f"k{i:02d}" for i in range(7)], list(range(7)))
    assert out[0] == out[1] == out[2] == expected


def test_slot_retrieval_reports_each_slot_and_each_branch() -> None:
    from cliplab.eval.runner import slot_retrieval

    g = torch.Generator().manual_seed(0)
    texts = torch.nn.functional.normalize(torch.randn(20, 2, 16, generator=g), dim=-1)
    image = texts.clone()  # branch m is exactly slot m's caption
    out = slot_retrieval(image, texts, ["colour", "shape"], slot_texts=[[f"c{i}", f"s{i}"] for i in range(20)])
    assert out["branch0/colour/i2t_R1"] == 1.0 and out["branch1/shape/t2i_R1"] == 1.0
    assert out["branch0/shape/i2t_R1"] < 0.5 and out["branch1/colour/i2t_R1"] < 0.5
    assert out["retrieval/colour/i2t_R1"] > out["branch1/colour/i2t_R1"]  # fused over branches
    assert not any(k.startswith("branch") for k in slot_retrieval(image[:, 0], texts, ["colour", "shape"]))
