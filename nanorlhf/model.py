"""
The GPT-2 model, in the style of nanoGPT's model.py, plus what RLHF needs on top of it:

- GPT: the language model (SFT model, PPO actor, frozen reference). forward() returns logits.
- ScalarGPT: the same trunk with a Linear(n_embd, 1) head: one value per position (reward model, critic).
- padding: forward() takes an attention_mask (B, T), 1 = real token, 0 = pad. Position ids come from the mask,
  so a left-padded row gives the same logits at its real positions as the row alone.
- generate(): batched sampling with a preallocated KV cache, temperature / top-k / top-p, left-padded prompts,
  per-row EOS, and the logprob of every sampled token; on an x86 CPU its Linears run through oneDNN on weights
  reordered once per call (nanorlhf/cpu_linear.py).
- GPT.from_pretrained(): load a local Hugging Face GPT-2 checkpoint without importing transformers (the reading
  and checking of the files is nanorlhf/hf.py).

Deliberate deviations from GPT-2 / nanoGPT:
- Attention always goes through F.scaled_dot_product_attention; with padding it gets a boolean mask in which
  every query may at least attend to itself, so a pad query of a left-padded row never makes a NaN.
- GPTConfig has no layer_norm_epsilon: it is GPT-2's 1e-5 (from_pretrained refuses anything else). Nor does it
  have an untied lm_head or another attention scale than 1 / sqrt(head size): from_pretrained refuses a config.json
  with tie_word_embeddings false, scale_attn_weights false or scale_attn_by_inverse_layer_idx true.
- GPTConfig.activation: GPT-2's tanh GELU ("gelu_new", the default and what GPT-2's weights load with) or the exact
  GELU ("gelu", nanoGPT's choice, which train_sft.py gives a new model: torch computes it 3x faster on a CPU).
- Under autocast the output heads still multiply in float32 (float32_head: logprobs and PPO's ratio need it), and
  on a CPU so do the attention and the KV cache (torch's bf16 attention kernels are the slower ones there).
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from nanorlhf.cpu_linear import onednn_linears


GELU_APPROXIMATE = {"gelu_new": "tanh", "gelu": "none"}  # GPTConfig.activation -> nn.GELU's `approximate`


@dataclass
class GPTConfig:
    block_size: int = 256  # longest sequence (number of learned positions)
    vocab_size: int = 258  # byte-level: 256 bytes + EOS + PAD
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, as in GPT-2
    # the MLP's GELU, by Hugging Face's names: "gelu_new" is GPT-2's tanh approximation; "gelu" the exact one (erf),
    # which train_sft.py gives a new model because torch computes it 3x faster on a CPU (up to 9% of an SFT step)
    activation: str = "gelu_new"

    def __post_init__(self):
        if self.activation not in GELU_APPROXIMATE:
            raise ValueError(f"activation {self.activation!r}: expected one of {', '.join(GELU_APPROXIMATE)}")


# -----------------------------------------------------------------------------
# masks and small helpers


def at_least_float32(x):
    """Outputs leave the model in float32 (bf16/fp16 under autocast are upcast); a float64 model stays float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def autocast_off(device_type):
    """
    A context in which autocast is off on device_type: torch.autocast(enabled=False) where autocast is on, else
    nothing to do (a null context; entering torch.autocast costs about 15 us, several times per decode step).
    """
    on = torch.is_autocast_enabled(device_type) if hasattr(torch, "get_autocast_dtype") else True  # torch < 2.4
    return torch.autocast(device_type, enabled=False) if on else nullcontext()


def last_positions(h, k):
    """
    h (B, T, C) -> its last k positions (B, k, C), a tensor of their own (a copy, the one the head's matmul would
    make of a strided slice); h itself for k = 0 (all of T). Never a view: autograd keeps the head's input for the
    backward, and a view of a one-row batch's last positions would keep the whole (1, T, C) alive with it.
    """
    if k == 0 or k >= h.size(1):
        return h
    return h[:, -k:].clone(memory_format=torch.contiguous_format)


