"""Actors on a simulated multi-node cluster: placement, tensor parallel verification, pipelining,
batching, and recovery when a draft worker or a target rank dies."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from tiny_models import make_tiny_model

from cluster.local import LocalCluster
from specserve.config import DrafterConfig, ModelConfig, SamplingParams, check_engine_fits
from specserve.engine import SpecEngine
from specserve.errors import SpecServeError
from specserve.models import load_model

pytestmark = pytest.mark.ray

#: Every run here decodes 24 tokens past EOS: long enough for several blocks, short enough for CI.
PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4,",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
    "Hello there, how are you",
]


@pytest.fixture(scope="module")
def cluster():
    """A head node plus a 'draft' node and a 'target' node, all on 127.0.0.1."""
    c = LocalCluster([
        {"num_cpus": 1},
        {"num_cpus": 1, "resources": {"draft_node": 1}},
        {"num_cpus": 2, "resources": {"target_node": 1}},
    ])
    c.connect()
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def even_tiny_dir(tmp_path_factory, tokenizer):
    """Tiny model with 4 attention / 2 KV heads: splits over 2 ranks."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-tp"), tokenizer, seed=3, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def reference(even_tiny_dir):
    """Plain greedy outputs of the in-process engine: what every distributed run must reproduce."""
    target = load_model(ModelConfig(model=str(even_tiny_dir), dtype="fp32"))
    engine = SpecEngine(target, *_none_drafter(target))
    return {p: engine.generate(p, PARAMS).token_ids for p in PROMPTS}


def _none_drafter(target):
    from specserve.drafters import make_drafter

    cfg = DrafterConfig(kind="none", num_speculative_tokens=0)
    return make_drafter(cfg, target), cfg


def app_config(model_dir, **overrides):
    from deployments.config import AppConfig

    data = {
        "model": {"model": str(model_dir), "dtype": "fp32"},
        "drafter": {"kind": "ngram", "num_speculative_tokens": 4, "adaptive_k": False},
        "topology": {
            "draft_placement": "workers",  # these tests are about draft workers; 'auto' would draft n-gram in the router
            "tensor_parallel_size": 2,
            "draft_worker": {"num_cpus": 0.2, "resources": {"draft_node": 0.01}},
            "target_rank": {"num_cpus": 0.4, "resources": {"target_node": 0.01}},
        },
    }
    for key, value in overrides.items():
        data.setdefault(key, {}).update(value)
    return AppConfig.model_validate(data).replica()


async def _run(core, prompt_ids, params):
    tokens, _ = await _run_with_stats(core, prompt_ids, params)
    return tokens


async def _run_with_stats(core, prompt_ids, params):
    tokens, stats = [], None
    async for chunk in core.generate(prompt_ids, params):
        tokens += chunk.token_ids
        stats = chunk.stats or stats
    return tokens, stats


def run_router(cfg, body):
    """Start a RouterCore in this process's event loop, run ``body(core)``, shut everything down."""
    from actors.router import RouterCore

    async def main():
        core = RouterCore(cfg)
        await core.start()
        try:
            return await body(core)
        finally:
            core.shutdown()

    return asyncio.run(main())


def test_actors_land_on_the_nodes_their_resources_name(cluster, even_tiny_dir):
    async def body(core):
        return await core.placement()

    placed = run_router(app_config(even_tiny_dir), body)
    draft_node, target_node = cluster.node_ids()[1], cluster.node_ids()[2]
    assert [w["node_id"] for w in placed["draft_workers"]] == [draft_node]
    ranks = placed["target_groups"][0]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert {r["node_id"] for r in ranks} == {target_node}  # STRICT_PACK keeps the TP group together


