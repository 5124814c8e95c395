"""
Offload (seed section 3.3, DeepSpeed-Chat's --offload_reference_model): a frozen model kept in CPU memory and
copied to the accelerator only for the block of code that runs it.

    offload(ref, device)                 # ref's weights now live in (pinned) CPU memory
    with on_device(ref, reward_model):   # copies in; models that are not offloaded are left alone
        ref_logits = ref(idx, mask)
    # leaving the block drops the accelerator copies: the CPU copies stay the weights (frozen: nothing to copy back)

The numbers are those of the model that never left the accelerator: the same weights, the same kernels.
"""

from contextlib import ExitStack, contextmanager

import torch


def offload(model, device):
    """Keep model's parameters and buffers in CPU memory (pinned when the accelerator is CUDA); returns model."""
    device = torch.device(device)
    tensors = list(model.parameters()) + list(model.buffers())
    host = []
    for t in tensors:
        h = t.data.to("cpu")
        if device.type == "cuda":
            h = h.pin_memory()  # pinned pages: the copy to the GPU can run without a staging buffer
        t.data = h
        host.append(h)
    model._offload = (device, tensors, host)
    return model


def is_offloaded(model):
    return hasattr(model, "_offload")


@contextmanager
def _resident(model):
    device, tensors, host = model._offload
    try:
        for t, h in zip(tensors, host):
            t.data = h.to(device, non_blocking=True)
        yield model
    finally:
        for t, h in zip(tensors, host):
            t.data = h


@contextmanager
def on_device(*models):
    """Within the block, every offloaded model among models has its weights on its accelerator."""
    with ExitStack() as stack:
        for m in models:
            if m is not None and is_offloaded(m):
                stack.enter_context(_resident(m))
        yield