def float32_head(head, h):
    """
    head(h) for an output head (the lm_head, the scalar head) with its matmul in float32 also under autocast:
    h (..., C) -> (..., out) float32 (float64 for a float64 model).

    Why: logprobs, the KL and PPO's ratio come from these logits. A bf16 matmul rounds each logit to 8
    significant bits, about 0.03 nats at a logit of 8, comparable to the logprob changes that the 0.2 clip range
    measures; an upcast afterwards cannot undo that. The head is one matmul of the model's many, so this costs
    little (on a GPU the float32 matmul runs on TF32 where setup_runtime allows it).
    """
    x = at_least_float32(h)  # (..., C)
    with autocast_off(x.device.type):
        if head.weight.dtype == x.dtype:
            return head(x)  # (..., out); during generate() on a CPU possibly a OneDNNLinear (cpu_linear.py)
        bias = None if head.bias is None else head.bias.to(x.dtype)  # a bf16/fp16 model's head
        return F.linear(x, head.weight.to(x.dtype), bias)  # (..., out)


def last_index(mask):
    """
    Index of the last 1 in each row of a (B, T) 0/1 mask (0 for an all-zero row).
    Example: [[0, 1, 1, 0], [1, 1, 1, 1]] -> [2, 3]
    """
    T = mask.size(-1)
    positions = torch.arange(T, device=mask.device)  # (T,)
    return (mask.long() * positions).argmax(-1)  # (B,)


