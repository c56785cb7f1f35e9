"""Every group and subset in one profile: ``--subset-by`` blocks, views, contrasts within a subset, gene sets
and ``attnprof compare`` — each checked against a run made the other way (same cells, same model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attnprof import merge
from attnprof.blocks import design_blocks
from attnprof.cli import main
from attnprof.profile import Profile
from attnprof.singlecell.run import profile_anndata

from helpers import demo_fixtures

adata, vocab, means, model = demo_fixtures(n_cells=120, n_genes=80, seed=3, context_length=64)
SEX_BIASED = ["Esr1", "Pgr", "Ar", "Gal"]


def run(model, adata, vocab, means, groupby="sex", **kw):
    return profile_anndata(model, adata, groupby, vocab=vocab, means=means, progress=False, backend="torch", **kw)


@pytest.fixture(scope="module")
def full(model, adata, vocab, means):
    """Grouped by sex, kept apart by cell type, replicates = animals."""
    return run(model, adata, vocab, means, replicate="animal", subset_by=["cell_type"])


def assert_same(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for k in expected:
        np.testing.assert_allclose(actual[k], expected[k], rtol=1e-12, atol=1e-15, err_msg=k)


def test_blocks_split_by_subset_and_every_cell_lands_in_its_own():
    rng = np.random.default_rng(0)
    codes, ct = rng.integers(0, 2, 50), rng.choice(["x", "y", "z"], 50)
    for replicates in (None, np.where(codes == 0, "a", "b") + rng.choice(["1", "2"], 50)):
        blocks, cell = design_blocks(codes, ["f", "m"], replicates, per_group=3, subsets={"ct": ct})
        assert np.array_equal(np.asarray(blocks.group)[cell], codes)
        assert np.array_equal(blocks.subset_values("ct")[cell], ct)
        if replicates is not None:
            assert np.array_equal(np.asarray(blocks.names)[cell], replicates)
        else:  # every (group, subset) present has all its pseudo-replicates, each cell dealt evenly within it
            assert blocks.per_group == 3
            for g in range(2):
                for v in "xyz":
                    n = np.bincount(cell[(codes == g) & (ct == v)], minlength=len(blocks))
                    held = n[n > 0]
                    assert held.max() - held.min() <= 1


def test_view_within_a_subset_equals_a_run_on_that_subset(full, model, adata, vocab, means):
    for cell_type in ("astrocyte", "microglia"):
        alone = run(model, adata, vocab, means, replicate="animal", subset=f"cell_type == '{cell_type}'")
        view = full.view(within={"cell_type": cell_type})
        assert view.blocks == alone.blocks and view.groups == alone.groups
        assert_same(view.sums, alone.sums)


def test_view_of_all_cells_equals_a_run_without_subsets(full, model, adata, vocab, means):
    plain = run(model, adata, vocab, means, replicate="animal")
    assert full.replicates == plain.replicates  # an animal split by cell type counts once
    assert full.view().blocks == plain.blocks
    assert_same(full.view().sums, plain.sums)


def test_view_by_a_subset_key_equals_a_run_grouped_by_it(full, model, adata, vocab, means):
    by_type = run(model, adata, vocab, means, groupby="cell_type", subset_by=None)
    view = full.view("cell_type")
    assert view.groups == by_type.groups and view.cells == by_type.cells
    assert_same(view.group_sums(), by_type.group_sums())  # pseudo blocks differ; groups add the same cells


def test_pseudo_replicate_views_add_up_to_groups(model, adata, vocab, means):
    pseudo = run(model, adata, vocab, means, subset_by=["cell_type"])
    alone = run(model, adata, vocab, means, subset="cell_type == 'astrocyte'")
    view = pseudo.view(within={"cell_type": "astrocyte"})
    assert view.blocks.per_group == alone.blocks.per_group
    assert_same(view.group_sums(), alone.group_sums())


def test_shards_with_subsets_merge_to_one_run(full, model, adata, vocab, means):
    shards = [run(model, adata, vocab, means, replicate="animal", subset_by=["cell_type"], shard=(i, 2))
              for i in range(2)]  # fmt: skip
    merged = merge(shards)
    assert merged.blocks == full.blocks
    assert_same(merged.sums, full.sums)


def test_subsets_survive_save_and_load(full, tmp_path):
    loaded = Profile.load(full.save(tmp_path / "p.npz"))
    assert loaded.blocks == full.blocks and loaded.keys() == full.keys()


def test_compare_within_equals_compare_of_the_subset_run(full, model, adata, vocab, means):
    alone = run(model, adata, vocab, means, replicate="animal", subset="cell_type == 'excitatory neuron'")
    kw = dict(min_cells=2, permutations=50, seed=1)
    mine = full.compare("female", "male", within={"cell_type": "excitatory neuron"}, **kw)
    theirs = alone.compare("female", "male", **kw)
    for name, table in theirs.tables().items():
        assert mine.tables()[name].equals(table), name
    assert "within cell_type = excitatory neuron" in mine.design()


def test_crossed_replicates_are_refused_for_a_replicate_test(full):
    with pytest.raises(ValueError, match="have cells in both cell_type 'astrocyte' and 'microglia'"):
        full.compare("astrocyte", "microglia")
    assert full.compare("astrocyte", "microglia", unit="cell", permutations=0, min_cells=2).unit == "cell"


def test_unknown_keys_and_values_are_named(full):
    with pytest.raises(ValueError, match="'tissue' is not a key of this profile"):
        full.view(within={"tissue": "brain"})
    with pytest.raises(ValueError, match="cell_type has no value 'neuron'"):
        full.view(within={"cell_type": "neuron"})


def test_gene_set_family_is_the_gene_family_restricted_to_the_set(full):
    c = full.compare("female", "male", min_cells=2, permutations=30, gene_sets={"sdn": SEX_BIASED})
    genes = c.genes[c.genes["gene"].isin(SEX_BIASED)]  # the genes table: every valid gene's D, independently
    heads = c.heads[c.heads["family"] == "set:sdn"].set_index(["layer", "head"])
    assert len(heads) == len(full.layers) * full.n_heads and genes["gene"].nunique() > 1
    for (layer, head), g in genes.groupby(["layer", "head"]):
        row = heads.loc[(layer, head)]
        assert row["n_elements"] == len(g)
        np.testing.assert_allclose(row["mean_abs_diff"], g["diff"].abs().mean(), rtol=1e-12)
        np.testing.assert_allclose(row["max_abs_diff"], g["diff"].abs().max(), rtol=1e-12)
        assert row["where"] == g.loc[g["diff"].abs().idxmax(), "gene"]
    assert heads["p_fwer_mean_abs_diff"].between(0, 1).all()
    layers = c.layers[c.layers["family"] == "set:sdn"]
    np.testing.assert_allclose(layers["mean_abs_diff"], heads.groupby("layer")["mean_abs_diff"].mean(), rtol=1e-12)


def test_gene_sets_are_checked(full, model, adata, vocab, means):
    with pytest.warns(UserWarning, match="1 of its 3 genes are not among the profile's genes"):
        full.compare("female", "male", min_cells=2, permutations=0, gene_sets={"s": ["Esr1", "Pgr", "Nope1"]})
    with pytest.raises(ValueError, match="gene set 's' has no gene among the profile's genes"):
        full.compare("female", "male", permutations=0, gene_sets={"s": ["Nope1"]})
    with pytest.raises(ValueError, match="gene set 's' holds none of the run's genes"):
        run(model, adata, vocab, means, gene_sets={"s": ["Nope1"]})


# ------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    from attnprof.singlecell.demo import write_demo_inputs

    root = tmp_path_factory.mktemp("subsets")
    inputs = write_demo_inputs(root / "inputs", n_cells=120, n_genes=80, seed=3)
    (root / "sdn.txt").write_text("\n".join(SEX_BIASED) + "\n")
    out = root / "run"
    code = main(["run", str(inputs["data.h5ad"]), "--groupby", "cell_type", "--compare", "astrocyte", "microglia",
                 "--model", str(inputs["model.ckpt"]), "--vocab", str(inputs["vocab.txt"]),
                 "--means", str(inputs["means.npy"]), "--subset-by", "sex", "--gene-set", f"SDN={root / 'sdn.txt'}",
                 "--min-cells", "2", "--permutations", "20", "--no-figures", "--quiet", "--out", str(out)])  # fmt: skip
    assert code == 0
    return out


def test_run_keeps_every_group_and_the_gene_sets(run_folder):
    profile = Profile.load(run_folder / "profile.npz")
    assert profile.groups[:2] == ["astrocyte", "microglia"] and len(profile.groups) == 5
    assert profile.keys()["sex"] == ["female", "male"]
    heads = (run_folder / "tables" / "heads.csv").read_text()
    assert "set:SDN" in heads


def test_compare_writes_any_pair_within_a_subset(run_folder, capsys):
    code = main(["compare", str(run_folder), "oligodendrocyte", "excitatory neuron", "--within", "sex=female",
                 "--min-cells", "2", "--permutations", "10", "--no-figures"])  # fmt: skip
    assert code == 0
    out = run_folder / "compare" / "oligodendrocyte_vs_excitatory_neuron_within_sex=female"
    record = json.loads((out / "run.json").read_text())
    assert record["contrast"] == ["oligodendrocyte", "excitatory neuron"] and record["within"] == {"sex": "female"}
    assert (out / "tables" / "heads.csv").is_file() and not (out / "profile.npz").exists()
    profile = Profile.load(run_folder / "profile.npz")
    expected = profile.compare("oligodendrocyte", "excitatory neuron", within={"sex": "female"}, min_cells=2,
                               permutations=10, seed=0).heads  # fmt: skip
    written = __import__("pandas").read_csv(out / "tables" / "heads.csv")
    np.testing.assert_allclose(written["mean_abs_diff"], expected["mean_abs_diff"], rtol=1e-9)
    # a second time refuses to write over it, --overwrite replaces it
    assert main(["compare", str(run_folder), "oligodendrocyte", "excitatory neuron", "--within", "sex=female",
                 "--min-cells", "2", "--permutations", "0", "--no-figures"]) == 2  # fmt: skip
    assert "--overwrite" in capsys.readouterr().err


def test_compare_names_bad_keys_and_values(run_folder, capsys):
    assert main(["compare", str(run_folder), "astrocyte", "microglia", "--within", "tissue=brain"]) == 2
    assert "'tissue' is not a key of this profile" in capsys.readouterr().err
    assert main(["compare", str(run_folder), "astrocyte", "microglia", "--within", "sex"]) == 2
    assert "give KEY=VALUE" in capsys.readouterr().err
    assert main(["compare", str(run_folder), "astrocyte", "nope"]) == 2
    assert "unknown group 'nope'" in capsys.readouterr().err


def test_the_memory_estimate_is_the_profiles_size_and_too_much_is_refused_first(full, model, adata, vocab, means,
                                                                                monkeypatch):  # fmt: skip
    from attnprof.singlecell import budget

    panel, (modules, _) = len(full.panel), budget.attention_shape(model)
    estimate = budget.sums_bytes(model, len(full.blocks), full.window, len(full.genes), panel)
    # per attention module exactly the profile's bytes per layer (a module the forward never calls, such as
    # Nicheformer's encoder_layer prototype, is counted too: the estimate errs on the safe side)
    assert estimate / modules == sum(v.nbytes for v in full.sums.values()) / len(full.layers)
    monkeypatch.setattr(budget, "MEMORY_SHARE", 1e-9)
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(ValueError, match=r"the run's sums would take .* blocks x .*fewer --subset-by keys"):
        run(model, adata, vocab, means, replicate="animal", subset_by=["cell_type"])
