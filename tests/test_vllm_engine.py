"""Engine vllm on the real SmolLM2 in fp32: remote drafting through vLLM's proposer hook is lossless.

vLLM engines start slowly (~25 s each, much more on a busy machine), so this module starts four
and shares what it can: plain vLLM (the reference), remote n-gram drafting, local n-gram drafting
inside vLLM's worker, and a draft model on its own draft worker actor. Greedy outputs must be token-identical to the plain engine's; sampling must
reproduce the target's distribution; a draft worker killed under 8 streams costs no request.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from specserve.config import SamplingParams
from specserve.errors import SpecServeError

pytestmark = [pytest.mark.ray, pytest.mark.real_model]

GREEDY = SamplingParams(max_tokens=40)
SHORT = [
    "Rewrite this code with clearer names and return it in full:\n\ndef calc(l):\n    t = 0\n    for x in l:\n"
    "        if x % 2 == 0:\n            t = t + x\n    return t",
    "List the days of the week, one per line.",
    "What is the capital of France? Answer in one sentence.",
]
#: ~1000-token prompts: the model is asked to quote and edit long inputs (project source files).
LONG_SOURCES = ["specserve/sampling.py", "specserve/strategy.py", "specserve/sequence.py"]


def long_prompt(path: str) -> str:
    text = (Path(__file__).parent.parent / path).read_text()[:3600]
    return f"Add type hints to this code and return it in full:\n\n{text}"


def replica(drafter: dict, **vllm) -> dict:
    return {"model": {"engine": "vllm", "dtype": "fp32",
                      "vllm": {"kv_cache_gb": 1, "max_num_seqs": 16, "enforce_eager": True, **vllm}},
            "drafter": drafter, "max_model_len": 2048,
            "topology": {"draft_worker": {"num_cpus": 0.1}}}


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    # A core shut down outside the loop (the tests' ``finally``) has vLLM close its engine client's sockets on
    # this loop's next turn; give them that turn. Left open, their zmq context blocks forever in term() when
    # the garbage collector destroys it later (a hang seen in a later module).
    loop.run_until_complete(asyncio.sleep(0.1))
    loop.close()


@pytest.fixture(scope="module")
def ray_local():
    from cluster.local import init_local_ray

    ray = init_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def start_core(loop, config: dict):
    from actors.config import ReplicaConfig
    from actors.vllm_core import VllmCore

    core = VllmCore(ReplicaConfig.model_validate(config))
    loop.run_until_complete(core.start())
    return core


async def stream(core, prompt_ids: list[int], params: SamplingParams):
    """(tokens, last chunk, number of chunks) of one request."""
    tokens, last, n = [], None, 0
    async for chunk in core.generate(prompt_ids, params, "test"):
        tokens += chunk.token_ids
        last, n = chunk, n + 1
    return tokens, last, n


async def collect(core, prompt_ids: list[int], params: SamplingParams):
    tokens, last, _ = await stream(core, prompt_ids, params)
    return tokens, last


def run_all(loop, core, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] = GREEDY,
            chunks: list[int] | None = None):
    """All prompts at once (continuous batching), results in prompt order; ``params`` per prompt or for all;
    ``chunks`` gets each request's number of chunks, in prompt order."""
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)

    async def body():
        return await asyncio.gather(*[stream(core, p, sp) for p, sp in zip(prompts, per_prompt)])

    results = loop.run_until_complete(body())
    if chunks is not None:
        chunks.extend(n for _, _, n in results)
    return [(tokens, last) for tokens, last, _ in results]


def run_once(loop, config: dict, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] = GREEDY,
             chunks: list[int] | None = None):
    """Start a core, decode all prompts at once, stop it: (results, proposer counters, draft workers started)."""
    core = start_core(loop, config)
    try:
        workers = len(core.workers)
        results = run_all(loop, core, prompts, params, chunks)
        return results, loop.run_until_complete(core.refresh_proposer_stats()), workers
    finally:
        core.shutdown()


