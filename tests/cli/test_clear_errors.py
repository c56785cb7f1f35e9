"""Crashes, raw tracebacks and silent surprises of issue 22 (items 4 and 5), through the CLI: each is a clear
``attnprof: error:`` naming the problem and the fix (exit 2) before the model loads where it can be, no
code runs from a file without --trust-checkpoint, and nothing is left on disk."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from attnprof.cli import main
from attnprof.singlecell.demo import write_demo_inputs
from attnprof.singlecell.scgpt import ScGPT, ScGPTConfig, save_scgpt

transformers = pytest.importorskip("transformers")
N_GENES = 12


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_demo_inputs(tmp_path_factory.mktemp("inputs"), n_cells=16, n_genes=30, seed=4)


def run_argv(inputs, out, *extra):
    return [str(a) for a in ["run", inputs["data.h5ad"], "--groupby", "sex", "--model", inputs["model.ckpt"],
                             "--vocab", inputs["vocab.txt"], "--means", inputs["means.npy"], "--window", "8",
                             "--threads", "1", "--quiet", "--permutations", "0", "--min-cells", "1", "--out", out,
                             *extra]]  # fmt: skip


def fails(argv, capsys, *messages):
    """The command exits 2 with one ``attnprof: error:`` line holding every message, and no traceback."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "attnprof: error: " in err and "Traceback" not in err, err
    for message in messages:
        assert message in err, err
    return err


def usage_error(argv, capsys, message):
    """argparse refuses the value: exit 2 and its usage message."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ options
@pytest.mark.parametrize(("device", "message"), [
    ("foo", "--device 'foo' is not a device name: use cpu, cuda"),
    ("cuda:x", "--device 'cuda:x' is not a device name"),
    ("meta", "--device meta: attnprof runs on cpu, cuda, mps"),
    pytest.param("cuda", "a CPU build; use --device cpu, or install a CUDA build of torch",
                 marks=pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU build of torch")),
])  # fmt: skip
def test_a_device_that_cannot_run_is_refused_before_anything_loads(inputs, tmp_path, capsys, device, message):
    fails(run_argv(inputs, tmp_path / "out", "--device", device), capsys, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--threads", "0", "argument --threads: must be at least 1, got 0"),
    ("--min-cells", "-1", "argument --min-cells: must be at least 0, got -1"),
    ("--heads", "0", "argument --heads: must be at least 1, got 0"),
])  # fmt: skip
def test_absurd_numbers_are_refused(inputs, tmp_path, capsys, option, value, message):
    argv = run_argv(inputs, tmp_path / "out")
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    usage_error(argv, capsys, message)
    assert not (tmp_path / "out").exists()


def test_all_negative_means_are_refused(inputs, tmp_path, capsys):
    means = tmp_path / "negative.npy"
    np.save(means, -np.abs(np.load(inputs["means.npy"])) - 1)
    argv = run_argv(inputs, tmp_path / "out")
    argv[argv.index("--means") + 1] = str(means)
    fails(argv, capsys, f"{means} has no positive mean", "_mean_script.npy")
    assert not (tmp_path / "out").exists()


def test_heads_are_checked_against_the_weights(inputs, tmp_path, capsys):
    bare = tmp_path / "bare.ckpt"  # a state dict without hyper_parameters: the head count is not recorded
    torch.save(torch.load(inputs["model.ckpt"], weights_only=True)["state_dict"], bare)
    argv = run_argv(inputs, tmp_path / "out")
    argv[argv.index("--model") + 1] = str(bare)
    fails(argv + ["--heads", "3"], capsys, "d_model 32, which 3 heads cannot split evenly")
    fails(run_argv(inputs, tmp_path / "out", "--heads", "2"), capsys, "hyper_parameters say 4 heads but n_heads=2")
    assert main(argv + ["--heads", "4", "--no-figures"]) == 0  # cannot be checked: said, and kept in run.json
    assert "does not record its number of attention heads" in capsys.readouterr().err
    warnings = json.loads((tmp_path / "out" / "run.json").read_text())["warnings"]
    assert any("does not record its number of attention heads" in w for w in warnings)


# --------------------------------------------------------------- Geneformer
def write_cells(path, n_counts_zero=False):
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, (10, N_GENES)).astype(np.float32) + 1
    var = pd.DataFrame({"ensembl_id": [f"ENSG{i:03d}" for i in range(N_GENES)]}, index=[f"gene{i}" for i in range(N_GENES)])
    adata = ad.AnnData(sp.csr_matrix(counts), var=var)
    adata.obs["sex"] = pd.Categorical(np.where(np.arange(10) % 2, "male", "female"))
    adata.obs["n_counts"] = 0.0 if n_counts_zero else counts.sum(1).astype(np.float64)
    adata.write_h5ad(path)
    return path


class WritesAFile:
    """A pickled object whose unpickling runs code: it creates the file ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def geneformer(tmp_path):
    genes = [f"ENSG{i:03d}" for i in range(N_GENES)]
    tokens = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, **{g: i + 4 for i, g in enumerate(genes)}}
    medians = {g: 0.5 + (i % 5) for i, g in enumerate(genes)}
    for name, value in (("tokens.pkl", tokens), ("medians.pkl", medians)):
        with open(tmp_path / name, "wb") as f:
            pickle.dump(value, f)
    config = transformers.BertConfig(vocab_size=len(tokens), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "gf")
    data = write_cells(tmp_path / "cells.h5ad")
    argv = ["run", data, "--groupby", "sex", "--model", tmp_path / "gf", "--token-dictionary", tmp_path / "tokens.pkl",
            "--gene-medians", tmp_path / "medians.pkl", "--gene-key", "ensembl_id", "--max-length", "16", "--window",
            "4", "--permutations", "0", "--min-cells", "1", "--no-figures", "--threads", "1"]  # fmt: skip
    return tmp_path, [str(a) for a in argv]


