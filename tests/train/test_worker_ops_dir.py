"""Where Ray workers JIT-build DeepSpeed's ops: one cache per Python installation, unless the user names one."""

from __future__ import annotations

import sys
from pathlib import Path

from cliplab.config import validate_tree
from cliplab.train.trainer import build_trainer, worker_ops_dir
from tiny_models import tiny_model


def _worker_env(tmp_path: Path) -> dict[str, str]:
    exp = validate_tree(
        {
            "name": "ops",
            "data": {"train_shards": str(tmp_path / "{00000..00001}.tar")},
            "model": {"config": tiny_model()},
            "train": {"steps": 1},
            "storage": {"path": str(tmp_path / "runs")},
        }
    )
    trainer = build_trainer(exp, "ops-run", {}, str(tmp_path / "runs"))
    return trainer.run_config.worker_runtime_env["env_vars"]


def test_two_venvs_get_two_caches_and_the_same_venv_keeps_its_own():
    here = worker_ops_dir(sys.prefix)
    assert worker_ops_dir(sys.prefix) == here
    assert worker_ops_dir("/opt/another-checkout/.venv") != here
    assert Path(here).parent == Path.home() / ".cache" / "torch_extensions"


def test_the_workers_build_in_this_venvs_cache_unless_torch_extensions_dir_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert _worker_env(tmp_path)["TORCH_EXTENSIONS_DIR"] == worker_ops_dir(sys.prefix)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ops"))
    assert _worker_env(tmp_path)["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "ops")
