"""The issue's done-when: one `attnprof run` and one `attnprof figure` on a dataset of four tissues/technologies
(three spatial, one dissociated, each with its own means and context tokens), a small Nicheformer with a head that
changes between dissociated and spatial cells, a head that does not (self), and a sex contrast within one cell
type read by the demo's rank head; the panels' CSVs show the planted heads where they were planted."""

from __future__ import annotations

import json
import math

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from attnprof.cli import main
from attnprof.singlecell.demo import PLANTED_HEAD, PLANTED_LAYER, plant_head
from attnprof.singlecell.nicheformer import save_checkpoint, small_nicheformer
from attnprof.singlecell.vocab import MODALITY, Vocabulary

#: tissue/technology -> (assay, modality); the last is dissociated.
TISSUES = {"lung spatial": ("CosMx", "spatial"), "brain spatial": ("MERFISH", "spatial"),
           "liver spatial": ("Xenium", "spatial"), "brain dissociated": ("10x 3' v3", "dissociated")}  # fmt: skip
SELF_HEAD, DISSOCIATED_HEAD = (0, 0), (0, 1)  # layer 0: attends to itself everywhere / to the dissociated token
CELL_TYPES, SEXED = {"HY GABA": 0.6, "Astro": 0.25, "Oligo": 0.15}, "HY GABA"  # sex-biased genes in HY GABA only
FEMALE, MALE = ["Esr1", "Pgr", "Prlr", "Greb1", "Tac1"], ["Ar", "Cyp19a1", "Calcr", "Brs3", "Gal"]
N_GENES, CELLS_PER_TISSUE, ANIMALS_PER_SEX = 100, 84, 6


def plant_context_heads(model, self_head=SELF_HEAD, dissociated_head=DISSOCIATED_HEAD, frequencies: int = 6):
    """Two layer-0 heads. ``self_head`` scores key j by sum_k cos(w_k (i - j)) from position features (cos, sin and
    their negatives, so LayerNorm's mean and scale stay the same at every position): every query attends to
    itself. ``dissociated_head``: a constant query times a key that only the dissociated modality token carries:
    in dissociated cells every query attends to the modality token, in spatial cells evenly. Only these heads
    read those dimensions, and their outputs are not written back (the rank head of layer 1 stays as planted)."""
    c = model.config
    E, hd = c.d_model, c.d_model // c.n_heads
    w = math.pi / 2.65 ** np.arange(frequencies)  # no i != j within 256 positions scores within 2.1 of i == j
    feats = list(range(E - 3 - 4 * frequencies, E - 3))
    marker = E - 3
    with torch.no_grad():
        j = torch.arange(c.context_length, dtype=torch.float64)[:, None] * torch.tensor(w)[None]
        model.positional_embedding.weight[:, feats] = torch.cat([j.cos(), j.sin(), -j.cos(), -j.sin()], 1).float()
        model.embeddings.weight[:, feats + [marker]] = 0
        model.embeddings.weight[MODALITY["dissociated"], marker] = 1.0
        for enc in model.encoder.layers:  # no other weight reads or writes them
            attn = enc.self_attn
            attn.in_proj_weight[:, feats + [marker]] = 0
            attn.out_proj.weight[feats + [marker]] = 0
            attn.out_proj.bias[feats + [marker]] = 0
            enc.linear1.weight[:, feats + [marker]] = 0
            enc.linear2.weight[feats + [marker]] = 0
            enc.linear2.bias[feats + [marker]] = 0
            for norm in (enc.norm1, enc.norm2):
                norm.weight[feats + [marker]], norm.bias[feats + [marker]] = 1.0, 0.0
        attn = model.encoder.layers[0].self_attn
        for head in (self_head[1], dissociated_head[1]):
            q, k = slice(head * hd, (head + 1) * hd), slice(E + head * hd, E + (head + 1) * hd)
            attn.in_proj_weight[q], attn.in_proj_bias[q], attn.in_proj_weight[k], attn.in_proj_bias[k] = 0, 0, 0, 0
            attn.out_proj.weight[:, q] = 0
        q, k = self_head[1] * hd, E + self_head[1] * hd
        for f in range(2 * frequencies):  # q_i . k_j = 6 sqrt(hd) sum_k cos(w_k (i - j)), over sqrt(hd)
            attn.in_proj_weight[q + f, feats[f]] = 6.0 * hd**0.5
            attn.in_proj_weight[k + f, feats[f]] = 1.0
        q, k = dissociated_head[1] * hd, E + dissociated_head[1] * hd
        attn.in_proj_bias[q] = 1.0
        attn.in_proj_weight[k, marker] = 12.0 * hd**0.5
    return model


def make_data(seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    genes = FEMALE + MALE + [f"Gene{i:03d}" for i in range(N_GENES - 10)]
    n = CELLS_PER_TISSUE * len(TISSUES)
    tissue = np.repeat(list(TISSUES), CELLS_PER_TISSUE)
    animals = [f"F{i}" for i in range(ANIMALS_PER_SEX)] + [f"M{i}" for i in range(ANIMALS_PER_SEX)]
    animal = np.resize(np.arange(len(animals)), n)[rng.permutation(n)]  # about equal cells per animal
    sex = np.where(animal < ANIMALS_PER_SEX, "female", "male")
    cell_type = rng.choice(list(CELL_TYPES), size=n, p=list(CELL_TYPES.values()))
    log_mean = rng.normal(-1.0, 1.0, size=len(genes))
    log_mean[:10] = rng.normal(0.5, 0.3, size=10)  # the sex-biased genes are seen in most cells
    log_expected = np.tile(log_mean, (n, 1))
    sexed = cell_type == SEXED
    log_expected[np.ix_(sexed & (sex == "female"), range(5))] += np.log(4.0)
    log_expected[np.ix_(sexed & (sex == "male"), range(5, 10))] += np.log(4.0)
    counts = rng.poisson(np.exp(log_expected) * rng.lognormal(0, 0.5, size=(n, 1)))
    obs = pd.DataFrame({"sex": sex, "animal": np.asarray(animals)[animal], "cell_type": cell_type,
                        "tissue": pd.Categorical(tissue, categories=list(TISSUES)),  # the paper's order
                        "assay": [TISSUES[t][0] for t in tissue], "modality": [TISSUES[t][1] for t in tissue]},
                       index=[f"cell{i:04d}" for i in range(n)])  # fmt: skip
    return ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=obs.astype("category"),
                      var=pd.DataFrame(index=genes))  # fmt: skip