def position_ids_from_mask(attention_mask):
    """
    Positions count real tokens only, so padding does not shift them. Pads get a position too (clamped to 0 or
    repeating the last one); their outputs are never used.
    Example: [[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]] -> [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def attention_mask_4d(attention_mask):
    """
    The boolean mask for F.scaled_dot_product_attention, True where query i may attend to key j:
    j <= i (causal) and key j is a real token, and always j == i, so that a pad query (left padding) still
    attends to one key and its softmax is not over an empty set (which would give NaN).
    Example, one left-padded row [0, 1, 1]:
        key  0 1 2
        q0   1 0 0   <- pad query: only itself
        q1   0 1 0
        q2   0 1 1
    (B, T) -> (B, 1, T, T)
    """
    T = attention_mask.size(-1)
    ones = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device)  # (T, T)
    mask = ones.tril() & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)
    return mask | torch.eye(T, dtype=torch.bool, device=attention_mask.device)  # (B, 1, T, T)


# -----------------------------------------------------------------------------
# the transformer


class KVCache:
    """
    The keys and values of one attention layer for every position of a generation, one (2, B, nh, T_max, hs)
    tensor (keys, then values) allocated at the first update (with the dtype of the keys: bf16 under CUDA autocast,
    float32 on a CPU, see CausalSelfAttention) and filled left to right; one tensor means one copy per decode step
    instead of two.
    """

    def __init__(self, T_max):
        self.T_max = T_max
        self.kv = None

    def update(self, kv, start):
        """Write kv (2, B, nh, T, hs) at positions start..start+T-1; return the keys and values of 0..start+T-1."""
        if self.kv is None:
            _, B, nh, _, hs = kv.shape
            self.kv = kv.new_empty(2, B, nh, self.T_max, hs)
        T = kv.size(3)
        self.kv.narrow(3, start, T).copy_(kv)  # narrow + copy_: fewer ops per decode step than slice assignment
        return self.kv.narrow(3, 0, start + T).unbind(0)  # keys, values (B, nh, start + T, hs) each


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # query, key, value projections for all heads, in a batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, attn_mask=None, cache=None, start=0):
        """
        x (B, T, C) at positions start..start+T-1. attn_mask: None (plain causal attention) or a boolean
        (B, 1, T, start + T). With a cache, the keys/values of earlier positions come from it; a call with
        start > 0 and no mask must be a single query (T == 1), which may see every cached key.
        """
        B, T, C = x.size()
        # query, key, value for all heads in one matmul, viewed as (3, B, nh, T, hs) without a copy
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        cpu, dtype = qkv.device.type == "cpu", qkv.dtype
        if cpu:
            # Under CPU autocast the attention itself (and the KV cache) stays float32: torch's bf16 attention
            # kernels are slower than its float32 ones here (measured on AVX512-BF16: 1.2x for a training step at
            # T = 256, 3x for a one-query decode step), while the matmuls around it gain from bf16.
            qkv = at_least_float32(qkv)  # (3, B, nh, T, hs)
        q, k, v = qkv  # (B, nh, T, hs) each
        if cache is not None:
            k, v = cache.update(qkv[1:], start)  # (B, nh, start + T, hs) each
        # softmax(q k^T / sqrt(hs) + mask) v, through the fused kernels (flash when there is no explicit mask)
        with autocast_off("cpu") if cpu else nullcontext():
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
                is_causal=attn_mask is None and start == 0,
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        if y.dtype != dtype:  # back to c_attn's dtype: a bf16 model's c_proj takes bf16 (autocast would cast it too)
            y = y.to(dtype)
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=GELU_APPROXIMATE[config.activation])
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GELU(u) = u Phi(u) ("gelu", erf), or GPT-2's 0.5 u (1 + tanh(sqrt(2 / pi) (u + 0.044715 u^3))) ("gelu_new")
        x = self.gelu(self.c_fc(x))  # (B, T, 4C)
        return self.dropout(self.c_proj(x))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, cache=None, start=0):
        # pre-LN residual (GPT-2): x + attn(LN(x)), then x + mlp(LN(x)), where over the C features of a position
        # LN(x) = (x - mean(x)) / sqrt(var(x) + 1e-5) * weight + bias   (var without Bessel's correction)
        x = x + self.attn(self.ln_1(x), attn_mask, cache, start)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class Trunk(nn.Module):
    """
    What GPT and ScalarGPT share: embeddings, blocks, final LayerNorm (`self.transformer`, nanoGPT's names, so a
    GPT state dict's `transformer.*` loads into either), the padded forward, gradient checkpointing, counts.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.grad_checkpointing = False
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))

    def init_weights(self):
        """GPT-2's init: N(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2 * n_layer)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def trunk(self, idx, attention_mask=None, position_ids=None):
        """
        idx (B, T) token ids, attention_mask (B, T) 1 = real 0 = pad (optional), position_ids (B, T) (optional,
        by default from the mask) -> hidden states (B, T, C) after the final LayerNorm.
        attention_mask may also be a ready boolean (B, 1, T, T) mask, True = may attend, with position_ids given
        (sequences that share a prefix packed in one row, see data.pack_shared_prefix).
        What the heads call: it builds the attention mask and the position ids, then runs transformer_forward.
        """
        B, T = idx.size()
        if attention_mask is not None and attention_mask.dim() == 4:
            assert position_ids is not None, "a (B, 1, T, T) attention mask needs position_ids"
            return self.transformer_forward(idx, position_ids, attention_mask)  # (B, T, C)
        if attention_mask is None:
            assert T <= self.config.block_size, f"sequence of length {T} > block_size {self.config.block_size}"
            attn_mask = None  # plain causal attention: the flash path
            if position_ids is None:
                position_ids = torch.arange(T, device=idx.device)[None, :]  # (1, T)
        else:
            attn_mask = attention_mask_4d(attention_mask)  # (B, 1, T, T)
            if position_ids is None:
                position_ids = position_ids_from_mask(attention_mask)  # (B, T)
        return self.transformer_forward(idx, position_ids, attn_mask)  # (B, T, C)

    def transformer_forward(self, idx, position_ids, attn_mask, caches=None, start=0):
        """
        The transformer itself (self.transformer): embeddings, blocks, final LayerNorm -> (B, T, C), with the mask
        and positions ready: attn_mask None (causal) or boolean (B, 1, T, start + T). Called by trunk(), and by
        generate() with caches, one KVCache per block, the tokens sitting at cache slots start..start+T-1 (their
        keys and values are appended).
        """
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(position_ids))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            if self.grad_checkpointing and self.training and caches is None:
                # keep only the block's input; recompute its activations in the backward pass
                x = checkpoint(block, x, attn_mask, use_reentrant=False)  # (B, T, C)
            else:
                x = block(x, attn_mask, caches[i] if caches else None, start)  # (B, T, C)
        return self.transformer.ln_f(x)  # (B, T, C)

    def num_params(self, non_embedding=False):
        """
        Number of parameters (the tied wte/lm_head counted once). non_embedding=True leaves out the embeddings
        that are lookups only: the position embeddings, and for ScalarGPT also the token embeddings (in GPT they
        are the lm_head matmul, so they count, as in nanoGPT).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
            if not isinstance(self, GPT):
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, T=None):
        """
        Training FLOPs (forward + backward) per token at sequence length T, PaLM appendix B:
            6 N + 12 L H Q T     (N non-embedding params, L layers, H heads, Q head size)
        e.g. GPT-2 124M at T=1024: 6 * 123.65e6 + 12 * 12 * 12 * 64 * 1024 = 0.855 GFLOPs per token.
        """
        cfg = self.config
        T = cfg.block_size if T is None else T
        L, H, Q = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
        return 6 * self.num_params(non_embedding=True) + 12 * L * H * Q * T