def test_geneformer_without_the_hf_extra_names_the_extra(geneformer):
    tmp_path, argv = geneformer
    out = tmp_path / "out"
    script = ("import sys; sys.modules['transformers'] = None  # what an install without the [hf] extra imports\n"
              "from attnprof.cli import main; sys.exit(main(sys.argv[1:]))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script, *argv, "--quiet", "--out", str(out)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "Geneformer models need the transformers package" in done.stderr
    assert "pip install 'attnprof[hf]'" in done.stderr and not out.exists()


def test_a_truncated_safetensors_file_says_so(geneformer, capsys):
    tmp_path, argv = geneformer
    weights = tmp_path / "gf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    fails(argv + ["--quiet", "--out", tmp_path / "out"], capsys, "cannot read its weights (model.safetensors)",
          "truncated", "download it again")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_pytorch_model_bin_holding_code_needs_trust(geneformer, capsys):
    tmp_path, argv = geneformer
    folder, marker = tmp_path / "gf", tmp_path / "code-ran"
    model = transformers.BertForMaskedLM.from_pretrained(folder)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({**state, "extra": WritesAFile(marker)}, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    fails(argv + ["--quiet", "--out", tmp_path / "out"], capsys, "hold Python objects besides tensors",
          "pass --trust-checkpoint")  # fmt: skip
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert main(argv + ["--quiet", "--out", str(tmp_path / "out"), "--trust-checkpoint"]) == 0  # trusted: loads
    assert marker.exists()  # and its code ran, as the flag's help says


def test_a_dictionary_pickle_holding_code_needs_trust(geneformer, capsys):
    tmp_path, argv = geneformer
    marker = tmp_path / "code-ran"
    tokens = pickle.loads((tmp_path / "tokens.pkl").read_bytes())
    (tmp_path / "tokens.pkl").write_bytes(pickle.dumps({**tokens, "<extra>": WritesAFile(marker)}))
    fails(argv + ["--quiet", "--out", tmp_path / "out"], capsys, "holds a pickled io.open, not plain data",
          "pass --trust-checkpoint")  # fmt: skip
    assert not marker.exists() and not (tmp_path / "out").exists()
    # numpy scalars are plain numbers: a medians dictionary of np.float32 values loads without trust
    medians = pickle.loads((tmp_path / "medians.pkl").read_bytes())
    (tmp_path / "medians.pkl").write_bytes(pickle.dumps({g: np.float32(m) for g, m in medians.items()}))
    (tmp_path / "tokens.pkl").write_bytes(pickle.dumps(tokens))
    assert main(argv + ["--quiet", "--out", str(tmp_path / "out")]) == 0


def test_quiet_silences_transformers(geneformer, capsys):
    tmp_path, argv = geneformer
    assert main(argv + ["--quiet", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "LOAD REPORT" not in err, err


def test_geneformer_leaving_out_every_cell_says_why(tmp_path, geneformer, capsys):
    _, argv = geneformer
    argv[1] = str(write_cells(tmp_path / "zero.h5ad", n_counts_zero=True))
    fails(argv + ["--quiet", "--out", tmp_path / "out"], capsys, "nothing to profile: 10 cells", "--counts-key")
    assert not (tmp_path / "out").exists()


def test_scgpt_leaving_out_every_cell_says_why(tmp_path, capsys):
    vocab = {f"other{i}": i for i in range(N_GENES)}  # none of the data's genes
    vocab.update({"<pad>": len(vocab), "<cls>": len(vocab) + 1, "<eoc>": len(vocab) + 2})
    config = ScGPTConfig(n_tokens=len(vocab), d_model=16, n_heads=2, d_hid=32, n_layers=1, dropout=0.0,
                         pad_id=vocab["<pad>"])  # fmt: skip
    folder = save_scgpt(ScGPT(config), tmp_path / "scgpt", vocab)
    data = write_cells(tmp_path / "cells.h5ad")
    vocab_genes = ad.read_h5ad(data)
    vocab_genes.var_names = [f"other{i}" for i in range(N_GENES)]
    vocab_genes.X = sp.csr_matrix(vocab_genes.shape, dtype=np.float32)  # the vocabulary genes have no counts
    vocab_genes.write_h5ad(data)
    fails(["run", data, "--groupby", "sex", "--model", folder, "--quiet", "--permutations", "0", "--out",
           tmp_path / "out"], capsys, "nothing to profile", "which is every selected cell")  # fmt: skip
    assert not (tmp_path / "out").exists()