@pytest.mark.parametrize("drafter,placement,pipelining,batching,tree", [
    ("ngram", "workers", False, True, 0), ("ngram", "auto", False, True, 0), ("self", "workers", True, True, 0),
    ("self", "workers", False, False, 0), ("ngram", "auto", False, True, 8), ("self", "workers", True, True, 6),
    ("suffix", "auto", False, True, 8)],
    ids=["ngram-worker-batched", "ngram-in-router-batched", "self-draft-pipelined-batched",
         "self-draft-sequential-unbatched", "ngram-tree-in-router", "self-draft-tree-pipelined",
         "suffix-tree-in-router"])
def test_tensor_parallel_speculative_greedy_equals_plain_greedy(cluster, even_tiny_dir, reference, tokenizer,
                                                                drafter, placement, pipelining, batching, tree):
    # Self-drafting accepts every token in fp32, so pipelined blocks are used on almost every step.
    drafter_cfg = {"kind": "draft_model", "path": str(even_tiny_dir)} if drafter == "self" else {"kind": drafter}
    # Trees: chains and trees of the batch's sequences share one tensor-parallel pass (Verifier.verify).
    drafter_cfg["tree"] = {"max_nodes": tree, "branching": 2, "adaptive": False}
    cfg = app_config(even_tiny_dir, drafter=drafter_cfg, router={"pipelining": pipelining, "batching": batching},
                     topology={"draft_placement": placement})
    in_router = placement == "auto"  # 'auto' drafts n-gram in the router: no draft worker is started

    async def body(core):
        # All prompts at once: their blocks share batched verification passes.
        runs = await asyncio.gather(*[_run_with_stats(core, tokenizer.encode(p), PARAMS) for p in PROMPTS])
        held = await core.held_sequences()
        return ([tokens for tokens, _ in runs], held, sum(stats["num_pipelined_drafts"] for _, stats in runs),
                sum(stats["num_draft_tokens"] for _, stats in runs), len(core.workers))

    outs, held, pipelined, drafted, num_workers = run_router(cfg, body)
    for prompt, out in zip(PROMPTS, outs):
        assert out == reference[prompt], prompt
    assert held == {"router": 0, "router_drafter": 0, "draft_workers": [] if in_router else [0], "target_groups": [0]}
    assert (pipelined > 0) == pipelining
    assert drafted > 0
    assert num_workers == (0 if in_router else 1)


def test_draft_model_worker_on_its_own_node_keeps_greedy_exact(cluster, even_tiny_dir, reference, tokenizer,
                                                               tiny_draft_dir):
    cfg = app_config(even_tiny_dir, drafter={"kind": "draft_model", "path": str(tiny_draft_dir)})

    async def body(core):
        return await asyncio.gather(*[_run(core, tokenizer.encode(p), PARAMS) for p in PROMPTS[:2]])

    outs = run_router(cfg, body)
    assert outs == [reference[p] for p in PROMPTS[:2]]


def test_a_dead_draft_worker_falls_back_to_plain_decoding_and_drafting_resumes(cluster, even_tiny_dir, reference,
                                                                               tokenizer):
    import ray

    cfg = app_config(even_tiny_dir)

    async def body(core):
        worker = core.workers[0]
        pid = (await worker.info.remote())["pid"]
        killed = False
        tokens = []
        async for chunk in core.generate(tokenizer.encode(PROMPTS[1]), PARAMS):
            tokens += chunk.token_ids
            if not killed:
                # SIGKILL the worker process mid-request: Ray restarts it (max_restarts=-1).
                os.kill(pid, 9)
                killed = True
        for _ in range(100):
            try:
                new_pid = (await worker.info.remote())["pid"]
                break
            except ray.exceptions.RayError:
                await asyncio.sleep(0.2)
        later = await _run(core, tokenizer.encode(PROMPTS[0]), PARAMS)
        return tokens, later, new_pid, pid

    tokens, later, new_pid, old_pid = run_router(cfg, body)
    assert tokens == reference[PROMPTS[1]]
    assert later == reference[PROMPTS[0]]
    assert new_pid != old_pid


