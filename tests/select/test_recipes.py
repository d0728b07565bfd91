"""Recipes on a hand-built pool; uids and DataComp-format subset files."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from cliplab.select import uids as U
from cliplab.select.recipes import PAPER_RECIPE, Step, apply_chain, combine, top_k


def test_top_k_by_score_ties_to_the_earlier_sample() -> None:
    s = np.array([0.1, 0.9, 0.5, 0.9, 0.3])
    assert top_k(s, np.arange(5), 2).tolist() == [1, 3]
    assert top_k(s, np.arange(5), 3).tolist() == [1, 2, 3]
    assert top_k(np.array([1.0, 1.0, 1.0]), np.arange(3), 1).tolist() == [0]
    assert top_k(s, np.array([0, 4]), 5).tolist() == [0, 4]


def test_paper_chain_counts_fractions_against_the_whole_pool() -> None:
    n = 20
    ncl = np.arange(n, dtype=float)  # samples 14..19 are the top 30% (6 of 20)
    ns = np.zeros(n)
    ns[[14, 16, 18, 19]] = [4, 3, 2, 1]
    ns[0] = 100  # best NormSim, but dropped by the first step
    first, second = apply_chain({"negclip": ncl, "normsim_inf": ns}, PAPER_RECIPE)
    assert first.tolist() == [14, 15, 16, 17, 18, 19]
    assert second.tolist() == [14, 16, 18, 19]  # floor(0.2 * 20) = 4 of the pool, not 20% of the 6


def test_threshold_step_keeps_at_or_above() -> None:
    s = np.array([0.2, 0.28, 0.3, 0.1])
    (kept,) = apply_chain({"clipscore": s}, [Step("clipscore", threshold=0.28)])
    assert kept.tolist() == [1, 2]


def test_bad_steps_are_refused() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Step("clipscore")
    with pytest.raises(ValueError, match="fraction"):
        Step("clipscore", fraction=1.5)
    with pytest.raises(KeyError, match="normsim_inf"):
        apply_chain({"negclip": np.ones(3)}, PAPER_RECIPE)


def test_uid_rule() -> None:
    dc = "0123456789ABCDEF0123456789abcdef"
    assert U.sample_uid({"uid": dc}, "s3://b/0.tar", "k") == dc.lower()
    assert U.sample_uid({"uid": "00ab12"}, "x", "k") == "0" * 26 + "00ab12"
    derived = hashlib.sha256(b"s3://b/00000.tar#000000007").hexdigest()[:32]
    assert U.sample_uid({}, "s3://b/00000.tar", "000000007") == derived
    assert U.sample_uid({"uid": "not-hex"}, "s3://b/00000.tar", "000000007") == derived


def datacomp_file(path, uids: list[str]) -> None:
    """A subset file exactly as DataComp's README builds it."""
    arr = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))
    arr.sort()
    np.save(path, arr)


def test_subset_files_round_trip_and_match_datacomp(tmp_path) -> None:
    uids = [f"{i:032x}" for i in (5, 1 << 70, 3, 3)]
    written = U.save_subset(str(tmp_path / "ours.npy"), uids)
    datacomp_file(tmp_path / "theirs.npy", uids)
    assert written == (tmp_path / "ours.npy").read_bytes() == (tmp_path / "theirs.npy").read_bytes()
    assert len(np.load(tmp_path / "ours.npy")) == 4
    back = U.load_subset(str(tmp_path / "theirs.npy"))
    assert U.to_hex(back) == sorted(uids)  # repeats kept: upweighting survives a round trip


def test_set_algebra_with_datacomp_files(tmp_path) -> None:
    a = [f"{i:032x}" for i in (1, 2, 3, 4)]
    b = [f"{i:032x}" for i in (3, 4, 5, 5)]
    datacomp_file(tmp_path / "b.npy", b)
    ours, theirs = U.to_pairs(a), U.load_subset(str(tmp_path / "b.npy"))
    assert U.to_hex(combine(ours, "union", theirs)) == [f"{i:032x}" for i in (1, 2, 3, 4, 5)]
    assert U.to_hex(combine(ours, "intersection", theirs)) == [f"{i:032x}" for i in (3, 4)]
    assert U.to_hex(combine(ours, "difference", theirs)) == [f"{i:032x}" for i in (1, 2)]
    with pytest.raises(ValueError, match="set operation"):
        combine(ours, "xor", theirs)


def test_non_datacomp_arrays_are_refused(tmp_path) -> None:
    np.save(tmp_path / "bad.npy", np.arange(4))
    with pytest.raises(ValueError, match="u8,u8"):
        U.load_subset(str(tmp_path / "bad.npy"))


def test_subset_files_on_s3(s3_bucket) -> None:
    url = f"s3://{s3_bucket}/sel/subset.npy"
    U.save_subset(url, ["f" * 32, "0" * 32])
    assert U.to_hex(U.load_subset(url)) == ["0" * 32, "f" * 32]
