"""scGPT: its encoder in plain PyTorch with the published state-dict names, and its preprocessing.

Model (``scgpt/model/model.py``, ``TransformerModel._encode``): gene embedding
+ layer norm (``encoder.*``), a continuous value encoder (``value_encoder.*``),
their sum through ``nn.TransformerEncoder`` of post-norm layers
(``transformer_encoder.*``). Checkpoints trained with flash attention name the
fused projection ``self_attn.Wqkv.*`` (or ``self_attn._impl.Wqkv.*``): it is
the q, k, v projection stacked as ``nn.MultiheadAttention``'s ``in_proj``, and
is loaded there. Every weight of the encoder must be found in the file, or the
load is refused; the training heads are the only keys left aside.

Two preprocessing paths, which give different inputs (``mode``):

- ``"tutorial"`` -- the fine-tuning tutorials (``Preprocessor`` then
  ``tokenize_and_pad_batch`` with ``include_zero_gene=False``): genes outside
  the vocabulary dropped first, ``normalize_total`` to 10,000 and ``log1p``
  over the remaining genes, then per-cell binning of the non-zero values into
  ``n_bins`` (args.json) quantile bins; ``<cls>`` with value 0 leads. A cell
  with no vocabulary counts keeps only ``<cls>`` (as the tutorial does). The
  tutorials bin every cell before sampling genes of long cells with the same
  random stream, which a streamed run cannot replay: a cell longer than
  ``max_length`` is an error (raise ``max_length``; the tutorials set it to
  the number of genes + 1).
- ``"embed"`` -- ``scgpt.tasks.embed_data`` (its ``DataCollator``): raw counts
  of the non-zero vocabulary genes binned into 51 bins, ``<cls>`` with value
  ``pad_value`` (−2) leads, cells longer than ``max_length`` keep ``<cls>``
  and a random sample of genes (``torch.randperm``). ``embed_data`` crashes
  on a cell with no vocabulary counts (``max()`` of an empty row); attnprof
  leaves such a cell out and says how many.

Random draws: a value on several equal quantile edges gets a random bin
(``np.random.rand`` per cell, drawn for every non-zero value as scGPT does).
Both paths draw from ``np.random.RandomState(seed)`` and the embed path's
sampling from ``torch.Generator().manual_seed(seed)``, cell by cell in row
order over all selected cells: the draws of scGPT after ``np.random.seed(seed)``
and ``torch.manual_seed(seed)`` on the AnnData of the selected cells, with the
collator in the main process (``num_workers=0``; worker processes reseed).
Shards and resumed runs tokenize the other cells too, to give each cell the
draws it gets in one whole run.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .family import FrontEnd, Packing, dense, nonzero_rows, pad_rows
from .vocab import Vocabulary

SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")  # appended to the vocabulary when absent, as embed_data does
#: Checkpoint keys of training heads: not used for attention, left aside on load.
TRAINING_HEADS = ("decoder.", "cls_decoder.", "mvc_decoder.", "grad_reverse_discriminator.", "sim.")
#: Keys of parts that change the encoder's math and are not supported.
UNSUPPORTED = {"dsbn.": "domain-specific batch norm", "bn.": "batch norm", "batch_encoder.": "batch labels"}
#: Flash-attention names -> nn.MultiheadAttention names (scGPT's load_pretrained rename rules).
RENAMES = ((r"self_attn\._impl\.Wqkv\.", "self_attn.in_proj_"), (r"self_attn\.Wqkv\.", "self_attn.in_proj_"),
           (r"self_attn\._impl\.out_proj\.", "self_attn.out_proj."))  # fmt: skip
EMBED_BINS = 51  # DataCollator bins with n_bins=51, whatever args.json says
MODES = ("tutorial", "embed")


@dataclass(frozen=True)
class ScGPTConfig:
    """Architecture of an scGPT encoder (args.json names in comments)."""

    n_tokens: int  # len(vocab) after the special tokens
    d_model: int = 512  # embsize
    n_heads: int = 8  # nheads
    d_hid: int = 512  # d_hid
    n_layers: int = 12  # nlayers
    dropout: float = 0.2  # dropout
    pad_id: int = 0  # vocab[pad_token]
    pad_value: int = -2  # pad_value
    n_bins: int = 51  # n_bins


class GeneEncoder(nn.Module):
    def __init__(self, n_tokens: int, d_model: int, pad_id: int):
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, d_model, padding_idx=pad_id)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, x):
        return self.enc_norm(self.embedding(x))


class ContinuousValueEncoder(nn.Module):
    def __init__(self, d_model: int, max_value: int = 512):
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.max_value = max_value

    def forward(self, x):
        x = torch.clamp(x.unsqueeze(-1), max=self.max_value)  # scGPT clips values at 512
        return self.norm(self.linear2(self.activation(self.linear1(x))))


class ScGPT(nn.Module):
    """scGPT encoder: ``forward(genes [B, L], values [B, L], padding [B, L]) -> [B, L, d_model]``."""

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        c = self.config = config
        self.encoder = GeneEncoder(c.n_tokens, c.d_model, c.pad_id)
        self.value_encoder = ContinuousValueEncoder(c.d_model)
        layer = nn.TransformerEncoderLayer(c.d_model, c.n_heads, c.d_hid, c.dropout, batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, c.n_layers, enable_nested_tensor=False)

    def forward(self, genes, values, src_key_padding_mask):
        x = self.encoder(genes) + self.value_encoder(values)
        return self.transformer_encoder(x, src_key_padding_mask=src_key_padding_mask)


# ---------------------------------------------------------------- model files
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
    args = {"embsize": c.d_model, "nheads": c.n_heads, "d_hid": c.d_hid,
            "nlayers": c.n_layers, "dropout": c.dropout, "pad_token": "<pad>", "pad_value": c.pad_value,
            "n_bins": c.n_bins, "input_emb_style": "continuous"}  # fmt: skip
    (folder / "args.json").write_text(json.dumps(args, indent=2))
    (folder / "vocab.json").write_text(json.dumps({k: v for k, v in vocab.items()}))
    return folder


# ------------------------------------------------------------- preprocessing
def digitize(x: np.ndarray, bins: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """scGPT's ``_digitize``: a value on several equal edges gets a uniformly random bin among them."""
    left = np.digitize(x, bins)
    right = np.digitize(x, bins, right=True)
    rands = rng.rand(len(x))  # drawn for every value, ties or not, as scGPT does
    return np.ceil(rands * (right - left) + left).astype(np.int64)


