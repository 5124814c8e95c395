"""
nanorlhf/cpu_linear.py on any CPU: onednn_dtype's decision table with the CPU and torch faked (AVX512, ARM, no
oneDNN, no bf16 kernels, torch < 2.4), a OneDNNLinear fed another dtype than its own against the float64 product,
and onednn_linears when a swap fails half way. The oneDNN kernels themselves, and generate() through them, are
tested in test_model.py.
"""

import pytest
import torch
import torch.nn.functional as F

import nanorlhf.cpu_linear as cpu_linear
from nanorlhf.model import GPT, GPTConfig


def fake_cpu(monkeypatch, capability="AVX2", mkldnn=True, bf16_kernels=True, new_torch=True):
    """Make torch say what an x86 CPU of that capability would say (the real one is never asked)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: mkldnn)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: bf16_kernels)
    if not new_torch:  # torch < 2.4 has no torch.get_autocast_dtype
        monkeypatch.delattr(torch, "get_autocast_dtype", raising=False)


def decide(autocast=None):
    """onednn_dtype of a float32 CPU weight, without autocast or under CPU autocast to that dtype."""
    w = torch.zeros(2, 2)
    if autocast is None:
        return cpu_linear.onednn_dtype(w)
    with torch.autocast("cpu", dtype=autocast):
        return cpu_linear.onednn_dtype(w)


@pytest.mark.skipif(not hasattr(torch, "get_autocast_dtype"), reason="torch < 2.4 keeps F.linear (tested below)")
@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_onednn_dtype_on_x86_with_onednn(monkeypatch, capability):
    # the table of the docstring: float32 without autocast, bf16 under bf16 autocast where the kernels exist,
    # F.linear (None) under bf16 autocast without them and under fp16 autocast
    fake_cpu(monkeypatch, capability)
    assert decide() == torch.float32
    assert decide(torch.bfloat16) == torch.bfloat16
    assert decide(torch.float16) is None
    fake_cpu(monkeypatch, capability, bf16_kernels=False)
    assert decide() == torch.float32
    assert decide(torch.bfloat16) is None


@pytest.mark.parametrize("cpu", [dict(capability="DEFAULT"), dict(capability="ZVECTOR"), dict(mkldnn=False),
                                 dict(new_torch=False)])
def test_onednn_dtype_keeps_f_linear_elsewhere(monkeypatch, cpu):
    # an x86 CPU below AVX2, another architecture, a torch built without oneDNN, a torch < 2.4: F.linear always
    fake_cpu(monkeypatch, **cpu)
    assert decide() is None
    if "new_torch" not in cpu:  # (torch < 2.4's autocast is not this torch's: asked without autocast only)
        assert decide(torch.bfloat16) is None


@pytest.mark.parametrize("x_dtype", [torch.float64, torch.bfloat16])
def test_onednn_linear_casts_its_input_to_its_dtype(x_dtype):
    # a float32 OneDNNLinear given float64 or bf16 rows computes in float32 and returns float32, as F.linear under
    # autocast does: against the float64 product of the float32-cast input and weight
    if cpu_linear.onednn_dtype(torch.zeros(2, 2)) != torch.float32:
        pytest.skip("generate() keeps F.linear for float32 on this CPU")
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40)
    x = torch.randn(6, 24, dtype=x_dtype)  # (rows, in)
    y = cpu_linear.OneDNNLinear(linear, torch.float32, 6)(x)  # (rows, out)
    ref = x.float().double() @ linear.weight.double().t() + linear.bias.double()
    assert y.dtype == torch.float32 and y.shape == (6, 40)
    assert ((y.double() - ref).abs() / (1 + ref.abs())).max() < 1e-5


def test_onednn_linear_hands_onednn_its_dtype_and_rows(monkeypatch):
    # on any CPU, with oneDNN's two ops faked by F.linear on what they are given: a bf16 OneDNNLinear (the trunk's
    # under bf16 autocast) reorders a bf16 weight for `rows` rows, and multiplies bf16 rows by it with a bf16 bias,
    # whatever dtype x comes in; the result against the float64 product of the bf16-rounded numbers
    reorders = []

    def reorder(w, rows):
        reorders.append((w.dtype, rows))
        return w

    def pointwise(x, w, b, attr, scalars, algorithm):
        assert (x.dtype, w.dtype, b.dtype, attr) == (torch.bfloat16, torch.bfloat16, torch.bfloat16, "none")
        return F.linear(x, w, b)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", reorder)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", pointwise)
    torch.manual_seed(1)
    linear = torch.nn.Linear(16, 8)
    x = torch.randn(5, 16)  # (rows, in), float32 as the trunk's LayerNorm gives under autocast
    y = cpu_linear.OneDNNLinear(linear, torch.bfloat16, 5)(x)  # (rows, out)
    assert reorders == [(torch.bfloat16, 5)]
    cast = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
    ref = cast(x) @ cast(linear.weight).t() + cast(linear.bias)
    assert y.dtype == torch.bfloat16 and ((y.double() - ref).abs() / (1 + ref.abs())).max() < 2 ** -7


class Recorder:
    """A stand-in OneDNNLinear: F.linear on the module's weight, and a record of what it was built with."""

    built = 0
    fail_at = None

    def __init__(self, linear, dtype, rows):
        Recorder.built += 1
        if Recorder.built == Recorder.fail_at:
            raise RuntimeError("no memory for the reordered weight")
        self.linear, self.dtype, self.rows = linear, dtype, rows

    def __call__(self, x):
        return F.linear(x, self.linear.weight, self.linear.bias)


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16)).eval()


def test_a_swap_that_fails_half_way_puts_back_the_ones_done(monkeypatch):
    # the third OneDNNLinear cannot be built: the error is the caller's, the two Linears swapped already get their
    # own forward back, and the ones never reached are left alone
    monkeypatch.setattr(cpu_linear, "onednn_dtype", lambda weight: torch.float32)
    monkeypatch.setattr(cpu_linear, "OneDNNLinear", Recorder)
    monkeypatch.setattr(Recorder, "built", 0)
    monkeypatch.setattr(Recorder, "fail_at", 3)
    model = tiny_gpt()
    with pytest.raises(RuntimeError, match="no memory for the reordered weight"):
        with cpu_linear.onednn_linears(model, 4, model.lm_head):
            pytest.fail("the block ran without all its Linears swapped")
    assert Recorder.built == 3
    assert all("forward" not in vars(m) for m in model.modules())


def test_a_single_row_swaps_too(monkeypatch):
    # the chat samples one row (rows=1): every plain Linear is swapped all the same, built for one row
    monkeypatch.setattr(cpu_linear, "onednn_dtype", lambda weight: torch.float32)
    monkeypatch.setattr(cpu_linear, "OneDNNLinear", Recorder)
    model = tiny_gpt()
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    with cpu_linear.onednn_linears(model, 1, model.lm_head):
        assert all(isinstance(m.forward, Recorder) and m.forward.rows == 1 for m in linears)
    assert all("forward" not in vars(m) for m in model.modules())
