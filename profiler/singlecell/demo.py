"""A built-in demo that needs no download: a small MERFISH-like dataset and a small Nicheformer.

:func:`make_demo_data` draws a few hundred cells over a panel of a few
hundred genes (as MERFISH panels are), from ``ANIMALS_PER_SEX`` animals of
each sex and five cell types, with a **planted** set of sex-biased genes:
their expected counts are ``SEX_FOLD`` times higher in one sex. Animals
differ too, as real ones do (dissection, section, age): ``ANIMAL_GENES``
genes get a random fold per animal, shared by all its cells and unrelated to
sex, so a test that takes cells for replicates finds "sex differences" there;
the replicate-level test (``--replicate animal``) does not. The gene names are real mouse genes
for readability, but the effects are planted by this generator, not
measured. :func:`write_demo_inputs` writes the data with a matching
vocabulary, technology means and a seeded small model checkpoint (in the
public Nicheformer key layout), so ``attnprof run`` profiles them like any
user's files. Everything is deterministic given the seed.

The model is untrained except for one **planted head** (:func:`plant_head`,
layer ``PLANTED_LAYER``, head ``PLANTED_HEAD``) that attends to the least
expressed genes of each cell, i.e. to its last gene tokens (Nicheformer ranks
genes by expression relative to the technology mean). The planted sex-biased
genes rank in the middle of a cell in one sex and near its end in the other, so
they receive different attention in females and males in that head only: a
known answer for the whole method to recover. (A head on the *first* tokens
would work too, but the first ranks belong to rarely detected genes, whose
relative expression is extreme whenever they are seen: a far noisier signal.)
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

import torch

from .nicheformer import Nicheformer, save_checkpoint, small_nicheformer
from .vocab import N_CONTEXT, Vocabulary

#: Planted sex-biased genes: higher in females, higher in males.
FEMALE_BIASED = ["Esr1", "Pgr", "Prlr", "Greb1", "Tac1"]
MALE_BIASED = ["Ar", "Cyp19a1", "Calcr", "Brs3", "Gal"]
SEX_FOLD = 4.0
#: Animals of each sex (the unit of replication) and the animal effect: this many genes get a per-animal
#: log-fold drawn from N(0, ANIMAL_SD²), the same in all the animal's cells.
ANIMALS_PER_SEX, ANIMAL_GENES, ANIMAL_SD = 6, 40, 1.0
CELL_TYPES = {
    "excitatory neuron": ["Slc17a6", "Slc17a7", "Nrn1", "Nts", "Cartpt", "Trh"],
    "inhibitory neuron": ["Gad1", "Gad2", "Slc32a1", "Sst", "Npy", "Pvalb"],
    "astrocyte": ["Aqp4", "Gja1", "Aldh1l1", "Slc1a3", "Gfap", "Sox9"],
    "oligodendrocyte": ["Mbp", "Plp1", "Mobp", "Mog", "Ermn", "Opalin"],
    "microglia": ["Cx3cr1", "P2ry12", "Tmem119", "Hexb", "Csf1r", "Selplg"],
}


#: Where the demo model's constructed head sits, and how fast its attention grows with a gene's rank.
PLANTED_LAYER, PLANTED_HEAD, RANK_SLOPE = 1, 2, 0.4


def plant_head(model: Nicheformer, layer: int = PLANTED_LAYER, head: int = PLANTED_HEAD,
               slope: float = RANK_SLOPE) -> Nicheformer:  # fmt: skip
    """Make one head attend to each cell's least expressed genes, and keep every other head blind to rank.

    Two residual dimensions carry the position as ``+eps·f(j)`` and ``-eps·f(j)``, with
    ``f(j) = j - 3`` for gene positions and far below for the context tokens; as a pair they
    survive LayerNorm (its mean shift cancels in their difference). Only the planted head reads
    them: a constant query times a key of ``x[d1] - x[d2]`` scores key j by ``slope·(j - 3)``
    (up to LayerNorm's scale), so attention grows with the gene's rank (the last real token most). No other weight reads
    or writes the pair, the positional embedding is zero elsewhere (no other head sees position,
    so no other head sees rank), and the planted head's output is not written back: later
    layers never see what it attends to. Changes ``model`` in place and returns it.
    """
    c = model.config
    E, hd = c.d_model, c.d_model // c.n_heads
    d1, d2, eps = E - 1, E - 2, 0.05
    with torch.no_grad():
        j = torch.arange(c.context_length, dtype=torch.float32)
        f = torch.where(j < N_CONTEXT, torch.full_like(j, -30.0), j - N_CONTEXT)
        model.positional_embedding.weight.zero_()
        model.positional_embedding.weight[:, d1] = eps * f
        model.positional_embedding.weight[:, d2] = -eps * f
        model.embeddings.weight[:, [d1, d2]] = 0
        for enc in model.encoder.layers:
            attn = enc.self_attn
            attn.in_proj_weight[:, [d1, d2]] = 0
            attn.out_proj.weight[[d1, d2]] = 0
            attn.out_proj.bias[[d1, d2]] = 0
            enc.linear1.weight[:, [d1, d2]] = 0
            enc.linear2.weight[[d1, d2]] = 0
            enc.linear2.bias[[d1, d2]] = 0
            for norm in (enc.norm1, enc.norm2):
                norm.weight[[d1, d2]], norm.bias[[d1, d2]] = 1.0, 0.0
        attn = model.encoder.layers[layer].self_attn
        q, k = slice(head * hd, (head + 1) * hd), slice(E + head * hd, E + (head + 1) * hd)
        attn.in_proj_weight[q], attn.in_proj_bias[q] = 0.0, 0.0
        attn.in_proj_weight[k], attn.in_proj_bias[k] = 0.0, 0.0
        attn.in_proj_bias[q.start] = 1.0  # constant query ...
        # ... times key w·(x[d1] - x[d2]) = w·2·eps·f(j) (LayerNorm-scaled), over sqrt(head dim)
        w = slope * hd**0.5 / (2 * eps)
        attn.in_proj_weight[k.start, d1], attn.in_proj_weight[k.start, d2] = w, -w
        attn.out_proj.weight[:, q] = 0.0
    return model


def demo_model(n_tokens: int, seed: int = 0) -> Nicheformer:
    """The demo's small Nicheformer: seeded random weights plus the planted head."""
    return plant_head(small_nicheformer(n_tokens, seed=seed))


def make_demo_data(n_cells: int = 400, n_genes: int = 300, seed: int = 0) -> ad.AnnData:
    """A MERFISH-like AnnData: raw counts in X (sparse), obs ``sex``, ``animal`` and ``cell_type``, obsm ``spatial``."""
    rng = np.random.default_rng(seed)
    planted = FEMALE_BIASED + MALE_BIASED
    markers = [g for genes in CELL_TYPES.values() for g in genes]
    fillers = [f"Gene{i:03d}" for i in range(n_genes - len(planted) - len(markers))]
    genes = planted + markers + fillers
    animals = [f"F{i + 1}" for i in range(ANIMALS_PER_SEX)] + [f"M{i + 1}" for i in range(ANIMALS_PER_SEX)]
    half = n_cells // 2  # as many female as male cells, about equal cells per animal
    animal = rng.permutation(np.concatenate([np.resize(np.arange(ANIMALS_PER_SEX), half),
                                             ANIMALS_PER_SEX + np.resize(np.arange(ANIMALS_PER_SEX), n_cells - half)]))
    sex = np.where(animal < ANIMALS_PER_SEX, "female", "male")
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
    animal_genes = len(planted) + len(markers) + np.arange(min(ANIMAL_GENES, len(fillers)))  # fillers only
    log_expected[:, animal_genes] += log_mean[: len(planted)].mean() - log_mean[animal_genes]  # seen in most cells
    log_expected[:, animal_genes] += rng.normal(0, ANIMAL_SD, size=(len(animals), len(animal_genes)))[animal]
    size_factor = rng.lognormal(0.0, 0.5, size=(n_cells, 1))  # library sizes vary, so cell lengths do
    counts = rng.poisson(np.exp(log_expected) * size_factor)

    obs = pd.DataFrame(
        {"sex": pd.Categorical(sex, categories=["female", "male"]),
         "animal": pd.Categorical(np.asarray(animals)[animal], categories=animals),
         "cell_type": pd.Categorical(cell_type, categories=list(CELL_TYPES))},
        index=[f"cell{i:04d}" for i in range(n_cells)],
    )  # fmt: skip
    var = pd.DataFrame(
        {"planted": [g in planted for g in genes],
         "animal_effect": np.isin(np.arange(len(genes)), animal_genes),
         "higher_in": ["female" if g in FEMALE_BIASED else "male" if g in MALE_BIASED else "" for g in genes]},
        index=genes,
    )  # fmt: skip
    adata = ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)
    adata.obsm["spatial"] = rng.uniform(0, 1000, size=(n_cells, 2))
    adata.uns["demo"] = {"seed": seed, "sex_fold": SEX_FOLD, "planted": planted, "animals_per_sex": ANIMALS_PER_SEX,
                         "animal_sd": ANIMAL_SD}  # fmt: skip
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
    save_checkpoint(demo_model(vocab.n_tokens, seed=seed), paths["model.ckpt"])
    return paths


