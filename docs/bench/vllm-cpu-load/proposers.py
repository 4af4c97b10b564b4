"""vLLM on the CPU, in process, one engine per run: our proposer against plain decoding and vLLM's n-gram.

    python docs/bench/vllm-cpu-load/proposers.py plain|ours|ours_switch|ngram4

ours = what `make serve` drafts with (actors.vllm_proposer.VllmLocalProposer, n-gram, adaptive k, no k table);
ours_switch = the same with model.vllm.drafting_switch. The 18 held-out prompts of bench-serve (6 ShareGPT chat,
6 code, 6 grounded edits, chat template), greedy, 128 tokens, submitted at once: 1 stream = 18 single prompts,
4 / 16 = two batches of that size, 64 = one batch. Prints aggregate tok/s per batch size.
"""
import sys, time, json
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
if __name__ == "__main__":
    from specserve.models import default_model_dir
    from specserve.data import load_prompts
    from vllm import LLM, SamplingParams
    cfg = sys.argv[1]
    kw = {}
    if cfg == "ngram4":
        kw["speculative_config"] = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    elif cfg.startswith("ours"):
        from specserve.config import DrafterConfig
        d = DrafterConfig(kind="ngram", vllm_placement="vllm_worker")
        kw["speculative_config"] = {"method": "custom_class", "model": "actors.vllm_proposer.VllmLocalProposer",
                                    "num_speculative_tokens": d.num_speculative_tokens}
        kw["additional_config"] = {"specserve": {"drafter": d.model_dump(mode="json"), "k_per_batch_size": [],
                                                 "drafting_switch": cfg == "ours_switch", "pipelining": False}}
        kw["worker_extension_cls"] = "actors.vllm_extension.ProposerExtension"
    llm = LLM(model=str(default_model_dir()), dtype="bfloat16", max_model_len=4096, seed=0, max_num_seqs=64, **kw)
    tok = llm.get_tokenizer()
    recs = load_prompts("sharegpt:6") + load_prompts("prompts/code.jsonl")[:6] + load_prompts("prompts/grounded.jsonl")[:6]
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True) for r in recs]
    sp = SamplingParams(max_tokens=128, temperature=0)
    llm.generate(prompts[:2], sp, use_tqdm=False)
    res = {"cfg": cfg}
    for n in (1, 4, 16, 64):
        tokens, secs = 0, 0.0
        reps = {1: 6, 4: 2, 16: 2, 64: 1}[n]
        for r in range(reps):
            if n == 1:
                ps = [prompts[(3 * r) % 18], prompts[(3 * r + 7) % 18], prompts[(3 * r + 14) % 18]]
                for p in ps:
                    t = time.perf_counter(); out = llm.generate([p], sp, use_tqdm=False); secs += time.perf_counter() - t
                    tokens += len(out[0].outputs[0].token_ids)
                continue
            ps = [prompts[(i + r * n) % 18] for i in range(n)]
            t = time.perf_counter(); out = llm.generate(ps, sp, use_tqdm=False); secs += time.perf_counter() - t
            tokens += sum(len(o.outputs[0].token_ids) for o in out)
        res[f"tok_s_{n}"] = round(tokens / secs, 1)
    print("RESULT", json.dumps(res), flush=True)
