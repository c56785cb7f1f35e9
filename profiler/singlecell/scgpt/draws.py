"""The random state of scGPT's ``embed_data`` replayed: the draws between ``torch.manual_seed(S)`` and its collator.

``embed_data`` (``scgpt/tasks/cell_emb.py``) samples the genes of long cells (``DataCollator._sample``:
``torch.randperm``) and bins tied values (``preprocess.binning``'s ``_digitize``: ``np.random.rand``) with the
global generators, in this state after the caller's ``torch.manual_seed(S)``:

1. ``TransformerModel(...)`` (cell_emb.py L237-257) draws its random initial weights from torch's global
   generator (``scgpt/model/model.py`` ``TransformerModel.__init__`` L21-158): :func:`replay_model_draws`.
2. ``get_batch_cell_embeddings`` iterates a ``DataLoader`` (cell_emb.py L106-122) whose iterator draws a base
   seed: ``torch.empty((), dtype=torch.int64).random_()`` (``torch/utils/data/dataloader.py``,
   ``_BaseDataLoaderIter.__init__``), with any ``num_workers``.
3. It has ``num_workers=min(len(os.sched_getaffinity(0)), batch_size)`` worker processes (cell_emb.py L112).
   Worker ``w`` seeds torch with ``base_seed + w`` and numpy with ``_generate_state(base_seed, w)``
   (``torch/utils/data/_utils/worker.py``, ``_worker_loop``); batch ``i`` (``SequentialSampler``) goes to worker
   ``i % W`` (``_try_put_index``'s ``itertools.cycle``; every worker of a map-style dataset stays active), whose
   generators continue over its batches. With ``num_workers=0`` the collator runs in the main process:
   torch's generator continues after the base seed and numpy's is the caller's (``np.random.seed(S)``, as
   ``scgpt.utils.set_seed`` seeds it).

Reproduced for the model ``embed_data`` builds without flash-attn (``use_fast_transformer=False``, or flash-attn
not installed: scGPT then warns and builds ``nn.TransformerEncoderLayer``); ``FlashMHA`` draws otherwise.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import init
from torch.utils.data._utils.worker import _generate_state  # the workers' numpy seed, as torch computes it

EMBED_DATA_BATCH_SIZE = 64  # embed_data's batch_size default (cell_emb.py L153)


@dataclass(frozen=True)
class UpstreamModel:
    """The shapes of the ``TransformerModel`` that ``embed_data`` builds (args.json names in comments)."""

    n_tokens: int  # len(vocab), the special tokens appended
    d_model: int  # embsize
    d_hid: int  # d_hid
    n_layers: int  # nlayers
    n_layers_cls: int  # n_layers_cls

    @classmethod
    def from_args(cls, args: dict, n_tokens: int) -> UpstreamModel:
        missing = [k for k in ("embsize", "d_hid", "nlayers", "n_layers_cls") if k not in args]
        if missing:
            raise ValueError(
                f"args.json lacks {missing}, which scGPT's embed_data reads to build the model whose random "
                f"initial weights come before its samples (it fails without them): add them as the model was "
                f"trained (scGPT's default n_layers_cls is 3)"
            )
        return cls(n_tokens, int(args["embsize"]), int(args["d_hid"]), int(args["nlayers"]), int(args["n_layers_cls"]))


def replay_model_draws(generator: torch.Generator, model: UpstreamModel) -> None:
    """Draw from ``generator`` what building ``TransformerModel`` draws from torch's global generator.

    The same init calls on float32 tensors of the same shapes, in the order of ``TransformerModel.__init__``
    with ``embed_data``'s arguments (model.py line numbers): do_mvc=True, do_dab=False, no batch labels, no
    batch norm, n_cls=1, input_emb_style "continuous", mvc_decoder_style "inner product".
    """

    def linear(n_in: int, n_out: int, bias: bool = True) -> None:  # nn.Linear.reset_parameters
        init.kaiming_uniform_(torch.empty(n_out, n_in), a=math.sqrt(5), generator=generator)
        if bias:
            bound = 1 / math.sqrt(n_in) if n_in > 0 else 0
            init.uniform_(torch.empty(n_out), -bound, bound, generator=generator)

    d = model.d_model
    embedding = torch.empty(model.n_tokens, d)
    init.normal_(embedding, generator=generator)  # GeneEncoder's nn.Embedding (L79, L725)
    linear(1, d)  # ContinuousValueEncoder.linear1 (L83, L767); its Dropout, ReLU, LayerNorm draw nothing
    linear(d, d)  # ContinuousValueEncoder.linear2 (L769)
    # nn.TransformerEncoderLayer (L124): MultiheadAttention builds out_proj (an nn.Linear), then
    # _reset_parameters draws xavier_uniform_(in_proj_weight) and zeroes the biases; then linear1, linear2.
    # nn.TransformerEncoder (L127) deep-copies that one layer nlayers times: no more draws.
    linear(d, d)
    init.xavier_uniform_(torch.empty(3 * d, d), generator=generator)
    linear(d, model.d_hid)
    linear(model.d_hid, d)
    for n_in, n_out in ((d, d), (d, d), (d, 1)):  # ExprDecoder.fc (L129, L851-857)
        linear(n_in, n_out)
    for _ in range(model.n_layers_cls - 1):  # ClsDecoder(d_model, n_cls=1, nlayers=n_layers_cls) (L134, L898-903)
        linear(d, d)
    linear(d, 1)
    linear(d, d)  # MVCDecoder "inner product": gene2query (L136, L942)
    linear(d, d, bias=False)  # ... and W (L944); Similarity and CrossEntropyLoss draw nothing
    init.uniform_(embedding, -0.1, 0.1, generator=generator)  # init_weights (L153-158)


def upstream_workers(batch_size: int = EMBED_DATA_BATCH_SIZE) -> int:
    """``num_workers`` as embed_data computes it on this machine: ``min(len(os.sched_getaffinity(0)), batch_size)``."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cpus, batch_size)


@dataclass(frozen=True)
class EmbedDataRun:
    """The ``embed_data`` call whose draws embed mode reproduces: its model, DataLoader workers and batch size."""

    model: UpstreamModel
    workers: int
    batch_size: int = EMBED_DATA_BATCH_SIZE

    def __post_init__(self):
        if self.workers < 0:
            raise ValueError(f"the number of DataLoader workers must be 0 or more, got {self.workers}")
        if self.batch_size < 1:
            raise ValueError(f"embed_data's batch size must be at least 1, got {self.batch_size}")

    def streams(self, seed: int):
        """cell position in the Dataset -> (numpy RandomState, torch Generator) its collation draws from."""
        generator = torch.Generator().manual_seed(seed)
        replay_model_draws(generator, self.model)
        base_seed = torch.empty((), dtype=torch.int64).random_(generator=generator).item()
        if self.workers == 0:
            main = (np.random.RandomState(seed), generator)
            return lambda position: main
        workers = [(np.random.RandomState(_generate_state(base_seed, w)), torch.Generator().manual_seed(base_seed + w))
                   for w in range(self.workers)]  # fmt: skip
        return lambda position: workers[(position // self.batch_size) % self.workers]


def seeded_streams(seed: int):
    """The state right after ``np.random.seed(seed)`` and ``torch.manual_seed(seed)``, the collator in one process."""
    both = (np.random.RandomState(seed), torch.Generator().manual_seed(seed))
    return lambda position: both