def test_a_dead_target_rank_fails_its_requests_clearly_and_the_group_is_rebuilt(cluster, even_tiny_dir, reference,
                                                                                tokenizer):
    from specserve.errors import TargetFailed

    cfg = app_config(even_tiny_dir)

    async def body(core):
        group = core.groups[0]
        rank1_pid = group.infos[1]["pid"]
        error = None
        try:
            async for _ in core.generate(tokenizer.encode(PROMPTS[0]), PARAMS):
                os.kill(rank1_pid, 9)
        except TargetFailed as e:
            error = e
        for _ in range(300):
            if group.index not in core.rebuilding and group.generation == 2:
                break
            await asyncio.sleep(0.1)
        later = await _run(core, tokenizer.encode(PROMPTS[2]), PARAMS)
        held = await core.held_sequences()
        return error, later, group.generation, held

    error, later, generation, held = run_router(cfg, body)
    assert error is not None and "target" in str(error).lower()
    assert generation == 2
    assert later == reference[PROMPTS[2]]
    assert held["router"] == 0 and held["target_groups"] == [0]


def test_a_router_shut_down_as_a_rebuild_is_called_for_leaves_no_bundle_or_rank_behind(cluster, even_tiny_dir):
    # A request saw the rank die and failed, and the replica stopped at once: the rebuild task then first ran after
    # the shutdown. Had it built its group anyway, that group would hold the target node's CPUs for good, and the
    # next group there would wait forever for its bundles.
    import ray
    from ray.util import placement_group_table

    from actors.router import RouterCore

    def reserved():
        return sorted(p["state"] for p in placement_group_table().values() if p["state"] != "REMOVED")

    async def main():
        core = RouterCore(app_config(even_tiny_dir))
        await core.start()
        try:
            await core.group_failed(core.groups[0])  # schedules the rebuild; nothing here yields before the shutdown
        finally:
            core.shutdown()
        await asyncio.sleep(1.0)  # what a rebuild left running would do now, it does here
        return core.groups[0]

    group = asyncio.run(main())
    for _ in range(100):
        if not reserved() and ray.available_resources().get("target_node", 0) == pytest.approx(1.0):
            break
        time.sleep(0.1)
    assert reserved() == []
    assert ray.available_resources().get("target_node", 0) == pytest.approx(1.0)
    assert group.ranks == [] and group.pg is None


def test_a_replica_without_a_drafter_decodes_plainly_and_holds_nothing_afterwards(cluster, even_tiny_dir, reference,
                                                                                  tokenizer):
    cfg = app_config(even_tiny_dir, drafter={"kind": "none", "num_speculative_tokens": 0})

    async def body(core):
        outs = await asyncio.gather(*[_run(core, tokenizer.encode(p), PARAMS) for p in PROMPTS[:2]])
        return outs, await core.held_sequences(), len(core.workers)

    outs, held, workers = run_router(cfg, body)
    assert outs == [reference[p] for p in PROMPTS[:2]]
    assert workers == 0
    assert held == {"router": 0, "router_drafter": 0, "draft_workers": [], "target_groups": [0]}


def test_two_replicas_sharing_the_suffix_cache_draft_each_others_answers(cluster, even_tiny_dir, reference,
                                                                          tokenizer):
    from actors.router import RouterCore

    cfg = app_config(even_tiny_dir, drafter={"kind": "suffix", "num_speculative_tokens": 8,
                                             "suffix_shared_cache": True},
                     topology={"draft_placement": "auto"})
    prompt = tokenizer.encode(PROMPTS[0])

    async def main():
        here, there = RouterCore(cfg), RouterCore(cfg)
        await asyncio.gather(here.start(), there.start())
        try:
            cold_tokens, cold = await _run_with_stats(here, prompt, PARAMS)
            # One trade each (the background task trades every second; called here to be deterministic).
            await here.suffix_sync.exchange()
            received = await there.suffix_sync.exchange()
            warm_tokens, warm = await _run_with_stats(there, prompt, PARAMS)
            return cold_tokens, cold, received, warm_tokens, warm, there.status()
        finally:
            here.shutdown()
            there.shutdown()

    cold_tokens, cold, received, warm_tokens, warm, status = asyncio.run(main())
    assert cold_tokens == warm_tokens == reference[PROMPTS[0]]
    assert received == 1 and status["suffix_shared_received"] == 1
    # The second replica never saw the prompt; it drafts the answer the first one gave, from its first step (the
    # same decoding without the shared answer is exactly the first replica's, a deterministic greedy fp32 run).
    assert warm["num_accepted_tokens"] > cold["num_accepted_tokens"] + 4, (cold, warm)
    assert warm["num_steps"] < cold["num_steps"], (cold, warm)


