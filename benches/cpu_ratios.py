"""Ratios that survive a shared, noisy machine: process CPU time on one thread, rounds interleaved.

    python benches/cpu_ratios.py panel   # plain (regular path) vs attnprof vs attnprof + compare with 999 relabelings
    python benches/cpu_ratios.py full    # the same on 1,500-token cells (no permutations)
    THREADS=2 MAP_BINS=32 python benches/cpu_ratios.py full   # on 2 threads, and a run with whole-context maps
    THREADS=2 ROUNDS=6 python benches/cpu_ratios.py full      # more rounds (default 3): a steadier minimum

The workloads are bench_e2e's full-mode ones (Nicheformer scale; 64 panel cells of 150-250 tokens in
batches of 32, or 4 full cells). Wall-clock ratios on a machine whose load swings by 3x within a
minute (other jobs) are noise; CPU time of one thread counts this process's work only.
"""
import sys, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
torch.set_num_threads(int(__import__("os").environ.get("THREADS", "1")))
import bench_e2e as be
s = be.setup._fixture_function(True)
kind = sys.argv[1] if len(sys.argv) > 1 else "panel"
t, lab, size = (s["panel"], s["panel_labels"], s["panel_batch"]) if kind == "panel" else (s["full"], s["labels"], s["batch"])
animals = __import__("numpy").array([f"{'ab'[g]}{i % 4}" for i, g in enumerate(lab)])  # 4 animals per group
runs = {
    "plain regular": lambda: be.plain(s["model"], t, lab, size, True, False),
    "attnprof": lambda: be.profiled(s["model"], t, lab, size, True, "auto", s["vocab"]),
    "attnprof 999 perms": lambda: be.profiled(s["model"], t, lab, size, True, "auto", s["vocab"], replicates=animals)
    .compare("a", "b", min_cells=1, permutations=999),
}
if kind != "panel":
    del runs["attnprof 999 perms"]
bins = int(__import__("os").environ.get("MAP_BINS", "0"))  # MAP_BINS=32: also a run with whole-context maps
if bins:
    runs[f"attnprof + {bins} bins"] = lambda: be.profiled(s["model"], t, lab, size, True, "auto", s["vocab"], map_bins=bins)
for f in runs.values(): f()
res = {k: [] for k in runs}
for r in range(int(__import__("os").environ.get("ROUNDS", "3"))):
    for k, f in runs.items():
        c = time.process_time(); w = time.perf_counter(); f()
        res[k].append((time.process_time() - c, time.perf_counter() - w))
    print(r, {k: (round(v[-1][0], 2), round(v[-1][1], 2)) for k, v in res.items()}, flush=True)
cpu = {k: min(x[0] for x in v) for k, v in res.items()}
wall = {k: min(x[1] for x in v) for k, v in res.items()}
print("cpu min", cpu, "wall min", wall)
print("attnprof / plain: cpu %.3f wall %.3f" % (cpu["attnprof"] / cpu["plain regular"], wall["attnprof"] / wall["plain regular"]))
median = lambda k, i: sorted(x[i] for x in res[k])[len(res[k]) // 2]  # noisy machines: the middle round too
print("median round, attnprof / plain: cpu %.3f wall %.3f"
      % tuple(median("attnprof", i) / median("plain regular", i) for i in (0, 1)))
if kind == "panel": print("999 perms / none: cpu %.3f wall %.3f" % (cpu["attnprof 999 perms"] / cpu["attnprof"], wall["attnprof 999 perms"] / wall["attnprof"]))
if bins:
    key = f"attnprof + {bins} bins"
    print("maps / none: cpu %.3f wall %.3f" % (cpu[key] / cpu["attnprof"], wall[key] / wall["attnprof"]))
