"""A built-in demo that needs no download: a small MERFISH-like dataset and a small Nicheformer.

:func:`make_demo_data` draws a few hundred cells over a panel of a few
hundred genes (as MERFISH panels are), from two sexes and five cell types,
with a **planted** set of sex-biased genes: their expected counts are
``SEX_FOLD`` times higher in one sex. The gene names are real mouse genes
for readability, but the effects are planted by this generator, not
measured. :func:`write_demo_inputs` writes the data with a matching
vocabulary, technology means and a seeded small model checkpoint (in the
public Nicheformer key layout), so ``attnprof run`` profiles them like any
user's files. Everything is deterministic given the seed.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .nicheformer import save_checkpoint, small_nicheformer
from .vocab import Vocabulary

#: Planted sex-biased genes: higher in females, higher in males.
FEMALE_BIASED = ["Esr1", "Pgr", "Prlr", "Greb1", "Tac1"]
MALE_BIASED = ["Ar", "Cyp19a1", "Calcr", "Brs3", "Gal"]
SEX_FOLD = 4.0
CELL_TYPES = {
    "excitatory neuron": ["Slc17a6", "Slc17a7", "Nrn1", "Nts", "Cartpt", "Trh"],
    "inhibitory neuron": ["Gad1", "Gad2", "Slc32a1", "Sst", "Npy", "Pvalb"],
    "astrocyte": ["Aqp4", "Gja1", "Aldh1l1", "Slc1a3", "Gfap", "Sox9"],
    "oligodendrocyte": ["Mbp", "Plp1", "Mobp", "Mog", "Ermn", "Opalin"],
    "microglia": ["Cx3cr1", "P2ry12", "Tmem119", "Hexb", "Csf1r", "Selplg"],
}


def make_demo_data(n_cells: int = 400, n_genes: int = 300, seed: int = 0) -> ad.AnnData:
    """A MERFISH-like AnnData: raw counts in X (sparse), obs ``sex`` and ``cell_type``, obsm ``spatial``."""
    rng = np.random.default_rng(seed)
    planted = FEMALE_BIASED + MALE_BIASED
    markers = [g for genes in CELL_TYPES.values() for g in genes]
    fillers = [f"Gene{i:03d}" for i in range(n_genes - len(planted) - len(markers))]
    genes = planted + markers + fillers
    sex = rng.permutation(np.repeat(["female", "male"], [n_cells // 2, n_cells - n_cells // 2]))
    cell_type = rng.choice(list(CELL_TYPES), size=n_cells, p=[0.3, 0.25, 0.2, 0.15, 0.1])

    # expected counts: a per-gene baseline, cell-type markers up, planted genes up in one sex
    log_mean = rng.normal(-1.2, 1.0, size=len(genes))
    log_mean[: len(planted)] = rng.normal(0.5, 0.3, size=len(planted))  # planted genes are seen in most cells
    log_expected = np.tile(log_mean, (n_cells, 1))
    index = {g: j for j, g in enumerate(genes)}
    for kind, marker_genes in CELL_TYPES.items():
        cols = [index[g] for g in marker_genes]
        log_expected[np.ix_(cell_type == kind, cols)] += 2.5
    fold = np.log(SEX_FOLD)
    log_expected[np.ix_(sex == "female", [index[g] for g in FEMALE_BIASED])] += fold
    log_expected[np.ix_(sex == "male", [index[g] for g in MALE_BIASED])] += fold
    size_factor = rng.lognormal(0.0, 0.5, size=(n_cells, 1))  # library sizes vary, so cell lengths do
    counts = rng.poisson(np.exp(log_expected) * size_factor)

    obs = pd.DataFrame(
        {"sex": pd.Categorical(sex, categories=["female", "male"]),
         "cell_type": pd.Categorical(cell_type, categories=list(CELL_TYPES))},
        index=[f"cell{i:04d}" for i in range(n_cells)],
    )  # fmt: skip
    var = pd.DataFrame(
        {"planted": [g in planted for g in genes],
         "higher_in": ["female" if g in FEMALE_BIASED else "male" if g in MALE_BIASED else "" for g in genes]},
        index=genes,
    )  # fmt: skip
    adata = ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)
    adata.obsm["spatial"] = rng.uniform(0, 1000, size=(n_cells, 2))
    adata.uns["demo"] = {"seed": seed, "sex_fold": SEX_FOLD, "planted": planted}
    return adata


def demo_vocabulary(adata: ad.AnnData, seed: int = 0, n_unmeasured: int = 20) -> Vocabulary:
    """A vocabulary in another order than the data, with genes the panel does not measure (as a real one)."""
    rng = np.random.default_rng(seed + 1)
    genes = list(adata.var_names) + [f"Unmeasured{i:02d}" for i in range(n_unmeasured)]
    return Vocabulary([genes[i] for i in rng.permutation(len(genes))], source="demo vocabulary")


def technology_means(adata: ad.AnnData, vocab: Vocabulary) -> np.ndarray:
    """Mean of counts scaled to 10,000 per cell, per vocabulary gene (0 where unmeasured), as Nicheformer's."""
    X = sp.csr_matrix(adata.X, dtype=np.float64)
    library = np.asarray(X.sum(1)).ravel()
    scaled = sp.diags(1e4 / np.where(library == 0, 1, library)) @ X
    gene_mean = dict(zip(adata.var_names, np.asarray(scaled.mean(0)).ravel()))
    return np.array([gene_mean.get(g, 0.0) for g in vocab.genes])


def write_demo_inputs(directory, *, n_cells: int = 400, n_genes: int = 300, seed: int = 0) -> dict[str, Path]:
    """Write data.h5ad, vocab.txt, means.npy, panel.txt and model.ckpt into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    adata = make_demo_data(n_cells, n_genes, seed)
    vocab = demo_vocabulary(adata, seed)
    paths = {name: directory / name for name in ("data.h5ad", "vocab.txt", "means.npy", "panel.txt", "model.ckpt")}
    adata.write_h5ad(paths["data.h5ad"])
    paths["vocab.txt"].write_text("\n".join(vocab.genes) + "\n")
    np.save(paths["means.npy"], technology_means(adata, vocab))
    paths["panel.txt"].write_text("\n".join(FEMALE_BIASED + MALE_BIASED) + "\n")
    save_checkpoint(small_nicheformer(vocab.n_tokens, seed=seed), paths["model.ckpt"])
    return paths
