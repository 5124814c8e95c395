"""
Memory of the RLHF models, predicted from the model's shape and measured from live tensors (memory.py prints both;
train_ppo.py writes the measured side to memory.json).

The seed's section 3.3: PPO holds four models. The trained ones (actor, critic) carry weights, gradients and two
AdamW moments; the frozen ones (reference, reward model) carry weights only. Three remedies change who holds what:

    option         actor                        critic                       reference              reward model
    full           GPT: W G O                   ScalarGPT: W G O             GPT: W                 ScalarGPT: W
    offload        GPT: W G O                   ScalarGPT: W G O             GPT: W in CPU memory   W in CPU memory
    lora           SFT base W + adapters W G O  RM base (the RM's W, shared) actor, adapters off   ScalarGPT: W
                                                + adapters + head W G O      (no weights of its own)
    shared         GPT trunk + lm_head: W G O   value head: W G O            GPT: W                 ScalarGPT: W
    lora+shared    SFT base W + adapters W G O  value head: W G O            actor, adapters off    ScalarGPT: W

W = weights, G = gradients, O = AdamW state. All counts are exact for nanorlhf's GPT-2 (biases, tied lm_head):

    GPT parameters        N_gpt = V C + P C + L (12 C^2 + 13 C) + 2 C           (12 L + 4 tensors)
    ScalarGPT parameters  N_gpt + C + 1                                          (12 L + 6 tensors)
    LoRA adapters         L * 16 r C   (c_attn r(C + 3C), attn c_proj r(2C), c_fc r(5C), mlp c_proj r(5C))
    AdamW state           2 moments per trained number + one 4-byte `step` tensor per trained tensor (torch's)

Activations: the tensors autograd saves during one update micro-batch (b rows of t tokens), float32 on a CPU with
a padding mask (what PPO and the RM run; SFT's right-padded batches run without one), per trunk of L layers with
a heads (derived from what each op saves, and checked against the saved-tensor hooks in tests/test_memory.py):

    per layer   16 b t C (LayerNorm inputs and outputs, q k v, attention output, MLP 4C twice)
                + 4 b t (LayerNorm mean and rstd) + b t t (the boolean mask as a float; none without a mask)
                + a b t (softmax logsumexp)
                + 4 b t r with LoRA (x A^T of each wrapped Linear, kept for B's gradient)
    per trunk   L * per layer + b t C + 2 b t (final LayerNorm input, statistics) + b k C (the head's input, the
                last k positions of its output, when the head on top is trained) + b t int64 position ids (t
                without a mask: one row, broadcast) (+ b t token ids, once); with LoRA the embeddings and the first
                LayerNorm need no gradient, so their b t C + 2 b t and the ids are not kept
    per LM head b k V (the float32 logits, kept for the logprobs' backward)

k is t for a head over every position (the separate critic's), and the response's N + 1 for the actor's LM head and
the shared trunk's two heads: PPO asks the actor for those logits only (GPT.forward's logits_to_keep).

KV cache of one rollout: 2 (keys and values) * L * B * (T_prompt + N) * C elements in the activation dtype.
"""

import contextlib
import re
from dataclasses import dataclass

import torch

ROLES = ("actor", "critic", "reference", "reward")
STEP_BYTES = 4  # torch's AdamW keeps `step` as a float32 scalar tensor per parameter tensor


@dataclass
class Shape:
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    block_size: int


def shape_of(config):
    """The Shape of a model's GPTConfig."""
    return Shape(config.n_layer, config.n_head, config.n_embd, config.vocab_size, config.block_size)


@dataclass
class Precision:
    """Bytes per number: weights, gradients, AdamW state (both moments together), activations."""
    weights: int = 4
    grads: int = 4
    optim: int = 8
    acts: int = 4


