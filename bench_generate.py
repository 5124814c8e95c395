"""
Generation speed: GPT.generate with its KV cache against recomputing the whole prefix at every step.

    python bench_generate.py                      # the reference size: batch 16, 64-token prompts, 128 new tokens
    python bench_generate.py --device cuda --dtype bfloat16 --n_layer 12 --n_embd 768 --vocab_size 50304

A random-weight model, sampling at temperature 1 with no EOS, so every run makes exactly new_tokens steps.
Prints tokens/s and ms per step of each, and the speed-up (the median over alternating rounds).
"""

import statistics
import time
from contextlib import nullcontext

import torch

from nanorlhf.model import GELU_APPROXIMATE, GPT, GPTConfig
from nanorlhf.utils import FlagParser

parser = FlagParser(description=__doc__)
parser.add_argument("--batch_size", type=int, default=16, help="prompts per batch")
parser.add_argument("--prompt_len", type=int, default=64, help="tokens per prompt")
parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per prompt")
parser.add_argument("--n_layer", type=int, default=4, help="transformer blocks")
parser.add_argument("--n_head", type=int, default=4, help="attention heads")
parser.add_argument("--n_embd", type=int, default=256, help="model width")
parser.add_argument("--vocab_size", type=int, default=258, help="vocabulary size (258 = byte-level)")
parser.add_argument("--activation", default="gelu", choices=list(GELU_APPROXIMATE),
                    help="the MLP's GELU: gelu (exact; train_sft.py's default for a new model) | gelu_new (GPT-2's)")
parser.add_argument("--left_pad", type=int, default=0, help="left-pad half of the prompts by this many tokens")
parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 (autocast, on a CPU too)")
parser.add_argument("--repeats", type=int, default=3, help="timed runs of the cached generation per round (best)")
parser.add_argument("--naive_repeats", type=int, default=1, help="timed runs of the naive generation (best is kept)")
parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both; the median ratio is reported")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                      "cpu" if args.device == "auto" else args.device)
ctx = nullcontext() if args.dtype == "float32" else torch.autocast(device.type, dtype=getattr(torch, args.dtype))
torch.manual_seed(args.seed)
config = GPTConfig(block_size=args.prompt_len + args.new_tokens, vocab_size=args.vocab_size,
                   n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, activation=args.activation)
model = GPT(config).to(device).eval()
B, T = args.batch_size, args.prompt_len
idx = torch.randint(0, args.vocab_size, (B, T), device=device)
mask = torch.ones_like(idx)
mask[: B // 2, : args.left_pad] = 0


def timed(use_cache, repeats):
    """Best wall time over `repeats` runs of one generation, and the process CPU time of that run."""
    best, best_cpu = float("inf"), float("inf")
    for r in range(repeats):
        g = torch.Generator(device=device).manual_seed(r)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        with ctx:
            out = model.generate(idx, args.new_tokens, attention_mask=mask, generator=g, use_cache=use_cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if dt < best:
            best, best_cpu = dt, dc
        assert out.shape == (B, T + args.new_tokens)
    return best, best_cpu


print(f"device {device}, dtype {args.dtype}, threads {torch.get_num_threads()}, "
      f"{model.num_params() / 1e6:.2f}M params, batch {B}, prompt {T}, new tokens {args.new_tokens}")
# warm-up: the allocator, and on a GPU the kernels chosen per shape (the naive run sees every length once)
timed(True, 1)
if device.type == "cuda":
    timed(False, 1)
# The machine's speed drifts (a shared host), so the two are timed in alternating rounds and each round
# gives a ratio of times measured seconds apart; the median round is the number to quote.
ratios = []
for k in range(args.rounds):
    (dt_kv, cpu_kv), (dt_naive, cpu_naive) = timed(True, args.repeats), timed(False, args.naive_repeats)
    ratios.append(dt_naive / dt_kv)
    print(f"round {k + 1}: kv cache {B * args.new_tokens / dt_kv:8.0f} tokens/s {1000 * dt_kv / args.new_tokens:7.2f} "
          f"ms/step | naive {B * args.new_tokens / dt_naive:6.0f} tokens/s {1000 * dt_naive / args.new_tokens:7.2f} "
          f"ms/step | speed-up {ratios[-1]:.1f}x wall clock, {cpu_naive / cpu_kv:.1f}x cpu time", flush=True)
print(f"speed-up: {statistics.median(ratios):.1f}x (median of {len(ratios)} rounds; "
      f"min {min(ratios):.1f}x, max {max(ratios):.1f}x)")