def write_inputs(directory, seed: int = 0) -> list[str]:
    """The data, vocabulary, one means file per technology, the gene set and the model; the run's options."""
    adata = make_data(seed)
    adata.write_h5ad(directory / "data.h5ad")
    vocab = Vocabulary(list(adata.var_names))
    (directory / "vocab.txt").write_text("\n".join(vocab.genes) + "\n")
    (directory / "sdn.txt").write_text("\n".join(FEMALE + MALE) + "\n")
    rng = np.random.default_rng(seed + 1)
    means = []
    for name, (assay, modality) in TISSUES.items():  # each technology its own means
        X = adata[adata.obs["tissue"] == name].X.toarray()
        scaled = X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4
        path = directory / f"{name.replace(' ', '_')}_means.npy"
        np.save(path, scaled.mean(0) * rng.lognormal(0, 0.3, size=X.shape[1]) + 1e-3)
        means += ["--means", f"{'dissociated' if modality == 'dissociated' else assay}={path}"]
    model = plant_context_heads(plant_head(small_nicheformer(vocab.n_tokens, seed=seed, d_model=64)))
    save_checkpoint(model, directory / "model.ckpt")
    return [str(directory / "data.h5ad"), "--model", str(directory / "model.ckpt"), "--vocab",
            str(directory / "vocab.txt"), *means, "--assay-key", "assay", "--modality-key", "modality"]  # fmt: skip


def test_one_run_and_one_figure_show_the_planted_heads_where_planted(tmp_path, capsys):
    data = write_inputs(tmp_path)
    out = tmp_path / "run"
    argv = ["run", *data, "--groupby", "sex", "--compare", "female", "male", "--replicate", "animal",
            "--subset-by", "tissue", "--subset-by", "cell_type", "--gene-set", f"SDN={tmp_path / 'sdn.txt'}",
            "--window", "16", "--map-bins", "8", "--min-cells", "5", "--threads", "1", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["figure", str(out), "--maps-by", "tissue"]) == 0
    err = capsys.readouterr().err
    assert "drawn empty" not in err, err  # every panel has its input
    fig = out / "figure"
    csv = {p.stem: pd.read_csv(p, dtype={"heads_fwer_le_0.05": str}) for p in fig.glob("panel_*.csv")}

    # A / B: the head that differs least between the four tissues is the self head, the one that differs most
    # the head that attends to the dissociated modality token
    heads = csv["panel_AB_heads"]
    chosen = {r["chosen_for"]: (r["layer"], r["head"]) for _, r in heads.dropna(subset=["chosen_for"]).iterrows()}
    assert chosen == {"A": SELF_HEAD, "B": DISSOCIATED_HEAD}
    assert set(csv["panel_B"]["group"]) == set(TISSUES)
    b = csv["panel_B"]  # whole-context maps: 8 bins of 16 positions
    # the key bin (or position) of the modality token: almost all of a dissociated cell's mass, a share of a
    # spatial cell's evenly spread one
    modality = b[b["key_bin"] == 0].groupby("group")["mean_attention"].mean()
    assert modality["brain dissociated"] > 0.9
    assert max(modality[t] for t in TISSUES if "spatial" in t) < 0.5
    a = csv["panel_A"]
    diagonal = a[a["query_bin"] == a["key_bin"]].groupby("group")["mean_attention"].mean()
    assert (diagonal > 0.5).all()  # attends to itself in every tissue

    # C: the self head is the gallery's "self"
    c = csv["panel_C"]
    assert set(zip(c.loc[c["category"] == "self", "layer"], c.loc[c["category"] == "self", "head"])) == {SELF_HEAD}

    # F: within the cell type with the most cells (HY GABA, the only one with sex-biased genes), the maximum over
    # heads of mean |D| in the planted layer is the rank head, family-wise significant
    f = csv["panel_F"]
    assert set(f["cells"]) == {f"cell_type = {SEXED}"}
    top = f[(f["layer"] == PLANTED_LAYER) & (f["reading"] == "max_of_mean")]
    assert top["head"].item() == PLANTED_HEAD and top["head_p_fwer"].item() <= 0.05
    marked = csv["panel_F_heads"]
    marked = marked[marked["mean_abs_diff_fwer_le_0.05"]]
    assert (PLANTED_LAYER, PLANTED_HEAD) in set(zip(marked["layer"], marked["head"]))
    # E: the gene set's family; D, G: all genes, all cells
    e = csv["panel_E"]
    assert set(e["family"]) == {"set:SDN"}
    assert str(PLANTED_HEAD) in str(e.loc[e["layer"] == PLANTED_LAYER, "heads_fwer_le_0.05"].item()).split(";")
    assert set(csv["panel_G"]["cells"]) == {"all cells"} and len(csv["panel_D"]) == 3
    record = json.loads((fig / "figure.json").read_text())
    assert not any(p["missing"] for p in record["panels"].values())