class GPT(Trunk):
    def __init__(self, config):
        super().__init__(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.init_weights()

    def forward(self, idx, attention_mask=None, position_ids=None, logits_to_keep=0):
        """
        idx (B, T) -> logits (B, T, vocab_size), computed in float32 also under autocast (float64 for a float64
        model): the lm_head matmul runs in float32, see float32_head. attention_mask (B, T) 1 = real 0 = pad, or a
        boolean (B, 1, T, T) with position_ids given: as trunk().
        logits_to_keep K > 0: the logits of the last K positions only, (B, K, V). PPO reads the response's logits
        only; at GPT-2's vocabulary the head is the largest matmul, and its float32 output the largest activation.
        """
        h = last_positions(self.trunk(idx, attention_mask, position_ids), logits_to_keep)  # (B, T or K, C)
        return float32_head(self.lm_head, h)  # (B, T or K, V)

    def resize_vocab(self, new_vocab_size):
        """
        Grow the vocabulary (e.g. GPT-2's 50257 -> 50258 for a pad token). The new rows start at the mean of the
        old embeddings, a neutral point; wte and lm_head stay tied.
        """
        V, C = self.transformer.wte.weight.shape
        assert new_vocab_size >= V, f"resize_vocab only grows the vocabulary ({V} -> {new_vocab_size})"
        old = self.lm_head.weight.data  # (V, C)
        self.lm_head = nn.Linear(C, new_vocab_size, bias=False).to(device=old.device, dtype=old.dtype)
        with torch.no_grad():
            self.lm_head.weight[:V] = old  # (V, C)
            self.lm_head.weight[V:] = old.mean(0)  # (C,) into each of the new rows
        self.transformer.wte = nn.Embedding(new_vocab_size, C).to(device=old.device, dtype=old.dtype)
        self.transformer.wte.weight = self.lm_head.weight
        self.config = replace(self.config, vocab_size=new_vocab_size)
        return self

    # -------------------------------------------------------------------------
    # generation

    def _forward_cached(self, idx, position_ids, attn_mask, caches, start):
        """The logits (B, V) after the last of tokens idx (B, T), run through transformer_forward with KV caches."""
        h = self.transformer_forward(idx, position_ids, attn_mask, caches, start)  # (B, T, C)
        return float32_head(self.lm_head, h[:, -1])  # (B, V)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, attention_mask=None,
                 eos_id=None, pad_id=None, return_logprobs=False, generator=None, use_cache=True,
                 on_token=None):
        """
        Sample up to max_new_tokens tokens after each left-padded prompt.

        idx (B, T0) prompts, left-padded, with attention_mask (B, T0) (1 = real; None = no padding).
        temperature == 0 is greedy argmax. top_k / top_p (nucleus) filter the distribution before sampling.
        After a row emits eos_id it emits pad_id (default: eos_id); generation stops early once every row has.
        Returns out (B, T0 + N), N <= max_new_tokens, and with return_logprobs also logprobs (B, N):
        log softmax(logits / temperature) of each sampled token, of the distribution before top-k/top-p
        filtering (what the PPO loss recomputes), with temperature 1 when greedy, and 0.0 at pads after eos.
        use_cache=False recomputes the whole prefix at every step instead of using the KV cache (slow; the
        reference the cache is tested and benchmarked against).
        on_token: called with each step's tokens (B,) as soon as they are sampled (sample.py streams with it).

        Example: prompts "ab" and "cde", pad_id=P, eos_id=E, max_new_tokens=3:
            idx  = [[P, a, b], [c, d, e]]   attention_mask = [[0, 1, 1], [1, 1, 1]]
            out  = [[P, a, b, x, E, P], [c, d, e, y, z, w]]
        """
        B, T0 = idx.size()
        device = idx.device
        if max_new_tokens <= 0:
            out = idx.clone()  # (B, T0)
            return (out, torch.zeros(B, 0, device=device)) if return_logprobs else out
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)  # (B, T0)
        mask = attention_mask.bool()  # (B, T0)
        if not bool(mask[:, -1].all()):
            raise ValueError("generate() needs left-padded prompts: the last column of attention_mask must be 1")
        padded = not bool(mask.all())
        prompt_lens = mask.sum(-1)  # (B,) real prompt tokens = position of the first new token
        longest = int(prompt_lens.max()) + max_new_tokens - 1  # longest sequence the model is run on
        if longest > self.config.block_size:
            raise ValueError(f"prompt ({int(prompt_lens.max())}) + max_new_tokens ({max_new_tokens}) - 1 "
                             f"> block_size ({self.config.block_size})")
        if pad_id is None:
            pad_id = eos_id if eos_id is not None else 0

        # inference mode: no autograd bookkeeping at all in the sampling loop (it costs per op, and a decode
        # step is many small ops); its tensors may not enter autograd later, so the results are copied out below.
        # On an x86 CPU the Linears run through oneDNN with weights reordered once (cpu_linear.onednn_linears).
        with torch.inference_mode(), onednn_linears(self, B, self.lm_head):
            T_max = T0 + max_new_tokens
            out = torch.full((B, T_max), pad_id, dtype=idx.dtype, device=device)  # (B, T_max)
            out[:, :T0] = idx  # (B, T0)
            logprobs = None  # (B, N), allocated at the first step with the dtype of the logits
            finished = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
            # keys that may be attended to: the prompt's real tokens and every generated token, built once; each
            # decode step takes a view of it
            key_mask = torch.ones(B, T_max, dtype=torch.bool, device=device)  # (B, T_max)
            key_mask[:, :T0] = mask  # (B, T0)

            if use_cache:
                caches = [KVCache(T_max) for _ in self.transformer.h]
                attn_mask = attention_mask_4d(mask) if padded else None  # (B, 1, T0, T0)
                logits = self._forward_cached(idx, position_ids_from_mask(mask), attn_mask, caches, 0)  # (B, V)
            n = max_new_tokens
            for i in range(max_new_tokens):
                t = T0 + i  # the slot of the token sampled now
                if not use_cache:
                    h = self.trunk(out[:, :t], key_mask[:, :t] if padded else None)  # (B, t, C)
                    logits = float32_head(self.lm_head, h[:, -1])  # (B, V)
                tok, logp = sample_next_token(logits, temperature, top_k, top_p, generator,
                                              return_logprobs)  # (B,), (B,)
                if eos_id is not None:
                    tok = tok.masked_fill(finished, pad_id)  # (B,)
                out[:, t] = tok  # (B,)
                if on_token is not None:
                    on_token(tok)
                if return_logprobs:
                    if logprobs is None:
                        logprobs = logp.new_zeros(B, max_new_tokens)  # (B, N)
                    logprobs[:, i] = logp.masked_fill(finished, 0.0) if eos_id is not None else logp  # (B,)
                if eos_id is not None:
                    finished |= tok == eos_id  # (B,)
                    if bool(finished.all()):
                        n = i + 1
                        break
                if use_cache and i + 1 < max_new_tokens:
                    pos = (prompt_lens + i)[:, None]  # (B, 1)
                    step_mask = key_mask[:, None, None, :t + 1] if padded else None  # (B, 1, 1, t + 1)
                    logits = self._forward_cached(tok[:, None], pos, step_mask, caches, t)  # (B, V)
        out = out[:, :T0 + n].clone()  # (B, T0 + n)
        return (out, logprobs[:, :n].clone()) if return_logprobs else out

    # -------------------------------------------------------------------------
    # Hugging Face GPT-2 import

    @classmethod
    def from_pretrained(cls, path):
        """
        Load a Hugging Face GPT-2 checkpoint from a local directory holding config.json and model.safetensors
        (or pytorch_model.bin), without transformers. HF's GPT-2 uses Conv1D layers, whose weights are stored
        transposed (in, out) relative to nn.Linear (out, in); keys may carry a `transformer.` prefix or not.
        A directory that is no GPT-2 language model, or whose config.json GPT cannot follow exactly, is a one-line
        ValueError naming it and the field (train_sft.py --init_from reports it so).
        """
        from nanorlhf import hf  # here, not at the top: hf.py imports this module (GPTConfig)

        config, tensors, weights_path = hf.read_gpt2(path)  # config.json checked; the tensors as HF stores them
        model = cls(config)
        hf.copy_gpt2_tensors(model, tensors, path, weights_path)  # Conv1D weights transposed; names, shapes checked
        return model


