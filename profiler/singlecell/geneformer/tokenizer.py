"""Geneformer: its rank-value tokenizer and its BERT model from the files users have.

The specification is Geneformer's own ``geneformer/tokenizer.py``
(``TranscriptomeTokenizer.tokenize_anndata`` and ``create_dataset``):

- the library size is the obs column ``n_counts`` (not recomputed), the genes
  are those of the data whose Ensembl id (a var column) is in the token
  dictionary, kept in var-column order;
- ``X / n_counts * 10_000 / median`` left to right, with the dtypes of X, of the ``n_counts`` column
  and of the (float64) medians: in numpy on dense X; on sparse X in scipy's sparse arithmetic, which
  divides by multiplying with the reciprocal (the two differ in the last bit and swap near-ties)
- the non-zero values, in var-column order, ranked by ``np.argsort(-values)``:
  numpy's default (unstable) sort, so ties fall where that sort puts them;
- V1 dictionaries (no ``<cls>``/``<eos>``): the first 2,048 ranked genes; V2
  dictionaries: the first 4,094 between ``<cls>`` and ``<eos>`` (4,096 tokens).

Quirks named, and what attnprof does about them:

- a cell with ``n_counts == 0`` divides 0 by 0: Geneformer ranks NaNs, i.e.
  every gene of the data in the sort's NaN order; attnprof leaves such a cell out;
- a cell with no counts in dictionary genes: V2's ``tokenize_anndata`` drops
  it with a warning, V1's keeps an empty input the model cannot attend over;
  attnprof leaves it out (both: with a warning that counts them);
- Ensembl ids are used as given, as with ``collapse_gene_ids=False``: the
  mapping file that renames and sums ids is not read, duplicates are an error;
- the ``filter_pass`` obs column is not read: select cells with ``subset``.
"""

from __future__ import annotations

import pickle
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from ..safe_pickle import UntrustedPickle, load_plain
from .family import FrontEnd, Packing, nonzero_rows, pad_rows
from .vocab import Vocabulary

TARGET_SUM = 10_000  # an int, as in Geneformer: the product keeps the dtype of X / n_counts
SPECIAL = ("<pad>", "<mask>", "<cls>", "<eos>")
#: Input size per model version: V1 (no <cls>/<eos> in the dictionary) and V2.
INPUT_SIZE = {False: 2048, True: 4096}


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


class GeneformerTokenizer:
    """Cells -> Geneformer input ids, as ``TranscriptomeTokenizer`` makes them.

    token_dict:   Ensembl id -> token id (with ``<pad>``, ``<mask>``; V2 also ``<cls>``, ``<eos>``).
    medians:      Ensembl id -> non-zero median (the gene median dictionary).
    input_size:   tokens per cell (default: 2,048 for V1 dictionaries, 4,096 for V2).
    counts_key:   the obs column with each cell's total counts (Geneformer's ``n_counts``).
    """

    draws = False  # deterministic: no random stream to keep in step

    def __init__(self, token_dict: dict, medians: dict, input_size: int | None = None, counts_key: str = "n_counts"):
        self.token_dict = token_dict
        self.special = "<cls>" in token_dict and "<eos>" in token_dict
        self.input_size = INPUT_SIZE[self.special] if input_size is None else int(input_size)
        minimum = 3 if self.special else 1
        if self.input_size < minimum:
            raise ValueError(f"input_size must be at least {minimum}, got {self.input_size}")
        self.counts_key = counts_key
        genes = [g for g in token_dict if g not in SPECIAL]
        no_median = [g for g in genes if g not in medians]
        if no_median:
            raise ValueError(
                f"{len(no_median)} genes of the token dictionary have no median in the gene median dictionary "
                f"(e.g. {no_median[:3]}): pass the two files of the same Geneformer release"
            )
        self.vocab = Vocabulary(genes, source="the Geneformer token dictionary")
        self.token_of = np.array([token_dict[g] for g in genes], dtype=np.int64)
        self.median_of = np.array([medians[g] for g in genes])  # float64, as np.array of Python floats
        self.packing = Packing()

    def settings(self) -> dict:
        return {"version": "V2" if self.special else "V1", "input_size": self.input_size,
                "counts_key": self.counts_key, "target_sum": TARGET_SUM}  # fmt: skip

    def start(self, adata, alignment) -> None:
        if self.counts_key not in adata.obs.columns:
            raise ValueError(
                f"obs has no column {self.counts_key!r}: Geneformer normalizes by each cell's total counts from "
                f"obs['n_counts']; add it (e.g. adata.obs['n_counts'] = adata.X.sum(axis=1).A1 over all genes) "
                f"or name the column with --counts-key"
            )
        self.n_counts = np.asarray(adata.obs[self.counts_key].values)
        self.columns = alignment.columns
        self.tokens = self.token_of[alignment.vocab_index]
        self.norm = self.median_of[alignment.vocab_index]

    def tokenize(self, block, rows: np.ndarray, alignment) -> tuple[np.ndarray, np.ndarray]:
        """Codes and lengths of the cells; length 0 for the cells left out (see the module docstring)."""
        n_counts = self.n_counts[rows]
        cells = []
        for i, (values, columns) in enumerate(self._normalized(block, n_counts)):
            if n_counts[i] == 0:
                cells.append(np.empty(0, dtype=np.int64))
                continue
            ranked = self.tokens[columns][np.argsort(-values)]  # default (unstable) argsort, as rank_genes
            if ranked.size and self.special:
                ranked = np.concatenate([[self.token_dict["<cls>"]], ranked[: self.input_size - 2],
                                         [self.token_dict["<eos>"]]])  # fmt: skip
            else:
                ranked = ranked[: self.input_size]
            cells.append(self.packing.pack(ranked))
        return pad_rows(cells)

    def _normalized(self, block, n_counts):
        """Per cell, the values Geneformer ranks and their columns (of the aligned genes), as it computes them.

        Dense X: numpy's ``X / n_counts * 10_000 / median`` on the non-zero entries only (the same operations
        on the same dtypes give the same values; zeros are not ranked). Sparse X: Geneformer's expression runs
        on scipy's sparse matrix, where ``X / a`` is ``X.multiply(1 / a)``, so the values are
        X·(1/n_counts)·10,000·(1/median), which differ in the last bit and can swap near-ties: the same
        expression on the same scipy here, then ``csr_matrix`` (entries as it keeps them, explicit zeros too).
        """
        if sp.issparse(block):
            X = sp.csr_matrix(block)[:, self.columns]
            with np.errstate(divide="ignore", invalid="ignore"):  # n_counts 0: those cells are left out
                normed = sp.csr_matrix(X / n_counts[:, None] * TARGET_SUM / self.norm)
            for i in range(normed.shape[0]):
                span = slice(normed.indptr[i], normed.indptr[i + 1])
                yield normed.data[span], normed.indices[span]
            return
        X = nonzero_rows(block, self.columns)
        for i in range(X.shape[0]):
            span = slice(X.indptr[i], X.indptr[i + 1])
            values, columns = X.data[span], X.indices[span]
            with np.errstate(divide="ignore", invalid="ignore"):
                yield values / n_counts[i : i + 1] * TARGET_SUM / self.norm[columns], columns