@pytest.fixture(scope="module")
def prompts(ray_local, loop):
    from specserve.config import ModelConfig
    from specserve.models import ModelInfo

    info = ModelInfo.load(ModelConfig())
    ids = [info.encode(p, chat=True) for p in SHORT] + [info.encode(long_prompt(p), chat=True) for p in LONG_SOURCES]
    assert all(800 <= len(i) <= 1400 for i in ids[3:]), [len(i) for i in ids]
    return ids


@pytest.fixture(scope="module")
def reference(ray_local, loop, prompts):
    """Plain vLLM greedy outputs (no speculative decoding): what every drafted run must reproduce."""
    core = start_core(loop, replica({"kind": "none", "num_speculative_tokens": 0}))
    try:
        return [tokens for tokens, _ in run_all(loop, core, prompts)]
    finally:
        core.shutdown()


#: Below this top-2 logit margin of the fp32 target at the first difference, two exact decoders may disagree.
NEAR_TIE = 1e-3


def assert_plain_outputs(outputs: list[list[int]], reference: list[list[int]], prompts: list[list[int]],
                         real_target) -> None:
    """Each output equals plain vLLM's, or first differs where the fp32 target has a near-tie.

    A pass over several tokens rounds differently from a pass over one, so at a near-tie (the two likeliest
    tokens' logits within ``NEAR_TIE``, measured with transformers) greedy speculative and plain decoding may
    pick different tokens: numerics, not the algorithm. Any other difference fails.
    """
    import torch

    assert len(outputs) == len(reference)
    for out, ref, ids in zip(outputs, reference, prompts):
        if out == ref:
            continue
        i = next((j for j, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))
        assert i < min(len(out), len(ref)), f"lengths differ without a differing token: {len(out)} vs {len(ref)}"
        with torch.inference_mode():
            logits = real_target.model(torch.tensor([ids + ref[:i]])).logits[0, -1].float()
        top = torch.topk(logits, 2)
        margin = float(top.values[0] - top.values[1])
        assert {out[i], ref[i]} == set(top.indices.tolist()) and margin < NEAR_TIE, \
            f"output differs from plain at token {i} ({out[i]} vs {ref[i]}), top-2 margin {margin:.2e}"


@pytest.fixture(scope="module")
def ngram_core(ray_local, loop, reference):
    core = start_core(loop, replica({"kind": "ngram", "num_speculative_tokens": 4}, draft_deadline_ms=2000))
    yield core
    core.shutdown()


def test_remote_ngram_is_token_identical_to_plain_vllm(loop, ngram_core, prompts, reference, real_target):
    results = run_all(loop, ngram_core, prompts)
    assert_plain_outputs([tokens for tokens, _ in results], reference, prompts, real_target)
    stats = [last.stats for _, last in results]
    assert sum(s["num_drafts"] for s in stats) > 0, "nothing was drafted: the test would not exercise verification"
    assert sum(s["num_accepted_tokens"] for s in stats) > 0
    assert all(last.usage.completion_tokens == len(tokens) for tokens, last in results)
    assert loop.run_until_complete(ngram_core.refresh_proposer_stats()).get("failed", 0) == 0


def test_the_engine_core_runs_on_the_cores_its_worker_is_bound_to(ngram_core):
    # vLLM binds its CPU worker to a core and leaves the engine core free to run on the path's core
    # (model.vllm.engine_core_on_worker_cores, on by default, moves it).
    from cluster.processes import ENGINE_CORE_TITLE, WORKER_TITLE, all_processes, process_tree, thread_ids

    procs = all_processes()
    engine_cores = [p for p in process_tree(os.getpid(), procs).values() if ENGINE_CORE_TITLE.search(p.title)]
    assert engine_cores, "no vLLM engine core under this process"
    for core in engine_cores:
        workers = [p for p in process_tree(core.pid, procs).values() if WORKER_TITLE.search(p.title)]
        bound = set().union(*(os.sched_getaffinity(w.pid) for w in workers))
        if not bound < os.sched_getaffinity(0):
            pytest.skip(f"vLLM left its worker unbound ({sorted(bound)}): nothing to move the engine core to")
        assert {tid: os.sched_getaffinity(tid) for tid in thread_ids(core.pid)} == dict.fromkeys(
            thread_ids(core.pid), bound)


