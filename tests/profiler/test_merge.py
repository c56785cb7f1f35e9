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


def test_shards_merge_to_the_whole_block_by_block(model, adata, vocab, means):
    """Pseudo-replicates are dealt over all selected cells before sharding: the shards add up exactly."""
    whole = run(model, adata, vocab, means, seed=7)
    shards = [run(model, adata, vocab, means, seed=7, shard=(i, 3)) for i in range(3)]
    assert [sum(s.cells.values()) for s in shards] == [16, 16, 16]
    merged = attnprof.merge(shards)
    assert merged.cells == whole.cells == adata.obs["sex"].value_counts().to_dict()
    assert_same_sums(merged, whole)
    assert [s["shard"] for s in merged.meta["data"]["shards"]] == [[0, 3], [1, 3], [2, 3]]
    assert merged.meta["merged"] == 3


def test_shards_that_split_animals_merge_to_the_whole(model, adata, vocab, means):
    whole = run(model, adata, vocab, means, replicate="animal")
    shards = [run(model, adata, vocab, means, replicate="animal", shard=(i, 3)) for i in range(3)]
    split = [set(adata.obs["animal"].iloc[i::3]) for i in range(3)]
    assert set.intersection(*split)  # some animal's cells lie in every shard
    merged = attnprof.merge(shards)
    assert merged.blocks == whole.blocks and merged.replicates == whole.replicates == {"female": 6, "male": 6}
    assert_same_sums(merged, whole)
    pd.testing.assert_frame_equal(merged.compare("female", "male", min_cells=2).heads,
                                  whole.compare("female", "male", min_cells=2).heads)  # fmt: skip


def test_subsets_of_the_cells_merge_to_the_whole(model, adata, vocab, means):
    """Shards need not be --shard: disjoint subsets (or files) of one dataset merge the same way; their
    replicate blocks unite by name (exactly the whole's), pseudo-replicates add up group by group."""
    glia = "cell_type in ['astrocyte', 'oligodendrocyte', 'microglia']"
    by_animal = [run(model, adata, vocab, means, replicate="animal", subset=s) for s in (glia, f"not ({glia})")]
    assert by_animal[0].meta["data"] != by_animal[1].meta["data"]  # per-shard data meta differs and is not compared
    assert_same_sums(by_animal[0] + by_animal[1], run(model, adata, vocab, means, replicate="animal"))
    parts = [run(model, adata, vocab, means, subset=s) for s in (glia, f"not ({glia})")]
    merged, whole = (parts[0] + parts[1]).group_sums(), run(model, adata, vocab, means).group_sums()
    for name in whole:
        np.testing.assert_allclose(merged[name], whole[name], rtol=1e-12, err_msg=name)


def test_explicit_cell_selection_merges_to_the_whole(model, adata, vocab, means):
    """Two AnnData halves (e.g. two files, each with some of the animals): same model and options, so they merge."""
    first, second = adata[: len(adata) // 2].copy(), adata[len(adata) // 2 :].copy()
    whole = run(model, adata, vocab, means, replicate="animal")
    halves = [run(model, part, vocab, means, replicate="animal") for part in (first, second)]
    assert_same_sums(attnprof.merge(halves), whole)


def test_a_replicate_in_two_groups_is_refused(model, adata, vocab, means):
    bad = adata.copy()
    bad.obs["animal"] = bad.obs["animal"].astype(str)
    bad.obs.loc[bad.obs_names[0], "animal"] = "M1" if bad.obs["sex"].iloc[0] == "female" else "F1"
    with pytest.raises(ValueError, match="animal '[FM]1' has cells in group 'female' and 'male'"):
        run(model, bad, vocab, means, replicate="animal")
    # the same across profiles: one file calls M1 female
    half = adata[:24].copy()
    half.obs["sex"] = half.obs["sex"].astype(str)
    half.obs.loc[half.obs["animal"] == "M1", "sex"] = "female"
    if (half.obs["animal"] == "M1").any():
        other = run(model, half, vocab, means, replicate="animal")
        with pytest.raises(ValueError, match="replicate 'M1' is in group code"):
            other + run(model, adata[24:].copy(), vocab, means, replicate="animal")


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
    # shards must deal their pseudo-replicates with the same seed, or their blocks do not add up
    with pytest.raises(ValueError, match=r"options \(options.blocks.seed\)"):
        run(model, adata, vocab, means, shard=(0, 2)) + run(model, adata, vocab, means, shard=(1, 2), seed=1)
    merged = attnprof.merge([base, other])  # and the good pair still merges
    assert sum(merged.cells.values()) == len(adata)


def test_merge_refuses_another_vocabulary(model, adata, vocab, means):
    base = run(model, adata, vocab, means, shard=(0, 2))
    genes = list(vocab.genes)
    genes[0], genes[1] = genes[1], genes[0]  # same size, another order: token ids mean other genes
    with pytest.raises(ValueError, match="vocabulary"):  # the tokenizer's vocabulary digest differs
        base + run(model, adata, Vocabulary(genes), means, shard=(1, 2))
    with pytest.raises(ValueError, match="different layout.*genes.*vocabulary mismatch"):  # every id kept
        run(model, adata, vocab, means, shard=(0, 2), all_genes=True) + run(
            model, adata, Vocabulary(genes), means, shard=(1, 2), all_genes=True)


# ------------------------------------------------------------ permutations
def test_permutation_p_values_reach_the_run_tables(model, adata, vocab, means, tmp_path):
    profile = run(model, adata, vocab, means, replicate="animal")
    write_outputs(profile, "female", "male", tmp_path, min_cells=2, permutations=3, seed=1, figures=False)
    for table in ("heads", "layers"):
        frame = pd.read_csv(tmp_path / "tables" / f"{table}.csv")
        for column in ("p_perm_mean_abs_diff", "p_perm_max_abs_diff", "p_fwer_mean_abs_diff"):
            assert frame[column].between(1 / 4, 1).all(), (table, column)  # (1 + count) / (1 + N), N = 3
    contrast = Profile.load(tmp_path / "profile.npz").meta["contrast"]
    assert contrast["permutations"] == 3 and contrast["unit"] == "replicate" and contrast["seed"] == 1


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
