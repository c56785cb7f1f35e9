"""The model-family seam: codes, detection, and `attnprof run/validate --family geneformer|scgpt` end to end."""

from __future__ import annotations

import json
import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnprof import Profile
from attnprof.cli import main
from attnprof.singlecell.family import Packing
from attnprof.singlecell.registry import check_family, detect_family
from attnprof.singlecell.scgpt import ScGPT, ScGPTConfig, save_scgpt

transformers = pytest.importorskip("transformers")

N_GENES = 30


@settings(max_examples=50, deadline=None)
@given(st.integers(-3, 0), st.integers(1, 60), st.data())
def test_packing_round_trips_ids_values_and_padding(low, n_values, draw):
    packing = Packing(min_value=low, n_values=n_values)
    n = draw.draw(st.integers(1, 20))
    ids = np.array(draw.draw(st.lists(st.integers(0, 70_000), min_size=n, max_size=n)))
    values = np.array(draw.draw(st.lists(st.integers(low, low + n_values - 1), min_size=n, max_size=n)))
    codes = torch.from_numpy(np.append(packing.pack(ids, values), 1))  # one padded position
    got_ids, got_values, padding = packing.unpack(codes, pad_id=5, pad_value=-9)
    assert got_ids.tolist() == [*ids.tolist(), 5] and got_values.tolist() == [*values.tolist(), -9]
    assert padding.tolist() == [False] * n + [True]
    assert (codes[:-1] >= 2).all()
    with pytest.raises(ValueError, match="values outside"):
        packing.pack(ids, values + n_values)


def write_data(path, n_cells=24, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(1.5, (n_cells, N_GENES)).astype(np.float32)
    counts[3] = 0  # an empty cell
    var = pd.DataFrame({"ensembl_id": [f"ENSG{i:03d}" for i in range(N_GENES)]}, index=[f"gene{i}" for i in range(N_GENES)])
    adata = ad.AnnData(sp.csr_matrix(counts), var=var)
    adata.obs["sex"] = pd.Categorical(np.where(np.arange(n_cells) % 2, "male", "female"))
    adata.obs["n_counts"] = counts.sum(1).astype(np.float64)
    adata.write_h5ad(path)
    return path


@pytest.fixture
def geneformer_files(tmp_path):
    genes = [f"ENSG{i:03d}" for i in range(N_GENES - 2)]  # two data genes outside the dictionary
    tokens = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, **{g: i + 4 for i, g in enumerate(genes)}}
    medians = {g: 0.5 + (i % 5) for i, g in enumerate(genes)}
    for name, value in (("tokens.pkl", tokens), ("medians.pkl", medians)):
        with open(tmp_path / name, "wb") as f:
            pickle.dump(value, f)
    config = transformers.BertConfig(vocab_size=len(tokens), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "geneformer")
    return tmp_path / "geneformer", tmp_path / "tokens.pkl", tmp_path / "medians.pkl"


@pytest.fixture
def scgpt_folder(tmp_path):
    vocab = {f"gene{i}": i for i in range(N_GENES - 1)}  # one data gene outside the vocabulary
    vocab.update({"<pad>": len(vocab), "<cls>": len(vocab) + 1, "<eoc>": len(vocab) + 2})
    config = ScGPTConfig(n_tokens=len(vocab), d_model=16, n_heads=2, d_hid=32, n_layers=2, dropout=0.0,
                         pad_id=vocab["<pad>"])  # fmt: skip
    torch.manual_seed(0)
    return save_scgpt(ScGPT(config), tmp_path / "scgpt", vocab)


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_run_folder(out, family):
    for path in ("profile.npz", "run.json", "tables/layers.csv", "tables/heads.csv", "figures"):
        assert (out / path).exists(), path
    assert any((out / "figures").glob("*.png"))
    profile = Profile.load(out / "profile.npz")
    assert profile.meta["options"]["tokenizer"]["family"] == family
    assert profile.cells == {"female": 12, "male": 11}  # the empty cell 3 (male) is left out
    assert profile.meta["data"]["context_only_cells"] == 1
    return profile


@pytest.mark.parametrize("detected", [False, True])
def test_run_geneformer_end_to_end(tmp_path, capsys, geneformer_files, detected):
    folder, tokens, medians = geneformer_files
    data = write_data(tmp_path / "cells.h5ad")
    out = tmp_path / "out"
    argv = ["run", str(data), "--groupby", "sex", "--model", str(folder), "--token-dictionary", str(tokens),
            "--gene-medians", str(medians), "--gene-key", "ensembl_id", "--max-length", "64", "--window", "8",
            "--panel", "ENSG001,ENSG002", "--out", str(out), "--quiet", "--backend", "torch"]  # fmt: skip
    code, stdout, err = run(argv + ([] if detected else ["--family", "geneformer"]), capsys)
    assert code == 0, err
    profile = assert_run_folder(out, "geneformer")
    assert profile.meta["adapter"] == "hf" and profile.n_context == 1
    assert "left out, as Geneformer's tokenizer drops" in err


