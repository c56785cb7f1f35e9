"""What the recorder derives once per forward: the layers' mask, the batch plan, the NaN/Inf verdict.

The sync-free side (no op of a later layer waits for the device) is tests/test_sync.py; here: the
results are right when a mask is reused, changed in place or built anew, and the triton backend's
deferred NaN/Inf verdict reaches the user, naming the first layer whose input was not finite.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import attnprof
try:
    from attnprof.kernels.triton_common import INTERPRET
except ImportError:  # no Triton (the gpu extra): the triton tests below skip
    INTERPRET = False

D, HEADS = 16, 2


class TwoAttentions(nn.Module):
    """Two self-attention modules; between them cell 0 loses its last 3 keys, by a change of the mask
    in place or in a new tensor."""

    def __init__(self, in_place: bool):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.second = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.in_place = in_place

    def forward(self, x, mask):
        x = self.first(x, x, x, key_padding_mask=mask, need_weights=False)[0]
        mask = mask if self.in_place else mask.clone()
        mask[0, -3:] = True if mask.dtype == torch.bool else float("-inf")
        return self.second(x, x, x, key_padding_mask=mask, need_weights=False)[0]


def profile_of(model, x, mask, labels):
    with attnprof.Profiler(model, groups=["a", "b"], window=9, backend="torch") as prof:
        prof.set_batch(groups=labels)
        with torch.no_grad():
            model(x, mask)
    return prof.profile


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_a_mask_changed_in_place_between_layers_gets_its_own_plan(dtype):
    x = torch.randn(3, 9, D, generator=torch.Generator().manual_seed(1))
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[1, 6:] = True
    mask = padding if dtype == torch.bool else torch.zeros(3, 9).masked_fill(padding, float("-inf"))
    changed = profile_of(TwoAttentions(in_place=True), x, mask.clone(), [0, 1, 0])
    fresh = profile_of(TwoAttentions(in_place=False), x, mask.clone(), [0, 1, 0])
    assert changed.sums.keys() == fresh.sums.keys()
    for name, value in fresh.sums.items():
        np.testing.assert_array_equal(changed.sums[name], value, err_msg=name)
    # the change reached the second layer's statistics: group a's cells 0 and 2 are full in the first
    # layer; in the second, cell 0 holds 6 of its 9 positions
    assert fresh.group_sums()["pos_count"][0, 0].sum() == 9 * 9 + 9 * 9
    assert fresh.group_sums()["pos_count"][1, 0].sum() == 6 * 6 + 9 * 9


def test_per_forward_derives_once_per_mask_and_forward():
    recorder = attnprof.Profiler(TwoAttentions(False), groups=["a"]).recorder
    calls = []

    def derive(mask, n):
        calls.append(n)
        return mask * n

    recorder.set_batch(groups=[0])
    mask = torch.ones(2)
    first = recorder.per_forward(derive, mask, 2)
    assert recorder.per_forward(derive, mask, 2) is first and calls == [2]
    recorder.per_forward(derive, mask, 3)  # other arguments: derived again
    recorder.per_forward(derive, mask.clone(), 2)  # another tensor: derived again
    mask.add_(1)  # changed in place: derived again
    assert recorder.per_forward(derive, mask, 2).tolist() == [4.0, 4.0]
    assert calls == [2, 3, 2, 2]
    recorder.set_batch(groups=[0])  # the next forward: derived again
    recorder.per_forward(derive, mask, 2)
    assert calls == [2, 3, 2, 2, 2]


def test_a_float_mask_with_a_bias_is_refused_naming_the_module():
    model = TwoAttentions(in_place=False)
    mask = torch.zeros(2, 5)
    mask[0, 1] = 0.5  # a score bias, not padding
    with attnprof.Profiler(model, groups=["a"]) as prof:
        prof.set_batch(groups=[0, 0])
        with pytest.raises(attnprof.UnsupportedAttention, match="'first'.*other than 0 and -inf"):
            model(torch.randn(2, 5, D), mask)


class NaNInTheMiddle(nn.Module):
    """A 3-layer encoder whose middle layer's attention input turns NaN (and every layer's after)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(D, HEADS, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()
        with torch.no_grad():
            self.encoder.layers[1].self_attn.in_proj_bias[3] = float("nan")

    def forward(self, x, mask):
        return self.encoder(x, src_key_padding_mask=mask)


@pytest.mark.skipif(not INTERPRET, reason="runs the triton kernels under the interpreter (CPU)")
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max over NaN rows
@pytest.mark.parametrize("when", ["profile is read", "next set_batch", "session exits"])
def test_triton_run_with_nan_activations_names_the_first_layer(when):
    model = NaNInTheMiddle()
    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 4:] = True
    expected = r"layer 'encoder\.layers\.1\.self_attn': q, k or v contains NaN or Inf"
    prof = attnprof.Profiler(model, groups=["a", "b"], window=4, backend="triton")
    with pytest.raises(ValueError, match=expected):
        with prof:
            prof.set_batch(groups=[0, 1])
            with torch.no_grad():
                model(x, mask)  # the layer calls do not wait for the device: no verdict yet
            if when == "profile is read":
                prof.profile
            elif when == "next set_batch":
                prof.set_batch(groups=[0, 1])


@pytest.mark.skipif(not INTERPRET, reason="runs the triton kernels under the interpreter (CPU)")
def test_triton_run_with_finite_activations_reads_as_usual():
    model = NaNInTheMiddle()
    with torch.no_grad():
        model.encoder.layers[1].self_attn.in_proj_bias.zero_()
    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    with attnprof.Profiler(model, groups=["a", "b"], window=4, backend="triton") as prof:
        for _ in range(2):
            prof.set_batch(groups=[0, 1])
            with torch.no_grad():
                model(x, mask)
    assert prof.profile.group_sums()["cells"].sum() == 2 * 2 * 3  # 2 forwards of 2 cells, per each of 3 layers
