"""Several technologies in one run: per-cell context from obs columns, each cell divided by its technology's means.

The reference is upstream's own practice: theislab/nicheformer tokenizes each technology alone (one
tokenization notebook, or one ``NicheformerDataset``, per technology) with that technology's published
``data/model_means/*_mean_script.npy`` and its own obs context. So a mixed AnnData must give, cell for cell,
the tokens of each technology tokenized alone with its own run-wide options, on both upstream paths.
"""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import attnprof
from attnprof import Profile
from attnprof.cli import main
from attnprof.singlecell import profile_anndata, small_nicheformer
from attnprof.singlecell.demo import write_demo_inputs
from attnprof.singlecell.nicheformer.technologies import PUBLISHED_MEANS, published_folder
from attnprof.singlecell.nicheformer.tokenizer import Tokenizer, tokenize_anndata

NAN = np.nan
N_GENES = 40
VOCAB = [f"g{i}" for i in range(N_GENES)]
CONTEXT_LENGTH = 24
# one dataset per upstream notebook: the obs values it tokenizes, and the published file it divides by
TECHNOLOGIES = {
    "merfish_mean_script.npy": {"organism": "Mus musculus", "assay": "MERFISH", "modality": "spatial"},
    "cosmx_mean_script.npy": {"organism": "Homo sapiens", "assay": "NanoString digital spatial profiling",
                              "modality": "spatial"},  # cosmx_human_lung.ipynb
    "xenium_mean_script.npy": {"organism": "Homo sapiens", "assay": "Xenium", "modality": "spatial"},
    "dissociated_mean_script.npy": {"organism": "Mus musculus", "assay": "10x transcription profiling",
                                    "modality": "dissociated"},  # scRNAseq_mouse_brain_haviv.ipynb
}  # fmt: skip
# means as published files hold them: NaN, zeros, negatives, fractions the notebooks round
MEAN_VALUES = [NAN, 0.0, 1.0, 2.0, 2.5, 0.4, -3.6, -0.3, 1e-3, 4.0, 7.7, 1.49]