PRECISIONS = {
    # what nanorlhf trains in: float32 weights, gradients and moments (bf16 autocast only touches activations)
    "fp32": Precision(4, 4, 8, 4),
    "fp32+bf16": Precision(4, 4, 8, 2),
    # the seed's arithmetic: everything in 16 bits, Adam's two moments = 2x the parameters
    "bf16": Precision(2, 2, 4, 2),
    # the usual mixed precision of DeepSpeed / ZeRO: 16-bit weights and grads, fp32 master copy + 2 moments
    "mixed": Precision(2, 2, 12, 2),
}


def gpt_params(s):
    """(numbers, tensors) of a GPT: tied wte/lm_head, learned positions, biases, final LayerNorm."""
    C = s.n_embd
    return s.vocab_size * C + s.block_size * C + s.n_layer * (12 * C * C + 13 * C) + 2 * C, 12 * s.n_layer + 4


def lora_params(s, rank, targets=None):
    """(numbers, tensors) of the adapters on the default targets; other targets are counted on the meta device."""
    from nanorlhf import lora

    if targets is None or targets == lora.DEFAULT_TARGETS:
        return s.n_layer * 16 * rank * s.n_embd, 8 * s.n_layer
    from nanorlhf.model import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig(block_size=s.block_size, vocab_size=s.vocab_size, n_layer=s.n_layer,
                              n_head=s.n_head, n_embd=s.n_embd))
    lora.apply_lora(model, rank, 2 * rank, targets)
    adapters = [p for n, p in model.named_parameters() if re.search(r"lora_[AB]$", n)]
    return sum(p.numel() for p in adapters), len(adapters)


def options_of(name):
    """'lora+shared+offload' -> dict(lora=True, shared=True, offload={'ref', 'rm'})."""
    parts = set(name.split("+")) - {"full"}
    unknown = parts - {"lora", "shared", "offload"}
    if unknown:
        raise ValueError(f"unknown option {sorted(unknown)}: expected full, offload, lora, shared joined by +")
    return dict(lora="lora" in parts, shared="shared" in parts, offload={"ref", "rm"} if "offload" in parts else set())


def static_memory(s, lora_rank=0, shared=False, offload=(), prec=Precision(), lora_targets=None):
    """
    Predicted bytes per role: {role: {"weights", "weights_host", "grads", "optim", "trainable", "note"}}, plus
    "resident": how many full models' weights sit on the accelerator. offload names frozen models ("ref", "rm")
    kept in CPU memory; one whose weights a trained model uses (the LoRA base) stays where it is.
    """
    n_gpt, t_gpt = gpt_params(s)
    head = s.n_embd + 1  # Linear(C, 1): the reward/value head
    n_lora, t_lora = lora_params(s, lora_rank, lora_targets) if lora_rank else (0, 0)
    roles = {r: dict(weights=0, weights_host=0, grads=0, optim=0, trainable=0, note="") for r in ROLES}

    def train(role, n, t, frozen=0):
        """role holds n trained numbers in t tensors, plus `frozen` numbers of frozen weights."""
        roles[role].update(weights=(n + frozen) * prec.weights, grads=n * prec.grads,
                           optim=n * prec.optim + t * STEP_BYTES, trainable=n)

    def frozen(role, n, name):
        key = "weights_host" if name in offload else "weights"
        roles[role][key] = n * prec.weights

    resident = 0
    if lora_rank:
        train("actor", n_lora, t_lora, frozen=n_gpt)
        roles["reference"]["note"] = "the actor with adapters off"
        resident += 1
    else:
        train("actor", n_gpt, t_gpt)
        resident += 1
    if shared:
        train("critic", head, 2)
        roles["critic"]["note"] = "value head on the actor's trunk"
    elif lora_rank:
        train("critic", n_lora + head, t_lora + 2)
        roles["critic"]["note"] = "adapters and its own head on the reward model's weights"
    else:
        train("critic", n_gpt + head, t_gpt + 2)
        resident += 1
    if not lora_rank:
        frozen("reference", n_gpt, "ref")
        resident += "ref" not in offload
    # with a LoRA critic the reward model's weights are the critic's base: they stay on the accelerator
    rm_offload = offload if (shared or not lora_rank) else set(offload) - {"rm"}
    key = "weights_host" if "rm" in rm_offload else "weights"
    roles["reward"][key] = (n_gpt + head) * prec.weights
    resident += "rm" not in rm_offload
    total = {k: sum(r[k] for r in roles.values()) for k in ("weights", "weights_host", "grads", "optim", "trainable")}
    return dict(roles=roles, total=total, resident=resident)