class ScalarGPT(Trunk):
    """The GPT trunk with a scalar head: one value per position (the reward model and the critic)."""

    def __init__(self, config):
        super().__init__(config)
        self.head = nn.Linear(config.n_embd, 1)
        self.init_weights()

    def forward(self, idx, attention_mask=None, position_ids=None):
        """
        idx (B, T) -> values (B, T), the head computed in float32 also under autocast (float64 for a float64 model).
        attention_mask (B, T) 1 = real 0 = pad, or a boolean (B, 1, T, T) with position_ids given: as trunk().
        """
        h = self.trunk(idx, attention_mask, position_ids)  # (B, T, C)
        return float32_head(self.head, h).squeeze(-1)  # (B, T)

    def score(self, idx, attention_mask):
        """The value at the last real token of each row (left or right padding alike): (B,)."""
        values = self(idx, attention_mask)  # (B, T)
        return values.gather(1, last_index(attention_mask)[:, None]).squeeze(1)  # (B,)

    @classmethod
    def from_gpt(cls, gpt):
        """A ScalarGPT with a copy of gpt's trunk and a zero head (InstructGPT starts the RM from the SFT model)."""
        p = gpt.lm_head.weight
        model = cls(gpt.config).to(device=p.device, dtype=p.dtype)
        model.transformer.load_state_dict(gpt.transformer.state_dict())
        nn.init.zeros_(model.head.weight)
        nn.init.zeros_(model.head.bias)
        model.grad_checkpointing = gpt.grad_checkpointing
        return model


