"""Nicheformer's token layout: special and context ids, the gene vocabulary, the technology means.

Token ids (from Nicheformer's public code):

    0 <mask>   1 <pad>   2 <cls>
    3-4   modality  (dissociated, spatial)
    5-6   species   (human, mouse)
    7-18  assay     (MERFISH, CosMx, Xenium, 10x variants, CITE-seq, Smart-seq v4)
    19-29 unused
    30 +  genes: gene id = vocabulary index + 30

The embedding table has ``n_tokens + 5`` rows with ``n_tokens = n_genes + 30``;
the last five ids are unused too. Every id gets a readable name (special and
context ids in angle brackets) so that tables list context tokens by name.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MASK, PAD, CLS = 0, 1, 2
#: Gene id = vocabulary index + GENE_OFFSET.
GENE_OFFSET = 30
#: Rows of the embedding table beyond n_tokens.
EXTRA_EMBEDDINGS = 5
#: Context tokens per cell: species, assay, modality (in this order).
N_CONTEXT = 3

MODALITY = {"dissociated": 3, "spatial": 4}
SPECIES = {"human": 5, "mouse": 6}
ASSAY = {
    "MERFISH": 7,
    "CosMx": 8,
    "Xenium": 9,  # the Xenium notebook's name for 9; two other notebooks call 9 "visium" (an alias)
    "10x 5' v2": 10,
    "10x 3' v3": 11,
    "10x 3' v2": 12,
    "10x 5' v1": 13,
    "10x 3' v1": 14,
    "10x 3' transcription profiling": 15,
    "10x 5' transcription profiling": 16,
    "CITE-seq": 17,
    "Smart-seq v4": 18,
}
#: Other spellings Nicheformer's tokenization notebooks accept.
ALIASES = {
    "species": {"homo sapiens": "human", "mus musculus": "mouse"},
    "assay": {
        "nanostring digital spatial profiling": "CosMx",
        "visium": "Xenium",
        "10x transcription profiling": "10x 3' transcription profiling",
    },
    "modality": {},
}
CONTEXT_TABLES = {"species": SPECIES, "assay": ASSAY, "modality": MODALITY}


def context_id(kind: str, value) -> int:
    """The token id of a species, assay or modality given by name (any case) or by id (``9`` or ``"9"``)."""
    table = CONTEXT_TABLES[kind]
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)  # a number typed on the command line
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if int(value) not in table.values():
            valid = ", ".join(f"{i} ({name})" for name, i in table.items())
            raise ValueError(f"{kind} id {value} is not a Nicheformer {kind} token; valid ids: {valid}")
        return int(value)
    by_lower = {k.lower(): v for k, v in table.items()}
    key = str(value).strip().lower()
    key = ALIASES[kind].get(key, key).lower()
    if key not in by_lower:
        ids = ", ".join(f"{name} ({i})" for name, i in table.items())
        raise ValueError(f"unknown {kind} {value!r}; choose one of (name or id): {ids}")
    return by_lower[key]


def special_token_names() -> dict[int, str]:
    names = {MASK: "<mask>", PAD: "<pad>", CLS: "<cls>"}
    for kind, table in CONTEXT_TABLES.items():
        names.update({i: f"<{kind}:{name}>" for name, i in table.items()})
    return names


class Vocabulary:
    """The model's gene list: gene ``genes[i]`` has token id ``i + 30``."""

    def __init__(self, genes: Sequence[str], source: str = "<list>"):
        self.genes = [str(g) for g in genes]
        self.source = source
        if not self.genes:
            raise ValueError(f"the vocabulary {source} is empty: it needs one gene name per token")
        self.index: dict[str, int] = {}
        duplicates = []
        for i, g in enumerate(self.genes):
            if g in self.index:
                duplicates.append(g)
            else:
                self.index[g] = i  # a duplicated name maps to its first occurrence
        if duplicates:
            warnings.warn(
                f"the vocabulary {source} names {len(duplicates)} genes twice (e.g. {duplicates[:5]}); "
                f"data genes map to the first occurrence",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.genes)

    @property
    def n_tokens(self) -> int:
        """The model's ``n_tokens`` for this vocabulary (genes + 30 reserved ids)."""
        return len(self.genes) + GENE_OFFSET

    def token_names(self) -> list[str]:
        """A name for every row of the embedding table (``n_tokens + 5`` ids)."""
        names = [f"<unused{i}>" for i in range(self.n_tokens + EXTRA_EMBEDDINGS)]
        for i, name in special_token_names().items():
            names[i] = name
        names[GENE_OFFSET : GENE_OFFSET + len(self.genes)] = self.genes
        return names

    def special_ids(self) -> list[int]:
        """Ids of :meth:`token_names` that are no gene: context tokens, padding, unused rows."""
        genes = range(GENE_OFFSET, GENE_OFFSET + len(self.genes))
        return [i for i in range(self.n_tokens + EXTRA_EMBEDDINGS) if i not in genes]

    def digest(self) -> str:
        """A short fingerprint: profiles merge only when made with the same vocabulary."""
        return hashlib.blake2b("\n".join(self.genes).encode(), digest_size=8).hexdigest()

    @classmethod
    def from_file(cls, path) -> Vocabulary:
        """A text file with one gene per line, or an ``.h5ad`` whose var names are the vocabulary."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"vocabulary file {path} does not exist")
        if path.suffix == ".h5ad":
            import anndata as ad

            adata = ad.read_h5ad(path, backed="r")  # only var names are needed
            try:
                return cls(list(adata.var_names), source=str(path))
            finally:
                adata.file.close()
        lines = path.read_text().splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
        if blank:
            # a blank line would silently shift every later gene id
            raise ValueError(f"vocabulary file {path} has blank lines (line {blank[0]}): write one gene name per line")
        return cls([line.strip() for line in lines], source=str(path))


def as_vocabulary(vocab) -> Vocabulary:
    """A Vocabulary from a Vocabulary, a path or a sequence of gene names."""
    if isinstance(vocab, Vocabulary):
        return vocab
    if isinstance(vocab, (str, Path)):
        return Vocabulary.from_file(vocab)
    return Vocabulary(list(vocab))


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


#: The two ways Nicheformer's public code prepares means and tokenizes (see tokenize.py).
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
