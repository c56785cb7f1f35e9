"""The demo recovers its planted head: the head, its layer and the planted genes come out on top."""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stdout

import anndata as ad
import pandas as pd
import pytest

from attnprof import Profile
from attnprof.cli import main
from attnprof.singlecell.demo import FEMALE_BIASED, MALE_BIASED, PLANTED_HEAD, PLANTED_LAYER

PLANTED = set(FEMALE_BIASED + MALE_BIASED)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The README's `attnprof demo`, as a user runs it (also CI's end-to-end smoke test)."""
    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert main(["demo", "--out", str(out), "--quiet"]) == 0
    return out, printed.getvalue()


def test_demo_runs_end_to_end(demo):
    out, printed = demo
    assert "profiled 400 cells (female 200, male 200)" in printed
    for name in ("profile.npz", "tables/layers.csv", "tables/genes.h5ad", "figures/layer_differences.png"):
        assert (out / name).stat().st_size > 0
    profile = Profile.load(out / "profile.npz")
    assert profile.meta["contrast"]["a"] == "female" and len(profile.panel) == 10


def test_demo_names_the_planted_head_and_lists_the_planted_genes_first(demo):
    out, printed = demo
    assert "replicate level: 6 female vs 6 male replicates (200 vs 200 cells); all 924 distinct relabelings " \
           "(exact): smallest possible p = 0.00216 (its mirror image, the groups swapped, ties it)" in printed  # fmt: skip
    # the observed labeling and its mirror image (sexes swapped) give the same |D|: p = 2/924 at best
    assert re.search(rf"top layer: {PLANTED_LAYER} .*p_perm = 0.00[0-9]+, family-wise p = 0.0[0-4][0-9]*$", printed, re.M)
    assert re.search(rf"top head:  layer {PLANTED_LAYER}, head {PLANTED_HEAD} .*p_perm = 0.00216, family-wise p = "
                     rf"0.0[0-4][0-9]*$", printed, re.M)  # fmt: skip
    top = re.search(r"its top 10 genes by Welch p: (.*)", printed).group(1).replace("*", "").split(", ")
    assert len(set(top) & PLANTED) >= 8
    rates = re.search(r"Welch p < 0.05 for (\d+)% across animals, (\d+)% with cells as replicates", printed)
    assert int(rates.group(1)) <= 10 and int(rates.group(2)) >= 25  # animal effects fool the cell-level test
    assert "-> recovered" in printed and "NOT" not in printed


def test_demo_tables_rank_the_planted_layer_and_head_first(demo):
    out, _ = demo
    record = json.loads((out / "run.json").read_text())
    assert record["unit"] == "replicate" and record["replicates"] == {"female": 6, "male": 6}
    assert record["permutations"] == 923 and record["exact"] and record["min_p"] == pytest.approx(2 / 924)
    heads = pd.read_csv(out / "tables" / "heads.csv").query("family == 'gene'")
    planted = heads.query("layer == @PLANTED_LAYER and head == @PLANTED_HEAD").iloc[0]
    assert planted["p_perm_mean_abs_diff"] == pytest.approx(2 / 924)
    assert planted["p_fwer_mean_abs_diff"] <= 0.05
    others = heads.drop(index=planted.name)
    assert (others["p_fwer_mean_abs_diff"] > planted["p_fwer_mean_abs_diff"]).all()
    assert planted["mean_abs_diff"] > planted["mean_abs_diff_null_q95"] and planted["rms_diff"] > 0
    layers = pd.read_csv(out / "tables" / "layers.csv").query("family == 'gene'")
    assert layers.sort_values("p_fwer_mean_abs_diff").iloc[0]["layer"] == PLANTED_LAYER
    assert "Replicate level" in (out / "report.html").read_text()