# -----------------------------------------------------------------------------
# the shared actor-critic trunk (train_ppo.py --critic shared)


class ValueHeadGPT(GPT):
    """
    One GPT trunk with two heads: the language-model head (the policy) and a Linear(n_embd, 1) value head
    (the critic). `forward(..., values=True)` runs the trunk once and gives both, so PPO pays one forward and one
    backward per micro-batch for actor and critic together instead of two.

    Everything GPT does (forward -> logits, generate) works unchanged; the value head is only read with
    values=True. The value head starts at zero (`from_gpt`): see train_ppo.py's build_models for why.
    """

    def __init__(self, config):
        super().__init__(config)
        self.value_head = nn.Linear(config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, idx, attention_mask=None, position_ids=None, values=False, logits_to_keep=0):
        """
        idx (B, T) -> logits (B, T, V) as GPT.forward (attention_mask and position_ids as trunk()); values=True:
        (logits, values (B, T)) from one pass through the trunk (float32 out). Both go through forward() because
        DistributedDataParallel syncs gradients only for what its wrapper's forward() ran. logits_to_keep K > 0:
        both for the last K positions only, as GPT.forward.
        """
        h = last_positions(self.trunk(idx, attention_mask, position_ids), logits_to_keep)  # (B, T or K, C)
        logits = float32_head(self.lm_head, h)  # (B, T or K, V), as GPT.forward computes them
        if not values:
            return logits
        return logits, float32_head(self.value_head, h).squeeze(-1)  # (B, T or K), as ScalarGPT.forward

    def policy_state_dict(self):
        """The state dict of the plain GPT inside (the value head left out): what ckpt.pt holds."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("value_head.")}

    @classmethod
    def from_gpt(cls, gpt):
        """A ValueHeadGPT holding a copy of gpt's weights (trunk and lm_head) and a zero value head."""
        p = gpt.lm_head.weight
        model = cls(gpt.config).to(device=p.device, dtype=p.dtype)
        missing, unexpected = model.load_state_dict(gpt.state_dict(), strict=False)
        assert sorted(missing) == ["value_head.bias", "value_head.weight"] and not unexpected, (missing, unexpected)
        model.grad_checkpointing = gpt.grad_checkpointing
        return model


