"""
generate()'s Linears on an x86 CPU: through oneDNN, each weight reordered once per call.

GPT.generate wraps its sampling loop in `with onednn_linears(...)`; nothing else uses this module. It calls
torch.ops.mkldnn's private ops (_reorder_linear_weight, _linear_pointwise) and swaps each nn.Linear's forward for
the length of the call: the substitution torch.compile's freezing makes, without a compiler. Where onednn_dtype
says None (a GPU, a float64 or bf16 model, fp16 autocast, ARM, torch < 2.4), nothing changes.
"""

from contextlib import contextmanager

import torch
import torch.nn as nn


def onednn_dtype(weight):
    """
    The dtype in which generate() runs a Linear with this weight through oneDNN (OneDNNLinear), or None to keep
    F.linear: float32 weights on an x86 CPU whose torch has oneDNN; bfloat16 under CPU autocast to bfloat16 (where
    oneDNN has bf16 kernels), float32 without autocast. Anything else (a GPU, a float64 or bf16 model, fp16
    autocast, ARM) keeps F.linear.
    """
    if (weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available()
            or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512")
            or not hasattr(torch, "get_autocast_dtype")):  # torch < 2.4 (pyproject allows 2.1): keep F.linear
        return None
    if not torch.is_autocast_enabled("cpu"):
        return torch.float32
    if torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


class OneDNNLinear:
    """
    y = x W^T + b for one nn.Linear, through oneDNN with W reordered once into oneDNN's blocked layout for about
    `rows` rows of x; computes in `dtype` and returns that dtype (what F.linear gives under autocast).
    """

    def __init__(self, linear, dtype, rows):
        self.dtype = dtype
        # W (out, in), in oneDNN's blocked layout (an opaque mkldnn tensor, not a strided one)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype), rows)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)  # (out,)

    def __call__(self, x):
        x = x if x.dtype == self.dtype else x.to(self.dtype)  # (..., in); a no-op .to() still costs a few us per call
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")  # (..., out)


@contextmanager
def onednn_linears(model, rows, head):
    """
    Inside the block, every plain nn.Linear of model runs as a OneDNNLinear (its forward is replaced, and put
    back on exit), the trunk's in onednn_dtype, `head` (the lm_head) in float32 as float32_head wants. Where
    onednn_dtype says None, nothing changes. For inference only: a OneDNNLinear has no backward, and it holds a
    copy of the weight taken on entry.

    Why: a decode step multiplies a few rows (one per sequence) by every weight of the model, and at so few rows
    the layout of the weight decides the speed. Measured on this project's 2-core AMD EPYC, float32, 16 rows, x
    W^T for W 768 x 256 / 256 x 1024 / 4096 x 256: F.linear (MKL) 80 / 138 / 385 us, oneDNN on the weight as it
    is 93 / 108 / 297 us, oneDNN on the reordered weight 75 / 77 / 207 us; a reorder costs about one or two such
    calls. oneDNN is also the faster float32 kernel at many rows on this CPU (2048 rows against the 4096 x 256
    weight: 133 against 90 GFLOP/s). Under bf16 autocast F.linear already calls oneDNN, on the weight as it is
    (16 rows, W 768 x 256: 107 against 41 us reordered). torch.compile's freezing makes the same substitution;
    this needs no compiler.
    """
    dtype = onednn_dtype(head.weight)
    # a Linear swapped already belongs to an enclosing call (a generate() inside another's on_token): left to it
    linears = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in m.__dict__] \
        if dtype is not None else []
    swapped = []
    try:
        for m in linears:
            m.forward = OneDNNLinear(m, torch.float32 if m is head else dtype, rows)
            swapped.append(m)
        yield
    finally:
        for m in swapped:
            del m.forward