def published_means(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(MEAN_VALUES, N_GENES)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder like data/model_means/: the four paired files, plus iss_mean_script.npy (no assay token)."""
    path = tmp_path_factory.mktemp("model_means")
    for seed, name in enumerate([*TECHNOLOGIES, "iss_mean_script.npy"]):
        np.save(path / name, published_means(seed))
    return path


def mixed_data(sparse: bool, n_per: int = 7, seed: int = 0) -> ad.AnnData:
    """Cells of the four technologies interleaved (chunks mix them), tie-heavy counts, one empty cell each,
    the genes shuffled plus one outside the vocabulary."""
    rng = np.random.default_rng(seed)
    n = n_per * len(TECHNOLOGIES)
    counts = rng.integers(0, 4, (n, N_GENES)) * (rng.random((n, N_GENES)) < 0.7)
    tech = rng.permutation(np.repeat(np.arange(len(TECHNOLOGIES)), n_per))
    for t in range(len(TECHNOLOGIES)):
        counts[np.flatnonzero(tech == t)[0]] = 0
    perm = rng.permutation(N_GENES)
    X = np.concatenate([counts[:, perm], np.full((n, 1), 5)], axis=1).astype(np.float32)
    obs = pd.DataFrame([list(TECHNOLOGIES.values())[t] for t in tech], index=[f"c{i}" for i in range(n)])
    obs["file"] = [list(TECHNOLOGIES)[t] for t in tech]
    var = pd.DataFrame(index=[VOCAB[i] for i in perm] + ["outside"])
    return ad.AnnData(X=sp.csr_matrix(X) if sparse else X, obs=obs.astype("category"), var=var)


def tokens(adata, means, tokenization, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the gene outside the vocabulary, iss_mean_script.npy left out
        return tokenize_anndata(adata, VOCAB, means, context_length=CONTEXT_LENGTH, tokenization=tokenization,
                                chunk_size=5, **kw)  # fmt: skip


PER_CELL = dict(species_key="organism", assay_key="assay", modality_key="modality")


@pytest.mark.parametrize("tokenization", ["notebook", "dataset"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_mixed_tokens_equal_each_technology_alone(folder, tokenization, sparse):
    adata = mixed_data(sparse)
    mixed = tokens(adata, folder, tokenization, **PER_CELL)
    for name, obs in TECHNOLOGIES.items():
        alone = adata.obs["file"] == name
        expected = tokens(adata[alone.to_numpy()].copy(), folder / name, tokenization, species=obs["organism"],
                          assay=obs["assay"], modality=obs["modality"])  # fmt: skip
        np.testing.assert_array_equal(mixed[alone.to_numpy()], expected, err_msg=name)
    # the technologies' means differ where it shows: dividing every cell by one file gives other tokens
    one_file = tokens(adata, folder / "merfish_mean_script.npy", tokenization, **PER_CELL)
    assert not np.array_equal(one_file, mixed)


def test_the_means_forms_agree_and_rows_pick_their_context(folder):
    adata = mixed_data(sparse=True)
    by_folder = tokens(adata, folder, "dataset", **PER_CELL)
    pairs = [f"{obs['assay']}={folder / name}" for name, obs in TECHNOLOGIES.items() if obs["modality"] == "spatial"]
    by_pairs = tokens(adata, [*pairs, f"dissociated={folder / 'dissociated_mean_script.npy'}"], "dataset", **PER_CELL)
    mapping = {"MERFISH": np.load(folder / "merfish_mean_script.npy"), 8: folder / "cosmx_mean_script.npy",
               "9": folder / "xenium_mean_script.npy", "Dissociated": folder / "dissociated_mean_script.npy"}  # fmt: skip
    by_mapping = tokens(adata, mapping, "dataset", **PER_CELL)
    np.testing.assert_array_equal(by_pairs, by_folder)
    np.testing.assert_array_equal(by_mapping, by_folder)
    # ids instead of names, as the notebooks' obs.replace leaves them (a column with NaN once holds floats)
    ids = adata.copy()
    ids.obs["assay"] = ids.obs["assay"].map({"MERFISH": 7, "NanoString digital spatial profiling": 8, "Xenium": 9,
                                             "10x transcription profiling": 15.0}).astype(float)  # fmt: skip
    ids.obs["organism"] = ids.obs["organism"].map({"Homo sapiens": "5", "Mus musculus": "MOUSE"})
    np.testing.assert_array_equal(tokens(ids, folder, "dataset", **PER_CELL), by_folder)
    rows = np.array([1, 2, 6, 11, 12, 20, 27])  # chunks of 5 rows read only some cells: each keeps its context
    np.testing.assert_array_equal(tokens(adata, folder, "dataset", rows=rows, **PER_CELL), by_folder[rows])


def test_an_assay_entry_comes_before_the_dissociated_one(folder):
    adata = mixed_data(sparse=False)
    dissociated = (adata.obs["modality"] == "dissociated").to_numpy()
    own = {"dissociated": folder / "dissociated_mean_script.npy",
           "10x 3' transcription profiling": folder / "cosmx_mean_script.npy"}  # fmt: skip
    got = tokens(adata[dissociated].copy(), own, "notebook", **PER_CELL)
    expected = tokens(adata[dissociated].copy(), folder / "cosmx_mean_script.npy", "notebook", **PER_CELL)
    np.testing.assert_array_equal(got, expected)


def test_settings_record_the_keys_and_each_technologys_file(folder):
    tok = Tokenizer(VOCAB, folder, assay_key="assay", modality_key="modality")
    settings = tok.settings()
    assert settings["context_keys"] == {"species": None, "assay": "assay", "modality": "modality"}
    assert {k: v["file"] for k, v in settings["means"].items()} == {v: k for k, v in PUBLISHED_MEANS.items()}
    changed = dict(published_folder(folder), Xenium=published_means(99))
    other = Tokenizer(VOCAB, changed, assay_key="assay", modality_key="modality").settings()
    assert other["means"]["Xenium"]["digest"] != settings["means"]["Xenium"]["digest"]
    assert other["means"]["CosMx"] == settings["means"]["CosMx"]
    # one file, no keys: the settings of before (profiles still merge with older ones)
    single = Tokenizer(VOCAB, folder / "merfish_mean_script.npy").settings()
    assert isinstance(single["means"], str) and "context_keys" not in single
    assert single == Tokenizer(VOCAB, [str(folder / "merfish_mean_script.npy")]).settings()


# ------------------------------------------------------------ refused before the run
@pytest.mark.filterwarnings("ignore:1 of the data's 41 genes are not in the vocabulary")
def test_unknown_missing_and_uncovered_values_are_refused_before_any_cell(folder):
    adata = mixed_data(sparse=True)
    model = small_nicheformer(len(VOCAB) + 30, context_length=CONTEXT_LENGTH)
    model.forward = lambda *a, **k: pytest.fail("the model ran before the check")
    adata.obs["sex"] = np.where(np.arange(adata.n_obs) % 2, "female", "male")
    run = dict(vocab=VOCAB, means=folder, progress=False, window=8, **PER_CELL)

    bad = adata.copy()
    bad.obs["assay"] = bad.obs["assay"].cat.add_categories(["seqFISH", "Visium HD"])
    bad.obs.iloc[[0, 3], bad.obs.columns.get_loc("assay")] = "seqFISH"
    bad.obs.iloc[5, bad.obs.columns.get_loc("assay")] = "Visium HD"
    with pytest.raises(ValueError, match=r"obs\['assay'\] holds 2 values that are no Nicheformer assay \(3 cells\): "
                       r"\['seqFISH', 'Visium HD'\]; accepted, by name \(any case\) or id: MERFISH \(7\)"):
        profile_anndata(model, bad, "sex", **run)
    bad = adata.copy()
    bad.obs["organism"] = bad.obs["organism"].astype(object)
    bad.obs.iloc[2, bad.obs.columns.get_loc("organism")] = None
    with pytest.raises(ValueError, match=r"obs\['organism'\] has no species for 1 cells \(missing values\)"):
        profile_anndata(model, bad, "sex", **run)
    with pytest.raises(ValueError, match=r"obs has no column 'tech' for the assay of each cell \(--assay-key\)"):
        profile_anndata(model, adata, "sex", **{**run, "assay_key": "tech"})
    without_xenium = {k: v for k, v in published_folder(folder).items() if k != "Xenium"}
    n_xenium = int((adata.obs["assay"] == "Xenium").sum())
    with pytest.raises(ValueError, match=rf"no technology means for {n_xenium} spatial cells of assay 'Xenium' "
                       r"\(means are given for: CosMx, dissociated, MERFISH\): add the file of their technology, "
                       r"e.g. --means \"Xenium=FILE\""):  # fmt: skip
        profile_anndata(model, adata, "sex", **{**run, "means": without_xenium})
    with pytest.raises(ValueError, match="no technology means for 1 spatial cells of assay 'Xenium'"):
        Tokenizer(VOCAB, without_xenium, assay="Xenium")  # run-wide context: at once


def test_means_options_that_cannot_work_are_refused(folder, tmp_path):
    with pytest.raises(ValueError, match=r"unknown technology 'iss' for a means file: name an assay"):
        Tokenizer(VOCAB, [f"iss={folder / 'iss_mean_script.npy'}"])
    with pytest.raises(ValueError, match=r"--means names 'Xenium' twice"):
        Tokenizer(VOCAB, [str(folder), f"9={folder / 'xenium_mean_script.npy'}"])
    with pytest.raises(ValueError, match=r"names 'CosMx' twice \(key 'cosmx' and key 8\)"):
        Tokenizer(VOCAB, {"cosmx": np.ones(N_GENES), 8: np.ones(N_GENES)})
    # a file without technology covers the cells without their own entry
    fallback = Tokenizer(VOCAB, {None: np.full(N_GENES, 2.0), "Xenium": np.ones(N_GENES)}, assay="CosMx")
    assert list(fallback.settings()["means"]) == ["default", "Xenium"]
    with pytest.raises(ValueError, match="holds none of Nicheformer's published means files"):
        Tokenizer(VOCAB, tmp_path)  # empty still
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the published folder's iss_mean_script.npy (no assay token) is left out quietly
        assert "ISS" not in str(Tokenizer(VOCAB, folder).settings()["means"])
    for name in ("merfish_mean_script.npy", "seqfish_mean_script.npy"):
        np.save(tmp_path / name, published_means(0))
    with pytest.warns(UserWarning, match=r"1 means files are not Nicheformer's published ones and are left out "
                      r"\(seqfish_mean_script.npy\); pair each with the assay token its cells carry"):
        assert list(Tokenizer(VOCAB, tmp_path).settings()["means"]) == ["MERFISH"]


# ------------------------------------------------------------ the command line, end to end
def test_cli_run_with_assay_and_modality_keys_and_a_means_folder(tmp_path, capsys):
    inputs = write_demo_inputs(tmp_path / "inputs", n_cells=24, n_genes=40, seed=2)
    adata = ad.read_h5ad(inputs["data.h5ad"])
    adata.obs["tech"] = pd.Categorical(np.array(["MERFISH", "9", "10x 3' v3"])[np.arange(24) % 3])
    adata.obs["mod"] = np.where(np.arange(24) % 3 == 2, "dissociated", "spatial")
    adata.write_h5ad(tmp_path / "mixed.h5ad")
    means = np.load(inputs["means.npy"])
    folder = tmp_path / "model_means"
    folder.mkdir()
    for scale, name in enumerate(["merfish", "xenium", "dissociated"], start=1):
        np.save(folder / f"{name}_mean_script.npy", means * scale + (scale == 2) * np.arange(len(means)))
    argv = ["run", str(tmp_path / "mixed.h5ad"), "--groupby", "sex", "--model", str(inputs["model.ckpt"]),
            "--vocab", str(inputs["vocab.txt"]), "--means", str(folder), "--assay-key", "tech",
            "--modality-key", "mod", "--species", "mouse", "--no-figures", "--quiet"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    profile = Profile.load(tmp_path / "out" / "profile.npz")
    settings = profile.meta["options"]["tokenizer"]
    assert settings["context_keys"] == {"species": None, "assay": "tech", "modality": "mod"}
    assert {k: v["file"] for k, v in settings["means"].items()} == {
        "MERFISH": "merfish_mean_script.npy", "Xenium": "xenium_mean_script.npy",
        "dissociated": "dissociated_mean_script.npy"}  # fmt: skip
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert "--assay-key" in record["command"] and record["tokenizer"] == settings
    # the same run in Python gives the same sums
    model = attnprof.load_nicheformer(inputs["model.ckpt"])
    expected = profile_anndata(model, tmp_path / "mixed.h5ad", "sex", vocab=inputs["vocab.txt"],
                               means={"7": folder / "merfish_mean_script.npy", "Xenium": folder / "xenium_mean_script.npy",
                                      "dissociated": folder / "dissociated_mean_script.npy"},
                               assay_key="tech", modality_key="mod", progress=False)  # fmt: skip
    for name in expected.sums:
        np.testing.assert_array_equal(profile.sums[name], expected.sums[name], err_msg=name)
    # a technology without means: exit status 2 before any cell, naming the assay and the fix
    assert main([*argv[:8], "--means", f"MERFISH={folder / 'merfish_mean_script.npy'}", *argv[10:],
                 "--out", str(tmp_path / "bad")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "no technology means for 8 spatial cells of assay 'Xenium'" in err
    assert "8 dissociated cells of assay \"10x 3' v3\"" in err and "--means \"Xenium=FILE\"" in err
    assert not (tmp_path / "bad" / "profile.npz").exists()


def test_shards_made_with_other_means_refuse_to_merge(folder):
    adata = mixed_data(sparse=True)
    adata.obs["sex"] = np.where(np.arange(adata.n_obs) % 2, "female", "male")
    model = small_nicheformer(len(VOCAB) + 30, context_length=CONTEXT_LENGTH)
    run = dict(vocab=VOCAB, progress=False, window=8, **PER_CELL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = profile_anndata(model, adata, "sex", means=folder, shard=(0, 2), **run)
        second = profile_anndata(model, adata, "sex", means=folder, shard=(1, 2), **run)
        changed = dict(published_folder(folder), CosMx=published_means(7))
        other = profile_anndata(model, adata, "sex", means=changed, shard=(1, 2), **run)
    assert sum(attnprof.merge([first, second]).cells.values()) == adata.n_obs
    with pytest.raises(ValueError, match=r"different options \(options.tokenizer.means"):
        attnprof.merge([first, other])


# ------------------------------------------------------------ upstream's own steps, per technology
SPECIE = {"Homo sapiens": 5, "Mus musculus": 6}  # the notebooks' specie_dict, modality_dict, technology_dict
MODALITY = {"dissociated": 3, "spatial": 4}
TECHNOLOGY = {"MERFISH": 7, "NanoString digital spatial profiling": 8, "Xenium": 9, "10x transcription profiling": 15}


def upstream_technology_mean(path, name: str, tokenization: str) -> np.ndarray:
    """The means as each upstream path prepares them (restated from its code)."""
    m = np.load(path)
    if tokenization == "dataset":  # NicheformerDataset._process_chunk: tech_mean += tech_mean == 0
        return m + (m == 0)
    m = np.nan_to_num(m)  # the notebooks' "Technology mean" cell
    rounded = np.where((m % 1) >= 0.5, np.ceil(m), np.floor(m))
    if name == "dissociated_mean_script.npy":  # scRNAseq_mouse_brain_haviv.ipynb tests the rounded mean
        m = np.where(rounded == 0, 1, rounded)
    else:  # cosmx_human_lung.ipynb, xenium_human_lung.ipynb test the unrounded one
        m = np.where(m == 0, 1, rounded)
    return m + (m == 0)  # tokenize_data: median_counts_per_gene += median_counts_per_gene == 0


def upstream_tokens(data: ad.AnnData, means: np.ndarray, tokenization: str, argsort) -> np.ndarray:
    """One technology through upstream: aligned by ``ad.concat([model, data])``, sf_normalize, / means,
    numba's argsort, then the model's on_after_batch_transfer (context from obs) and complete_masking."""
    model = ad.AnnData(X=np.zeros((1, N_GENES)), var=pd.DataFrame(index=VOCAB))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's and pandas' notices
        x = ad.concat([model, data], join="outer", axis=0)[1:, VOCAB].X  # float64, the vocabulary's order
        obs = data.obs.astype(object).replace({"organism": SPECIE, "assay": TECHNOLOGY, "modality": MODALITY})
    if tokenization == "dataset":  # NicheformerDataset sums dense rows
        x = x.toarray() if sp.issparse(x) else np.asarray(x)
        library = x.sum(axis=1)
    else:  # tokenize_data gets the sparse X after the concat
        x = sp.csr_matrix(x).toarray()
        library = np.asarray(sp.csr_matrix(x).sum(axis=1)).ravel()
    library = library + (library == 0)
    x = np.true_divide(x * (10000.0 / library)[:, None], means[None, :])
    out = np.zeros((len(x), CONTEXT_LENGTH + 3), dtype=np.int64)
    for i, cell in enumerate(x):
        nonzero = np.nonzero(cell)[0]
        ids = nonzero[argsort(-cell[nonzero])][:CONTEXT_LENGTH] + 30
        out[i, 3 : 3 + len(ids)] = ids
        out[i, :3] = [obs["organism"].iloc[i], obs["assay"].iloc[i], obs["modality"].iloc[i]]
    out = out[:, :CONTEXT_LENGTH]  # x[:, :context_length]
    out[out == 0] = 1  # complete_masking: padding 0 -> 1
    return out


@pytest.mark.parametrize("tokenization", ["notebook", "dataset"])
def test_per_technology_means_as_upstream_tokenizes_each_technology(folder, tokenization):
    numba = pytest.importorskip("numba", reason="upstream's argsort is numba's (pip install .[test])")
    argsort = numba.njit(lambda v: np.argsort(v))
    adata = mixed_data(sparse=True, seed=4)
    expected = np.zeros((adata.n_obs, CONTEXT_LENGTH), dtype=np.int64)
    for name in TECHNOLOGIES:  # one notebook (or dataset) per technology, each with its own file
        cells = (adata.obs["file"] == name).to_numpy()
        means = upstream_technology_mean(folder / name, name, tokenization)
        expected[cells] = upstream_tokens(adata[cells].copy(), means, tokenization, argsort)
    np.testing.assert_array_equal(tokens(adata, folder, tokenization, **PER_CELL), expected)