class GeneformerFrontEnd(FrontEnd):
    """Geneformer through the ``hf`` adapter: ``model(input_ids, attention_mask)`` of a transformers BERT."""

    name = "geneformer"
    adapter = "hf"

    def __init__(self, tokenizer: GeneformerTokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.token_dict.get("<pad>", 0))
        self.n_context = 1 if tokenizer.special else 0  # <cls> leads; <eos> trails and is no context
        self.context_length = tokenizer.input_size
        top = max(tokenizer.token_dict.values())
        if top >= vocab_size:
            raise ValueError(
                f"the token dictionary has ids up to {top} but the model embeds {vocab_size} tokens: "
                f"pass the dictionary of this model's release (V1 and V2 dictionaries differ)"
            )
        names = [f"<unused {i}>" for i in range(vocab_size)]
        for gene, token in tokenizer.token_dict.items():
            names[token] = str(gene)
        self.genes = names
        self.special_ids = sorted(set(range(vocab_size)) - set(tokenizer.token_of.tolist()))

    def gene_ids(self, codes: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.packing.unpack(codes, self.pad_id)[0]

    def inputs(self, codes: torch.Tensor) -> dict:
        ids, _, padding = self.tokenizer.packing.unpack(codes, self.pad_id)
        return {"input_ids": ids, "attention_mask": (~padding).long()}

    def left_out_message(self, n: int) -> str:
        return (
            f"{n} cells have no counts in genes of the token dictionary (or n_counts 0) and were left out, "
            f"as Geneformer's tokenizer drops cells without dictionary genes"
        )


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
        found = re.search(r"Unsupported global: GLOBAL (\S+)|but got <class '([^']+)'>", str(e))
        what = f" (e.g. {found.group(1) or found.group(2)})" if found else ""
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


def geneformer_front_end(model, token_dictionary, gene_medians, *, input_size=None, counts_key="n_counts",
                         trust_checkpoint: bool = False):  # fmt: skip
    """The Geneformer front end for ``model`` from the two dictionary files (paths, read as plain data unless
    ``trust_checkpoint``, or dicts)."""
    def read(value, what):
        return value if isinstance(value, dict) else read_dictionary(value, what, trust_checkpoint)

    token_dict, medians = read(token_dictionary, "token dictionary"), read(gene_medians, "gene median dictionary")
    tokenizer = GeneformerTokenizer(token_dict, medians, input_size=input_size, counts_key=counts_key)
    positions = int(model.config.max_position_embeddings)
    if tokenizer.input_size > positions:
        raise ValueError(
            f"the tokenizer makes up to {tokenizer.input_size} tokens per cell but the model has {positions} "
            f"positions: pass the dictionary of this model's version, or a smaller input size (--max-length)"
        )
    return GeneformerFrontEnd(tokenizer, int(model.config.vocab_size))
