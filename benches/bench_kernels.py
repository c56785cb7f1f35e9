"""The kernels alone: attnprof backends against plain scaled_dot_product_attention.

Issue target (full mode, B=4, H=16, L=1500, D=32, W=64, gene statistics on):
torch backend <= 2.5x plain SDPA and >= 3x faster than the reference backend.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnprof.kernels import StatsSpec, attention_stats

VOCAB = 20345


@pytest.fixture(scope="module")
def inputs(full):
    B, H, L, D = (4, 16, 1500, 32) if full else (2, 4, 256, 32)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    tokens = torch.stack([torch.randperm(VOCAB - 30, generator=g)[:L] + 30 for _ in range(B)])
    groups = torch.arange(B) % 2
    spec = StatsSpec(n_groups=2, window=64, vocab_size=VOCAB, n_context=3)
    return dict(q=q, k=k, v=v, tokens=tokens, groups=groups, spec=spec, shape=(B, H, L, D))


def _info(benchmark, inputs, **extra):
    benchmark.group = "kernels B={} H={} L={} D={}".format(*inputs["shape"])
    benchmark.extra_info.update(extra)


def test_sdpa(benchmark, inputs):
    _info(benchmark, inputs, contender="plain SDPA", baseline=True)
    benchmark(F.scaled_dot_product_attention, inputs["q"], inputs["k"], inputs["v"])


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_attnprof(benchmark, inputs, backend):
    _info(benchmark, inputs, contender=f"attnprof {backend}")

    def run():
        return attention_stats(
            inputs["q"], inputs["k"], inputs["v"],
            spec=inputs["spec"], groups=inputs["groups"], tokens=inputs["tokens"], backend=backend,
        )  # fmt: skip

    if backend == "reference":
        benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)
    else:
        benchmark(run)
