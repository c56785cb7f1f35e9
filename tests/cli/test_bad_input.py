"""Every public entry point, fed broken input: a clear error each time, and nothing already saved is damaged.

Entry points: attention_stats, StatsSpec, Profiler / set_batch, Profile.load / save / +, merge, compare,
validate, profile_anndata (with checkpoints), and the CLI subcommands run, merge, plot, validate, demo.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import attnprof
from attnprof import Profile, StatsSpec, attention_stats
from attnprof.cli import main
from attnprof.singlecell import profile_anndata, small_nicheformer
from attnprof.singlecell.demo import demo_vocabulary, make_demo_data, technology_means, write_demo_inputs


# ------------------------------------------------------------ the kernels
SPEC = StatsSpec(n_groups=2, window=4, vocab_size=10, panel=(1, 2), n_context=1)


def qkv(B=2, H=2, L=5, D=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, L, D, generator=g) for _ in range(3)]


def stats(q, k, v, groups=(0, 1), mask=None, tokens=None, spec=SPEC, **kw):
    tokens = torch.zeros(q.shape[0], q.shape[2], dtype=torch.long) if tokens is None else tokens
    return attention_stats(q, k, v, spec=spec, groups=torch.tensor(groups), key_padding_mask=mask, tokens=tokens, **kw)


def with_value(x, index, value):
    x = x.clone()
    x[index] = value
    return x


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda q, k, v: stats(q[0], k[0], v[0]), r"q must have shape \[B, H, L, D\], got \(2, 5, 8\)"),
        (lambda q, k, v: stats(q, k[:, :, :4], v), "q, k, v must have the same shape"),
        (lambda q, k, v: stats(with_value(q, (1, 0, 2, 3), float("nan")), k, v), "q contains NaN or Inf"),
        (lambda q, k, v: stats(q, k, with_value(v, (0, 1, 0, 0), float("inf"))), "v contains NaN or Inf"),
        (lambda q, k, v: stats(q[:0], k[:0], v[:0], groups=()), "empty batch"),
        (lambda q, k, v: stats(q, k, v, mask=torch.tensor([[False] * 5, [True] * 5])),
         r"cells \[1\] have no real token"),
        (lambda q, k, v: stats(q, k, v, groups=(0, 1, 1)), r"groups must have shape \[B\] = \[2\], got \(3,\)"),
        (lambda q, k, v: stats(q, k, v, groups=(0, 5)), r"group codes \[5\] are out of range"),
        (lambda q, k, v: stats(q, k, v, tokens=torch.full((2, 5), 99)), r"token ids \[99\] are outside"),
        (lambda q, k, v: stats(q, k, v, tokens=torch.zeros(2, 4, dtype=torch.long)), "tokens must have shape"),
        (lambda q, k, v: stats(q, k, v, backend="fastest"), "unknown backend 'fastest'"),
    ],
    ids=["3d", "shapes", "nan", "inf", "empty-batch", "zero-length-cell", "group-count", "group-code",
         "token-id", "token-shape", "backend"],  # fmt: skip
)
def test_attention_stats_refuses_broken_input(call, message):
    with pytest.raises(ValueError, match=message):
        call(*qkv())


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"window": 0}, r"window must be in \[1, 8192\], got 0"),
        ({"window": 10**6}, r"window must be in \[1, 8192\], got 1000000"),
        ({"n_groups": 0}, "n_groups must be >= 1"),
        ({"vocab_size": 10, "panel": (1, 1)}, "panel token ids must be unique"),
        ({"vocab_size": 10, "panel": (12,)}, r"panel token ids \[12\] are outside the vocabulary"),
    ],
)
def test_stats_spec_refuses_absurd_settings(kw, message):
    with pytest.raises(ValueError, match=message):
        StatsSpec(**{"n_groups": 2, **kw})


# ------------------------------------------------------------ the profiler
VOCAB = 12


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2).eval()


def batch(B=4, L=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, L, 16, generator=g), torch.randint(0, VOCAB, (B, L), generator=g), ["a", "b"] * (B // 2)


def profile_of(encoder, x, tokens, labels, **options):
    with attnprof.Profiler(encoder, ["a", "b"], **{"genes": VOCAB, "window": 3, **options}) as prof, \
            torch.inference_mode():  # fmt: skip
        prof.set_batch(groups=labels, tokens=tokens)
        encoder(x)
    return prof.profile


def test_profiler_refuses_broken_batches_and_names_the_layer(encoder):
    x, tokens, labels = batch()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with attnprof.Profiler(encoder, ["a", "b"], genes=VOCAB, window=3) as prof, torch.inference_mode():
        with pytest.raises(RuntimeError, match="call set_batch"):
            encoder(x)
        prof.set_batch(groups=labels[:3], tokens=tokens[:3])
        with pytest.raises(ValueError, match="set_batch gave 3 group codes but layer 'layers.0.self_attn' sees"):
            encoder(x)
        with pytest.raises(ValueError, match=r"group labels \['c'\] are not among the profiled groups"):
            prof.set_batch(groups=["a", "b", "c", "a"], tokens=tokens)
        with pytest.raises(ValueError, match="gene statistics are on.*pass tokens="):
            prof.set_batch(groups=labels)
        with pytest.raises(TypeError, match="permutations no longer run in the forward pass"):
            prof.set_batch(groups=labels, tokens=tokens, null_groups=[labels])
        with pytest.raises(ValueError, match="pseudo-replicate indices must be one per cell, in \\[0, 8\\)"):
            prof.set_batch(groups=labels, tokens=tokens, replicates=[0, 1, 2, 9])
        prof.set_batch(groups=labels, tokens=tokens)
        with pytest.raises(ValueError, match=r"layer 'layers.0.self_attn': q contains NaN or Inf"):
            encoder(with_value(x, (1, 2, 3), float("nan")))
    for k, v in encoder.state_dict().items():  # the model is restored after the failures
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match=r"panel genes \['Foo'\] are not in the vocabulary"):
        attnprof.Profiler(encoder, ["a", "b"], genes=[f"g{i}" for i in range(VOCAB)], panel=["Foo"])


def test_validate_refuses_non_finite_activations(encoder):
    x, tokens, labels = batch()
    with pytest.raises(ValueError, match="q contains NaN or Inf"):
        attnprof.validate(encoder, (with_value(x, (0, 0, 0), float("inf")),), groups=labels, tokens=tokens,
                          genes=VOCAB, window=3, backend="torch")  # fmt: skip


# ------------------------------------------------------ profiles on disk
@pytest.fixture
def saved(encoder, tmp_path):
    x, tokens, labels = batch()
    profile = profile_of(encoder, x, tokens, labels)
    path = profile.save(tmp_path / "p.npz")
    return profile, path


def corrupted(path, tmp_path):
    """Variants of a saved profile: truncated, bytes flipped mid-file, not a zip, and an npz without a header."""
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    files = {
        "truncated": data[: len(data) * 2 // 3],
        "flipped": bytes(flipped),
        "text": b"not a profile\n",
    }
    out = {}
    for name, content in files.items():
        out[name] = tmp_path / f"{name}.npz"
        out[name].write_bytes(content)
    out["headerless"] = tmp_path / "headerless.npz"
    np.savez(out["headerless"], sum_cells=np.zeros((1, 2)))
    return out


def test_load_refuses_truncated_or_corrupted_profiles(saved, tmp_path):
    _, path = saved
    for name, bad in corrupted(path, tmp_path).items():
        message = "no header" if name == "headerless" else "is not a readable attnprof profile .truncated or corrupted"
        with pytest.raises(ValueError, match=message):
            Profile.load(bad)
    with pytest.raises(FileNotFoundError):
        Profile.load(tmp_path / "missing.npz")


def test_a_failing_save_leaves_the_saved_file_intact(saved, monkeypatch):
    profile, path = saved
    before = path.read_bytes()
    profile.meta["bad"] = object()  # not JSON: refused before any file is touched
    with pytest.raises(ValueError, match="meta must be JSON-serializable"):
        profile.save(path)
    del profile.meta["bad"]

    written = []

    def half_written(f, array, **kwargs):  # the disk fills up in the second array
        if written:
            f.write(b"\x93NUMPY half an array")
            raise OSError("disk full")
        written.append(original(f, array, **kwargs))

    original = np.lib.format.write_array
    monkeypatch.setattr(np.lib.format, "write_array", half_written)
    with pytest.raises(OSError, match="disk full"):
        profile.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_merge_and_compare_refuse_what_does_not_fit(saved, encoder):
    profile, _ = saved
    x, tokens, labels = batch()
    other_vocab = profile_of(encoder, x, tokens, labels, genes=[f"gene{i}" for i in range(VOCAB)])
    with pytest.raises(ValueError, match="different layout.*genes.*vocabulary mismatch"):
        profile + other_vocab
    with pytest.raises(ValueError, match=r"different layout \(window: 3 vs 4"):
        attnprof.merge([profile, profile_of(encoder, x, tokens, labels, window=4)])
    with pytest.raises(ValueError, match="at least one"):
        attnprof.merge([])
    with pytest.raises(TypeError, match="merge takes Profile objects, got str.*Profile.load"):
        attnprof.merge([profile, "p.npz"])
    with pytest.raises(ValueError, match=r"unknown group 'c': this profile has groups \['a', 'b'\]"):
        attnprof.compare(profile, "a", "c")
    with pytest.raises(ValueError, match="two different groups"):
        attnprof.compare(profile, "a", "a")
    with pytest.raises(ValueError, match=r"permutations must be >= 0 \(0: no permutation null\) and at most 100,000 .*got -3"):
        attnprof.compare(profile, "a", "b", permutations=-3)
    with pytest.raises(ValueError, match="unit='replicate' needs a profile with replicates"):
        attnprof.compare(profile, "a", "b", unit="replicate")
    only_a = profile_of(encoder, x, tokens, ["a"] * 4)
    with pytest.raises(ValueError, match=r"group\(s\) \['b'\] have zero cells"):
        only_a.compare("a", "b")


# ----------------------------------------------------- profile_anndata
@pytest.fixture(scope="module")
def cells():
    adata = make_demo_data(n_cells=16, n_genes=30, seed=2)
    vocab = demo_vocabulary(adata, seed=2)
    return adata, vocab, technology_means(adata, vocab)


@pytest.fixture(scope="module")
def niche(cells):
    return small_nicheformer(cells[1].n_tokens, seed=3, n_layers=1, context_length=24)


def profile_cells(model, cells, **kw):
    adata, vocab, means = cells
    options = dict(vocab=vocab, means=means, window=8, batch_size=4, progress=False, backend="torch")
    return profile_anndata(model, adata, "sex", **{**options, **kw})


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        ({"window": 25}, ValueError, r"window=25 is outside \[1, 24\]: the model reads at most 24 tokens"),
        ({"window": 0}, ValueError, r"window=0 is outside \[1, 24\]"),
        ({"vocab": ["Esr1", "Ar"]}, ValueError, "has 2 genes, so the model would need n_tokens=32"),
        ({"pseudo_replicates": 0}, ValueError, "pseudo_replicates must be at least 1 per group"),
        ({"shard": (2, 2)}, ValueError, r"shard=\(2, 2\) needs 0 <= index < count"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be at least 1 cell"),
        ({"subset": "cell_type == 'pericyte'"}, ValueError, "selects no cells"),
        ({"checkpoint_every": 0, "checkpoint": "ckpt.npz"}, ValueError, "checkpoint_every must be at least 1"),
    ],
    ids=["window-beyond-context", "window-zero", "vocabulary", "pseudo-replicates", "shard", "batch-size",
         "chunk-size", "empty-selection", "checkpoint-every"],  # fmt: skip
)
def test_profile_anndata_refuses_broken_options(niche, cells, kw, error, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        profile_cells(niche, cells, **kw)
    assert list(tmp_path.iterdir()) == []  # no checkpoint, nothing written


def test_profile_anndata_refuses_other_models_and_missing_files(niche, cells, tmp_path):
    with pytest.raises(TypeError, match="Nicheformer-style models"):
        profile_cells(nn.Linear(2, 2), cells)
    with pytest.raises(FileNotFoundError, match="data file .*nowhere.h5ad does not exist"):
        profile_anndata(niche, tmp_path / "nowhere.h5ad", "sex", vocab=cells[1], window=8)


def test_a_broken_or_foreign_checkpoint_is_refused_and_kept(niche, cells, saved, tmp_path):
    ckpt = tmp_path / "ckpt.npz"
    _, profile_file = saved
    cases = {
        "is not a readable attnprof checkpoint .truncated or corrupted": b"garbage",
        r"is not an attnprof checkpoint \(a profile\?\)": profile_file.read_bytes(),
    }
    for message, content in cases.items():
        ckpt.write_bytes(content)
        with pytest.raises(ValueError, match=message):
            profile_cells(niche, cells, checkpoint=ckpt)
        assert ckpt.read_bytes() == content
    # a checkpoint of another run: left by an interrupted run with another window, then given to this one
    ckpt.unlink()
    handle = niche.register_forward_pre_hook(_crash_after(2))
    try:
        with pytest.raises(KeyboardInterrupt):
            profile_cells(niche, cells, checkpoint=ckpt, checkpoint_every=4, window=4)
    finally:
        handle.remove()
    before = ckpt.read_bytes()
    with pytest.raises(ValueError, match=r"is from another run \(options.window differ\).*delete it to start over"):
        profile_cells(niche, cells, checkpoint=ckpt, checkpoint_every=4)
    assert ckpt.read_bytes() == before


def _crash_after(n):
    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) > n:
            raise KeyboardInterrupt  # as a user's Ctrl-C mid-run

    return hook


# ------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_demo_inputs(tmp_path_factory.mktemp("inputs"), n_cells=16, n_genes=30, seed=4)


def run_argv(inputs, out, *extra):
    return ["run", str(inputs["data.h5ad"]), "--groupby", "sex", "--model", str(inputs["model.ckpt"]),
            "--vocab", str(inputs["vocab.txt"]), "--means", str(inputs["means.npy"]), "--window", "8",
            "--no-figures", "--quiet", "--permutations", "0", "--out", str(out), *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--window", "100000"], "window=100000 is outside [1, 128]: the model reads at most 128 tokens"),
        (["--shard", "2/2"], "--shard takes I/N with 0 <= I < N"),
        (["--shard", "half"], "--shard takes I/N"),
        (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1 cell"),
        (["--permutations", "-2"], "permutations must be between 0 (no permutation null) and 100,000"),
        (["--permutations", "1000000"], "more only costs time), got 1000000"),
        (["--pseudo-replicates", "0"], "pseudo-replicates must be at least 1"),
        (["--replicate", "donor"], "obs has no column 'donor'"),
        (["--strata", "cell_type"], "--strata names strata of replicates: give --replicate too"),
    ],
    ids=["window", "shard-range", "shard-format", "checkpoint-every", "permutations", "permutations-huge",
         "pseudo-replicates",
         "replicate-column", "strata-alone"],
)
def test_cli_run_refuses_broken_options(inputs, tmp_path, capsys, extra, message):
    assert main(run_argv(inputs, tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnprof: error: ") and message in err
    assert not (tmp_path / "profile.npz").exists()


def test_cli_run_refuses_a_checkpoint_of_another_run(inputs, cells, niche, tmp_path, capsys):
    """A checkpoint left in --out by another run (here: of in-memory data) is refused and left as it was."""
    ckpt = tmp_path / "checkpoint.npz"
    handle = niche.register_forward_pre_hook(_crash_after(1))
    try:
        with pytest.raises(KeyboardInterrupt):
            profile_cells(niche, cells, checkpoint=ckpt, checkpoint_every=4)
    finally:
        handle.remove()
    before = ckpt.read_bytes()
    assert main(run_argv(inputs, tmp_path, "--checkpoint-every", "4")) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt} is from another run (data.cells, data.source, model.context_length," in err
    assert "more differ): resuming would mix cells of two runs; delete it" in err
    assert ckpt.read_bytes() == before and not (tmp_path / "profile.npz").exists()


def test_cli_merge_plot_validate_demo_refuse_broken_input(saved, encoder, tmp_path, inputs, capsys):
    profile, path = saved
    x, tokens, labels = batch()
    other = profile_of(encoder, x, tokens, labels, genes=[f"gene{i}" for i in range(VOCAB)]).save(tmp_path / "o.npz")
    target = tmp_path / "merged.npz"
    target.write_bytes(b"an earlier merge")

    def fails(argv, message):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("attnprof: error: ") and message in err, err

    for name, bad in corrupted(path, tmp_path).items():
        message = "no header" if name == "headerless" else "not a readable attnprof profile (truncated or corrupted?)"
        fails(["merge", str(path), str(bad), "-o", str(target), "--overwrite"], message)
        fails(["plot", str(bad), "--out", str(tmp_path / "figures")], message)
    fails(["merge", str(path), str(other), "-o", str(target)], f"-o {target} exists: give a new file name, or --overwrite")
    fails(["merge", str(path), str(other), "-o", str(target), "--overwrite"], "vocabulary mismatch")
    fails(["merge", str(path), str(tmp_path / "nowhere"), "-o", str(target)], "no profile at")
    assert target.read_bytes() == b"an earlier merge"  # every failed merge left it alone
    assert not (tmp_path / "figures").exists()

    data = [str(inputs["data.h5ad"]), "--model", str(inputs["model.ckpt"]), "--vocab", str(inputs["vocab.txt"])]
    fails(["validate", *data, "--cells", "0"], "--cells must be at least 1")
    fails(["validate", *data, "--window", "0", "--cells", "4"], "window must be in [1, 8192], got 0")
    fails(["demo", "--cells", "1", "--out", str(tmp_path / "demo")], "--cells must be at least 2")


def test_demo_refuses_a_folder_holding_another_run_before_writing_its_inputs(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "run.json").write_text('{"outputs": ["profile.npz", "run.json"]}\n')
    (out / "profile.npz").write_bytes(b"an earlier run's profile")
    assert main(["demo", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} holds another run (run.json)" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["profile.npz", "run.json"]  # no inputs/ written
    assert (out / "profile.npz").read_bytes() == b"an earlier run's profile"


def test_a_manifest_listing_files_outside_its_folder_is_not_trusted(inputs, tmp_path, capsys):
    """--overwrite removes only what the folder's own run.json lists inside the folder."""
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    (out / "run.json").write_text('{"outputs": ["../precious.txt"]}\n')
    assert main(run_argv(inputs, out, "--overwrite")) == 2
    assert "lists files outside" in capsys.readouterr().err and victim.read_text() == "keep me\n"
