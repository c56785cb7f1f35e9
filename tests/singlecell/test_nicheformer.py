"""The Nicheformer model: public checkpoint layout, loading, bad checkpoints, padding, profiled layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnprof import Profiler
from attnprof.singlecell.nicheformer import (
    Nicheformer,
    NicheformerConfig,
    load_nicheformer,
    save_checkpoint,
    small_nicheformer,
)

N_TOKENS = 50  # 20 genes + 30 reserved ids


@pytest.fixture(scope="module")
def model():
    return small_nicheformer(N_TOKENS, seed=3, n_layers=2, context_length=32)


def random_tokens(B=5, L=20, seed=0, lengths=(20, 3, 11, 7, 16)):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(30, N_TOKENS, (B, L), generator=g)
    tokens[:, :3] = torch.tensor([6, 7, 4])
    for b, n in enumerate(lengths):
        tokens[b, n:] = 1
    return tokens


def public_checkpoint(model, prefix="model."):
    """A checkpoint in the public layout: prefixed keys, the encoder_layer duplicate, training heads."""
    state = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    d = model.config.d_model
    state[prefix + "classifier_head.weight"] = torch.zeros(N_TOKENS, d)
    state[prefix + "classifier_head.bias"] = torch.zeros(N_TOKENS)
    state[prefix + "pooler_head.weight"] = torch.zeros(d, d)
    state[prefix + "cls_head.weight"] = torch.zeros(164, d)
    return {"state_dict": state, "hyper_parameters": model.config.hyper_parameters(), "epoch": 3}


def test_state_dict_keys_match_the_public_layout(model):
    keys = set(model.state_dict())
    for key in (
        "embeddings.weight",
        "positional_embedding.weight",
        "encoder.layers.0.self_attn.in_proj_weight",
        "encoder.layers.1.linear2.bias",
        "encoder_layer.self_attn.in_proj_weight",  # the prototype's duplicate keys
        "encoder_layer.norm2.weight",
    ):
        assert key in keys
    assert model.embeddings.weight.shape == (N_TOKENS + 5, 32)
    assert model.embeddings.padding_idx == 1
    layer = model.encoder.layers[0]
    assert layer.norm_first is False and layer.norm1.eps == 1e-12 and layer.self_attn.batch_first


def test_public_checkpoint_loads_with_identical_outputs(model, tmp_path):
    path = tmp_path / "nicheformer.ckpt"
    torch.save(public_checkpoint(model), path)
    loaded = load_nicheformer(path)
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    tokens = random_tokens()
    with torch.inference_mode():
        assert torch.equal(loaded(tokens), model.eval()(tokens))


def test_checkpoint_without_hyper_parameters_needs_heads(model, tmp_path):
    path = tmp_path / "bare.ckpt"
    torch.save(model.state_dict(), path)  # a bare state dict: the shapes give all but the heads
    with pytest.raises(ValueError, match="number of attention heads cannot be read.*--heads"):
        load_nicheformer(path)
    loaded = load_nicheformer(path, n_heads=4)
    assert loaded.config == model.config


def test_saved_checkpoint_round_trips(model, tmp_path):
    loaded = load_nicheformer(save_checkpoint(model, tmp_path / "m.ckpt", prefix="backbone."))
    assert loaded.config == model.config


def test_different_architecture_is_a_clear_error(tmp_path):
    bert = {"state_dict": {"bert.encoder.layer.0.attention.self.query.weight": torch.zeros(4, 4)}}
    torch.save(bert, tmp_path / "bert.ckpt")
    with pytest.raises(ValueError, match="not a Nicheformer checkpoint.*encoder.layers.0.self_attn.in_proj_weight"):
        load_nicheformer(tmp_path / "bert.ckpt")

    other = small_nicheformer(N_TOKENS, n_layers=2, context_length=32, d_model=16)
    ckpt = public_checkpoint(other)
    ckpt["hyper_parameters"]["dim_model"] = 32  # says 32, weights are 16 wide
    torch.save(ckpt, tmp_path / "liar.ckpt")
    with pytest.raises(ValueError, match="hyper_parameters disagree with the weights.*d_model"):
        load_nicheformer(tmp_path / "liar.ckpt")

    incomplete = public_checkpoint(small_nicheformer(N_TOKENS, n_layers=2, context_length=32))
    del incomplete["state_dict"]["model.encoder.layers.1.norm2.weight"]
    torch.save(incomplete, tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="lacks 1 weights.*encoder.layers.1.norm2.weight.*different architecture"):
        load_nicheformer(tmp_path / "missing.ckpt")


def test_unknown_weights_warn(model, tmp_path):
    ckpt = public_checkpoint(model)
    ckpt["state_dict"]["model.encoder.norm.weight"] = torch.ones(32)
    torch.save(ckpt, tmp_path / "extra.ckpt")
    with pytest.warns(UserWarning, match="1 weights a Nicheformer encoder does not use.*encoder.norm.weight"):
        load_nicheformer(tmp_path / "extra.ckpt")


class Opaque:  # stands for a Python object pickled into a checkpoint
    pass


def test_pickled_objects_need_trust(model, tmp_path):
    ckpt = public_checkpoint(model)
    ckpt["callbacks"] = Opaque()
    torch.save(ckpt, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="Python objects besides tensors.*Opaque.*--trust-checkpoint"):
        load_nicheformer(tmp_path / "pickled.ckpt")
    assert load_nicheformer(tmp_path / "pickled.ckpt", trust_checkpoint=True).config == model.config


class CosineWarmup(torch.optim.lr_scheduler.LRScheduler):
    """Upstream's CosineWarmupScheduler restated: its learning rates are numpy float64 (np.cos)."""

    def __init__(self, optimizer, warmup, max_epochs):
        self.warmup, self.max_num_epochs = warmup, max_epochs
        super().__init__(optimizer)

    def get_lr(self):
        factor = 0.5 * (1 + np.cos(np.pi * self.last_epoch / self.max_num_epochs))
        if self.last_epoch <= self.warmup:
            factor *= self.last_epoch * 1.0 / self.warmup
        return [max(1e-5, base * factor) for base in self.base_lrs]


