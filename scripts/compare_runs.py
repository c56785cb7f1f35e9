"""Compare two run folders file by file (e.g. the demo before and after a change): arrays and tables must be
equal; text may differ only in paths and times.  python scripts/compare_runs.py BEFORE AFTER"""
import sys, json, re, pathlib, numpy as np, pandas as pd
a, b = map(pathlib.Path, sys.argv[1:3])
fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
print("only before:", sorted(set(fa) - set(fb)), "only after:", sorted(set(fb) - set(fa)))
bad = []
for rel in sorted(set(fa) & set(fb)):
    x, y = a / rel, b / rel
    if rel.suffix == ".npz":
        A, B = np.load(x, allow_pickle=False), np.load(y, allow_pickle=False)
        for k in A.files:
            if k not in B.files: bad.append((rel, k, "missing")); continue
            u, v = A[k], B[k]
            if u.dtype.kind in "fc":
                if not np.array_equal(u, v, equal_nan=True): bad.append((rel, k, float(np.nanmax(np.abs(u - v)))))
            elif k not in ("meta", "meta_json") and not np.array_equal(u, v): bad.append((rel, k, "differs"))
    elif rel.suffix in (".csv", ".tsv"):
        u, v = pd.read_csv(x, sep=None, engine="python"), pd.read_csv(y, sep=None, engine="python")
        try: pd.testing.assert_frame_equal(u, v, check_exact=True)
        except AssertionError as e: bad.append((rel, str(e)[:200]))
    elif rel.suffix in (".png", ".pdf", ".parquet"):
        if x.read_bytes() != y.read_bytes(): bad.append((rel, "bytes differ"))
    else:
        norm = lambda t: re.sub(r"/tmp/[\w./-]+|\d+\.\d+ ?s\b|20\d\d-\d\d-\d\d[T ][\d:.]+", "X", t)
        if norm(x.read_text(errors="replace")) != norm(y.read_text(errors="replace")): bad.append((rel, "text differs"))
print(len(set(fa) & set(fb)), "files compared;", len(bad), "differ")
for d in bad: print("  ", d)
