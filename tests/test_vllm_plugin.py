"""The vLLM plugin: per-request sampling parameters reach every draft position of vLLM's CPU rejection sampler.

No engine here: the kernel on its own, then vLLM's own plugin loading and CPU kernel registration in
this process, which is what each vLLM worker does at start.
"""

from __future__ import annotations

import pytest
import torch

from actors.vllm_plugin import expand_per_request


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64], ids=lambda d: str(d).split(".")[1])
def test_expand_gives_each_token_its_requests_value_with_the_replacement(dtype):
    values = torch.tensor([0, 7, 3], dtype=dtype)
    cu_num_tokens = torch.tensor([2, 2, 5], dtype=torch.int32)  # the middle request has no draft tokens
    out = torch.full((7,), -9, dtype=dtype)  # two positions past the last request's tokens
    expand_per_request(out, values, cu_num_tokens, 0, 1)
    assert out.tolist() == [1, 1, 3, 3, 3, -9, -9]


def test_expand_keeps_fractional_values():
    out = torch.empty(4, dtype=torch.float32)
    expand_per_request(out, torch.tensor([0.7, 1.3]), torch.tensor([1, 4]), 0.0, 1.0)
    assert out.tolist() == pytest.approx([0.7, 1.3, 1.3, 1.3])


def test_vllm_registers_the_plugin_kernel_for_its_rejection_sampler_on_the_cpu():
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform
    from vllm.plugins import load_general_plugins

    if not current_platform.is_cpu():
        pytest.skip("the plugin only acts on vLLM's CPU platform")
    # What every vLLM worker runs at start (vllm.v1.worker.worker_base), in this order.
    load_general_plugins()
    current_platform.register_triton_kernel_overrides()
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    temperature = torch.tensor([1.0, 0.7, 0.0])  # 0 = greedy, read as 1
    cu_num_draft_tokens = torch.tensor([2, 5, 6], dtype=torch.int32)
    expanded = expand_batch_to_tokens(temperature, cu_num_draft_tokens, 6, replace_from=0, replace_to=1)
    assert expanded.tolist() == pytest.approx([1.0, 1.0, 0.7, 0.7, 0.7, 1.0])
    top_k = expand_batch_to_tokens(torch.tensor([5, 7, 9], dtype=torch.int32), cu_num_draft_tokens, 6)
    assert top_k.tolist() == [5, 5, 7, 7, 7, 9]