def activation_memory(s, b, t, lora_rank=0, shared=False, masked=True, acts_bytes=4, logits_bytes=4, keep=None,
                      critic=True):
    """
    Predicted bytes autograd saves in one PPO update micro-batch (b rows, t = prompt + response tokens): the
    actor's trunk and logits, and the critic's trunk (separate) or nothing more (shared: the value head reads the
    actor's last hidden states). keep: the positions per row with logits (PPO's N + 1; None: all t).
    critic=False: the actor alone, as SFT trains it (with masked=False: train_sft.py's right-padded batches run
    the plain causal attention). See the module docstring for the terms.
    """
    C, L, a, V = s.n_embd, s.n_layer, s.n_head, s.vocab_size
    bt, bk = b * t, b * (t if keep is None else keep)
    per_layer = 16 * bt * C + 4 * bt + a * bt + (bt * t if masked else 0) + 4 * bt * lora_rank
    positions = (bt if masked else t) * 8  # int64 position ids: from the mask (b, t), else one (1, t) arange

    def trunk(head_trained, head_rows):
        n = L * per_layer + bt * C + 2 * bt  # the blocks, the final LayerNorm's input and statistics
        if head_trained:
            n += head_rows * C  # the head's input: the final LayerNorm's output at the positions the head reads
        if lora_rank:
            n -= bt * C + 2 * bt  # nothing before the first block needs a gradient: ln_1 keeps no input
        return n * acts_bytes + (0 if lora_rank else positions)  # + the position ids of the embedding

    logits = bk * V * logits_bytes
    token_ids = 0 if lora_rank else bt * 8  # one int64 (b, t) tensor, shared by the trunks' embeddings
    if shared:
        return trunk(True, bk) + logits + token_ids
    actor = trunk(not lora_rank, bk) + logits + token_ids  # a LoRA actor's LM head is frozen: its input is not kept
    return actor + trunk(True, bt) if critic else actor


def kv_cache_bytes(s, rollout_batch, prompt_len, response_len, acts_bytes=4):
    """One rollout's KV cache: keys and values of every layer for every position, (2, B, nh, T, hs) per layer."""
    return 2 * s.n_layer * rollout_batch * (prompt_len + response_len) * s.n_embd * acts_bytes


# -----------------------------------------------------------------------------
# measured: live tensors


def _storage_key(t):
    st = t.untyped_storage()
    return (st.device.type, st.data_ptr()), st.nbytes()


