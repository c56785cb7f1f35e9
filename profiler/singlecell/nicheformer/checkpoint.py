"""Nicheformer's Lightning checkpoints: read into :class:`~.model.Nicheformer`, and written as the public ones are.

The training heads of the checkpoints (``classifier_head``, ``pooler_head``,
``cls_head``) are not needed for attention and are skipped on load.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import torch

from ...safe_pickle import NUMPY_SCALAR, refused_global
from ..vocab import EXTRA_EMBEDDINGS
from .model import HPARAM_NAMES, Nicheformer, NicheformerConfig

#: Checkpoint keys of training heads: present in public checkpoints, unused here.
TRAINING_HEADS = ("classifier_head.", "pooler_head.", "cls_head.")
ANCHOR = "encoder.layers.0.self_attn.in_proj_weight"  # a key every Nicheformer state dict has


def save_checkpoint(model: Nicheformer, path, prefix: str = "") -> Path:
    """Write a Lightning-style checkpoint (``state_dict`` + ``hyper_parameters``) as the public ones are."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {prefix + k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": model.config.hyper_parameters()}, path)
    return path


def load_nicheformer(path, *, n_heads: int | None = None, trust_checkpoint: bool = False) -> Nicheformer:
    """Load a Nicheformer Lightning checkpoint (or a bare state dict) into :class:`Nicheformer`.

    The state dict may sit under a prefix (``model.``, ``backbone.``); the
    architecture comes from ``hyper_parameters`` when present, else from the
    weight shapes (``n_heads`` must then be given: shapes do not show it).
    Files are read with ``weights_only=True``, which also admits the numpy
    float64 scalars that upstream's training leaves in ``optimizer_states`` and
    ``lr_schedulers`` (its cosine schedule computes learning rates with
    ``np.cos``); a file that holds other Python objects loads only with
    ``trust_checkpoint=True`` (runs its pickled code).
    """
    path = Path(path)
    checkpoint = _read(path, trust_checkpoint)
    state, hparams = _split(checkpoint, path)
    state = _strip_prefix(state, path)
    config = _config(state, hparams, n_heads, path)
    model = Nicheformer(config)
    _load_state(model, state, path)
    return model.eval()


def _numpy_float64_scalars() -> list:
    """Exactly what unpickling a numpy float64 scalar needs, under numpy 2's and numpy 1's module names."""
    return [
        (NUMPY_SCALAR, "numpy._core.multiarray.scalar"),
        (NUMPY_SCALAR, "numpy.core.multiarray.scalar"),  # checkpoints written with numpy < 2
        np.dtype,
        type(np.dtype(np.float64)),  # numpy.dtypes.Float64DType
    ]


def _read(path: Path, trust: bool):
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_numpy_float64_scalars()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if trust or "Unsupported operand" in str(e):  # garbage, not pickled objects: the flag would not help
            detail = f": {e}" if trust else ""
            raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupted?){detail}") from e
        what = refused_global(e)
        raise ValueError(
            f"{path} holds Python objects besides tensors{what}, which weights_only loading refuses; "
            f"if you trust the file, load it with trust_checkpoint=True (--trust-checkpoint)"
        ) from e
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {e}") from e


def _split(checkpoint, path):
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, expected a checkpoint dict or a state dict")
    if "state_dict" in checkpoint:
        return checkpoint["state_dict"], checkpoint.get("hyper_parameters")
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint, None
    raise ValueError(f"{path} has no 'state_dict' (its keys: {list(checkpoint)[:10]}); is it a Lightning checkpoint?")


