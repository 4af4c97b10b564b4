"""CPU seconds per 1,000 tokens by process name while load.py runs (stream_interval check at 64 streams):
  .venv/bin/python docs/bench/one-stream-rounds/cpu_per_token.py PORT 64"""
import os, sys, time, subprocess, json
def snap():
    out = {}
    for p in os.listdir('/proc'):
        if not p.isdigit(): continue
        try:
            st = open(f'/proc/{p}/stat').read()
        except OSError: continue
        name = st.split('(')[1].split(')')[0]
        f = st.rsplit(')',1)[1].split()
        out[p] = (int(f[11]) + int(f[12]), name)
    return out
a = snap(); t0 = time.time()
r = subprocess.run([sys.executable, str(__import__("pathlib").Path(__file__).with_name("load.py")), sys.argv[1], sys.argv[2]], capture_output=True, text=True)
b = snap(); wall = time.time() - t0
line = [l for l in r.stdout.splitlines() if l.strip()][-1]; print(line)
tok_s = float(line.split("'tokens_per_s': ")[1].split(",")[0]); toks = tok_s * wall
agg = {}
for p in b:
    if p in a:
        agg[b[p][1]] = agg.get(b[p][1], 0) + (b[p][0] - a[p][0]) / os.sysconf('SC_CLK_TCK')
for k, v in sorted(agg.items(), key=lambda x: -x[1])[:12]:
    print(f"{k:20s} {1000*v/toks:6.3f} s/1000tok")