def test_a_shared_suffix_cache_is_refused_where_it_cannot_run():
    from deployments.config import AppConfig

    base = {"model": {"model": "default"}, "drafter": {"kind": "ngram", "suffix_shared_cache": True}}
    with pytest.raises(ValueError, match="suffix_shared_cache .* needs drafter.kind 'suffix' drafting in the router"):
        AppConfig.model_validate(base)
    with pytest.raises(ValueError, match="suffix_shared_cache .* needs drafter.kind 'suffix' drafting in the router"):
        AppConfig.model_validate({**base, "drafter": {"kind": "suffix", "suffix_shared_cache": True},
                                  "topology": {"draft_placement": "workers"}})
    with pytest.raises(SpecServeError, match="suffix_shared_cache on engine 'vllm' .* needs drafter.kind 'suffix' with "
                       "vllm_placement 'vllm_worker'"):
        check_engine_fits(ModelConfig(engine="vllm"), DrafterConfig(kind="suffix", suffix_shared_cache=True))
    with pytest.raises(SpecServeError, match="suffix_shared_cache on engine 'vllm'"):
        check_engine_fits(ModelConfig(engine="vllm"), DrafterConfig(
            kind="suffix", suffix_shared_cache=True, vllm_placement="vllm_builtin", vllm_builtin_method="suffix"))
    # Our suffix drafter in vLLM's worker shares its cache (tests/test_vllm_engine.py), whatever draft_placement says.
    AppConfig.model_validate({"model": {"engine": "vllm"}, "topology": {"draft_placement": "workers"},
                              "drafter": {"kind": "suffix", "vllm_placement": "vllm_worker", "suffix_shared_cache": True}})


def test_requests_without_ids_spread_over_two_draft_workers(cluster, even_tiny_dir, reference, tokenizer):
    cfg = app_config(even_tiny_dir, topology={"num_draft_workers": 2})

    async def body(core):
        outs = [await _run(core, tokenizer.encode(p), PARAMS) for p in PROMPTS[:4]]
        infos = await asyncio.gather(*[w.info.remote() for w in core.workers])
        return outs, [info["sequences_started"] for info in infos]

    outs, started = run_router(cfg, body)
    assert outs == [reference[p] for p in PROMPTS[:4]]
    assert started == [2, 2]  # round robin: every request takes the next worker