def test_the_local_ngram_drafter_inside_vllm_is_token_identical_to_plain_vllm(loop, ray_local, prompts, reference,
                                                                            real_target):
    # Our n-gram in vLLM's worker, adaptive k from the verification cost it measures. The 3 short prompts
    # run a second time in the same batch with "speculative": false: plain decoding, same tokens. Chunks carry
    # 4 tokens or more (stream_interval), except a request's first and last: same tokens, fewer chunks.
    plain = GREEDY.model_copy(update={"speculative": False})
    chunks: list[int] = []
    results, stats, workers = run_once(loop, replica({"kind": "ngram", "vllm_placement": "vllm_worker",
                                                      "num_speculative_tokens": 4}, stream_interval=4),
                                       prompts + prompts[:3], [GREEDY] * len(prompts) + [plain] * 3, chunks)
    assert workers == 0, "local drafting starts no draft worker"
    assert_plain_outputs([tokens for tokens, _ in results], reference + reference[:3], prompts + prompts[:3], real_target)
    for (tokens, _), n in zip(results, chunks):
        assert 1 <= n <= 2 + (len(tokens) - 1) // 4, f"{n} chunks for {len(tokens)} tokens at stream_interval 4"
    assert sum(last.stats["num_accepted_tokens"] for _, last in results[: len(prompts)]) > 0
    assert sum(last.stats["num_draft_tokens"] for _, last in results[:3]) > 0, "the speculative twins drafted"
    assert [last.stats["num_draft_tokens"] for _, last in results[len(prompts):]] == [0, 0, 0]
    assert stats.get("calls", 0) > 0