def _animal_effect_lines(comparison, layer: int, head: int) -> list[str]:
    """How often each test calls a gene with only an animal effect different in the top head (Welch p < 0.05):
    about 5% across animals, far more when cells are taken for replicates (the head sees every gene's rank,
    which the animal effect moves)."""
    genes = comparison.genes
    if "p_cells" not in genes or not len(genes):
        return []
    genes = genes[(genes["layer"] == layer) & (genes["head"] == head)]
    noise = genes[genes["gene"].isin(animal_effect_genes())]
    rate = {col: float((noise[col] < 0.05).mean()) for col in ("p", "p_cells")}
    return [f"  its {len(noise)} genes with an animal effect and no sex effect: Welch p < 0.05 for {rate['p']:.0%} "
            f"across animals, {rate['p_cells']:.0%} with cells as replicates (pseudoreplication)"]


def animal_effect_genes() -> list[str]:
    """The demo's genes with an animal effect and no sex effect: the first ``ANIMAL_GENES`` fillers."""
    return [f"Gene{i:03d}" for i in range(ANIMAL_GENES)]


def findings(comparison, family: str = "gene", top: int = 10) -> str:
    """What attnprof found, set against what was planted: the demo's closing lines."""
    heads = comparison.ranked_heads(family)
    layers = comparison.layers[comparison.layers["family"] == family]
    by_p = "p_perm_mean_abs_diff" in layers
    if by_p:
        layers = layers.sort_values(["p_fwer_mean_abs_diff", "p_perm_mean_abs_diff", "mean_abs_diff_excess"],
                                    ascending=[True, True, False])  # fmt: skip
    else:
        layers = layers.sort_values("excess_over_noise", ascending=False)
    best, layer = heads.iloc[0], layers.iloc[0]
    genes = comparison.genes
    genes = genes[(genes["layer"] == best["layer"]) & (genes["head"] == best["head"])].head(top)
    planted = set(FEMALE_BIASED + MALE_BIASED)

    def against_null(row) -> str:
        if by_p:
            return (f"mean |D| {row['mean_abs_diff']:.3g} vs null mean {row['mean_abs_diff_null_mean']:.3g} "
                    f"(95th pct {row['mean_abs_diff_null_q95']:.3g}), p_perm = {row['p_perm_mean_abs_diff']:.3g}, "
                    f"family-wise p = {row['p_fwer_mean_abs_diff']:.3g}")
        return f"mean |D| {row['mean_abs_diff']:.3g} vs noise floor {row['noise_floor']:.3g}"

    n_planted = sum(g in planted for g in genes["gene"])
    found = (int(best["layer"]), int(best["head"])) == (PLANTED_LAYER, PLANTED_HEAD)
    lines = [
        f"what attnprof found ({family} family, {comparison.a} − {comparison.b}; {comparison.design()}):",
        f"  top layer: {int(layer['layer'])}   {against_null(layer)}",
        f"  top head:  layer {int(best['layer'])}, head {int(best['head'])}   {against_null(best)}",
        f"  its top {len(genes)} genes by Welch p: "
        + ", ".join(f"{g}{'*' if g in planted else ''}" for g in genes["gene"]),
        f"  * planted sex-biased genes: {n_planted} of the top {len(genes)}",
        *_animal_effect_lines(comparison, int(best["layer"]), int(best["head"])),
        f"planted: layer {PLANTED_LAYER}, head {PLANTED_HEAD} attends to each cell's least expressed genes -> "
        + ("recovered" if found else "NOT recovered"),
    ]
    return "\n".join(lines)