def bin_row(row: np.ndarray, n_bins: int, rng: np.random.RandomState) -> np.ndarray:
    """scGPT's ``binning`` of one cell: quantile bins of the non-zero values (0 stays 0)."""
    if row.max() == 0:
        return np.zeros_like(row, dtype=np.int64)  # scGPT warns and keeps zeros
    nonzero = row.nonzero()
    values = row[nonzero]
    bins = np.quantile(values, np.linspace(0, 1, n_bins - 1))
    out = np.zeros_like(row, dtype=np.int64)
    out[nonzero] = digitize(values, bins, rng)
    return out


def normalize_log1p(X: np.ndarray, target_sum: float = 1e4) -> np.ndarray:
    """``sc.pp.normalize_total(target_sum=1e4)`` then ``sc.pp.log1p`` on dense rows, in scanpy's arithmetic.

    Checked bit for bit against scanpy 1.11.5 on dense and CSR counts during development (scanpy is no
    dependency: this is its float32 divide by ``counts / target_sum``, empty cells left at 0).
    """
    X = X.astype(np.float32) if np.issubdtype(X.dtype, np.integer) else X.copy()
    counts = X.sum(1)
    counts += counts == 0  # scanpy leaves empty cells at 0 instead of dividing by 0
    counts = counts / target_sum
    np.divide(X, counts[:, None], out=X)
    return np.log1p(X, out=X)