def test_cancelled_requests_leave_nothing_held_and_no_actor_stalled(cluster, even_tiny_dir, reference, tokenizer):
    """What Ray Serve does when a client goes away: ``ray.cancel`` (recursive) of the replica's streaming call.

    The router runs in an async actor as in a Serve replica. Cancelling must stop the request without
    cancelling the router's own calls to its draft worker and tensor-parallel ranks: a cancelled queued
    call stalls the in-order draft worker for Ray's 30 s reorder timeout, a cancelled free leaks the
    sequence, a cancelled call to one rank hangs the group.
    """
    import ray

    @ray.remote(num_cpus=0)
    class Host:
        async def start(self, cfg: dict) -> None:
            from actors.config import ReplicaConfig
            from actors.router import RouterCore

            self.core = RouterCore(ReplicaConfig.model_validate(cfg))
            await self.core.start()

        async def generate(self, prompt_ids: list[int], params: dict):
            from specserve.config import SamplingParams

            async for chunk in self.core.generate(prompt_ids, SamplingParams.model_validate(params)):
                yield chunk.token_ids

        async def run(self, prompt_ids: list[int], params: dict) -> list[int]:
            return [t async for ids in self.generate(prompt_ids, params) for t in ids]

        async def held(self) -> dict:
            return await self.core.held_sequences()

        def shutdown(self) -> None:
            self.core.shutdown()

    host = Host.remote()
    ray.get(host.start.remote(app_config(even_tiny_dir).model_dump(mode="json")), timeout=300)
    long = SamplingParams(max_tokens=200, ignore_eos=True).model_dump(mode="json")
    try:
        for i in range(6):  # cancelled after 1..6 streamed chunks: the cancel lands at different points of a step
            stream = host.generate.options(num_returns="streaming").remote(tokenizer.encode(PROMPTS[i % 4]), long)
            for _ in range(i + 1):
                ray.get(next(stream), timeout=60)
            ray.cancel(stream)
        deadline, held = time.monotonic() + 20, None
        while time.monotonic() < deadline:
            held = ray.get(host.held.remote(), timeout=60)
            if held == {"router": 0, "router_drafter": 0, "draft_workers": [0], "target_groups": [0]}:
                break
            time.sleep(0.2)
        assert held == {"router": 0, "router_drafter": 0, "draft_workers": [0], "target_groups": [0]}
        # Well inside the draft worker's 30 s reorder timeout: a hole left in its order would fail this call.
        later = ray.get(host.run.remote(tokenizer.encode(PROMPTS[1]), PARAMS.model_dump(mode="json")), timeout=20)
        assert later == reference[PROMPTS[1]]
    finally:
        ray.get(host.shutdown.remote(), timeout=60)
        ray.kill(host)


def test_a_cancelled_request_does_not_cancel_the_actor_calls_it_submitted(cluster):
    """``actors.calls.submit`` against plain ``.remote()``: Ray's recursive cancel takes a plain call that is
    still in the caller's process (here: waiting for its argument) with it, which on an in-order actor leaves
    a hole that stalls the actor for 30 s (what CI saw of a draft worker); a submitted call still runs."""
    import ray

    @ray.remote(num_cpus=0)
    class Worker:
        def __init__(self):
            self.ran: list[str] = []

        def value_after(self, seconds: float) -> int:
            time.sleep(seconds)
            return 1

        def mark(self, name: str, value: int) -> None:
            self.ran.append(name)

        def marks(self) -> list[str]:
            return self.ran

    @ray.remote(num_cpus=0)
    class Caller:
        def __init__(self, slow, worker):
            self.slow, self.worker = slow, worker

        async def call(self, name: str, detached: bool):
            from actors.calls import submit

            send = submit if detached else (lambda method, *args: method.remote(*args))
            value = send(self.slow.value_after, 1.0)
            ref = send(self.worker.mark, name, value)  # sent once ``value`` is ready, a second from now
            yield "submitted"
            await ref

    slow, worker = Worker.remote(), Worker.remote()
    caller = Caller.remote(slow, worker)
    names = {detached: [f"{'detached' if detached else 'plain'}-{i}" for i in range(2)] for detached in (False, True)}
    try:
        for detached in (False, True):
            for name in names[detached]:
                stream = caller.call.options(num_returns="streaming").remote(name, detached)
                ray.get(next(stream), timeout=60)
                ray.cancel(stream)  # recursive, as Ray Serve cancels a request whose client went away
        deadline = time.monotonic() + 40  # the slow actor answers one call a second, one after the other
        while not all(name in (ran := ray.get(worker.marks.remote(), timeout=60)) for name in names[True]) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(name in ran for name in names[True]), ran
        assert not any(name in ran for name in names[False]), f"no plain call was cancelled: the check is void ({ran})"
    finally:
        for actor in (caller, slow, worker):
            ray.kill(actor)