def _strip_prefix(state: dict, path) -> dict:
    prefixes = {k[: -len(ANCHOR)] for k in state if k.endswith(ANCHOR)}
    if not prefixes:
        raise ValueError(
            f"{path} is not a Nicheformer checkpoint: no key ends in {ANCHOR!r} "
            f"(first keys: {list(state)[:6]}); attnprof loads Nicheformer encoders (nn.TransformerEncoder) only"
        )
    if len(prefixes) > 1:
        raise ValueError(f"{path} holds several encoders (key prefixes {sorted(prefixes)}); save one model per file")
    prefix = prefixes.pop()
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _config(state: dict, hparams, n_heads, path) -> NicheformerConfig:
    for key in ("embeddings.weight", "positional_embedding.weight", "encoder.layers.0.linear1.weight"):
        if key not in state:
            hint = " (a sinusoidal positional encoding is not supported)" if "positional" in key else ""
            raise ValueError(f"{path} is not a Nicheformer checkpoint: it lacks {key!r}{hint}")
    n_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    shapes = {
        "n_tokens": state["embeddings.weight"].shape[0] - EXTRA_EMBEDDINGS,
        "d_model": state["embeddings.weight"].shape[1],
        "d_ff": state["encoder.layers.0.linear1.weight"].shape[0],
        "n_layers": n_layers,
        "context_length": state["positional_embedding.weight"].shape[0],
    }
    hp = {}
    if hparams:
        hparams = dict(hparams)
        if hparams.get("learnable_pe", True) is False:
            raise ValueError(f"{path} uses a sinusoidal positional encoding (learnable_pe=False), not supported")
        hp = {field: hparams[name] for name, field in HPARAM_NAMES.items() if name in hparams}
        wrong = {k: (hp[k], v) for k, v in shapes.items() if k in hp and int(hp[k]) != v}
        if wrong:
            details = ", ".join(f"{k}: hyper_parameters say {a}, weights have {b}" for k, (a, b) in wrong.items())
            raise ValueError(f"{path}: hyper_parameters disagree with the weights ({details})")
    heads = hp.get("n_heads", n_heads)
    if heads is None:
        raise ValueError(
            f"{path} has no hyper_parameters, and the number of attention heads cannot be read from weight "
            f"shapes: pass n_heads= (--heads; the published Nicheformer has 16)"
        )
    if n_heads is not None and int(n_heads) != int(heads):
        raise ValueError(f"{path}: hyper_parameters say {heads} heads but n_heads={n_heads} was given")
    if int(heads) < 1 or shapes["d_model"] % int(heads):
        raise ValueError(f"{path}: its weights have d_model {shapes['d_model']}, which {int(heads)} heads cannot "
                         f"split evenly; pass a head count that divides it (--heads)")  # fmt: skip
    if "n_heads" not in hp:  # only the count given can be used: shapes are the same for every split
        warnings.warn(f"{path} does not record its number of attention heads: profiling {heads} heads as given "
                      f"(--heads); a wrong count silently splits q, k and v into other heads (the published "
                      f"Nicheformer has 16)", stacklevel=3)  # fmt: skip
    return NicheformerConfig(**shapes, n_heads=int(heads), dropout=float(hp.get("dropout", 0.0)))


def _load_state(model: Nicheformer, state: dict, path) -> None:
    expected = model.state_dict()
    # the encoder_layer prototype never runs: checkpoints without it are fine
    required = {k for k in expected if not k.startswith("encoder_layer.")}
    missing = sorted(required - state.keys())
    if missing:
        raise ValueError(
            f"{path} lacks {len(missing)} weights of a Nicheformer with {model.config.n_layers} layers "
            f"(e.g. {missing[:5]}): is it a different architecture?"
        )
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
             if k in expected and v.shape != expected[k].shape]  # fmt: skip
    if wrong:
        details = "; ".join(f"{k}: {a} in the file, {b} expected" for k, a, b in wrong[:5])
        raise ValueError(f"{path} has weights of a different architecture ({details})")
    unknown = sorted(k for k in state.keys() - expected.keys() if not k.startswith(TRAINING_HEADS))
    if unknown:
        warnings.warn(
            f"{path} has {len(unknown)} weights a Nicheformer encoder does not use, ignored (e.g. {unknown[:5]})",
            stacklevel=3,
        )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
