"""One prompt, one stream: the raw SSE reads of one request, then N streamed requests through the official
client: the client's CPU per 1,000 tokens and tok/s. Run from the repo root beside a server on 127.0.0.1:PORT:
  .venv/bin/python docs/bench/one-stream-rounds/one_prompt.py PORT [N]"""
import sys, time, httpx, json
from openai import OpenAI
port = int(sys.argv[1]); n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
msgs = [{"role": "user", "content": "Write a Python function that returns the list of prime numbers below n, then explain it."}]
c = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
# raw read pattern
with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "smollm2-135m-instruct", "messages": msgs, "max_tokens": 128, "temperature": 0, "stream": True}) as r:
    sizes = [len(b) for b in r.iter_raw()]
print("raw reads", len(sizes), "bytes", sum(sizes), "first sizes", sizes[:8])
t0, w0 = time.process_time(), time.time(); toks = 0
for i in range(n):
    s = c.chat.completions.create(model="smollm2-135m-instruct", messages=msgs, max_tokens=128, temperature=0, stream=True)
    for ev in s:
        pass
    toks += 128
print(f"client cpu s per 1000 tok {1000*(time.process_time()-t0)/toks:.3f}  wall tok/s {toks/(time.time()-w0):.1f}")