def test_run_scgpt_end_to_end_and_validate(tmp_path, capsys, scgpt_folder):
    data = write_data(tmp_path / "cells.h5ad")
    out = tmp_path / "out"
    code, stdout, err = run(["run", str(data), "--groupby", "sex", "--model", str(scgpt_folder), "--family", "scgpt",
                             "--max-length", "20", "--window", "8", "--panel", "gene1,gene2", "--out", str(out),
                             "--quiet", "--backend", "torch"], capsys)  # fmt: skip
    assert code == 0, err
    profile = assert_run_folder(out, "scgpt")
    assert profile.meta["adapter"] == "mha" and profile.meta["options"]["tokenizer"]["mode"] == "embed"
    assert "embed_data fails on such cells" in err
    code, stdout, err = run(["validate", str(data), "--model", str(scgpt_folder), "--max-length", "20",
                             "--cells", "6", "--backend", "torch"], capsys)  # fmt: skip
    assert code == 0, err
    assert "all quantities within tolerance" in stdout


def test_validate_geneformer(tmp_path, capsys, geneformer_files):
    folder, tokens, medians = geneformer_files
    data = write_data(tmp_path / "cells.h5ad")
    code, stdout, err = run(["validate", str(data), "--model", str(folder), "--token-dictionary", str(tokens),
                             "--gene-medians", str(medians), "--gene-key", "ensembl_id", "--max-length", "64",
                             "--cells", "6", "--backend", "torch"], capsys)  # fmt: skip
    assert code == 0, err
    assert "all quantities within tolerance" in stdout


def test_bad_family_inputs_exit_with_clear_errors(tmp_path, capsys, geneformer_files, scgpt_folder):
    folder, tokens, medians = geneformer_files
    data = write_data(tmp_path / "cells.h5ad")
    base = ["run", str(data), "--groupby", "sex", "--quiet", "--out", str(tmp_path / "o")]
    code, _, err = run(base + ["--model", str(folder), "--family", "scgpt"], capsys)
    assert code == 2 and "holds a geneformer model, but --family scgpt" in err
    code, _, err = run(base + ["--model", str(folder), "--token-dictionary", str(tokens)], capsys)
    assert code == 2 and "needs --gene-medians" in err
    code, _, err = run(base + ["--model", str(folder), "--token-dictionary", str(tokens), "--gene-medians",
                               str(tmp_path / "missing.pkl"), "--gene-key", "ensembl_id"], capsys)  # fmt: skip
    assert code == 2 and "gene median dictionary" in err and "does not exist" in err
    code, _, err = run(base + ["--model", str(folder), "--token-dictionary", str(tokens), "--gene-medians",
                               str(medians), "--max-length", "64"], capsys)  # var names are symbols, not Ensembl ids
    assert code == 2 and "none of the data's" in err and "--gene-key" in err
    code, _, err = run(base + ["--model", str(scgpt_folder), "--family", "nicheformer", "--vocab", str(data)], capsys)
    assert code == 2 and "holds a scgpt model" in err
    code, _, err = run(base + ["--family", "scgpt"], capsys)
    assert code == 2 and "needs --model" in err


def test_detection(tmp_path, geneformer_files, scgpt_folder):
    assert detect_family(geneformer_files[0]) == "geneformer"
    assert detect_family(scgpt_folder) == "scgpt"
    assert detect_family(geneformer_files[1]) == "nicheformer"  # a single file: a Lightning checkpoint
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert detect_family(other) is None and detect_family(tmp_path / "nothing") is None
    assert check_family("geneformer", other) == "geneformer"  # undetected: as asked
    with pytest.raises(ValueError, match="unknown model family"):
        check_family("bert", None)


