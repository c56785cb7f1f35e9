"""Shards and merge: profiles of parts of a dataset sum to the profile of the whole, in Python and on the CLI."""

from __future__ import annotations

import attnprof
import numpy as np
import pandas as pd
import pytest
from attnprof import Profile
from attnprof.cli import main
from attnprof.singlecell import (
    Vocabulary,
    profile_anndata,
    small_nicheformer,
    write_outputs,
)
from attnprof.singlecell.demo import (
    write_demo_inputs,
)
from helpers import assert_same_sums, demo_fixtures

adata, vocab, means, model = demo_fixtures(n_cells=48, n_genes=40, seed=3, context_length=40)


def run(model, data, vocab, means, **kw):
    options = dict(vocab=vocab, means=means, window=16, batch_size=8, chunk_size=16,
                   bucket_size=24, panel=["Esr1", "Ar"], backend="torch", progress=False)  # fmt: skip
    return profile_anndata(model, data, "sex", **{**options, **kw})


def test_shards_merge_to_the_whole_with_their_permutation_nulls(model, adata, vocab, means):
    whole = run(model, adata, vocab, means, permutations=2, seed=7)
    shards = [run(model, adata, vocab, means, permutations=2, seed=7, shard=(i, 3)) for i in range(3)]
    assert [sum(s.cells.values()) for s in shards] == [16, 16, 16]
    merged = attnprof.merge(shards)
    assert merged.cells == whole.cells == adata.obs["sex"].value_counts().to_dict()
    assert_same_sums(merged, whole)  # the nulls too: every shard slices the same global shuffles
    assert [s["shard"] for s in merged.meta["data"]["shards"]] == [[0, 3], [1, 3], [2, 3]]
    assert merged.meta["merged"] == 3


def test_subsets_of_the_cells_merge_to_the_whole(model, adata, vocab, means):
    """Shards need not be --shard: disjoint subsets (or files) of one dataset merge the same way."""
    whole = run(model, adata, vocab, means)
    glia = "cell_type in ['astrocyte', 'oligodendrocyte', 'microglia']"
    parts = [run(model, adata, vocab, means, subset=glia), run(model, adata, vocab, means, subset=f"not ({glia})")]
    assert parts[0].meta["data"] != parts[1].meta["data"]  # per-shard data meta differs and is not compared
    assert_same_sums(parts[0] + parts[1], whole)