# -----------------------------------------------------------------------------
# sampling


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None, return_logprobs=True):
    """
    Pick one token per row from logits (B, V). Returns (tokens (B,), logprobs (B,) or None), where logprobs are
    log softmax(logits / temperature) at the chosen token, before top-k/top-p filtering (temperature 1 when
    greedy). temperature == 0 is argmax; top_k keeps the k largest logits; top_p keeps the smallest set of
    most likely tokens whose probability reaches top_p (always at least the most likely one).
    """
    if temperature == 0:
        tok = logits.argmax(-1)  # (B,)
        scaled = logits
    else:
        scaled = logits / temperature if temperature != 1 else logits  # (B, V)
        filtered = scaled
        if top_k is not None:
            v, _ = torch.topk(scaled, min(top_k, scaled.size(-1)))  # (B, k)
            filtered = filtered.masked_fill(filtered < v[:, [-1]], float("-inf"))  # (B, V)
        if top_p is not None:
            sorted_logits, sorted_idx = torch.sort(filtered, descending=True)  # (B, V)
            sorted_probs = F.softmax(sorted_logits, dim=-1)  # (B, V)
            # drop a token when the tokens more likely than it already reach top_p
            drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # (B, V)
            drop[:, 0] = False  # the most likely token always stays
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))  # (B, V)
            filtered = filtered.scatter(-1, sorted_idx, sorted_logits)  # (B, V), back in vocabulary order
        probs = F.softmax(filtered, dim=-1)  # (B, V)
        tok = sample_categorical(probs, generator)  # (B,)
    if not return_logprobs:
        return tok, None
    logp = F.log_softmax(scaled, dim=-1).gather(-1, tok[:, None]).squeeze(-1)  # (B,)
    return tok, logp


def sample_categorical(probs, generator=None):
    """
    One draw per row of probs (B, V) by inverting the CDF: token i such that cdf[i-1] < u <= cdf[i], with
    u uniform in (0, cdf[V-1]]. A token of probability 0 is never drawn (its interval is empty).

    Why not torch.multinomial: on a CPU it draws one exponential per vocabulary entry, 1.6 ms for 16 x 4096 here
    (more than the lm_head), where this needs one uniform per row. The CDF is summed in float64 (float32 on MPS,
    which has no float64), so a rare token keeps its own probability instead of float32's rounding of a sum near 1.
    """
    dtype = torch.float32 if probs.device.type == "mps" else torch.float64
    cdf = probs.to(dtype).cumsum(-1)  # (B, V)
    u = 1 - torch.rand(probs.size(0), 1, dtype=dtype, device=probs.device, generator=generator)  # (B, 1) in (0, 1]
    tok = torch.searchsorted(cdf, u * cdf[:, -1:])  # (B, 1): the first i with cdf[i] >= u * total
    return tok.squeeze(-1).clamp_(max=probs.size(-1) - 1)  # (B,)
