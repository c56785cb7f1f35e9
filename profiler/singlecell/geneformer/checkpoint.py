"""Geneformer's files: the model folder (a transformers ``BertModel``) and the token and gene median dictionaries."""

from __future__ import annotations

import pickle
from contextlib import contextmanager
from pathlib import Path

import torch

from ...safe_pickle import UntrustedPickle, load_plain, refused_global


def read_dictionary(path, what: str, trust: bool = False) -> dict:
    """A Geneformer pickle dictionary (token dictionary or gene medians): plain data only unless ``trust``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"the Geneformer {what} {path} does not exist: pass the .pkl from the model's release "
            f"(geneformer/{'token_dictionary' if what == 'token dictionary' else 'gene_median_dictionary'}*.pkl)"
        )
    try:
        found = load_plain(path, what, trust=trust)  # Geneformer ships these as pickles
    except UntrustedPickle:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"{path} is not a readable pickle ({what}): {e}") from e
    if not isinstance(found, dict) or not found:
        raise ValueError(f"{path} holds a {type(found).__name__}, expected the Geneformer {what} (a dict)")
    return found


def require_transformers():
    """The transformers module, or a message naming the extra that installs it."""
    try:
        import transformers
    except ImportError as e:
        raise ValueError(
            f"Geneformer models need the transformers package, which is not installed ({e}): "
            f"pip install 'attnprof[hf]' (or pip install transformers)"
        ) from None
    return transformers


@contextmanager
def _transformers_quiet(quiet: bool):
    """transformers' loading bar and its LOAD REPORT (of the training heads left aside) off while ``quiet``."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def load_geneformer_model(folder, *, trust_checkpoint: bool = False, quiet: bool = False):
    """A Geneformer model folder (``config.json`` + weights) as a transformers ``BertModel``, eager attention.

    Checkpoints of ``BertForMaskedLM`` or a classifier load too (their heads are not needed for
    attention); a missing encoder weight is an error. A ``pytorch_model.bin`` that holds pickled
    objects besides tensors loads only with ``trust_checkpoint`` (its code may run).
    """
    transformers = require_transformers()
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json: pass the Geneformer model folder (config.json and model.safetensors "
            f"or pytorch_model.bin)"
        )
    config = transformers.AutoConfig.from_pretrained(folder)
    if config.model_type != "bert":
        raise ValueError(f"{folder} holds a {config.model_type!r} model; Geneformer models are BERT ('bert')")
    source = {"pretrained_model_name_or_path": folder}
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if trust_checkpoint and bins and not any(folder.glob("*.safetensors")):  # transformers reads .bin weights_only
        state = {}
        for path in bins:
            state.update(torch.load(path, map_location="cpu", weights_only=False))  # trusted: its code runs
        source = {"pretrained_model_name_or_path": None, "config": config,
                  "state_dict": {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}}  # fmt: skip
    try:
        with _transformers_quiet(quiet):
            model, info = transformers.BertModel.from_pretrained(
                **source, attn_implementation="eager", add_pooling_layer=False, output_loading_info=True,
            )  # fmt: skip
    except pickle.UnpicklingError as e:  # torch's weights_only refusal of a .bin holding Python objects
        what = refused_global(e)
        raise ValueError(
            f"{folder}'s weights hold Python objects besides tensors{what}: loading them would run code from the "
            f"file; if you trust it, pass --trust-checkpoint (or use its model.safetensors)"
        ) from None
    except OSError:
        raise
    except Exception as e:  # safetensors' and torch's errors of a truncated or corrupted file
        files = ", ".join(p.name for p in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")))
        raise ValueError(
            f"{folder}: cannot read its weights ({files or 'no weight file'}): {type(e).__name__}: {e}; is a file "
            f"truncated (an interrupted download)? download it again"
        ) from e
    if info["missing_keys"] or info.get("mismatched_keys"):
        missing = sorted(info["missing_keys"])[:5] or info["mismatched_keys"][:5]
        raise ValueError(f"{folder} lacks or mismatches weights of its BERT encoder (e.g. {missing}): is it complete?")
    return model.eval()
