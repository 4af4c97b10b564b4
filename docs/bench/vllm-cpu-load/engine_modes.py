"""vLLM on the CPU, in process, one engine per run: what a speculating engine costs before any draft pays.

    python docs/bench/vllm-cpu-load/engine_modes.py plain|plain_sync|nodraft|ngram4

plain = vLLM's defaults; plain_sync = async scheduling off by hand; nodraft = a custom_class proposer that never
drafts (nodraft.NoDraft, k = 4); ngram4 = vLLM's n-gram, k = 4. Prints the engine's async_scheduling and tok/s at
1 / 16 / 64 prompts submitted at once (4 fixed chat prompts, 128 tokens each, ignore_eos, greedy, best of 2).
"""
import sys, time, json
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
if __name__ == "__main__":
    from specserve.models import default_model_dir
    from vllm import LLM, SamplingParams
    cfg = sys.argv[1]
    kw = {}
    if cfg == "plain_sync":
        kw["async_scheduling"] = False
    elif cfg == "nodraft":
        kw["speculative_config"] = {"method": "custom_class", "model": "nodraft.NoDraft", "num_speculative_tokens": 4}
    elif cfg == "ngram4":
        kw["speculative_config"] = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    llm = LLM(model=str(default_model_dir()), dtype="bfloat16", max_model_len=4096, seed=0, max_num_seqs=64, **kw)
    prompts = ["Write a short story about a robot learning to paint.", "Explain how a hash table works.",
               "List five uses of Python decorators with examples.", "Summarize the history of the printing press."]
    sp = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    llm.generate(prompts[:1], sp, use_tqdm=False)
    res = {"cfg": cfg, "async": llm.llm_engine.vllm_config.scheduler_config.async_scheduling}
    for n in (1, 16, 64):
        ps = (prompts * 16)[:n]
        best = 0
        for _ in range(2):
            t = time.perf_counter(); out = llm.generate(ps, sp, use_tqdm=False); dt = time.perf_counter() - t
            best = max(best, sum(len(o.outputs[0].token_ids) for o in out) / dt)
        res[f"tok_s_{n}"] = round(best, 1)
    print("RESULT", json.dumps(res), flush=True)
