"""
Generation speed: GPT.generate with its KV cache against recomputing the whole prefix at every step.

    python bench_generate.py                      # the reference size: batch 16, 64-token prompts, 128 new tokens
    python bench_generate.py --device cuda --dtype bfloat16 --n_layer 12 --n_head 12 --n_embd 768 \\
        --vocab_size 50304 --activation gelu_new --batch_size 64 --prompt_len 128 --new_tokens 256   # GPT-2 124M

A random-weight model, sampling at temperature 1 with no EOS, so every run makes exactly new_tokens steps.
Prints tokens/s and ms per step of each, and the speed-up (the median over alternating rounds).
"""

import statistics
import time

import torch

from nanorlhf import utils
from nanorlhf.model import GELU_APPROXIMATE, GPT, GPTConfig
from nanorlhf.utils import FlagParser, check

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
parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (autocast, on a CPU too)")
parser.add_argument("--repeats", type=int, default=3, help="timed runs of the cached generation per round (best)")
parser.add_argument("--naive_repeats", type=int, default=1, help="timed runs of the naive generation (best is kept)")
parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both; the median ratio is reported")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")


def check_args(args):
    """Sizes that would fail deep inside the model or the timing (or time nothing), refused in one line."""
    for name in ("batch_size", "prompt_len", "new_tokens", "n_layer", "n_head", "n_embd", "vocab_size", "repeats",
                 "naive_repeats", "rounds"):
        check(getattr(args, name) >= 1, f"--{name} must be at least 1, got {getattr(args, name)}")
    check(args.n_embd % args.n_head == 0, f"--n_embd {args.n_embd} must be divisible by --n_head {args.n_head}")
    # generate() needs the last column of every prompt to be a real token
    check(0 <= args.left_pad < args.prompt_len,
          f"--left_pad must be from 0 to --prompt_len - 1 ({args.prompt_len - 1}), got {args.left_pad}")
    check(args.threads >= 0, f"--threads must be 0 (torch's default) or more, got {args.threads}")


def timed(model, idx, mask, new_tokens, use_cache, repeats, rt):
    """Best wall time over `repeats` runs of one generation, and the process CPU time of that run."""
    sync = torch.cuda.synchronize if rt.device_type == "cuda" else (lambda: None)
    best, best_cpu = float("inf"), float("inf")
    for r in range(repeats):
        g = torch.Generator(device=rt.device).manual_seed(r)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        with rt.autocast():
            out = model.generate(idx, new_tokens, attention_mask=mask, generator=g, use_cache=use_cache)
        sync()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if dt < best:
            best, best_cpu = dt, dc
        assert out.shape == (idx.shape[0], idx.shape[1] + new_tokens)
    return best, best_cpu


def main(argv=None):
    args = parser.parse_args(argv)
    check_args(args)
    rt = utils.setup_runtime(args.device, args.dtype, args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = rt.device
    config = GPTConfig(block_size=args.prompt_len + args.new_tokens, vocab_size=args.vocab_size,
                       n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, activation=args.activation)
    model = GPT(config).to(device).eval()
    B, T, N = args.batch_size, args.prompt_len, args.new_tokens
    idx = torch.randint(0, args.vocab_size, (B, T), device=device)
    mask = torch.ones_like(idx)
    mask[: B // 2, : args.left_pad] = 0

    print(f"device {device}, dtype {rt.dtype}, threads {torch.get_num_threads()}, "
          f"{model.num_params() / 1e6:.2f}M params, batch {B}, prompt {T}, new tokens {N}")
    # warm-up: the allocator, and on a GPU the kernels chosen per shape (the naive run sees every length once)
    timed(model, idx, mask, N, True, 1, rt)
    if rt.device_type == "cuda":
        timed(model, idx, mask, N, False, 1, rt)
    # The machine's speed drifts (a shared host), so the two are timed in alternating rounds and each round
    # gives a ratio of times measured seconds apart; the median round is the number to quote.
    ratios = []
    for k in range(args.rounds):
        dt_kv, cpu_kv = timed(model, idx, mask, N, True, args.repeats, rt)
        dt_naive, cpu_naive = timed(model, idx, mask, N, False, args.naive_repeats, rt)
        ratios.append(dt_naive / dt_kv)
        print(f"round {k + 1}: kv cache {B * N / dt_kv:8.0f} tokens/s {1000 * dt_kv / N:7.2f} "
              f"ms/step | naive {B * N / dt_naive:6.0f} tokens/s {1000 * dt_naive / N:7.2f} "
              f"ms/step | speed-up {ratios[-1]:.1f}x wall clock, {cpu_naive / cpu_kv:.1f}x cpu time", flush=True)
    print(f"speed-up: {statistics.median(ratios):.1f}x (median of {len(ratios)} rounds; "
          f"min {min(ratios):.1f}x, max {max(ratios):.1f}x)")


if __name__ == "__main__":
    utils.run(main)
