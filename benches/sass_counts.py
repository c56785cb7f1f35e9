"""Count what the GPU would execute per score, without a GPU: compile the triton kernels for an H100
(sm_90), disassemble them (Triton's own ptxas and nvdisasm) and count the instructions of each main
loop. Then bound each loop by the H100's issue rate, exponential unit and tensor cores.

    python benches/sass_counts.py            # table + benches/results/sass_counts.json
    python benches/sass_counts.py OUT.json   # the same, written elsewhere
    python benches/sass_counts.py --spills   # registers and spills of the kernels' per-head-dim config
                                             # tables on sm_80 and sm_90 -> benches/results/spills.json and
                                             # kernels/triton_spills.py (what the autotune prune reads)
    python benches/sass_counts.py --spills --missing   # only the (config, policy, arch) not checked yet
    python benches/sass_counts.py --spills --pinned OUT.json  # the first config each launch takes, per
                                             # head dim, arch and precision, compiled again (0 spills expected)

The counts are exact for the code the compiler emits (fp16, head dim 32, the autotune configs named
below: 128 x 128 tiles of 4 warps unless said); the times are ESTIMATES: a loop at the slowest of its
three bounds (B=8, H=16, L=1,500: 2.88e8 scores), with no latency, launch or memory cost. The stand-in
for flash SDPA is kernel 1 without its statistics (``WITH_STATS=False``): a flash forward from the same
compiler and tiles.

H100 SXM per SM and clock: 4 warp instructions issued; the exponential unit (MUFU) 16 lanes, i.e.
0.5 warp instructions; tensor cores 989 TFLOP/s / (132 SMs x 1.83 GHz) = 2048 fp16 MACs.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attnprof.kernels import triton_common as kc  # noqa: E402
from attnprof.kernels import triton_forward as kf  # noqa: E402
from attnprof.kernels import triton_stats as ks  # noqa: E402

SMS, CLOCK = 132, 1.83e9
ISSUE, MUFU, MACS = 4.0, 0.5, 2048.0  # per SM and clock: warp instructions, MUFU warp instructions, fp16 MACs
SCORES = 8 * 16 * 1500**2
MASKED_RAW = "-1.26765060022822940150e+30"  # how nvdisasm prints kc.MASKED_RAW (-2**100)
NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"

# name: (kernel, constexprs, warps, stages, scores per loop iteration)
VARIANTS = {  # the autotune configs with the fewest instructions per score (and 128 x 64 for comparison)
    "flash forward (SDPA stand-in)": (kf._forward_kernel, dict(BLOCK_M=128, BLOCK_N=128, WITH_STATS=False, WRITE_LSE=True), 4, 3, 128 * 128),
    "kernel 1": (kf._forward_kernel, dict(BLOCK_M=128, BLOCK_N=128, WITH_STATS=True, WRITE_LSE=False), 4, 3, 128 * 128),
    "kernel 1, 128x64": (kf._forward_kernel, dict(BLOCK_M=128, BLOCK_N=64, WITH_STATS=True, WRITE_LSE=False), 4, 3, 128 * 64),
    "column pass": (ks._columns_kernel, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_M_FMA=0), 4, 3, 128 * 128),
    "column pass, 32 FMA rows": (ks._columns_kernel, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_M_FMA=32), 4, 3, 160 * 128),
    # fp32 models under the default policy (tf32x3: three tf32 tensor-core products per dot), with the
    # configs their launches take first on sm_90 (kernels/triton_spills.py)
    "kernel 1, fp32 tf32x3": (kf._forward_kernel, dict(BLOCK_M=128, BLOCK_N=64, WITH_STATS=True, WRITE_LSE=False, DOT_PREC="tf32x3"), 8, 3, 128 * 64, "fp32"),
    "column pass, fp32 tf32x3": (ks._columns_kernel, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_M_FMA=0, DOT_PREC="tf32x3"), 4, 3, 128 * 128, "fp32"),
    "flash forward, fp32 tf32x3": (kf._forward_kernel, dict(BLOCK_M=128, BLOCK_N=64, WITH_STATS=False, WRITE_LSE=True, DOT_PREC="tf32x3"), 8, 3, 128 * 64, "fp32"),
    "kernel 1, fp32 fp16x3": (kf._forward_kernel, dict(BLOCK_M=128, BLOCK_N=64, WITH_STATS=True, WRITE_LSE=False, DOT_PREC="fp16x3"), 8, 3, 128 * 64, "fp32"),
    "column pass, fp32 fp16x3": (ks._columns_kernel, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_M_FMA=0, DOT_PREC="fp16x3"), 4, 3, 128 * 128, "fp32"),
}  # fmt: skip


def compile_for_h100(kernel, consts: dict, dtype: str = "fp16", warps: int = 4, stages: int = 3, real_launch: bool = True,
                     capability: int = 90):
    """``kernel`` (an autotuned attnprof kernel) compiled for sm_90 (or ``capability``, e.g. 80 for an
    A100) with ``dtype`` q, k, v and ``consts``
    (its tile sizes and flags; head dim 24 padded to 32 unless given). ``real_launch``: the attributes
    the JIT gives real inputs (unit strides specialized, pointers and row strides divisible by 16)."""
    fn = kernel.fn
    pointers = dict.fromkeys(["Q", "K", "V", "OUT"], dtype)
    pointers.update(dict.fromkeys(["BIAS", "TERM", "LSE2", "ROWSTATS", "INV_N", "RECEIVED"], "fp32"))
    pointers.update(dict.fromkeys(["CELLS", "POS"], "i64"))
    pointers.update(dict.fromkeys(["EXTENT", "TILES"], "i32"))
    consts = {"HEAD_D": 24, "BLOCK_D": 32, "CTX": kc.CTX_BLOCK, **consts}
    consts.setdefault("DOT_PREC", kf.dot_precision({"fp32": torch.float32}.get(dtype)))
    attrs = {}
    if real_launch:
        consts.update(dict.fromkeys(["sqd", "skd", "svd", "sod"], 1))
    consts = {a: consts[a] for a in fn.arg_names if a in consts}
    sig = {a: "constexpr" if a in consts else "fp32" if a == "qk_scale" else
           "*" + pointers[a] if a in pointers else "i32" for a in fn.arg_names}  # fmt: skip
    if real_launch:
        aligned = [a for a in fn.arg_names if a not in consts and (a in pointers or a[:2] in ("sq", "sk", "sv", "so"))]
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=warps, num_stages=stages))  # fmt: skip


def ptxas_usage(compiled) -> dict:
    """Registers and spill bytes of a compiled kernel, from ptxas -v on its own PTX (Triton's ptxas, the
    options Triton compiles with). Without a GPU the driver never loads the kernel, so its
    ``n_regs`` / ``n_spills`` stay unset: ptxas says them instead."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptx = compiled.asm["ptx"]
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.MULTILINE).group(1)
    src = Path(f"/tmp/attnprof_usage_{os.getpid()}.ptx")
    src.write_text(ptx)
    try:
        ptxas = get_ptxas(compiled.metadata.target.arch).path  # the one Triton picks for this target
        run = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(src),
                              "-o", os.devnull], capture_output=True, text=True, check=True)  # fmt: skip
    finally:
        src.unlink()
    log = run.stdout + run.stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, log)) else 0  # noqa: E731
    return {"arch": arch, "registers": number(r"Used (\d+) registers"),
            "spill_stores": number(r"(\d+) bytes spill stores"), "spill_loads": number(r"(\d+) bytes spill loads"),
            "stack": number(r"(\d+) bytes stack frame")}  # fmt: skip