def lightning_checkpoint(model):
    """A checkpoint as Lightning's trainer writes it after a few steps of upstream's optimizer setup."""
    trained = small_nicheformer(N_TOKENS, seed=3, n_layers=2, context_length=32)
    trained.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-3, weight_decay=0.1)
    scheduler = CosineWarmup(optimizer, warmup=2, max_epochs=10)
    for _ in range(3):
        trained(random_tokens()).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    ckpt = public_checkpoint(trained)
    ckpt.update({
        "global_step": 3, "pytorch-lightning_version": "2.1.3", "hparams_name": "kwargs",
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 1}}}}, "callbacks": {},
        "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [scheduler.state_dict()],
    })  # fmt: skip
    return trained, ckpt


def test_lightning_checkpoint_with_numpy_scalars_loads_without_trust(model, tmp_path):
    trained, ckpt = lightning_checkpoint(model)
    assert isinstance(ckpt["lr_schedulers"][0]["_last_lr"][0], np.float64)  # what weights_only refused
    assert isinstance(ckpt["optimizer_states"][0]["param_groups"][0]["lr"], np.float64)
    torch.save(ckpt, tmp_path / "lightning.ckpt")
    loaded = load_nicheformer(tmp_path / "lightning.ckpt")
    tokens = random_tokens()
    with torch.inference_mode():
        assert torch.equal(loaded(tokens), trained.eval()(tokens))
    # only float64 scalars are admitted: another numpy object still needs trust
    ckpt["callbacks"] = {"threshold": np.int32(3)}
    torch.save(ckpt, tmp_path / "int32.ckpt")
    with pytest.raises(ValueError, match="Python objects besides tensors.*--trust-checkpoint"):
        load_nicheformer(tmp_path / "int32.ckpt")


def test_trimmed_padding_leaves_real_outputs_unchanged(model):
    tokens = random_tokens()
    padded = torch.cat([tokens, torch.ones(5, 12, dtype=torch.long)], 1)  # out to the context length
    real = tokens != 1
    with torch.inference_mode():
        short, full = model(tokens), model(padded)[:, :20]
    torch.testing.assert_close(short[real], full[real], atol=1e-5, rtol=1e-5)


def test_tokens_beyond_the_context_length_fail(model):
    with pytest.raises(ValueError, match="33 tokens per cell exceed the context length 32"):
        model(torch.full((1, 33), 40))


def test_profiler_records_the_encoder_layers_not_the_prototype(model):
    tokens = random_tokens()
    with torch.inference_mode():
        plain = model(tokens)
    with Profiler(model, groups=["a", "b"], genes=N_TOKENS + 5, n_context=3) as prof:
        prof.set_batch(groups=[0, 1, 0, 1, -1], tokens=tokens)
        with torch.inference_mode():
            profiled = model(tokens)
    assert prof.profile.layers == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    assert prof.profile.n_heads == 4
    real = tokens != 1
    torch.testing.assert_close(profiled[real], plain[real], atol=1e-5, rtol=1e-5)


def test_config_matches_the_published_model():
    config = NicheformerConfig()
    shape = (config.n_layers, config.n_heads, config.d_model, config.d_ff, config.context_length)
    assert shape == (12, 16, 512, 1024, 1500)
    assert config.n_tokens == 20_340
    with pytest.raises(ValueError, match="not divisible"):
        Nicheformer(NicheformerConfig(n_tokens=40, d_model=30, n_heads=4))
