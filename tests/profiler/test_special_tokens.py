"""Special tokens are known by id, not by the shape of a name (issue 22, item 5): a gene named like
``<...>`` stays among the genes; profiles that do not record the ids keep the name-shape rule."""

from __future__ import annotations

import anndata as ad
import pandas as pd
import pytest

from attnprof import Profile
from attnprof.cli import main
from attnprof.singlecell.demo import write_demo_inputs


@pytest.fixture(scope="module")
def run_out(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("special")
    inputs = write_demo_inputs(tmp, n_cells=16, n_genes=30, seed=4)
    adata = ad.read_h5ad(inputs["data.h5ad"])
    names = list(adata.var_names)
    names[0] = "<Gene000>"  # a real gene whose name looks like a special token
    adata.var_names = names
    adata.write_h5ad(tmp / "odd.h5ad")
    out = tmp / "out"
    argv = ["run", str(tmp / "odd.h5ad"), "--groupby", "sex", "--window", "8", "--threads", "1", "--quiet",
            "--permutations", "0", "--min-cells", "1", "--no-figures", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0  # no --model: the data's own genes are the vocabulary
    return out


def test_a_gene_named_like_a_special_token_stays_a_gene(run_out):
    genes = pd.read_csv(run_out / "tables" / "genes.csv")
    context = pd.read_csv(run_out / "tables" / "context.csv")
    assert "<Gene000>" in set(genes["gene"]) and "<Gene000>" not in set(context["token"])
    assert set(context["token"]) <= {"<pad>", "<species:mouse>", "<assay:MERFISH>", "<modality:spatial>"} | {
        t for t in context["token"] if t.startswith("<unused")}  # fmt: skip
    profile = Profile.load(run_out / "profile.npz")
    assert profile.genes.index("<Gene000>") not in profile.meta["special_tokens"]


def test_a_profile_without_the_ids_falls_back_to_the_names(run_out):
    profile = Profile.load(run_out / "profile.npz")
    del profile.meta["special_tokens"]  # what an older profile looks like
    comparison = profile.compare("female", "male", min_cells=1, permutations=0)
    assert "<Gene000>" in set(comparison.context["token"]) and "<Gene000>" not in set(comparison.genes["gene"])