def test_the_local_suffix_drafter_inside_vllm_is_exact_and_learns_across_requests_per_tenant(loop, ray_local, prompts,
                                                                                              reference, real_target):
    # Our suffix drafter in vLLM's worker, keyed by vLLM's request ids: a request's output joins the
    # replica's cross-request cache as soon as vLLM drops it. The same prompts a second time draft their
    # answers from the cache; a tenant's requests (an API key's) read only that tenant's cache.
    # Shared with other replicas (suffix_shared_cache): the engine trades with the app's hub actor; another
    # replica (here a router-side drafter in this process, on the same hub) gets its outputs and gives it its own.
    from actors.suffix_hub import DrafterCache, SuffixSync, hub_name
    from specserve.bench import learn_output
    from specserve.config import DrafterConfig, ModelConfig
    from specserve.drafters import make_drafter

    core = start_core(loop, replica({"kind": "suffix", "vllm_placement": "vllm_worker", "num_speculative_tokens": 8,
                                     "suffix_shared_cache": True}))
    other_drafter = make_drafter(DrafterConfig(kind="suffix"), None)
    other = SuffixSync(DrafterCache(other_drafter), hub_name(ModelConfig().model), 1000)
    key_d = GREEDY.model_copy(update={"cache_tenant": "key-d"})
    try:
        cold = run_all(loop, core, prompts)
        warm = run_all(loop, core, prompts)
        tenant = run_all(loop, core, prompts[:3], GREEDY.model_copy(update={"cache_tenant": "key-b"}))
        # The other replica answered prompts[:3] for tenant key-d, whose cache on this engine is empty.
        for i in range(3):
            learn_output(other_drafter, f"other-{i}", prompts[i], reference[i], key_d)
        got = loop.run_until_complete(other.exchange())
        loop.run_until_complete(core.suffix_syncs[0].exchange())  # the engine's background task trades too
        got += loop.run_until_complete(other.exchange())
        shared = run_all(loop, core, prompts[:3], key_d)
        stats = loop.run_until_complete(core.refresh_proposer_stats())
        received = core.status()["suffix_shared_received"]
    finally:
        core.shutdown()
    assert_plain_outputs([tokens for tokens, _ in cold], reference, prompts, real_target)
    assert_plain_outputs([tokens for tokens, _ in warm], reference, prompts, real_target)
    assert_plain_outputs([tokens for tokens, _ in tenant], reference[:3], prompts[:3], real_target)
    assert_plain_outputs([tokens for tokens, _ in shared], reference[:3], prompts[:3], real_target)
    # Every output the engine finished reached the other replica, the tenant's with its tenant; the engine took
    # in the other replica's three.
    assert got == 2 * len(prompts) + 3 and other_drafter.stats()["tenant_caches"] == 2, (got, other_drafter.stats())
    assert received == 3

    def accepted(results) -> int:
        return sum(last.stats["num_accepted_tokens"] for _, last in results)

    # Warm, every answer is in the cache: most of each output is accepted from it.
    assert accepted(warm) > max(2 * accepted(cold), sum(map(len, reference)) // 2), (accepted(cold), accepted(warm))
    assert accepted(tenant) < accepted(warm[:3]) // 2, "a tenant saw the shared cache"
    # key-d never ran here: its answers come from the other replica, and are drafted from the first step.
    assert accepted(shared) > max(2 * accepted(tenant), sum(map(len, reference[:3])) // 2), (accepted(tenant),
                                                                                            accepted(shared))
    assert stats["tenant_caches"] == 2 and stats["cache_requests"] >= 2 * len(prompts)  # key-b, key-d
    assert stats.get("calls", 0) > 0


def test_a_draft_model_on_its_own_actor_is_token_identical_to_plain_vllm(loop, ray_local, prompts, reference,
                                                                       tiny_draft_dir, real_target):
    # A tiny random draft model with the real tokenizer: mostly rejected, so every step exercises
    # rollback of the draft worker's history-keyed KV cache. A fixed k keeps it drafting.
    results, stats, _ = run_once(loop, replica({"kind": "draft_model", "path": str(tiny_draft_dir),
                                                "adaptive_k": False, "num_speculative_tokens": 3},
                                               draft_deadline_ms=5000, pipelining=True), prompts)
    assert_plain_outputs([tokens for tokens, _ in results], reference, prompts, real_target)
    assert sum(last.stats["num_draft_tokens"] for _, last in results) > 0
    assert stats.get("calls", 0) > 0 and stats.get("failed", 0) == 0


#: A repetitive prompt: the n-gram drafter proposes on the second token.
REPEATING = "one two three one two three one two three one two"


def sample_through(loop, core, prompt_ids: list[int], params: SamplingParams, n: int,
                   wave: int = 100) -> dict[tuple, int]:
    """``n`` seeded 2-token samples through ``core``, ``wave`` at a time (below the server's request limit):
    counts per outcome (the drafter must propose)."""
    async def body():
        results = []
        for start in range(0, n, wave):
            results += await asyncio.gather(*[collect(core, prompt_ids, params.model_copy(update={"seed": s}))
                                              for s in range(start, min(n, start + wave))])
        return results

    results = loop.run_until_complete(body())
    assert sum(last.stats["num_draft_tokens"] for _, last in results) > 0, "the drafter never proposed"
    counts: dict[tuple, int] = {}
    for tokens, _ in results:
        counts[tuple(tokens)] = counts.get(tuple(tokens), 0) + 1
    return counts


# Both sampling tests failed before actors/vllm_plugin.py fixed vLLM 0.32's CPU expand kernel (chi-square
# p ~ 1e-12 and 5e-50 with vLLM's own n-gram drafter too; docs/benchmarks.md, section 3).
def test_temperature_sampling_through_vllm_with_the_remote_proposer_keeps_the_target_distribution(
        loop, ngram_core, real_target):
    from distribution import chi_square_p_value, pooled, shifted, top_two_token_distribution

    # Temperature only (no top-k / top-p): the likeliest 6 x 6 continuations exactly, the rest pooled.
    params = SamplingParams(max_tokens=2, temperature=1.0, ignore_eos=True)
    prompt_ids = real_target.tokenizer.encode(REPEATING)
    expected = top_two_token_distribution(real_target, prompt_ids, params)
    n = 600  # with 45% of the mass pooled, 300 samples reject the 10% shift below only about half the time
    counts = pooled(sample_through(loop, ngram_core, prompt_ids, params, n), expected)
    assert chi_square_p_value(counts, expected, n) > 1e-3, counts
    # The same counts reject a 10% shift of mass between the two likeliest outcomes: the test has power.
    assert chi_square_p_value(counts, shifted(expected, 0.10), n) < 1e-3


def test_sampling_through_vllm_with_the_remote_proposer_keeps_the_target_distribution(loop, ngram_core,
                                                                                       real_target):
    from distribution import chi_square_p_value, shifted, two_token_distribution

    params = SamplingParams(max_tokens=2, temperature=1.0, top_p=0.7, ignore_eos=True)
    prompt_ids = real_target.tokenizer.encode(REPEATING)
    expected = two_token_distribution(real_target, prompt_ids, params)
    n = 300
    counts = sample_through(loop, ngram_core, prompt_ids, params, n)
    assert chi_square_p_value(counts, expected, n) > 1e-3, counts
    assert chi_square_p_value(counts, shifted(expected, 0.10), n) < 1e-3


def test_a_draft_worker_killed_under_8_streams_costs_no_request(loop, ngram_core, prompts, reference, real_target):
    eight = (prompts * 3)[:8]
    worker = ngram_core.workers[0]

    async def body():
        pid = (await worker.info.remote())["pid"]
        tasks = [asyncio.ensure_future(collect(ngram_core, p, GREEDY)) for p in eight]
        await asyncio.sleep(1.0)
        os.kill(pid, 9)
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=600)

    results = loop.run_until_complete(body())
    assert_plain_outputs([tokens for tokens, _ in results], (reference * 3)[:8], (prompts * 3)[:8], real_target)
    assert all(last.finish_reason in ("stop", "length") for _, last in results)


