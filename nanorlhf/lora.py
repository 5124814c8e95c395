"""
LoRA (Hu et al. 2021), written by hand: a frozen Linear W plus a trainable low-rank update B A.

    y = x W^T + b + (alpha / r) * (x A^T) B^T        A (r, in), B (out, r), r << min(in, out)

B starts at zero, so before the first optimizer step the adapted model is exactly the base model (same logits,
bit for bit). The base weights are frozen (requires_grad False), so they get no gradient and no AdamW state:
for a model with N parameters in the wrapped layers, training keeps r * (in + out) numbers per layer instead.

What RLHF gets from it (seed section 3.3, Hydra-PPO by Santacroce et al. 2023):
- the reference policy is the actor with its adapters switched off (`adapters_off(model)`): the frozen base IS
  the SFT model, so PPO needs no separate reference copy;
- every checkpoint is saved merged, W + (alpha / r) B A, as a plain model (`merged_state_dict`): nothing
  downstream knows LoRA was used.

A LoRALinear keeps the base Linear's parameter names (`weight`, `bias`) and adds `lora_A`, `lora_B`, so a plain
state dict loads into a wrapped model with strict=False and `merged_state_dict` gives back plain keys.

Example:
    model = GPT(config)                       # loaded SFT weights
    names = apply_lora(model, rank=8, alpha=16)   # ['transformer.h.0.attn.c_attn', ...]; base frozen
    with adapters_off(model):
        ref_logits = model(idx)               # the base model
    torch.save(merged_state_dict(model), ...) # plain keys, merged weights
"""

import math
import re
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.nn import functional as F

# the attention and MLP projections of every block (nanoGPT's names); not lm_head, which is tied to wte
DEFAULT_TARGETS = r"attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj"


