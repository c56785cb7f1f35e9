"""The scGPT front end: a loaded folder's vocab and args -> tokenizer, model inputs and special tokens."""

from __future__ import annotations

import warnings

import torch

from ..family import FrontEnd
from .checkpoint import SPECIAL_TOKENS
from .draws import EMBED_DATA_BATCH_SIZE, EmbedDataRun, UpstreamModel, upstream_workers
from .model import ScGPTConfig
from .tokenizer import ScGPTTokenizer


class ScGPTFrontEnd(FrontEnd):
    """scGPT through the ``mha`` adapter: ``model(genes, values, padding)``."""

    name = "scgpt"
    adapter = "mha"
    n_context = 1  # <cls>

    def __init__(self, tokenizer: ScGPTTokenizer, vocab: dict, args: dict | None = None):
        self.tokenizer = tokenizer
        self.vocab, self.args = vocab, args
        self.context_length = tokenizer.max_length
        names = [""] * len(vocab)
        for token, i in vocab.items():
            names[i] = token
        self.genes = names
        self.special_ids = sorted(vocab[t] for t in SPECIAL_TOKENS)

    def with_loader(self, workers: int | None = None, batch_size: int | None = None) -> ScGPTFrontEnd:
        """This front end drawing as ``embed_data(..., batch_size=batch_size)`` after ``torch.manual_seed(seed)``
        with ``workers`` DataLoader workers (None: ``min(len(os.sched_getaffinity(0)), batch_size)`` on this
        machine, as embed_data computes it; batch_size None: embed_data's 64). See ``draws.py``.

        The tutorial path has no DataLoader to reproduce: it is returned as it is when neither is given.
        """
        if self.tokenizer.mode != "embed":
            if workers is None and batch_size is None:
                return self
            raise ValueError("--scgpt-workers and --scgpt-batch-size are read in embed mode (--scgpt-mode embed): "
                             "the tutorial path has no DataLoader to reproduce")  # fmt: skip
        if self.args is None:
            raise ValueError("with_loader needs the model's args.json: build the front end with scgpt_front_end")
        batch_size = EMBED_DATA_BATCH_SIZE if batch_size is None else int(batch_size)
        workers = upstream_workers(batch_size) if workers is None else int(workers)
        run = EmbedDataRun(UpstreamModel.from_args(self.args, len(self.vocab)), workers, batch_size)
        old = self.tokenizer
        tokenizer = ScGPTTokenizer(self.vocab, old.config, mode="embed", max_length=old.max_length, seed=old.seed,
                                   embed_data=run)  # fmt: skip
        return ScGPTFrontEnd(tokenizer, self.vocab, self.args)

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
    return ScGPTFrontEnd(ScGPTTokenizer(vocab, config, mode=mode, max_length=max_length, seed=seed), vocab, args)