def compile_sass(kernel, consts: dict, warps: int, stages: int, dtype: str = "fp16") -> str:
    """SASS of ``kernel`` for sm_90 with ``dtype`` q, k, v of head dim 32, launched as real inputs are."""
    consts = dict(consts, HEAD_D=32, BLOCK_D=32, COUNT_TILES=False)
    compiled = compile_for_h100(kernel, consts, dtype, warps, stages)
    cubin = Path(f"/tmp/attnprof_sass_{os.getpid()}.cubin")
    cubin.write_bytes(compiled.asm["cubin"])
    try:
        return subprocess.run([str(NVDISASM), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    finally:
        cubin.unlink()


def main_loop(sass: str) -> tuple[list[str], list[str]]:
    """Opcodes of the main loop (the backward branch's body with the most exponentials), on a tile of
    real keys only, and those of its masking blocks (forward-branch bodies that select MASKED_RAW)."""
    ops, texts, labels = [], [], {}
    for line in sass.splitlines():
        if m := re.match(r"^\s*(\.L_x_\d+):", line):
            labels[m.group(1)] = len(ops)
        elif m := re.match(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line):
            texts.append(m.group(1))
            ops.append(re.sub(r"^@!?U?P\w+\s+", "", m.group(1)).split()[0])
    branches = [(i, labels[m.group(1)]) for i, t in enumerate(texts)
                if ops[i].startswith("BRA") and (m := re.search(r"`\((\.L_x_\d+)\)", t))]  # fmt: skip
    loops = [(target, i) for i, target in branches if target <= i]
    start, end = max(loops, key=lambda se: sum(op.startswith("MUFU.EX2") for op in ops[se[0] : se[1] + 1]))
    cold = set()
    for i, target in branches:
        if start <= i < target <= end and any(MASKED_RAW in t for t in texts[i + 1 : target]):
            cold.update(range(i + 1, target))
    body = range(start, end + 1)
    return [ops[i] for i in body if i not in cold], [ops[i] for i in sorted(cold)]


def bounds(ops: list[str], warps: int, scores: int) -> dict:
    """Per score: warp instructions, exponentials, MACs; and the SM clocks per score of each bound."""
    count = collections.Counter(ops)
    mufu = sum(n for op, n in count.items() if op.startswith("MUFU.EX2"))
    # tf32 products run at half the fp16 rate (494 against 989 TFLOP/s): each counts twice against the bound
    macs = sum(n * _hgmma_macs(op) * (2 if "TF32" in op else 1) for op, n in count.items() if op.startswith("HGMMA")) * warps / 4
    per_score = {"instructions": len(ops) * warps * 32 / scores, "MUFU.EX2": mufu * warps * 32 / scores}
    clocks = {"issue": len(ops) * warps / scores / ISSUE, "MUFU": mufu * warps / scores / MUFU, "tensor": macs / scores / MACS}
    return {"per_score": per_score, "clocks_per_score": clocks, "bound": max(clocks, key=clocks.get),
            "estimate_us": max(clocks.values()) * SCORES / SMS / CLOCK * 1e6,
            "top": dict(count.most_common(12))}  # fmt: skip


def _hgmma_macs(op: str) -> int:
    m, n, k = map(int, re.search(r"HGMMA\.(\d+)x(\d+)x(\d+)", op).groups())
    return m * n * k


def main(out: Path) -> dict:
    results = {}
    for name, (kernel, consts, warps, stages, scores, *dtype) in VARIANTS.items():
        hot, cold = main_loop(compile_sass(kernel, consts, warps, stages, *dtype))
        results[name] = dict(bounds(hot, warps, scores), config=dict(consts, warps=warps, stages=stages),
                             masking_block_instructions=len(cold))  # fmt: skip
    flash = results["flash forward (SDPA stand-in)"]["estimate_us"]
    print(f"{'main loop (D 32, sm_90; fp16 unless said)':34} {'instr/score':>11} {'exp/score':>9} {'bound':>7} {'ESTIMATE us':>11} {'x flash':>7}")
    for name, r in results.items():
        print(f"{name:34} {r['per_score']['instructions']:11.2f} {r['per_score']['MUFU.EX2']:9.3f} "
              f"{r['bound']:>7} {r['estimate_us']:11.1f} {r['estimate_us'] / flash:7.2f}")  # fmt: skip
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written to {out}")
    return results


# name: (kernel, its per-head-dim table, the table's size names, the flags it runs with)
TABLES = {
    "kernel 1": (kf._forward_kernel, kf.FORWARD_CONFIGS, ("BLOCK_M", "BLOCK_N"), dict(WITH_STATS=True, WRITE_LSE=False, COUNT_TILES=False)),
    "column pass": (ks._columns_kernel, ks.COLUMNS_CONFIGS, ("BLOCK_M", "BLOCK_N", "BLOCK_M_FMA"), dict(COUNT_TILES=False)),
    "entries": (ks._entries_kernel, ks.ENTRIES_CONFIGS, ("BLOCK_M", "BLOCK_N"), dict(WINDOW=False)),
}  # fmt: skip
FP32_POLICIES = ("tf32x3", "fp16x3", "tf32", "ieee", "bf16", "fp16")
ARCHS = {"sm_80": 80, "sm_90a": 90}
SPILLS_TABLE = Path(__file__).parents[1] / "kernels" / "triton_spills.py"


def _usage(name, config, head_dim, dtype, policy, arch, progress) -> dict:
    kernel, _, names, flags = TABLES[name]
    consts = dict(flags, **dict(zip(names, config[:-2])), HEAD_D=head_dim, BLOCK_D=head_dim, DOT_PREC=policy)
    compiled = compile_for_h100(kernel, consts, dtype, config[-2], config[-1], capability=ARCHS[arch])
    row = dict(kernel=name, head_dim=head_dim, dtype=dtype, precision=policy, config=list(config), **ptxas_usage(compiled))
    progress(f"{name:12} D {head_dim:3} {dtype} {policy:7} {str(tuple(config)):24} {row['arch']:7} {row['registers']:3} "
             f"registers, {row['spill_stores']} B spill stores, {row['spill_loads']} B spill loads")  # fmt: skip
    return row


def spill_check(archs=tuple(ARCHS), kernels=tuple(TABLES), head_dims=(32, 64, 128), progress=print,
                policies=FP32_POLICIES, main_rows=True, known=None):  # fmt: skip
    """Registers and spills (ptxas -v) of each kernel's per-head-dim table, for each arch: every config of
    a row with its main inputs (fp16 for 16-bit rows, fp32 tf32x3 for fp32 rows); the row's first
    spill-free config also with bf16 inputs (16-bit rows); for the other fp32 policies the row's configs
    in order until one is spill-free (the one they run). Returns ``(rows, checked)``: every compile, and
    {(arch, kernel, head dim, DOT_PREC, config): spill bytes} for kernels/triton_spills.py."""
    rows, checked = [], {}
    known = known or {}

    def record(name, config, head_dim, dtype, policy, arch):
        key = (arch, name, head_dim, policy, tuple(config))
        if key in known and dtype != "bf16":  # ``known``: a previous check's results, not compiled again
            checked[key] = known[key]
            return known[key]
        row = _usage(name, config, head_dim, dtype, policy, arch, progress)
        rows.append(row)
        key = (arch, name, head_dim, policy, tuple(config))
        checked[key] = max(checked.get(key, 0), row["spill_stores"] + row["spill_loads"])
        return checked[key]

    for name in kernels:
        table = TABLES[name][1]
        for (head_dim, wide), configs in table.items():
            if head_dim not in head_dims:
                continue
            for arch in archs:
                main_dtype, main_policy = ("fp32", "tf32x3") if wide else ("fp16", "native")
                if main_rows:
                    free = [c for c in configs if record(name, c, head_dim, main_dtype, main_policy, arch) == 0]
                    if not wide and free:
                        record(name, free[0], head_dim, "bf16", "native", arch)
                for policy in [p for p in policies if p != "tf32x3"] if wide else ():
                    for c in configs:
                        if record(name, c, head_dim, "fp32", policy, arch) == 0:
                            break
    return rows, checked


def write_spills_table(checked: dict, path: Path = SPILLS_TABLE, merge: bool = False) -> None:
    """Write ``checked`` as kernels/triton_spills.py's CHECKED (``merge``: updating what is there)."""
    if merge:
        from attnprof.kernels.triton_spills import CHECKED

        checked = {**CHECKED, **checked}
    lines = [repr(k) + ": " + str(v) + "," for k, v in sorted(checked.items())]
    head = path.read_text().split("CHECKED")[0]
    path.write_text(head + "CHECKED: dict = {\n" + "\n".join("    " + line for line in lines) + "\n}  # fmt: skip\n")


def pinned_spills(archs=tuple(ARCHS), head_dims=(32, 64, 128), kernels=tuple(TABLES), policies=None,
                  progress=print) -> list[dict]:  # fmt: skip
    """The config each kernel launches first (the deterministic mode's) for each head dim, arch and
    precision, compiled again: the rows of the check that must show no spills."""
    rows = []
    for name in kernels:
        table = TABLES[name][1]
        for (head_dim, wide), configs in table.items():
            if head_dim not in head_dims:
                continue
            for arch in archs:
                inputs = [("fp32", p) for p in FP32_POLICIES] if wide else [("fp16", "native"), ("bf16", "native")]
                for dtype, policy in [x for x in inputs if policies is None or x[1] in policies]:
                    free = kc.spill_free(name, configs, head_dim, policy, arch)
                    rows.append(dict(_usage(name, free[0], head_dim, dtype, policy, arch, progress), pinned=True))
    return rows


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--spills" in sys.argv:
        out = Path(args[0]) if args else Path(__file__).parent / "results" / "spills.json"
        if "--pinned" in sys.argv:
            found = pinned_spills()
        elif "--missing" in sys.argv:  # only what kernels/triton_spills.py lacks (new candidates or policies)
            from attnprof.kernels.triton_spills import CHECKED

            found, checked = spill_check(known=CHECKED)
            write_spills_table(checked, merge=True)
            previous = json.loads(out.read_text()) if out.exists() else []
            found = previous + found
        else:
            found, checked = spill_check()
            write_spills_table(checked)
            print(f"written {SPILLS_TABLE}")
        out.write_text("[\n" + ",\n".join(json.dumps(r) for r in found) + "\n]\n")  # one compile per line
        spilled = [r for r in found if r["spill_stores"] or r["spill_loads"]]
        print(f"{len(found)} compiles, {len(spilled)} with spills; written to {out}")
        sys.exit(1 if spilled else 0)
    main(Path(args[0]) if args else Path(__file__).parent / "results" / "sass_counts.json")
