import json, statistics, sys, os, time, torch
sys.path.insert(0, "bench")
import decode_throughput as B
from lmlab.models.hub import load_pretrained, resolve
torch.set_num_threads(2)
path = str(resolve("smollm2-135m-instruct"))
print("load average", os.getloadavg(), flush=True)
models = {n: load_pretrained(path, inference=B.FORMATS[n]) for n in ("fp32", "bf16", "int4")}
prompt = models["fp32"].tokenizer.encode(B.TEXT).ids[:128]
engines = {n: B.lmlab_engine(p, prompt) for n, p in models.items()}
for run, prefill, _ in engines.values():
    run(1, 2); prefill()
results, tokens = {}, {}
B.one_round(engines, len(prompt), 16, results, tokens)
print(json.dumps({"round1": results, "greedy_equal_fp32": {n: t == tokens["fp32"] for n, t in tokens.items()}}), flush=True)
B.one_round(engines, len(prompt), 16, results, tokens)
med = {n: {k: round(statistics.median(v), 1) for k, v in r.items()} for n, r in results.items()}
print(json.dumps({"medians": med, "ratios": {n: {k: round(v / med["fp32"][k], 2) for k, v in r.items()} for n, r in med.items()}}), flush=True)
print("load average", os.getloadavg(), flush=True)
print(json.dumps(B.speculation(models["int4"], 8, 48, 1)), flush=True)
print("load average", os.getloadavg(), flush=True)
