"""Session 18 diagnostic: why the first pass of 64 recompiles after warm-ups at 32 and 16, and what the agent's
per-step overhead is made of with compiled blocks (triples on/off, splits trusted or not)."""
import json, os, statistics, sys, time, argparse
from pathlib import Path
ROOT = Path(os.environ.get("ROOT", "."))
sys.path.insert(0, str(ROOT / "bench"))
import torch
import pollux_adaptive as pa

args = argparse.Namespace(device="cuda", model="small", data=ROOT / "build/gpu-data/pollux-small", samples=10**9,
                          val_samples=64, compile=True)
out = {}
pa.train(args, "warmup", 32, 32, steps=20)
pa.train(args, "warmup_split", 32, 16, steps=10)
print("=== now 64/64", flush=True)
r = pa.train(args, "r64", 64, 64, steps=8)
out["r64"] = [round(x["step_time"] * 1e3, 1) for x in r["rows"]]
print("=== now 80/80", flush=True)
r = pa.train(args, "r80", 80, 80, steps=6)
out["r80"] = [round(x["step_time"] * 1e3, 1) for x in r["rows"]]
print("=== now 128/64", flush=True)
r = pa.train(args, "r128", 128, 64, steps=6)
out["r128_64"] = [round(x["step_time"] * 1e3, 1) for x in r["rows"]]
base = {"max_micro_batch": 256, "max_batch": 2048, "decide_every": 10, "warmup_steps": 30,
        "adapt_batch": False, "scale_lr": False}
variants = {"none": None, "agent": base, "agent_untrusted": {**base, "split_precision": 1e-9},
            "agent_trusted": {**base, "split_precision": 1e9}, "agent_no_triples": {**base, "gns_triples": False}}
res = {k: [] for k in variants}
for rnd in range(3):
    for name, cfg in variants.items():
        run = pa.train(args, name, 32, 32, cfg, steps=100)
        times = [x["step_time"] for x in run["rows"] if "val_loss" not in x and x["step"] >= 32]
        res[name].append({"mean_ms": 1e3 * statistics.fmean(times), "median_ms": 1e3 * statistics.median(times),
                          "trusted": run["split_trusted_step"],
                          "splits": sum(x["micro_batch_size"] < x["batch_size"] for x in run["rows"] if x["step"] >= 32)})
out["overhead"] = res
for name, v in res.items():
    print(name, [f"{x['mean_ms']:.2f}/{x['median_ms']:.2f} t={x['trusted']} s={x['splits']}" for x in v], flush=True)
# The per-step host cost of a triple step, profiled.
from glassbox.train.callbacks import Callback
prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
import cProfile, pstats
cp = cProfile.Profile()
class P(Callback):
    def on_step_end(self, state):
        if state.step == 49: prof.start(); cp.enable()
        if state.step == 79:
            torch.cuda.synchronize(); cp.disable(); prof.stop()
pa_train = pa.train
import glassbox.train.trainer as T
orig = T.Trainer.__init__
def init(self, cfg, callbacks=None, plan=None):
    orig(self, cfg, callbacks=(callbacks or []) + [P()], plan=plan)
T.Trainer.__init__ = init
pa.train(args, "profiled_untrusted", 32, 32, {**base, "split_precision": 1e-9}, steps=80)
T.Trainer.__init__ = orig
ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:30]
out["profile_top"] = [(e.key, e.count, round(e.self_cpu_time_total / 30 / 1e3, 3)) for e in ev]
for row in out["profile_top"]:
    print(row)
st = pstats.Stats(cp).stats
ours = sorted(((v[3] / 30 * 1e3, v[2] / 30 * 1e3, f"{k[0].split('/')[-2]}/{k[0].split('/')[-1]}:{k[1]}({k[2]})")
               for k, v in st.items() if "glassbox" in k[0] or "elastic" in k[0] or "/train/" in k[0]
               or "/models/" in k[0]), reverse=True)[:40]
out["python_ms_per_step_cum_tot"] = ours
for row in ours:
    print("py %.3f %.3f %s" % row)
(ROOT / "bench/results/diag_s18.json").write_text(json.dumps(out, indent=1))
