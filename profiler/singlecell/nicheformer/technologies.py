"""Several technologies in one run: each cell's context tokens from obs columns, and the means of its technology.

Nicheformer tokenizes every technology with its own mean vector, one of the
published ``data/model_means/*_mean_script.npy`` files of theislab/nicheformer.
Its tokenization notebooks pair them as follows (the MERFISH notebook,
``merfish_mouse_brain.ipynb``, is a large file that was not readable; the pairing follows
the file name):

===============================  =========================================================  =========================
file                             cells                                                      upstream code
===============================  =========================================================  =========================
``merfish_mean_script.npy``      assay MERFISH (7)                                          file name
``cosmx_mean_script.npy``        assay CosMx (8; "NanoString digital spatial profiling")    ``cosmx_human_lung.ipynb``
``xenium_mean_script.npy``       assay Xenium (9)                                           ``xenium_human_lung.ipynb``
``dissociated_mean_script.npy``  every *dissociated* cell (modality 3), whatever its assay  ``scRNAseq_mouse_brain_haviv.ipynb``
``iss_mean_script.npy``          none: no assay token is ISS                                (left out of a folder)
===============================  =========================================================  =========================

The dissociated notebook tokenizes 10x cells (assay token "10x transcription
profiling", 15) with ``dissociated_mean_script.npy``: dissociated cells are
chosen by modality, and keep their own assay token. Each technology is
tokenized alone upstream (one notebook, or one ``NicheformerDataset``, per
technology) and every step is row-wise, so tokenizing a mixed AnnData with each
cell's own context and means gives the tokens of each technology alone.

A cell's means: the entry for its assay; else, for a dissociated cell, the
``dissociated`` entry; else an entry without technology (a single file, which
is then every other cell's); else the cell is refused before the run.

Upstream quirks, named: the dissociated notebook tests the *rounded* mean for 0
(``np.where(rounded_values == 0, 1, ...)``), the CosMx and Xenium notebooks the
unrounded one; ``tokenize_data``'s ``+= m == 0`` makes both the same
(:func:`technology_means`). The dissociated notebook also subsets its
means and data to the vocabulary genes present in the data (``[kept]``,
``common_genes``: 483 genes), which would number the genes by their position
among those; the tokens it recorded (cell outputs with ids such as 20301) are
vocabulary index + 30, as for every other technology, so attnprof keeps
vocabulary ids. For data holding every vocabulary gene (as the corpus files
do after the concat with ``model.h5ad``) the two are the same.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ..vocab import ASSAY, CONTEXT_TABLES, MODALITY, N_CONTEXT, context_id

#: The technology key of every dissociated cell (by modality), as upstream's dissociated_mean_script.npy.
DISSOCIATED = "dissociated"
#: The key of a means entry without technology (a single file: every cell without its own entry).
DEFAULT = "default"
#: Published means file -> the technology it is for (see the module docstring).
PUBLISHED_MEANS = {
    "merfish_mean_script.npy": "MERFISH",
    "cosmx_mean_script.npy": "CosMx",
    "xenium_mean_script.npy": "Xenium",
    "dissociated_mean_script.npy": DISSOCIATED,
}
#: Published files with no technology to pair them with.
UNPAIRED_MEANS = {"iss_mean_script.npy": "ISS (in situ sequencing) has no Nicheformer assay token"}
#: The context kinds, in token order.
KINDS = ("species", "assay", "modality")
_ASSAY_NAMES = {i: name for name, i in ASSAY.items()}


def load_means(means, n_genes: int) -> np.ndarray:
    """The technology mean vector as stored (a ``.npy`` path or an array), one entry per vocabulary gene.

    Entries are kept as they are, NaN and negative ones included (the
    published MERFISH file has both): what a mean becomes is the
    tokenization's business, see :func:`technology_means`.
    """
    source = str(means) if isinstance(means, (str, Path)) else "the means array"
    from_file = isinstance(means, (str, Path))
    if isinstance(means, (str, Path)):
        if not Path(means).exists():
            raise FileNotFoundError(f"technology mean file {means} does not exist")
        means = np.load(means, allow_pickle=False)
    means = np.asarray(means, dtype=np.float64).ravel()
    if means.size != n_genes:
        raise ValueError(
            f"{source} has {means.size} entries but the vocabulary has {n_genes} genes: "
            f"the mean vector must be the one made for this vocabulary (same genes, same order)"
        )
    if from_file and np.any(means < 0) and not np.any(means > 0):  # a few negative means occur; all is another file
        raise ValueError(
            f"{source} has no positive mean (its {means.size} entries are negative, zero or NaN), so every gene "
            f"would be ranked by a negated score: pass the technology's mean vector (*_mean_script.npy)"
        )
    return means


#: The two ways Nicheformer's public code prepares means and tokenizes (see tokenizer.py).
TOKENIZATIONS = ("notebook", "dataset")


def technology_means(means: np.ndarray, tokenization: str) -> np.ndarray:
    """The divisor per gene, prepared as Nicheformer's ``tokenization`` path prepares it.

    ``notebook`` (the "Technology mean" cell of notebooks/tokenization/*.ipynb,
    then ``tokenize_data``): NaN -> 0 (``np.nan_to_num``, which also turns +-inf
    into +-1.8e308), round half up as ``where(m % 1 >= 0.5, ceil, floor)`` (so
    -2370.27 -> -2370), then every 0 -> 1. Negative means stay negative.

    ``dataset`` (``NicheformerDataset``): only 0 -> 1; NaN stays NaN, so a
    NaN-mean gene scores NaN in every cell, and negative means stay negative.
    """
    if tokenization not in TOKENIZATIONS:
        raise ValueError(f"unknown tokenization {tokenization!r}; choose one of: {', '.join(TOKENIZATIONS)}")
    m = np.array(means, dtype=np.float64)
    if tokenization == "notebook":
        m = np.nan_to_num(m)
        rounded = np.where((m % 1) >= 0.5, np.ceil(m), np.floor(m))
        # the notebooks test the unrounded mean here (the dissociated one the rounded);
        # tokenize_data's `+= m == 0` below turns every remaining 0 (and -0.0) into 1 either way
        m = np.where(m == 0, 1.0, rounded)
    m += m == 0
    return m


def technology_key(key) -> str:
    """A means entry's technology: an assay (name or id, as ``--assay`` takes) by its name, or ``dissociated``."""
    if str(key).strip().lower() == DISSOCIATED:
        return DISSOCIATED
    try:
        return _ASSAY_NAMES[context_id("assay", key)]
    except ValueError:
        assays = ", ".join(f"{name} ({i})" for name, i in ASSAY.items())
        raise ValueError(
            f"unknown technology {key!r} for a means file: name an assay (name or id: {assays}) or "
            f"'{DISSOCIATED}' (every dissociated cell), e.g. --means Xenium=xenium_mean_script.npy"
        ) from None


# ------------------------------------------------------------ which file for which cells
def means_entries(means) -> dict[str, object]:
    """Technology -> its means (array or path) from what ``means=`` (``--means``) was given.

    ``means``: None; one array or ``.npy`` (every cell); a folder of the published ``*_mean_script.npy``
    files; a mapping ``{technology: array or path}`` (key None: every cell without its own entry); or the
    ``--means`` values, each ``ASSAY=FILE``,
    ``dissociated=FILE``, a folder, or one file without technology (every cell without its own entry).
    """
    if means is None or isinstance(means, np.ndarray):
        return {DEFAULT: means}
    if isinstance(means, (str, Path)):
        means = [means]
    if isinstance(means, Mapping):
        return _merge([{DEFAULT if k is None else technology_key(k): v} for k, v in means.items()],
                      [f"key {k!r}" for k in means])
    values = list(means)
    if values and not all(isinstance(v, (str, Path)) for v in values):
        return {DEFAULT: np.asarray(values, dtype=np.float64)}  # a list of numbers
    return _merge([_one_value(v) for v in values], [str(v) for v in values])


def _one_value(value) -> dict[str, object]:
    """The entries of one ``--means`` value: ``TECHNOLOGY=FILE``, a folder, or a file."""
    text = str(value)
    if Path(text).is_dir():
        return published_folder(text)
    key, sep, path = text.partition("=")
    if sep and not Path(text).exists():  # a file whose name holds '=' stays a file
        return {technology_key(key): path}
    return {DEFAULT: text}


def _merge(parts: list[dict], sources: list[str]) -> dict[str, object]:
    merged, origin = {}, {}
    for part, source in zip(parts, sources):
        for key, value in part.items():
            if key in merged:
                what = "a file without technology" if key == DEFAULT else f"{key!r}"
                raise ValueError(
                    f"--means names {what} twice ({origin[key]} and {source}): give each technology one file"
                )
            merged[key], origin[key] = value, source
    return merged


def published_folder(folder) -> dict[str, Path]:
    """The published means files in ``folder`` by technology (``PUBLISHED_MEANS``).

    ``iss_mean_script.npy`` (``UNPAIRED_MEANS``) is left out quietly; other ``*_mean_script.npy`` files with a warning.
    """
    folder = Path(folder)
    found = {p.name: p for p in sorted(folder.glob("*_mean_script.npy"))}
    entries = {PUBLISHED_MEANS[name]: path for name, path in found.items() if name in PUBLISHED_MEANS}
    others = [name for name in found if name not in PUBLISHED_MEANS and name not in UNPAIRED_MEANS]
    if others:
        warnings.warn(
            f"{folder}: {len(others)} means files are not Nicheformer's published ones and are left out "
            f"({', '.join(others)}); pair each with the assay token its cells carry: --means ASSAY=FILE",
            stacklevel=2,
        )
    if not entries:
        raise ValueError(
            f"the folder {folder} holds none of Nicheformer's published means files ({', '.join(PUBLISHED_MEANS)}): "
            f"pass theislab/nicheformer's data/model_means/ folder, or pair files with assays as --means ASSAY=FILE"
        )
    return entries


# --------------------------------------------------------------- the means, prepared
class TechnologyMeans:
    """Each technology's means, stored and as the tokenization prepares them, and which cells use which.

    entries: technology -> array or ``.npy`` path (:func:`means_entries`); None values mean all ones.
    """

    def __init__(self, entries: dict[str, object], n_genes: int, tokenization: str):
        self.labels = list(entries)
        self.files = [None if isinstance(v, np.ndarray) or v is None else Path(v).name for v in entries.values()]
        self.raw = np.stack([np.ones(n_genes) if v is None else load_means(v, n_genes) for v in entries.values()])
        self.prepared = np.stack([technology_means(r, tokenization) for r in self.raw])
        self.nan_genes = [np.flatnonzero(np.isnan(p)) for p in self.prepared]  # the dataset path ranks them
        index = {label: t for t, label in enumerate(self.labels)}
        self._by_assay = np.full(max(CONTEXT_TABLES["assay"].values()) + 1, -1, dtype=np.int64)
        for label, t in index.items():
            if label not in (DISSOCIATED, DEFAULT):
                self._by_assay[ASSAY[label]] = t
        self._dissociated = index.get(DISSOCIATED, -1)
        self._default = index.get(DEFAULT, -1)

    @property
    def single(self) -> bool:
        """One vector for every cell (today's ``--means FILE``)."""
        return self.labels == [DEFAULT]

    def of_cells(self, context: np.ndarray) -> np.ndarray:
        """The technology index of each cell of ``context`` (``[n, 3]`` ids); -1 where none applies."""
        context = np.asarray(context, dtype=np.int64).reshape(-1, N_CONTEXT)
        tech = self._by_assay[context[:, 1]]
        tech = np.where((tech < 0) & (context[:, 2] == MODALITY[DISSOCIATED]), self._dissociated, tech)
        return np.where(tech < 0, self._default, tech)

    def check(self, context: np.ndarray) -> np.ndarray:
        """:meth:`of_cells`, refusing cells without means with a message naming their assays and the fix."""
        tech = self.of_cells(context)
        if np.any(tech < 0):
            raise ValueError(self._missing(np.asarray(context).reshape(-1, N_CONTEXT)[tech < 0]))
        return tech

    def _missing(self, context: np.ndarray) -> str:
        pairs, counts = np.unique(context[:, 1:], axis=0, return_counts=True)
        modality = {i: name for name, i in MODALITY.items()}
        cells = ", ".join(f"{n} {modality.get(m, m)} cells of assay {_ASSAY_NAMES.get(a, a)!r}"
                          for (a, m), n in zip(pairs.tolist(), counts.tolist()))  # fmt: skip
        first = _ASSAY_NAMES.get(int(pairs[0, 0]), int(pairs[0, 0]))
        return (
            f"no technology means for {cells} (means are given for: {', '.join(self.labels)}): add the file of "
            f"their technology, e.g. --means \"{first}=FILE\" (means={{'{first}': FILE}}), "
            f"'{DISSOCIATED}=dissociated_mean_script.npy' for dissociated cells, or theislab/nicheformer's "
            f"data/model_means/ folder"
        )

    def divisor(self, tech: np.ndarray, row: np.ndarray, vocab_index: np.ndarray) -> np.ndarray:
        """The prepared mean of each entry (cell ``row``, gene ``vocab_index``), from its cell's technology."""
        if len(self.labels) == 1:
            return self.prepared[0][vocab_index]
        return self.prepared[tech[row], vocab_index]

    def nan_entries(self, tech: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, genes)``: every cell with each NaN-mean gene of its technology (a loop over technologies)."""
        rows, genes = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        for t, nan in enumerate(self.nan_genes):
            cells = np.flatnonzero(tech == t)
            if nan.size and cells.size:
                rows.append(np.repeat(cells, nan.size))
                genes.append(np.tile(nan, cells.size))
        return np.concatenate(rows), np.concatenate(genes)

    @property
    def any_nan(self) -> bool:
        return any(nan.size for nan in self.nan_genes)

    def settings(self):
        """What the run records: a digest for one vector (as before), else technology -> file and digest."""
        digests = [hashlib.blake2b(r.tobytes(), digest_size=8).hexdigest() for r in self.raw]
        if self.single:
            return digests[0]
        return {label: {"file": f, "digest": d} for label, f, d in zip(self.labels, self.files, digests)}


# ------------------------------------------------------------ context from obs
def obs_context(obs: pd.DataFrame, keys: dict[str, str | None], default: np.ndarray) -> np.ndarray:
    """Each cell's ``[species, assay, modality]`` ids (``[n, 3]`` int64): obs columns ``keys``, else ``default``.

    Values are names (any case, upstream's spellings too) or ids, as ``--species/--assay/--modality`` take;
    a column with missing or unknown values is refused, naming them and the accepted names.
    """
    context = np.tile(np.asarray(default, dtype=np.int64), (len(obs), 1))
    for k, kind in enumerate(KINDS):
        key = keys.get(kind)
        if key is not None:
            context[:, k] = column_ids(obs, key, kind)
    return context


def column_ids(obs: pd.DataFrame, key: str, kind: str) -> np.ndarray:
    """The ``kind`` token id of every cell from obs column ``key`` (each distinct value looked up once)."""
    if key not in obs.columns:
        raise ValueError(f"obs has no column {key!r} for the {kind} of each cell (--{kind}-key); "
                         f"its columns are: {list(obs.columns)}")  # fmt: skip
    codes, values = pd.factorize(obs[key])
    if np.any(codes < 0):
        raise ValueError(
            f"obs[{key!r}] has no {kind} for {int(np.sum(codes < 0))} cells (missing values): fill them in, "
            f"or leave those cells out with subset= (--subset \"{key}.notna()\")"
        )
    ids, unknown = np.empty(len(values), dtype=np.int64), []
    for i, value in enumerate(values):
        try:
            ids[i] = context_id(kind, _plain(value))
        except ValueError:
            unknown.append(i)
    if unknown:
        names = ", ".join(f"{name} ({i})" for name, i in CONTEXT_TABLES[kind].items())
        n = int(np.isin(codes, unknown).sum())
        unknown = [values[i] for i in unknown]
        raise ValueError(
            f"obs[{key!r}] holds {len(unknown)} values that are no Nicheformer {kind} ({n} cells): "
            f"{[str(u) for u in unknown[:10]]}; accepted, by name (any case) or id: {names}; rename them, e.g. "
            f"adata.obs[{key!r}] = adata.obs[{key!r}].replace({{{str(unknown[0])!r}: ...}})"
        )
    return ids[codes]


def _plain(value):
    """A column value as context_id takes it: integral floats (a column with NaN once) as ints."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    return value
