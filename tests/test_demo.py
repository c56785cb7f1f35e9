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
    n = len(Profile.load(out / "profile.npz").null)
    smallest = f"p_perm = {1 / (n + 1):.3g}"  # beats every one of the n permutations
    assert re.search(rf"top layer: {PLANTED_LAYER} .*{smallest}$", printed, re.M)
    assert re.search(rf"top head:  layer {PLANTED_LAYER}, head {PLANTED_HEAD} .*{smallest}$", printed, re.M)
    top = re.search(r"its top 10 genes by Welch p: (.*)", printed).group(1).replace("*", "").split(", ")
    assert set(top) == PLANTED
    assert "-> recovered" in printed and "NOT" not in printed


def test_demo_tables_rank_the_planted_layer_and_head_first(demo):
    out, _ = demo
    n = len(Profile.load(out / "profile.npz").null)
    assert n == json.loads((out / "run.json").read_text())["permutations"] > 0
    heads = pd.read_csv(out / "tables" / "heads.csv").query("family == 'gene'")
    planted = heads.query("layer == @PLANTED_LAYER and head == @PLANTED_HEAD").iloc[0]
    assert planted["p_perm_mean_abs_diff"] == pytest.approx(1 / (n + 1))
    assert (heads.drop(index=planted.name)["p_perm_mean_abs_diff"] > planted["p_perm_mean_abs_diff"]).all()
    band = planted["mean_abs_diff_null_q95"] - planted["mean_abs_diff_null_mean"]
    assert planted["mean_abs_diff_excess"] > 3 * band > 0
    assert planted["excess_over_noise"] > 3 * heads.drop(index=planted.name)["excess_over_noise"].abs().max()
    layers = pd.read_csv(out / "tables" / "layers.csv").query("family == 'gene'").set_index("layer")
    assert layers.at[PLANTED_LAYER, "p_perm_mean_abs_diff"] == pytest.approx(1 / (n + 1))
    assert (layers.drop(index=PLANTED_LAYER)["p_perm_mean_abs_diff"] > 1 / (n + 1)).all()
    genes = pd.read_csv(out / "tables" / "genes.csv")
    head_genes = genes.query("layer == @PLANTED_LAYER and head == @PLANTED_HEAD")
    assert set(head_genes["gene"].iloc[:10]) == PLANTED
    assert (head_genes["n_a"] >= 10).all() and (head_genes["n_b"] >= 10).all()  # the default min_cells


def test_context_tokens_are_not_genes(demo):
    out, _ = demo
    genes = pd.read_csv(out / "tables" / "genes.csv")
    assert not genes["gene"].str.startswith("<").any()
    context = pd.read_csv(out / "tables" / "context.csv")
    assert {"<species:mouse>", "<assay:MERFISH>", "<modality:spatial>"} == set(context["token"])
    assert not any(name.startswith("<") for name in ad.read_h5ad(out / "tables" / "genes.h5ad").var_names)


def test_plot_draws_every_group_and_a_gallery(demo, tmp_path, capsys):
    out, _ = demo
    argv = ["plot", str(out), "--groups", "all", "--gallery", "0:1,1:2", "--gallery-group", "male", "--out",
            str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"head_gallery.png", "head_gallery.pdf", "attention_maps.png"} <= names
    assert main([*argv[:-2], "--gallery", "1-2", "--out", str(tmp_path)]) == 2
    assert "--gallery takes layer:head pairs" in capsys.readouterr().err
    assert main(["plot", str(out), "--groups", "female", "nobody", "--out", str(tmp_path)]) == 2
    assert "unknown group 'nobody'" in capsys.readouterr().err
