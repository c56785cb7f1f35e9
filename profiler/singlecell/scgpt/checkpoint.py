"""scGPT model folders: args.json, vocab.json and best_model.pt read (and written, for tests and demos).

Checkpoints trained with flash attention name the fused projection ``self_attn.Wqkv.*`` (or
``self_attn._impl.Wqkv.*``): it is the q, k, v projection stacked as ``nn.MultiheadAttention``'s
``in_proj``, and is loaded there. Every weight of the encoder must be found in the file, or the load is
refused; the training heads are the only keys left aside.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from .model import ScGPT, ScGPTConfig

SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")  # appended to the vocabulary when absent, as embed_data does
#: Checkpoint keys of training heads: not used for attention, left aside on load.
TRAINING_HEADS = ("decoder.", "cls_decoder.", "mvc_decoder.", "grad_reverse_discriminator.", "sim.")
#: Keys of parts that change the encoder's math and are not supported.
UNSUPPORTED = {"dsbn.": "domain-specific batch norm", "bn.": "batch norm", "batch_encoder.": "batch labels"}
#: Flash-attention names -> nn.MultiheadAttention names (scGPT's load_pretrained rename rules).
RENAMES = ((r"self_attn\._impl\.Wqkv\.", "self_attn.in_proj_"), (r"self_attn\.Wqkv\.", "self_attn.in_proj_"),
           (r"self_attn\._impl\.out_proj\.", "self_attn.out_proj."))  # fmt: skip


def read_vocab(path) -> dict[str, int]:
    """vocab.json (token -> id), with scGPT's special tokens appended when absent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the scGPT vocabulary {path} does not exist: pass the model folder with vocab.json")
    try:
        vocab = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from e
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError(f"{path} must map gene names to ids (scGPT's vocab.json)")
    vocab = {str(k): int(v) for k, v in vocab.items()}
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{path}: the ids must be 0..{len(vocab) - 1}, each once")
    for token in SPECIAL_TOKENS:
        vocab.setdefault(token, len(vocab))
    return vocab


def read_args(folder: Path) -> dict:
    path = folder / "args.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no args.json: pass the scGPT model folder (args.json, vocab.json, "
                                f"best_model.pt)")  # fmt: skip
    args = json.loads(path.read_text())
    missing = [k for k in ("embsize", "nheads", "d_hid", "nlayers") if k not in args]
    if missing:
        raise ValueError(f"{path} lacks {missing}: is it an scGPT args.json?")
    for key, supported in (("input_emb_style", "continuous"), ("pre_norm", False)):
        if args.get(key, supported) != supported:
            raise ValueError(f"{path}: {key}={args[key]!r} is not supported (only {supported!r})")
    return args


def model_file(folder: Path) -> Path:
    path = folder / "best_model.pt"
    if path.is_file():
        return path
    found = sorted(folder.glob("*.pt"))
    if len(found) != 1:
        raise FileNotFoundError(f"{folder} has no best_model.pt (and {len(found)} other .pt files): pass the "
                                f"scGPT model folder")  # fmt: skip
    return found[0]


def load_scgpt(folder, *, trust_checkpoint: bool = False) -> tuple[ScGPT, dict, dict]:
    """An scGPT model folder (args.json, vocab.json, best_model.pt) as (model, vocab, args); a checkpoint
    holding pickled objects besides tensors loads only with ``trust_checkpoint`` (its code may run)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass the scGPT model folder (args.json, vocab.json, "
                                f"best_model.pt)")  # fmt: skip
    args = read_args(folder)
    vocab = read_vocab(folder / "vocab.json")
    pad_token = args.get("pad_token", "<pad>")
    config = ScGPTConfig(
        n_tokens=len(vocab), d_model=int(args["embsize"]), n_heads=int(args["nheads"]), d_hid=int(args["d_hid"]),
        n_layers=int(args["nlayers"]), dropout=float(args.get("dropout", 0.0)), pad_id=vocab[pad_token],
        pad_value=int(args.get("pad_value", -2)), n_bins=int(args.get("n_bins", 51)),
    )  # fmt: skip
    path = model_file(folder)
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise ValueError(f"{path} holds Python objects besides tensors, which loading it would run as code; "
                             f"if you trust the file, pass --trust-checkpoint") from None  # fmt: skip
        raise ValueError(f"{path} is not a readable PyTorch state dict: {e}") from e
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path} is not a readable PyTorch state dict: {e}") from e
    if trust_checkpoint and isinstance(state, dict):
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}  # the code ran; keep the weights
    model = ScGPT(config)
    load_state(model, state, path)
    return model.eval(), vocab, args


def load_state(model: ScGPT, state, path) -> None:
    """Load an scGPT state dict: fused-attention names mapped, every encoder weight required."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors (scGPT saves model.state_dict())")
    renamed = {}
    for key, value in state.items():
        for pattern, new in RENAMES:
            key = re.sub(pattern, new, key)
        renamed[key] = value
    if not any(k.endswith("self_attn.in_proj_weight") for k in renamed):
        raise ValueError(f"{path} is not an scGPT checkpoint: it has no attention weights "
                         f"(first keys: {list(state)[:5]})")  # fmt: skip
    for prefix, what in UNSUPPORTED.items():
        if any(k.startswith(prefix) for k in renamed):
            raise ValueError(f"{path} uses {what} ({prefix}*), which attnprof's scGPT encoder does not support")
    expected = model.state_dict()
    missing = sorted(expected.keys() - renamed.keys())
    if missing:
        raise ValueError(
            f"{path} lacks {len(missing)} weights of an scGPT encoder with {model.config.n_layers} layers "
            f"(e.g. {missing[:5]}): is it an scGPT checkpoint matching args.json?"
        )
    unknown = sorted(k for k in renamed.keys() - expected.keys() if not k.startswith(TRAINING_HEADS))
    if unknown:
        raise ValueError(f"{path} has {len(unknown)} weights the scGPT encoder does not know (e.g. {unknown[:5]}): "
                         f"refusing to skip them")  # fmt: skip
    wrong = [(k, tuple(renamed[k].shape), tuple(v.shape)) for k, v in expected.items() if renamed[k].shape != v.shape]
    if wrong:
        details = "; ".join(f"{k}: {a} in the file, {b} expected" for k, a, b in wrong[:5])
        raise ValueError(f"{path} does not match args.json and vocab.json ({details})")
    model.load_state_dict({k: renamed[k] for k in expected}, strict=True)


def save_scgpt(model: ScGPT, folder, vocab: dict, *, fused: bool = True, extra: dict | None = None) -> Path:
    """Write a model folder in the published layout (tests, demos): fused-attention names when ``fused``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in model.state_dict().items():
        if fused:
            key = key.replace("self_attn.in_proj_", "self_attn.Wqkv.")
        state[key] = value.detach().clone()
    state.update(extra or {})
    torch.save(state, folder / "best_model.pt")
    c = model.config
    args = {"embsize": c.d_model, "nheads": c.n_heads, "d_hid": c.d_hid, "nlayers": c.n_layers,
            "n_layers_cls": 3, "dropout": c.dropout, "pad_token": "<pad>", "pad_value": c.pad_value,
            "n_bins": c.n_bins, "input_emb_style": "continuous"}  # fmt: skip
    (folder / "args.json").write_text(json.dumps(args, indent=2))
    (folder / "vocab.json").write_text(json.dumps({k: v for k, v in vocab.items()}))
    return folder