class Crash(Exception):
    pass


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_geneformer_runs_shard_and_resume_like_nicheformer(tmp_path, geneformer_files):
    """The family-agnostic parts: shards sum to the whole, a crashed run resumes to the uninterrupted
    result, left-out cells are counted once (also after a resume)."""
    from attnprof import merge
    from attnprof.singlecell.registry import load_front_end
    from attnprof.singlecell.run import profile_anndata
    from helpers import assert_same_sums

    folder, tokens, medians = geneformer_files
    adata = ad.read_h5ad(write_data(tmp_path / "cells.h5ad", n_cells=40, seed=3))
    adata.X[[5, 17]] = 0  # two more empty cells, in two buckets
    adata.X.eliminate_zeros()  # Geneformer ranks stored zeros of a sparse X (as scipy keeps them): empty means none
    model, front = load_front_end("geneformer", folder, token_dictionary=tokens, gene_medians=medians,
                                  max_length=64)  # fmt: skip

    def run(**kw):
        options = dict(gene_key="ensembl_id", family=front, window=8, batch_size=4, chunk_size=8, bucket_size=12,
                       permutations=1, backend="torch", progress=False)  # fmt: skip
        return profile_anndata(model, adata, "sex", **{**options, **kw})

    whole = run()
    assert whole.meta["data"]["context_only_cells"] == 3
    assert_same_sums(merge([run(shard=(0, 2)), run(shard=(1, 2))]), whole)

    calls = []

    def crash(module, args, kwargs):
        calls.append(1)
        if len(calls) > 4:
            raise Crash

    handle = model.register_forward_pre_hook(crash, with_kwargs=True)
    try:
        with pytest.raises(Crash):
            run(checkpoint=tmp_path / "ckpt.npz", checkpoint_every=4)
    finally:
        handle.remove()
    with np.load(tmp_path / "ckpt.npz") as saved:
        done = len(saved["ckpt_done"])
    assert 0 < done < 37
    resumed = run(checkpoint=tmp_path / "ckpt.npz", checkpoint_every=4)
    assert resumed.meta["resumed_cells"] == done
    assert resumed.meta["data"]["context_only_cells"] == 3
    assert_same_sums(resumed, whole)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_scgpt_random_draws_do_not_depend_on_shards_or_resume(tmp_path, scgpt_folder):
    """Each cell gets the draws of one whole run: the shards sum to it, a resumed run ends at it."""
    from attnprof import merge
    from attnprof.singlecell.registry import load_front_end
    from attnprof.singlecell.run import profile_anndata
    from helpers import assert_same_sums

    adata = ad.read_h5ad(write_data(tmp_path / "cells.h5ad", n_cells=40, seed=4))
    model, front = load_front_end("scgpt", scgpt_folder, max_length=12, seed=5)  # cells longer than 12: sampled

    def run(**kw):
        options = dict(family=front, window=8, batch_size=4, chunk_size=8, bucket_size=12, backend="torch",
                       progress=False)  # fmt: skip
        return profile_anndata(model, adata, "sex", **{**options, **kw})

    whole = run()
    assert_same_sums(merge([run(shard=(0, 3)), run(shard=(1, 3)), run(shard=(2, 3))]), whole)
    other_seed = load_front_end("scgpt", scgpt_folder, max_length=12, seed=6)[1]
    assert not np.allclose(run(family=other_seed).sums["pos_sum"], whole.sums["pos_sum"])  # the draws matter

    calls = []

    def crash(module, args):
        calls.append(1)
        if len(calls) > 3:
            raise Crash

    handle = model.register_forward_pre_hook(crash)
    try:
        with pytest.raises(Crash):
            run(checkpoint=tmp_path / "ckpt.npz", checkpoint_every=4)
    finally:
        handle.remove()
    resumed = run(checkpoint=tmp_path / "ckpt.npz", checkpoint_every=4)
    assert resumed.meta["resumed_cells"] > 0
    assert resumed.meta["data"]["context_only_cells"] == whole.meta["data"]["context_only_cells"] == 1
    assert_same_sums(resumed, whole)


def test_options_of_another_family_are_refused(tmp_path, capsys, geneformer_files, scgpt_folder):
    folder, tokens, medians = geneformer_files
    data = write_data(tmp_path / "cells.h5ad")
    base = ["run", str(data), "--groupby", "sex", "--quiet", "--out", str(tmp_path / "o")]
    code, _, err = run(base + ["--model", str(scgpt_folder), "--vocab", "v.txt", "--assay", "10x"], capsys)
    assert code == 2 and "--vocab, --assay are not read for a scgpt model" in err
    code, _, err = run(base + ["--token-dictionary", str(tokens)], capsys)  # no --model: Nicheformer
    assert code == 2 and "--token-dictionary is not read for a nicheformer model" in err
    code, _, err = run(base + ["--model", str(folder), "--token-dictionary", str(tokens), "--gene-medians",
                               str(medians), "--scgpt-mode", "tutorial"], capsys)  # fmt: skip
    assert code == 2 and "--scgpt-mode is not read for a geneformer model" in err
    code, _, err = run(base + ["--model", str(scgpt_folder), "--tokenization", "dataset"], capsys)
    assert code == 2 and "--tokenization is not read for a scgpt model" in err
    code, _, err = run(base + ["--model", str(scgpt_folder), "--seed", "3"], capsys)
    assert code == 2 and "--seed is not read for a scgpt model" in err
    code, _, err = run(base + ["--max-length", "10"], capsys)
    assert code == 2 and "--max-length is read for Geneformer and scGPT" in err
