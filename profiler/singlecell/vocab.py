"""The gene vocabulary every family's tokenizer aligns the data to, in Nicheformer's token layout.

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


#: Names that moved to the Nicheformer family (:mod:`attnprof.singlecell.nicheformer.technologies`).
_MOVED = ("load_means", "technology_means", "TOKENIZATIONS")


def __getattr__(name: str):
    """The moved names, with a DeprecationWarning; resolved by name on first use, so this shared module imports
    no model family."""
    if name in _MOVED:
        import importlib

        new = "attnprof.singlecell.nicheformer.technologies"
        warnings.warn(f"attnprof.singlecell.vocab.{name} moved to {new}.{name}; import it from there",
                      DeprecationWarning, stacklevel=2)  # fmt: skip
        return getattr(importlib.import_module(new), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