def test_top_k_with_speculation_on_the_cpu_is_refused_naming_it(loop, ngram_core):
    # vLLM 0.32's CPU top-k kills the engine on a step without drafts (see VllmCore.vllm_params).
    with pytest.raises(SpecServeError) as e:
        run_all(loop, ngram_core, [[1, 2, 3]], SamplingParams(max_tokens=4, temperature=1.0, top_k=5))
    assert e.value.param == "top_k"


def test_a_prompt_beyond_the_context_is_refused_naming_the_field(loop, ngram_core):
    with pytest.raises(SpecServeError) as e:
        run_all(loop, ngram_core, [[1] * 4000])
    assert e.value.param in ("prompt", "messages")


def test_a_core_shut_down_while_its_engine_loads_stops_that_engine_and_says_so(loop, ray_local):
    # A replica stopped while its engine loads (Serve calls its __del__, which shuts the core down): the engine
    # whose build finishes afterwards must not start serving nobody, its processes alive until the replica's
    # process ends.
    from actors.config import ReplicaConfig
    from actors.vllm_core import VllmCore
    from cluster.processes import ENGINE_TITLE, find_by_title, process_tree, wait_gone
    from specserve.errors import TargetFailed

    def engine_processes():
        return {p.pid: p for p in find_by_title(ENGINE_TITLE, process_tree(os.getpid()))}

    before = set(engine_processes())
    core = VllmCore(ReplicaConfig.model_validate(replica({"kind": "none", "num_speculative_tokens": 0})))
    started: dict = {}

    async def main():
        start = asyncio.ensure_future(core.start())
        for _ in range(1200):  # until the engine's first process exists: its build is under way
            started.update({pid: p for pid, p in engine_processes().items() if pid not in before})
            if started or start.done():
                break
            await asyncio.sleep(0.1)
        core.shutdown()
        with pytest.raises(TargetFailed, match="shut down while it started"):
            await start

    loop.run_until_complete(main())
    assert started, "the engine's processes never appeared: the shutdown did not fall inside the engine's build"
    assert core.engines == []
    assert wait_gone(list(started.values()), 60) == []


def test_tensor_parallel_that_does_not_divide_the_heads_is_refused(default_dir):
    from actors.vllm_core import check_tensor_parallel
    from specserve.config import ModelConfig
    from specserve.models import ModelInfo

    with pytest.raises(SpecServeError) as e:
        check_tensor_parallel(ModelInfo.load(ModelConfig()), 2)  # SmolLM2 has 9 heads
    assert e.value.param == "topology.tensor_parallel_size"