def test_explicit_cell_selection_merges_to_the_whole(model, adata, vocab, means):
    """Two AnnData halves (e.g. two files): same model and options, so they merge."""
    first, second = adata[: len(adata) // 2].copy(), adata[len(adata) // 2 :].copy()
    whole = run(model, adata, vocab, means)
    assert_same_sums(attnprof.merge([run(model, first, vocab, means), run(model, second, vocab, means)]), whole)


def test_merge_refuses_what_does_not_add_up(model, adata, vocab, means):
    base = run(model, adata, vocab, means, shard=(0, 2))
    other = run(model, adata, vocab, means, shard=(1, 2))
    cases = {
        "model .*weights": run(small_nicheformer(vocab.n_tokens, seed=5, n_layers=2, context_length=40), adata,
                               vocab, means, shard=(1, 2)),  # fmt: skip
        r"different layout \(window: 16 vs 8;": run(model, adata, vocab, means, shard=(1, 2), window=8),
        r"different options \(options.tokenizer.context\)": run(model, adata, vocab, means, shard=(1, 2),
                                                                   species="human"),  # fmt: skip
        "share 24 cells": base,
    }
    for message, bad in cases.items():
        with pytest.raises(ValueError, match=message):
            attnprof.merge([base, other, bad])
    # shards of a permutation run must shuffle with the same seed, or their nulls do not add up
    with pytest.raises(ValueError, match=r"options \(options.permutations.seed\)"):
        run(model, adata, vocab, means, shard=(0, 2), permutations=1) + run(
            model, adata, vocab, means, shard=(1, 2), permutations=1, seed=1
        )
    merged = attnprof.merge([base, other])  # and the good pair still merges
    assert sum(merged.cells.values()) == len(adata)


def test_merge_refuses_another_vocabulary(model, adata, vocab, means):
    base = run(model, adata, vocab, means, shard=(0, 2))
    genes = list(vocab.genes)
    genes[0], genes[1] = genes[1], genes[0]  # same size, another order: token ids mean other genes
    with pytest.raises(ValueError, match="different layout.*genes.*vocabulary mismatch"):
        base + run(model, adata, Vocabulary(genes), means, shard=(1, 2))


# ------------------------------------------------------------ permutations
def test_permutation_p_values_reach_the_run_tables(model, adata, vocab, means, tmp_path):
    profile = run(model, adata, vocab, means, permutations=3, seed=1)
    assert len(profile.null) == 3
    for null in profile.null:  # a shuffle of the labels keeps the group sizes
        np.testing.assert_array_equal(null["cells"], profile.sums["cells"])
    assert not np.array_equal(profile.null[0]["recv_sum"], profile.sums["recv_sum"])
    again = run(model, adata, vocab, means, permutations=3, seed=1)
    np.testing.assert_array_equal(again.null[2]["pos_sum"], profile.null[2]["pos_sum"])  # the seed fixes them
    write_outputs(profile, "female", "male", tmp_path, figures=False)
    for table in ("heads", "layers"):
        frame = pd.read_csv(tmp_path / "tables" / f"{table}.csv")
        for column in ("p_perm_mean_abs_diff", "p_perm_max_abs_diff"):
            assert frame[column].between(1 / 4, 1).all(), (table, column)  # (1 + count) / (1 + N), N = 3
    assert Profile.load(tmp_path / "profile.npz").meta["contrast"]["permutations"] == 3


# ---------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_demo_inputs(tmp_path_factory.mktemp("inputs"), n_cells=40, n_genes=40, seed=6)


def run_cli(inputs, out, *extra):
    argv = ["run", str(inputs["data.h5ad"]), "--groupby", "sex", "--model", str(inputs["model.ckpt"]),
            "--vocab", str(inputs["vocab.txt"]), "--means", str(inputs["means.npy"]), "--window", "16",
            "--batch-size", "8", "--permutations", "2", "--out", str(out), "--no-figures", "--quiet",
            *extra]  # fmt: skip
    assert main(argv) == 0


def test_cli_shards_merge_to_the_single_run(inputs, tmp_path, capsys):
    run_cli(inputs, tmp_path / "whole")
    for i in range(2):
        run_cli(inputs, tmp_path / f"shard{i}", "--shard", f"{i}/2")
    capsys.readouterr()
    argv = ["merge", str(tmp_path / "shard0"), str(tmp_path / "shard1" / "profile.npz"),
            "-o", str(tmp_path / "all.npz"), "--out", str(tmp_path / "merged"), "--no-figures"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "merged 2 profiles: 40 cells (female 20, male 20)" in out and "female − male" in out
    whole = Profile.load(tmp_path / "whole" / "profile.npz")
    assert_same_sums(Profile.load(tmp_path / "all.npz"), whole)
    assert_same_sums(Profile.load(tmp_path / "merged" / "profile.npz"), whole)
    for table in ("heads", "layers"):
        merged = pd.read_csv(tmp_path / "merged" / "tables" / f"{table}.csv")
        single = pd.read_csv(tmp_path / "whole" / "tables" / f"{table}.csv")
        assert {"p_perm_mean_abs_diff", "p_perm_max_abs_diff"} <= set(merged.columns)
        pd.testing.assert_frame_equal(merged, single, rtol=1e-9)


def test_cli_merge_needs_a_destination_and_names_the_misfit(inputs, tmp_path, capsys):
    run_cli(inputs, tmp_path / "a", "--shard", "0/2")
    run_cli(inputs, tmp_path / "b", "--shard", "1/2", "--window", "8")
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "say where to write: -o FILE" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "all.npz")]) == 2
    err = capsys.readouterr().err
    assert f"cannot merge {tmp_path / 'b' / 'profile.npz'} into" in err and "window: 16 vs 8" in err
    assert not (tmp_path / "all.npz").exists()
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "a" / "profile.npz"), "-o", str(tmp_path / "x")]) == 2
    assert "is given twice" in capsys.readouterr().err


def test_cli_merge_refuses_any_overlap_naming_both_inputs_and_the_shared_cells(inputs, tmp_path):
    """A whole run with one of its own shards, or two overlapping subsets: refused with the count of shared
    cells (per-cell identities stored in each profile), and nothing is written."""
    import subprocess
    import sys

    run_cli(inputs, tmp_path / "whole")
    run_cli(inputs, tmp_path / "shard1", "--shard", "1/2")
    # 1 female and 4 male cells: below the default --min-cells, so it is lowered to write the tables
    run_cli(inputs, tmp_path / "subset", "--subset", "cell_type in ['neuron', 'astrocyte']", "--compare",
            "female", "male", "--min-cells", "1")  # fmt: skip
    whole = Profile.load(tmp_path / "whole" / "profile.npz")
    shard = Profile.load(tmp_path / "shard1" / "profile.npz")
    subset = Profile.load(tmp_path / "subset" / "profile.npz")
    assert len(whole.cell_ids) == 40 and len(shard.cell_ids) == 20  # 8 bytes per counted cell
    assert np.all(np.diff(whole.cell_ids.astype(np.float64)) >= 0) and set(shard.cell_ids) <= set(whole.cell_ids)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    argv = [sys.executable, "-m", "attnprof.cli", "merge", str(tmp_path / "whole"), str(tmp_path / "shard1"),
            "-o", str(tmp_path / "merged.npz"), "--out", str(tmp_path / "merged")]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert (f"{tmp_path / 'whole' / 'profile.npz'} and {tmp_path / 'shard1' / 'profile.npz'} share 20 cells"
            in done.stderr and "count them twice" in done.stderr)  # fmt: skip
    shared = len(set(subset.cell_ids) & set(shard.cell_ids))
    assert 0 < shared < len(subset.cell_ids)  # overlapping subsets, neither inside the other
    assert main(["merge", str(tmp_path / "shard1"), str(tmp_path / "subset"), "-o", str(tmp_path / "m.npz")]) == 2
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written
    with pytest.raises(ValueError, match=f"share {shared} cells"):
        attnprof.merge([shard, subset])
