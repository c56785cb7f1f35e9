#!/usr/bin/env bash
# Mutation testing with mutmut (3.x), one module group at a time, against that group's fast tests.
#
#   scripts/mutation.sh kernels|tables|tokenize|adapters
#
# mutmut names mutants after the import path of the file (src/attnprof/x.py -> attnprof.x), while this
# repository maps the package `attnprof` onto profiler/ and kernels/. So the script copies the sources
# into a scratch tree with the installed layout (src/attnprof, src/attnprof/kernels), copies tests/ and
# the pytest settings, and runs mutmut there; nothing in the repository is touched. The last lines
# printed are the score: killed / (killed + survived + timeouts), and the surviving mutants' names
# (`cd $WORK && mutmut show NAME` prints a diff).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
group=${1:?usage: scripts/mutation.sh kernels|tables|tokenize|adapters}
case $group in
  kernels)  mutate='"src/attnprof/kernels/plan.py", "src/attnprof/kernels/reduce.py", "src/attnprof/kernels/features.py", "src/attnprof/kernels/spec.py", "src/attnprof/kernels/reference.py"'
            tests='"tests/kernels/test_kernels.py", "tests/kernels/test_plan.py", "tests/kernels/test_kernel_inputs_and_layout.py"' ;;
  tables)   mutate='"src/attnprof/tables.py", "src/attnprof/frames.py"'
            tests='"tests/statistics/test_tables.py", "tests/statistics/test_significance.py", "tests/statistics/test_table_layout_and_p_values.py"' ;;
  tokenize) mutate='"src/attnprof/singlecell/nicheformer/tokenizer.py", "src/attnprof/singlecell/alignment.py"'
            tests='"tests/singlecell/test_tokenize.py", "tests/singlecell/test_upstream_tokens.py", "tests/singlecell/test_counts.py", "tests/singlecell/test_tokenize_edges.py"' ;;
  adapters) mutate='"src/attnprof/adapters/*"'
            tests='"tests/profiler/test_adapter_sdpa.py", "tests/profiler/test_adapter_hf.py", "tests/profiler/test_mha.py", "tests/profiler/test_adapter_refusals_and_edges.py"' ;;
  *) echo "unknown group $group: kernels, tables, tokenize or adapters" >&2; exit 2 ;;
esac
work=${WORK:-${TMPDIR:-/tmp}/attnprof-mutation/$group}
# FRESH=1 starts over; otherwise an earlier run in $work continues: finished mutants keep their result,
# the current tests are copied in, and mutants reached by new tests are tested again.
[ "${FRESH:-0}" = 1 ] && rm -rf "$work"
mkdir -p "$work/src/attnprof"
# cp -p keeps the modification times: mutmut mutates again only the files that changed
rm -rf "$work/tests" && cp -rp "$repo/tests" "$work/tests"
(cd "$repo/profiler" && find . -name '*.py' -not -path '*/__pycache__/*' -exec cp -p --parents {} "$work/src/attnprof/" \;)
mkdir -p "$work/src/attnprof/kernels"
(cd "$repo/kernels" && find . -name '*.py' -not -path '*/__pycache__/*' -exec cp -p --parents {} "$work/src/attnprof/kernels/" \;)
# pytest settings of the repository, then mutmut's (only the fast tests: -m "not slow" comes from addopts)
sed -n '/^\[tool.pytest.ini_options\]/,/^\[/p' "$repo/pyproject.toml" | sed '$!b;/^\[/d' | sed 's/^testpaths.*/testpaths = ["tests"]/' > "$work/pyproject.toml"
cat >> "$work/pyproject.toml" <<TOML

[tool.mutmut]
source_paths = ["src"]
only_mutate = [$mutate]
pytest_add_cli_args_test_selection = [$tests]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:randomly", "-x", "-q"]
TOML
# only the test files that exist (the mutant-killing files are optional)
tests=$(for t in ${tests//,/ }; do t=${t//\"/}; if [ -f "$work/$t" ]; then printf '"%s", ' "$t"; fi; done)
sed -i "s|^pytest_add_cli_args_test_selection = .*|pytest_add_cli_args_test_selection = [${tests%, }]|" "$work/pyproject.toml"
cd "$work"
export CI=${CI:-} PYTHONDONTWRITEBYTECODE=1
"$python" -m mutmut run --max-children "${JOBS:-2}" >run.log 2>&1 || { tail -c 3000 run.log; exit 1; }
# mutmut maps new test files and re-tests the mutants they reach by itself; RETEST=1 also re-runs every
# survivor (slow: a survivor runs all the tests that reach it)
survivors=$([ "${RETEST:-0}" = 1 ] && "$python" -m mutmut results 2>/dev/null | sed -n 's/^ *\([^ ]*\): survived$/\1/p' || true)
if [ -n "$survivors" ]; then
  "$python" -m mutmut run --max-children "${JOBS:-2}" $survivors >>run.log 2>&1 || { tail -c 3000 run.log; exit 1; }
fi
"$python" -m mutmut results --all true > results.txt 2>&1 || true
"$python" - <<'PY'
import collections, re
counts = collections.Counter()
survivors = []
for line in open("results.txt"):
    m = re.match(r"\s*(\S+): (.+)$", line)
    if m:
        counts[m.group(2).strip()] += 1
        if m.group(2).strip() == "survived":
            survivors.append(m.group(1))
killed, survived = counts["killed"], counts["survived"]
timeout = counts["timeout"]
total = killed + survived + timeout
print(dict(counts))
print(f"score: {killed + timeout}/{total} killed ({100 * (killed + timeout) / max(total, 1):.1f}%)")
for s in survivors:
    print("survived:", s)
PY