class LoRALinear(nn.Linear):
    """
    A Linear whose frozen weight gets a trainable low-rank update. Built from an existing nn.Linear with
    `from_linear` (the same weight and bias Parameters, no copy).
    """

    @classmethod
    def from_linear(cls, linear, rank, alpha):
        assert rank >= 1, "LoRA rank must be >= 1"
        w = linear.weight
        # nn.Linear.__init__ on the meta device allocates nothing; the base's own Parameters are put in place
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        module.weight = w
        module.bias = linear.bias
        module.rank = rank
        module.alpha = alpha
        module.scaling = alpha / rank
        module.enabled = True
        module.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=w.device, dtype=w.dtype))
        module.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device=w.device, dtype=w.dtype))
        # A as nn.Linear initialises its weight (Kaiming-uniform), B = 0: the product B A starts at exactly 0
        nn.init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))
        module.weight.requires_grad_(False)
        if module.bias is not None:
            module.bias.requires_grad_(False)
        return module

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        if not self.enabled:
            return y
        # y += (alpha / r) * (x A^T) B^T: two thin matmuls, never the (out, in) product B A
        return y + (x @ self.lora_A.t()) @ self.lora_B.t() * self.scaling  # (..., out)

    def delta_weight(self):
        """(alpha / r) * B A, the (out, in) update that merging adds to the weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self):
        return super().extra_repr() + f", rank={self.rank}, alpha={self.alpha}"


def _tied_parameters(model):
    """ids of parameters that appear under more than one name (GPT's wte / lm_head)."""
    seen, tied = set(), set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (tied if id(p) in seen else seen).add(id(p))
    return tied


def apply_lora(model, rank, alpha, targets=DEFAULT_TARGETS):
    """
    Replace every nn.Linear whose full name matches the regex `targets` (re.search) by a LoRALinear, freeze
    every parameter of the model, and leave only the adapters trainable. Returns the wrapped names, in order.
    The caller unfreezes what else should train (the scalar head of a reward model or critic).
    Raises ValueError when targets is not a regular expression, when nothing matches, or when a match is tied to
    another parameter (lm_head = wte: merging would change the embedding too, so merged and unmerged models would
    differ).
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    try:
        pattern = re.compile(targets)
    except re.error as e:  # a ValueError as the other bad targets are, which the scripts turn into one line
        raise ValueError(f"LoRA targets {targets!r}: not a regular expression ({e})") from None
    tied = _tied_parameters(model)
    matches = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and pattern.search(name)]
    if not matches:
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"LoRA targets {targets!r} match no Linear layer (the layers are named like "
                         f"{', '.join(linears[:3])})")
    for name, m in matches:
        if id(m.weight) in tied:
            raise ValueError(f"LoRA target {name} shares its weight with another layer (tied embeddings); "
                             f"leave it out of the targets")
    model.requires_grad_(False)
    for name, m in matches:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear.from_linear(m, rank, alpha))
    return [name for name, _ in matches]


def apply_lora_flags(model, args, trainable=None):
    """
    apply_lora with a stage's --lora_rank, --lora_alpha and --lora_targets (a regex that names no layer is one line
    naming --lora_targets); trainable: a resumed run's saved tensors (lora_payload's "trainable"), put back.
    """
    from nanorlhf.utils import UserError

    try:
        apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets)
    except ValueError as e:
        raise UserError(f"--lora_targets: {e}") from None
    if trainable is not None:
        model.load_state_dict(trainable, strict=False)


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def has_lora(model):
    return any(isinstance(m, LoRALinear) for m in model.modules())


@contextmanager
def adapters_off(model):
    """Within the block, every LoRALinear of model computes its base layer only (the reference policy)."""
    layers = lora_layers(model)
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(layers, before):
            m.enabled = e


@torch.no_grad()
def merged_state_dict(model, device="cpu", state=None):
    """
    The model's state dict as a plain model holds it: each LoRALinear's weight replaced by W + (alpha / r) B A
    (computed in the weight's dtype), lora_A / lora_B dropped. The model itself is not changed.
    state: the model's whole state dict to merge instead of model.state_dict(), e.g. dist.full_state_dict's, which
    under FSDP2 gathers what each rank holds a shard of (the model's own tensors are then DTensors, one shard each).
    """
    raw = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    sd = raw.state_dict() if state is None else state
    merged = {}
    for name, m in raw.named_modules():
        if isinstance(m, LoRALinear) and f"{name}.weight" in sd:
            # W + (alpha / r) B A, as m.weight + m.delta_weight() computes it
            w, a, b = (sd[f"{name}.{k}"] for k in ("weight", "lora_A", "lora_B"))
            merged[f"{name}.weight"] = w + (b @ a) * m.scaling
    out = {}
    for k, v in sd.items():
        if k.endswith((".lora_A", ".lora_B")):
            continue
        out[k] = merged.get(k, v).detach().to(device).clone()
    return out


@torch.no_grad()
def merge_lora(model):
    """
    Fold every adapter into its weight, W <- W + (alpha / r) B A, and put a plain nn.Linear back in its place
    (sharing the merged Parameters). The model is then a plain model again; returns it.
    """
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.weight += m.delta_weight()
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            plain.weight, plain.bias = m.weight, m.bias
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    return model


def adapter_state_dict(model):
    """Only the adapters ({name: tensor} of lora_A / lora_B, on the CPU): what --resume needs beside the base."""
    raw = getattr(model, "_orig_mod", model)
    return {k: v.detach().cpu().clone() for k, v in raw.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def count_trainable(model):
    """Number of parameters with requires_grad (each tensor once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class AdaptersOff(nn.Module):
    """
    A model seen with its adapters switched off, as a callable module (PPO's reference under LoRA). It holds no
    weights of its own: the wrapped model is deliberately not registered as a submodule, so that freezing or
    moving this module never touches the actor's parameters.
    """

    def __init__(self, model):
        super().__init__()
        self.__dict__["model"] = model

    def forward(self, *args, **kwargs):
        with adapters_off(self.model):
            return self.model(*args, **kwargs)


def lora_payload(model, payload, rank, alpha, targets):
    """
    A checkpoint payload (utils.model_payload) made plain: "model" holds the merged weights, which every stage
    loads as a plain model; "lora" keeps the trained tensors and the settings, which only --resume reads. Both
    come from payload["model"], the whole weights that model_payload gathered (under FSDP2 on rank 0; the other
    ranks hold an empty dict and write nothing), never from one rank's shards.
    """
    full = payload["model"]
    raw = getattr(model, "_orig_mod", model)
    trainable = {k: full[k].clone() for k, p in raw.named_parameters() if p.requires_grad and k in full}
    payload["model"] = merged_state_dict(model, state=full)
    payload["lora"] = {"rank": rank, "alpha": alpha, "targets": targets, "trainable": trainable}
    return payload
