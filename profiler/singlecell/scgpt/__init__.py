"""scGPT: its encoder in plain PyTorch with the published state-dict names, and its preprocessing.

Modules: ``model`` (the encoder), ``checkpoint`` (model folders, state-dict names), ``tokenizer``
(both preprocessing paths, binning and sampling), ``draws`` (the random state of ``embed_data``),
``front`` (the front end for ``profile_anndata``).

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
(``np.random.rand`` per cell, drawn for every non-zero value as scGPT does);
the embed path's long cells keep a random sample (``torch.randperm``). The
tutorial path draws from ``np.random.RandomState(seed)``. The embed path draws,
cell by cell in row order over all selected cells (the Dataset of
``embed_data`` on the AnnData of the selected cells), from one of two states:

- ``ScGPTFrontEnd.with_loader(workers, batch_size)`` (the CLI's default):
  ``embed_data``'s after ``torch.manual_seed(seed)``, its model built and its
  DataLoader's workers seeded (``draws.py``);
- otherwise, the state right after ``np.random.seed(seed)`` and
  ``torch.manual_seed(seed)`` with scGPT's ``DataCollator`` called in one
  process.

Shards and resumed runs tokenize the other cells too, to give each cell the
draws it gets in one whole run.
"""

from .checkpoint import (
    RENAMES,
    SPECIAL_TOKENS,
    TRAINING_HEADS,
    UNSUPPORTED,
    load_scgpt,
    load_state,
    model_file,
    read_args,
    read_vocab,
    save_scgpt,
)
from .draws import EmbedDataRun, UpstreamModel, replay_model_draws, upstream_workers
from .front import ScGPTFrontEnd, scgpt_front_end
from .model import ContinuousValueEncoder, GeneEncoder, ScGPT, ScGPTConfig
from .tokenizer import EMBED_BINS, MODES, ScGPTTokenizer, bin_row, digitize, normalize_log1p

__all__ = [
    "EMBED_BINS", "MODES", "RENAMES", "SPECIAL_TOKENS", "TRAINING_HEADS", "UNSUPPORTED", "ContinuousValueEncoder",
    "EmbedDataRun", "GeneEncoder", "ScGPT", "ScGPTConfig", "ScGPTFrontEnd", "ScGPTTokenizer", "UpstreamModel",
    "bin_row", "digitize", "load_scgpt", "load_state", "model_file", "normalize_log1p", "read_args", "read_vocab",
    "replay_model_draws", "save_scgpt", "scgpt_front_end", "upstream_workers",
]  # fmt: skip