class ScGPTTokenizer:
    """Cells -> scGPT (gene id, value) pairs, by one of scGPT's two preprocessing paths (``MODES``)."""

    draws = True  # random bins and samples: one stream over all selected cells (see iter_family_chunks)
    keeps_duplicates = True  # scGPT maps every column by its name: a name given twice is the same gene twice

    def __init__(self, vocab: dict, config: ScGPTConfig, *, mode: str = "embed", max_length: int = 1200, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"unknown scGPT preprocessing {mode!r}; choose {' or '.join(MODES)}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (<cls> and a gene), got {max_length}")
        self.mode, self.max_length, self.seed = mode, int(max_length), int(seed)
        self.cls_id, self.pad_id = vocab["<cls>"], config.pad_id
        self.pad_value = config.pad_value
        self.n_bins = EMBED_BINS if mode == "embed" else config.n_bins
        self.cls_value = config.pad_value if mode == "embed" else 0
        genes = [g for g in vocab if g not in SPECIAL_TOKENS]
        self.vocab = Vocabulary(genes, source="the scGPT vocab.json")
        self.id_of = np.array([vocab[g] for g in genes], dtype=np.int64)
        low = min(0, self.pad_value, self.cls_value)
        self.packing = Packing(min_value=low, n_values=self.n_bins - low)

    def settings(self) -> dict:
        return {"mode": self.mode, "max_length": self.max_length, "n_bins": self.n_bins, "seed": self.seed,
                "cls_value": self.cls_value, "pad_value": self.pad_value}  # fmt: skip

    def start(self, adata, alignment) -> None:
        self.columns = alignment.columns
        self.ids = self.id_of[alignment.vocab_index]
        self.rng = np.random.RandomState(self.seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.sampled = False  # said once per run: the draws of long cells follow the seed in one process

    def tokenize(self, block, rows: np.ndarray, alignment) -> tuple[np.ndarray, np.ndarray]:
        # genes outside the vocabulary are dropped first, in both paths
        if self.mode == "tutorial":
            cells = self._tutorial(dense(block)[:, self.columns], rows)  # normalize_total sums dense rows
        else:
            cells = self._embed(nonzero_rows(block, self.columns))
        return pad_rows([self.packing.pack(ids, values) for ids, values in cells])

    def _tutorial(self, X, rows):
        if X.size and X.min() < 0:  # the Preprocessor refuses negative data before binning
            raise ValueError(f"the counts have negative values (min {X.min()}): scGPT's tutorial preprocessing "
                             f"expects raw counts; pick them with --layer or --use-raw")  # fmt: skip
        cells = []
        for row, r in zip(normalize_log1p(X), rows):
            binned = bin_row(row, self.n_bins, self.rng)
            keep = np.nonzero(binned)[0]
            if len(keep) + 1 > self.max_length:
                raise ValueError(
                    f"cell {r} has {len(keep)} genes, more than max_length - 1 = {self.max_length - 1}: the tutorial "
                    f"path samples such cells with a random stream a streamed run cannot replay; raise --max-length "
                    f"(the tutorials use the number of genes + 1) or use --scgpt-mode embed"
                )
            cells.append((np.insert(self.ids[keep], 0, self.cls_id), np.insert(binned[keep], 0, 0)))
        return cells

    def _embed(self, X):
        cells = []
        for i in range(X.shape[0]):
            span = slice(X.indptr[i], X.indptr[i + 1])
            keep = X.indices[span]  # the non-zero genes, in column order: the Dataset's np.nonzero(row)
            if not len(keep):  # embed_data crashes here; attnprof leaves the cell out
                cells.append((np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)))
                continue
            # the Dataset casts values to float32 tensors; the collator bins them in numpy
            values = X.data[span].astype(np.float32)
            binned = _collator_binning(values, self.n_bins, self.rng)
            ids = np.insert(self.ids[keep], 0, self.cls_id)
            values = np.insert(binned, 0, self.cls_value)
            if len(ids) > self.max_length:  # DataCollator._sample: <cls> kept, the rest a random sample
                if not self.sampled:
                    self.sampled = True
                    warnings.warn(
                        f"cells with more than --max-length {self.max_length} tokens keep a random sample of their "
                        f"genes, drawn as scGPT's collator draws them right after torch.manual_seed({self.seed}) in "
                        f"one process; scGPT's embed_data draws after building its model and in DataLoader workers, "
                        f"so its samples differ (docs/reliability.md: how to match them)", stacklevel=2,
                    )  # fmt: skip
                picked = torch.randperm(len(ids) - 1, generator=self.generator)[: self.max_length - 1].numpy() + 1
                picked = np.insert(picked, 0, 0)
                ids, values = ids[picked], values[picked]
            cells.append((ids, values))
        return cells


def _collator_binning(values: np.ndarray, n_bins: int, rng) -> np.ndarray:
    """``preprocess.binning`` as the collator calls it: on the non-zero values, all > 0 here."""
    if values.min() <= 0:  # negative counts: binning's own branch for rows with zeros or less
        return bin_row(values, n_bins, rng)
    return digitize(values, np.quantile(values, np.linspace(0, 1, n_bins - 1)), rng)


class ScGPTFrontEnd(FrontEnd):
    """scGPT through the ``mha`` adapter: ``model(genes, values, padding)``."""

    name = "scgpt"
    adapter = "mha"
    n_context = 1  # <cls>

    def __init__(self, tokenizer: ScGPTTokenizer, vocab: dict):
        self.tokenizer = tokenizer
        self.context_length = tokenizer.max_length
        names = [""] * len(vocab)
        for token, i in vocab.items():
            names[i] = token
        self.genes = names
        self.special_ids = sorted(vocab[t] for t in SPECIAL_TOKENS)

    def _unpack(self, codes):
        return self.tokenizer.packing.unpack(codes, self.tokenizer.pad_id, self.tokenizer.pad_value)

    def gene_ids(self, codes: torch.Tensor) -> torch.Tensor:
        return self._unpack(codes)[0]

    def inputs(self, codes: torch.Tensor) -> dict:
        ids, values, padding = self._unpack(codes)
        return {"genes": ids, "values": values.float(), "src_key_padding_mask": padding}

    def left_out_message(self, n: int) -> str:
        if self.tokenizer.mode == "embed":
            return (f"{n} cells have no counts in vocabulary genes and were left out (scGPT's embed_data "
                    f"fails on such cells)")  # fmt: skip
        return super().left_out_message(n)


def scgpt_front_end(vocab: dict, args: dict, *, mode: str = "embed", max_length: int | None = None, seed: int = 0):
    """The scGPT front end from a loaded folder's vocab and args (max_length: embed_data's default 1,200)."""
    pad_token = args.get("pad_token", "<pad>")
    config = ScGPTConfig(n_tokens=len(vocab), pad_id=vocab[pad_token], pad_value=int(args.get("pad_value", -2)),
                         n_bins=int(args.get("n_bins", 51)))  # fmt: skip
    if max_length is None:
        max_length = 1200 if mode == "embed" else int(args.get("max_seq_len", 1200))
    if "max_seq_len" in args and max_length > int(args["max_seq_len"]):
        warnings.warn(f"max_length {max_length} exceeds the max_seq_len {args['max_seq_len']} the model was trained "
                      f"with", stacklevel=2)  # fmt: skip
    return ScGPTFrontEnd(ScGPTTokenizer(vocab, config, mode=mode, max_length=max_length, seed=seed), vocab)
