"""Resources and threads computed from the topology config (no Ray needed)."""

import pytest

from cluster.config import ActorResources, TopologyConfig
from cluster.placement import actor_options, bundle, torch_threads, tp_bundles


@pytest.mark.parametrize("explicit,sharers,cpus,expected", [
    (None, 1, 2, 2),  # one target rank on an idle 2-core node uses both cores
    (None, 3, 2, 1),  # never fewer than one
    (None, 2, 16, 8),  # a TP group of 2 on 16 cores: 8 each
    (3, 1, 2, 3),  # an explicit value wins
])
def test_torch_threads(explicit, sharers, cpus, expected):
    assert torch_threads(explicit, sharers, cpus) == expected


def test_default_topology_derives_threads():
    topo = TopologyConfig()
    assert topo.target_rank.num_threads is None and topo.draft_worker.num_threads is None


def test_bundles_carry_gpus_custom_resources_and_accelerator_type():
    res = ActorResources(num_cpus=1, num_gpus=1, accelerator_type="A10G", resources={"target_node": 0.01})
    assert actor_options(res) == {"num_cpus": 1, "num_gpus": 1, "resources": {"target_node": 0.01},
                                  "accelerator_type": "A10G"}
    assert bundle(res) == {"CPU": 1, "GPU": 1, "target_node": 0.01, "accelerator_type:A10G": 0.001}
    assert len(tp_bundles(res, 4)) == 4
