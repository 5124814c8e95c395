"""
nanorlhf/offload.py on a CPU-only machine: the copy to an accelerator is played by a host tensor whose .to(device)
is recorded and returns a fresh copy, and pinning by a pin_memory that makes such a host tensor. (The tests in
test_memory.py run the real path on device 'cpu', where .to returns the tensor itself.) The reference is the model's
own tensors cloned before offload.
"""

import pytest
import torch

from nanorlhf.offload import is_offloaded, offload, on_device


class Host(torch.Tensor):
    """A pinned host tensor stand-in: each .to(...) is recorded in Host.moves and returns a new plain tensor."""

    moves = []

    def to(self, *args, **kwargs):
        Host.moves.append((args, kwargs))
        return torch.Tensor.to(self, "cpu").as_subclass(torch.Tensor).clone()


def models():
    """A model with buffers (BatchNorm's running statistics, moved off their initial values) and one without."""
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    a(torch.randn(5, 3))
    return a, torch.nn.Linear(4, 2)


def tensors(model):
    return list(model.parameters()) + list(model.buffers())


def test_offload_to_cuda_pins_and_on_device_copies_each_model_to_its_device(monkeypatch):
    """
    offload(model, 'cuda...') makes every parameter and buffer a pinned CPU copy of itself; on_device copies each of
    every offloaded model to that model's own device (non_blocking: the point of pinning), skipping None and models
    that are not offloaded; after the block each tensor is its pinned host copy again, values unchanged throughout.
    """
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.clone().as_subclass(Host))
    monkeypatch.setattr(Host, "moves", [])
    a, b = models()
    plain = torch.nn.Linear(2, 2)
    want = {m: [t.detach().clone() for t in tensors(m)] for m in (a, b)}
    plain_home = [t.data_ptr() for t in tensors(plain)]
    offload(a, "cuda")
    offload(b, "cuda:1")
    assert is_offloaded(a) and is_offloaded(b) and not is_offloaded(plain)
    for m in (a, b):
        host = m._offload[2]
        assert all(type(h) is Host for h in host), "not pinned"
        assert [t.data_ptr() for t in tensors(m)] == [h.data_ptr() for h in host], "not the pinned copies"
        assert all(torch.equal(t, w) for t, w in zip(tensors(m), want[m]))
    home = {m: [t.data_ptr() for t in tensors(m)] for m in (a, b)}
    with on_device(a, None, plain, b):
        for m in (a, b):
            assert all(torch.equal(t, w) for t, w in zip(tensors(m), want[m]))
            assert all(p != h for p, h in zip([t.data_ptr() for t in tensors(m)], home[m])), "not copied in"
        assert [t.data_ptr() for t in tensors(plain)] == plain_home
    moves = [((torch.device("cuda"),), {"non_blocking": True})] * len(want[a]) + \
            [((torch.device("cuda", 1),), {"non_blocking": True})] * len(want[b])
    assert Host.moves == moves
    for m in (a, b):
        assert [t.data_ptr() for t in tensors(m)] == home[m], "not back on the host"
        assert all(torch.equal(t, w) for t, w in zip(tensors(m), want[m]))


def test_offload_for_a_cpu_run_pins_nothing_and_keeps_the_numbers(monkeypatch):
    """Pinned pages help a copy to a GPU only (and need CUDA): a 'cpu' run pins nothing; its outputs are unchanged."""
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pytest.fail("pinned"))
    a, b = models()
    a.eval()
    x = torch.randn(6, 3)
    want = b(a(x))
    offload(a, "cpu")
    offload(b, torch.device("cpu"))
    with on_device(a, b):
        assert torch.equal(b(a(x)), want)
    assert torch.equal(b(a(x)), want)
