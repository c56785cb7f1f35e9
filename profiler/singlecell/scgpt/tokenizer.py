"""scGPT's preprocessing: cells -> (gene id, value) pairs by its embed or tutorial path (see the package doc)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..family import Packing, dense, nonzero_rows, pad_rows
from ..vocab import Vocabulary
from .checkpoint import SPECIAL_TOKENS
from .draws import EmbedDataRun, seeded_streams
from .model import ScGPTConfig

EMBED_BINS = 51  # DataCollator bins with n_bins=51, whatever args.json says
MODES = ("tutorial", "embed")


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

    def __init__(self, vocab: dict, config: ScGPTConfig, *, mode: str = "embed", max_length: int = 1200, seed: int = 0,
                 embed_data: EmbedDataRun | None = None):
        """embed_data: the embed_data call whose random state the embed path reproduces (draws.py); None: the
        state right after the seeds, the collator in one process (scGPT's DataCollator called directly)."""
        if mode not in MODES:
            raise ValueError(f"unknown scGPT preprocessing {mode!r}; choose {' or '.join(MODES)}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (<cls> and a gene), got {max_length}")
        if embed_data is not None and mode != "embed":
            raise ValueError("only the embed path reproduces embed_data's DataLoader (its workers and batch size)")
        self.mode, self.max_length, self.seed = mode, int(max_length), int(seed)
        self.config, self.embed_data = config, embed_data
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
        settings = {"mode": self.mode, "max_length": self.max_length, "n_bins": self.n_bins, "seed": self.seed,
                    "cls_value": self.cls_value, "pad_value": self.pad_value}  # fmt: skip
        if self.embed_data is not None:
            run = self.embed_data  # the DataLoader whose workers' seeds the draws follow
            settings.update(embed_data_workers=run.workers, embed_data_batch_size=run.batch_size)
        return settings

    def start(self, adata, alignment) -> None:
        self.columns = alignment.columns
        self.ids = self.id_of[alignment.vocab_index]
        self.rng = np.random.RandomState(self.seed)  # the tutorial path's binning
        if self.mode == "embed":  # cell position in the Dataset -> its collation's (numpy, torch) generators
            self.streams = seeded_streams(self.seed) if self.embed_data is None else self.embed_data.streams(self.seed)
        self.position = 0  # of the next cell among all selected cells (the Dataset's index)
        self.sampled = False  # said once per run: which state the draws of long cells follow

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
            rng, generator = self.streams(self.position)
            self.position += 1
            span = slice(X.indptr[i], X.indptr[i + 1])
            keep = X.indices[span]  # the non-zero genes, in column order: the Dataset's np.nonzero(row)
            if not len(keep):  # embed_data crashes here; attnprof leaves the cell out
                cells.append((np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)))
                continue
            # the Dataset casts values to float32 tensors; the collator bins them in numpy
            values = X.data[span].astype(np.float32)
            binned = _collator_binning(values, self.n_bins, rng)
            ids = np.insert(self.ids[keep], 0, self.cls_id)
            values = np.insert(binned, 0, self.cls_value)
            if len(ids) > self.max_length:  # DataCollator._sample: <cls> kept, the rest a random sample
                if not self.sampled:
                    self.sampled = True
                    warnings.warn(self._sampling_message(), stacklevel=2)
                picked = torch.randperm(len(ids) - 1, generator=generator)[: self.max_length - 1].numpy() + 1
                picked = np.insert(picked, 0, 0)
                ids, values = ids[picked], values[picked]
            cells.append((ids, values))
        return cells

    def _sampling_message(self) -> str:
        said = f"cells with more than --max-length {self.max_length} tokens keep a random sample of their genes"
        run = self.embed_data
        if run is None:
            return (f"{said}, drawn as scGPT's collator draws them right after torch.manual_seed({self.seed}) in one "
                    f"process; scGPT's embed_data draws after building its model and in DataLoader workers, so its "
                    f"samples differ (docs/reliability.md: how to match them)")  # fmt: skip
        return (f"{said}, drawn as scGPT's embed_data draws them after torch.manual_seed({self.seed}) with batch_size "
                f"{run.batch_size} and {run.workers} DataLoader workers (--scgpt-workers; embed_data uses "
                f"min(CPUs, batch_size) of the machine it runs on): another worker count samples other genes "
                f"(docs/reliability.md)")  # fmt: skip


def _collator_binning(values: np.ndarray, n_bins: int, rng) -> np.ndarray:
    """``preprocess.binning`` as the collator calls it: on the non-zero values, all > 0 here."""
    if values.min() <= 0:  # negative counts: binning's own branch for rows with zeros or less
        return bin_row(values, n_bins, rng)
    return digitize(values, np.quantile(values, np.linspace(0, 1, n_bins - 1)), rng)

