"""One SynthScenes set for every data test (written once per session)."""

from __future__ import annotations

import pytest
from loader_setup import PER_SHARD, SAMPLES

from cliplab.data.synth import SynthSpec, write_synthscenes


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    """8 shards of 30 SynthScenes samples at 48 px (larger than the loaders' 32 px, so crops downscale)."""
    root = tmp_path_factory.mktemp("synth")
    write_synthscenes(str(root), SynthSpec(num_samples=SAMPLES, samples_per_shard=PER_SHARD, image_size=48))
    return f"{root}/{{00000..{SAMPLES // PER_SHARD - 1:05d}}}.tar"
