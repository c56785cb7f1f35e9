"""The profiled layer call as a torch.library custom op (profiler/compiled.py): a profiled model runs
under torch.compile and gives the eager outputs and sums (CPU, the torch backend)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from attnprof import Profiler
from attnprof import compiled as custom_op


def model_and_batch():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    B, L, V = 3, 12, 20
    x = torch.randn(B, L, 16)
    tokens = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(1))
    tokens[0, :4] = torch.tensor([2, 5, 5, 7])
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[1, 8:] = True
    mask[2, [0, 3]] = True
    return model, x, tokens, mask, V


def profiled(compile_backend):
    model, x, tokens, mask, V = model_and_batch()
    with Profiler(model, groups=["a", "b"], genes=V, window=6, panel=[2, 5, 7], n_context=2, backend="torch",
                  replicates={"r0": "a", "r1": "b", "r2": "a"}) as prof:  # fmt: skip
        run = model if compile_backend is None else torch.compile(model, backend=compile_backend)
        ys = []
        for step in range(3):  # the first forward allocates the sums; the later ones add into them
            prof.set_batch(groups=[0, 1, 0], tokens=tokens, replicates=["r0", "r1", "r2"])
            with torch.no_grad():
                ys.append(run(x * (1 + step), src_key_padding_mask=mask))
    return ys, prof.profile


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_compiled_profiled_model_matches_eager(compile_backend):
    torch._dynamo.reset()
    calls = []
    impl = custom_op.profiled_attention._init_fn  # the op's Python implementation, counted
    original = custom_op.compiled_attend

    def counting(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(custom_op, "compiled_attend", counting)
        ys, profile = profiled(compile_backend)
    ys_eager, profile_eager = profiled(None)
    assert calls, "the compiled model did not route attention through the custom op"
    assert impl is not None
    for y, y_eager in zip(ys, ys_eager):
        torch.testing.assert_close(y, y_eager, atol=1e-6, rtol=1e-6)
    assert profile.layers == profile_eager.layers and len(profile.layers) == 2
    for name, value in profile.sums.items():
        np.testing.assert_allclose(value, profile_eager.sums[name], rtol=1e-10, atol=1e-12, err_msg=name)
    assert profile.sums["cells"][0].tolist() == [3, 3, 3]  # 3 forwards of one cell per replicate, none lost or doubled
    assert profile.cells == {"a": 6, "b": 3}


def test_fake_implementation_gives_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 3, 5, 8)
        out = torch.ops.attnprof.profiled_attention(q, q, q, None, [], 0, "layer", None)
    assert out.shape == q.shape and out.dtype == q.dtype