def measure_static(role_params, optimizers):
    """
    Bytes of live parameters, gradients and optimizer state, per role. role_params: {role: iterable of
    parameters}, in order; a storage counted under an earlier role (a shared base) is not counted again.
    Weights are split by device: "weights" (an accelerator, or the CPU on a CPU-only run) and "weights_host"
    (CPU memory while the run uses an accelerator). optimizers: the optimizers holding these parameters.
    """
    role_params = {r: list(ps) for r, ps in role_params.items()}
    seen, owner = set(), {}
    accel = any(p.device.type != "cpu" for ps in role_params.values() for p in ps)
    out = {r: dict(weights=0, weights_host=0, grads=0, optim=0, trainable=0) for r in role_params}
    for role, params in role_params.items():
        for p in params:
            owner.setdefault(id(p), role)
            key, nbytes = _storage_key(p)
            if key not in seen:
                seen.add(key)
                out[role]["weights_host" if accel and p.device.type == "cpu" else "weights"] += nbytes
            if p.requires_grad and owner[id(p)] == role:
                out[role]["trainable"] += p.numel()
            if p.grad is not None and owner[id(p)] == role:
                key, nbytes = _storage_key(p.grad)
                if key not in seen:
                    seen.add(key)
                    out[role]["grads"] += nbytes
    for opt in optimizers:
        for p, state in opt.state.items():
            role = owner.get(id(p))
            for v in state.values():
                if torch.is_tensor(v):
                    key, nbytes = _storage_key(v)
                    if key not in seen:
                        seen.add(key)
                        out[role]["optim"] += nbytes
    total = {k: sum(r[k] for r in out.values()) for k in ("weights", "weights_host", "grads", "optim", "trainable")}
    return dict(roles=out, total=total)


class SavedTensors:
    """
    Context manager: the bytes of the distinct storages autograd saves for backward inside the block, leaving
    out `exclude` (the parameters' storages, which exist anyway). Example:
        with SavedTensors(model.parameters()) as saved:
            loss = model(idx).sum()
        saved.bytes
    """

    def __init__(self, exclude=()):
        self.exclude = {_storage_key(p)[0] for p in exclude}
        self.seen = {}

    def _pack(self, t):
        key, nbytes = _storage_key(t)
        if key not in self.exclude:
            self.seen[key] = nbytes
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)

    @property
    def bytes(self):
        return sum(self.seen.values())


@contextlib.contextmanager
def saved_once(probe, models, micro_batch, keep):
    """
    Context manager around one update micro-batch's forward: the first time, the bytes autograd saves inside it
    (SavedTensors, leaving out the models' parameters) go into the dict probe as "activations", with "micro_batch"
    (its shape) and "keep" (the positions that got logits), for memory.json. A no-op with probe None or once probe
    holds "activations"; nothing is recorded if the block raises.
    """
    if probe is None or "activations" in probe:
        yield
        return
    with SavedTensors([p for m in models for p in m.parameters()]) as saved:
        yield
    probe["activations"], probe["micro_batch"], probe["keep"] = saved.bytes, tuple(micro_batch), keep


def reset_cuda_peak(rt):
    """Restart torch.cuda.max_memory_allocated's count on a CUDA run (nothing elsewhere), e.g. at the training loop."""
    if rt.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)


def fmt_bytes(n):
    """1536 -> '1.5 KiB'; binary units, three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        # from 1023.5 on the number would round to 1024 of this unit: the next unit writes it
        if abs(n) < 1023.5 or unit == "TiB":
            # from 999.5 on, three significant digits would be written 1e+03: a whole number instead
            return f"{n:.0f} {unit}" if unit == "B" or n >= 999.5 else f"{n:.3g} {unit}"
        n /= 1024


class StaticProbe:
    """
    Takes measure_static(role_params, optimizers) once, right after the first optimizer step at which every
    optimizer holds its state: the gradients are still alive then (zero_grad comes later), so that moment is
    the peak of the static memory. .result holds the measurement (None before); .extra is a dict for the
    caller's other measurements (train_ppo.ppo_update puts the saved activations there).
    """

    def __init__(self, role_params, optimizers):
        self.role_params = {r: list(ps) for r, ps in role_params.items()}
        self.optimizers = list(optimizers)
        self.result, self.extra = None, {}
        for opt in self.optimizers:
            opt.register_step_post_hook(self._hook)

    def _hook(self, optimizer, args, kwargs):
        if self.result is None and all(len(o.state) for o in self.optimizers):
            self.result = measure_static(self.role_params, self.optimizers)


def static_total(mem):
    """Weights (both places), gradients and AdamW state of a static_memory or measure_static result, in bytes."""
    return sum(mem["total"][k] for k in ("weights", "weights_host", "grads", "optim"))
