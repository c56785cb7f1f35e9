"""attnprof figure: panels A–G from a profile with planted heads; each panel's CSV names the planted head."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import attnprof
from attnprof.blocks import Blocks
from attnprof.cli import main
from attnprof.figure import figure_panels
from attnprof.figure_draw import draw_figure, panel_figure
from attnprof.figure_files import outputs
from attnprof.plots import attention_map

LAYERS, HEADS, W, GENES = 2, 3, 5, 8
REPLICATES, CELLS = 6, 12  # per group; cells per replicate
SAME = (0, 0)  # maps identical in every cell: differ least between the groups (panel A)
CHANGES = (1, 2)  # male maps move their mass to key 0: differ most (panel B)
GENE_HEAD = (1, 1)  # attention received by genes 0-3 higher in females (panels D, G)
SELF, CONTEXT, DIFFUSE = (0, 1), (1, 0), (0, 2)  # head summaries (panel C)


def _blocks_of(per_cell: np.ndarray, block: np.ndarray, n_blocks: int):
    """Per-cell values [cells, ...] as block sums and sums of squares [n_blocks, ...]."""
    total = np.zeros((n_blocks, *per_cell.shape[1:]))
    sq = np.zeros_like(total)
    np.add.at(total, block, per_cell)
    np.add.at(sq, block, per_cell**2)
    return total, sq


def planted_profile(seed: int = 0, binned: bool = False) -> attnprof.Profile:
    """``binned``: the planted maps also as whole-context binned maps (one bin per position)."""
    rng = np.random.default_rng(seed)
    n_blocks = 2 * REPLICATES
    block = np.repeat(np.arange(n_blocks), CELLS)
    male = block >= REPLICATES
    n = len(block)
    base = rng.random((LAYERS, HEADS, W, W)) + 0.1
    maps = np.broadcast_to(base, (n, LAYERS, HEADS, W, W)).copy()
    maps += rng.normal(0, 0.02, size=maps.shape)
    maps[:, SAME[0], SAME[1]] = base[SAME]  # no cell-to-cell noise, no group difference
    maps[male, CHANGES[0], CHANGES[1], :, 0] += 3.0
    maps /= maps.sum(-1, keepdims=True)
    recv = 0.1 + rng.normal(0, 0.01, size=(n, LAYERS, HEADS, GENES))
    recv[~male, GENE_HEAD[0], GENE_HEAD[1], :4] += 0.05
    summary = np.empty((n, LAYERS, HEADS, 4))  # entropy, context_mass, self_mass, row_max
    summary[...] = (1.0, 0.2, 0.1, 0.4)
    summary[:, SELF[0], SELF[1]] = (0.5, 0.05, 0.9, 0.9)
    summary[:, CONTEXT[0], CONTEXT[1]] = (0.6, 0.85, 0.05, 0.8)
    summary[:, DIFFUSE[0], DIFFUSE[1]] = (2.5, 0.1, 0.05, 0.15)
    summary += rng.normal(0, 0.005, size=summary.shape)
    sums = {}
    for name, per_cell in (("pos", maps), ("recv", recv), ("summary", summary)):
        total, sq = _blocks_of(np.moveaxis(per_cell, 1, 0).reshape(LAYERS, n, -1).swapaxes(0, 1), block, n_blocks)
        shape = (n_blocks, LAYERS, *per_cell.shape[2:])
        sums[f"{name}_sum"] = total.reshape(shape).swapaxes(0, 1)
        sums[f"{name}_sq"] = sq.reshape(shape).swapaxes(0, 1)
    cells = np.bincount(block, minlength=n_blocks).astype(float)
    sums["cells"] = np.broadcast_to(cells, (LAYERS, n_blocks)).copy()
    sums["pos_count"] = np.broadcast_to(cells[None, :, None, None], (LAYERS, n_blocks, W, W)).copy()
    sums["recv_count"] = np.broadcast_to(cells[None, :, None], (LAYERS, n_blocks, GENES)).copy()
    names = [f"F{i}" for i in range(REPLICATES)] + [f"M{i}" for i in range(REPLICATES)]
    binned = {"map_length": W} if binned else {}
    if binned:  # the window stays too, as in a run with --map-bins; the figure prefers the whole context
        sums.update({f"map_{name}": sums[f"pos_{name}"].copy() for name in ("sum", "sq", "count")})
    return attnprof.Profile(
        sums, layers=[f"encoder.layers.{i}.self_attn" for i in range(LAYERS)], groups=["female", "male"],
        n_heads=HEADS, window=W, n_context=0, genes=[f"g{i}" for i in range(GENES)],
        meta={"special_tokens": [], "contrast": {"a": "female", "b": "male", "min_cells": 10, "permutations": 999}},
        blocks=Blocks(tuple([0] * REPLICATES + [1] * REPLICATES), tuple(names), None, False), **binned,
    )  # fmt: skip


@pytest.fixture(scope="module")
def panels():
    return figure_panels(planted_profile(), "female", "male", permutations=999)


def test_maps_panels_pick_the_head_that_differs_least_and_most(panels):
    scores = panels["A"].extra["heads"]
    assert len(scores) == LAYERS * HEADS and scores["maps_by"].nunique() == 1
    chosen = {row["chosen_for"]: (row["layer"], row["head"]) for _, row in scores.iterrows() if row["chosen_for"]}
    assert chosen == {"A": SAME, "B": CHANGES}
    for name, head in (("A", SAME), ("B", CHANGES)):
        table = panels[name].table
        assert set(zip(table["layer"], table["head"])) == {head}
        assert set(zip(table["paper_layer"], table["paper_head"])) == {(head[0] + 1, head[1] + 1)}
        assert set(table["group"]) == {"female", "male"} and len(table) == 2 * W * W
        assert f"paper {head[0] + 1}" in panels[name].caption and "differ" in panels[name].caption
    b = panels["B"].table
    key0 = b[b["key_position"] == 0].groupby("group")["mean_attention"].mean()
    assert key0["male"] > key0["female"]  # the planted move, read back from the CSV's numbers
    shown = b[b["group"] == "male"].pivot(index="query_position", columns="key_position", values="mean_attention")
    np.testing.assert_allclose(shown.to_numpy(), attention_map(planted_profile(), "male", *CHANGES))  # the window


def test_binned_whole_context_maps_are_used_when_the_profile_has_them():
    profile = planted_profile(binned=True)
    panels = figure_panels(profile, "female", "male", permutations=0)
    for name, head in (("A", SAME), ("B", CHANGES)):
        table = panels[name].table
        assert set(zip(table["layer"], table["head"])) == {head}
        assert {"query_bin", "key_bin"} <= set(table) and "key_position" not in table
        assert "whole context in 5 x 5 bins" in panels[name].caption and "5 bins" in panels[name].title
    c = panels["C"].table
    assert c["mean_attention"].notna().all() and "query_bin" in c
    b = panels["B"].table
    for group in ("female", "male"):  # the CSV's numbers are Profile.binned_map's
        shown = b[b["group"] == group].pivot(index="query_bin", columns="key_bin", values="mean_attention")
        np.testing.assert_allclose(shown.to_numpy(), profile.binned_map(group, *CHANGES))


def test_gallery_picks_one_head_per_kind_from_the_summaries(panels):
    table = panels["C"].table
    kinds = dict(zip(table["category"], zip(table["layer"], table["head"])))
    assert kinds["self"] == SELF and kinds["metadata-token focus"] == CONTEXT and kinds["diffuse"] == DIFFUSE
    assert len(set(kinds.values())) == len(kinds)  # distinct heads
    heads = panels["C"].extra["heads"]
    assert {"entropy", "context_mass", "self_mass", "row_max", "chosen_as", "score: self"} <= set(heads)
    assert "most cells" in panels["C"].caption


def test_layer_panels_mark_the_planted_head_and_read_the_maximum_both_ways(panels):
    d_heads = panels["D"].extra["heads"]
    marked = d_heads[d_heads["mean_abs_diff_fwer_le_0.05"]]
    assert set(zip(marked["layer"], marked["head"])) == {GENE_HEAD}
    d = panels["D"].table
    assert d.loc[d["layer"] == GENE_HEAD[0], "heads_fwer_le_0.05"].item() == str(GENE_HEAD[1])
    assert (d["null_q95"] > 0).all() and d["statistic"].eq("mean over heads of mean |D|").all()
    g = panels["G"].table
    assert set(g["reading"]) == {"max_of_max", "max_of_mean"} and len(g) == 2 * LAYERS
    top = g[(g["layer"] == GENE_HEAD[0]) & (g["reading"] == "max_of_mean")]
    assert top["head"].item() == GENE_HEAD[1] and top["paper_head"].item() == GENE_HEAD[1] + 1
    assert top["head_p_fwer"].item() <= 0.05
    assert g.loc[g["reading"] == "max_of_max", "null_q95"].notna().all()
    assert g.loc[g["reading"] == "max_of_mean", "null_q95"].notna().all()  # its own null band (layers table)
    assert "max_head_mean_abs_diff" in panels["G"].caption


def test_a_gene_set_gives_panel_e_with_the_planted_head():
    profile = planted_profile()
    profile.meta["gene_sets"] = {"planted": ["g0", "g1", "g2", "g3"], "other": ["g5", "g6"]}
    panels = figure_panels(profile, "female", "male", permutations=999)
    e = panels["E"]
    assert e.missing is None and set(e.table["family"]) == {"set:planted"}  # the run's first gene set
    marked = e.extra["heads"][e.extra["heads"]["mean_abs_diff_fwer_le_0.05"]]
    assert set(zip(marked["layer"], marked["head"])) == {GENE_HEAD}
    other = figure_panels(profile, "female", "male", permutations=999, gene_set="other")["E"].extra["heads"]
    assert not other["mean_abs_diff_fwer_le_0.05"].any()  # nothing planted there


def test_missing_inputs_give_labelled_empty_panels(panels):
    assert "--gene-set NAME=FILE" in panels["E"].missing
    assert "--subset-by" in panels["F"].missing
    fig = panel_figure(panels["E"])
    text = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "no data" in text and "--gene-set" in text
    whole = draw_figure(panels, "test")
    assert sum(1 for ax in whole.axes if ax.texts and "no data" in ax.texts[0].get_text()) == 2


@pytest.fixture()
def run_folder(tmp_path):
    planted_profile().save(tmp_path / "profile.npz")
    (tmp_path / "run.json").write_text(json.dumps({"outputs": ["profile.npz", "run.json"], "complete": True}))
    return tmp_path


def test_command_writes_every_panel_and_says_which_are_empty(run_folder, capsys):
    assert main(["figure", str(run_folder)]) == 0
    err = capsys.readouterr().err
    assert "panel E is drawn empty" in err and "panel F is drawn empty" in err
    assert f"panels A-C show the first {W} positions" in err and "--map-bins N" in err
    out = run_folder / "figure"
    assert sorted(p.name for p in out.iterdir()) == sorted(outputs())
    record = json.loads((out / "figure.json").read_text())
    assert record["panels"]["E"]["missing"] and not record["panels"]["D"]["missing"]
    listed = json.loads((run_folder / "run.json").read_text())["outputs"]
    assert "figure/panel_D.csv" in listed  # the run's own outputs now
    d = pd.read_csv(out / "panel_D_heads.csv")
    assert set(d.loc[d["mean_abs_diff_fwer_le_0.05"], "head"]) == {GENE_HEAD[1]}
    assert "--gene-set" in pd.read_csv(out / "panel_E.csv")["missing"].item()  # said, not left out
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG" and not (out / "figure.pdf").exists()
    assert main(["figure", str(run_folder), "--head-a", "1:1", "--gallery", "0:0,1:2"]) == 0  # its own files
    a = pd.read_csv(out / "panel_A.csv")
    assert set(zip(a["layer"], a["head"])) == {(1, 1)}
    assert set(pd.read_csv(out / "panel_C.csv")["category"]) == {"chosen with --gallery"}


def test_command_never_writes_over_a_users_file(run_folder, capsys):
    out = run_folder / "mine"
    out.mkdir()
    (out / "panel_D.csv").write_text("my numbers\n")
    assert main(["figure", str(run_folder), "--out", str(out)]) == 2
    assert "panel_D.csv" in capsys.readouterr().err and (out / "panel_D.csv").read_text() == "my numbers\n"
    assert main(["figure", str(run_folder), "--out", str(out), "--overwrite", "--pdf"]) == 0
    assert (out / "panel_D.csv").read_text() != "my numbers\n"
    assert (out / "figure.pdf").read_bytes()[:4] == b"%PDF" and "figure.pdf" in json.loads(
        (out / "figure.json").read_text())["outputs"]


@pytest.mark.parametrize("argv, message", [
    (["--head-a", "5:0"], "--head-a 5:0 is out of range"),
    (["--head-b", "1"], "--head-b takes layer:head"),
    (["--gallery", "0:0,x"], "--gallery takes layer:head"),
    (["--within", "cell_type"], "--within takes KEY=VALUE"),
    (["--maps-by", "tissue"], "--maps-by 'tissue' is not a key"),
    (["--gene-set", "SDN"], "--gene-set 'SDN' is not a gene set"),
    (["--compare", "female", "nobody"], "nobody"),
    (["--within", "cell_type=Astro"], "--within cell_type=Astro: the profile's keys"),
    (["--gallery-group", "nobody"], "--gallery-group 'nobody' is not a value of"),
])  # fmt: skip
def test_bad_options_are_refused_naming_the_fix(run_folder, capsys, argv, message):
    assert main(["figure", str(run_folder), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (run_folder / "figure").exists()
