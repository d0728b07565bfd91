"""The local Ray cliplab starts listens on loopback only, with token authentication left on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, psutil, ray
from ray._private.authentication.authentication_utils import is_token_auth_enabled
from cliplab.runtime import ensure_ray

ensure_ray(num_cpus=1)
assert ray.get(ray.remote(lambda: 1).remote()) == 1
ray_pids = {p.pid for p in psutil.Process().children(recursive=True)} | {psutil.Process().pid}
listening = sorted(
    {c.laddr.ip for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.pid in ray_pids}
)
node = ray.nodes()[0]["NodeManagerAddress"]
dashboard = ray._private.worker._global_node.address_info.get("webui_url")
print(json.dumps({"node": node, "listening": listening, "token": is_token_auth_enabled(), "dashboard": dashboard}))
ray.shutdown()
"""


@pytest.mark.parametrize("dashboard", ["0", "1"])
def test_local_ray_listens_on_loopback_only_with_token_auth(dashboard: str) -> None:
    """With and without its dashboard (off by default: it costs seconds of start-up)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"CLIPLAB_RAY_DASHBOARD": dashboard}
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["node"] == "127.0.0.1"
    assert got["listening"] and set(got["listening"]) <= {"127.0.0.1", "::ffff:127.0.0.1"}, got["listening"]
    assert got["token"], "token authentication stays on"
    assert bool(got["dashboard"]) == (dashboard == "1"), got["dashboard"]
