"""
Running a stage on many devices: the same script runs as `python train_X.py ...` or as
`torchrun --standalone --nproc_per_node N train_X.py ...`, the way nanoGPT does it. Everything that knows about
ranks is here, so that a script only calls a few named functions:

    check_grad_accum(args.grad_accum)     nanoGPT's batch semantics: --grad_accum micro-batches per step in all
    device = setup(args.device)           read RANK / LOCAL_RANK / WORLD_SIZE, start the process group, pick the
                                          rank's device, silence print on ranks > 0
    mine(micro)                           this rank's share of the step's micro-batches (every rank draws all of
                                          them from the same sampler and keeps its own: the same examples as 1 process)
    train_model = wrap(model)             DistributedDataParallel (or FSDP2 with fsdp=True) that SUMS gradients
    sync_grads(train_model, last)         gradient communication on the last micro-batch of a step only
    all_reduce_sum(x)                     a global count or metric
    gather_rows(x)                        the rows each rank computed for its share, rebuilt into the whole batch
                                          on every rank (the online scripts' scoring pass, rollout.score_and_logprobs)
    if is_main(): save ...                only rank 0 prints, writes metrics and checkpoints

Without torchrun (no WORLD_SIZE in the environment) all of this is a no-op: world size 1, rank 0, the model
unwrapped, and a single-process run computes exactly what it computed before this module existed.

Why sum, not average: every stage divides its loss by the count of the whole global batch (its tokens, prompts
or sequences, all-reduced), so the sum over ranks of their gradients is the gradient of the whole batch. DDP
and FSDP average by default, which would divide it by the world size once more.
"""

import builtins
import os

import torch
import torch.distributed as td

from nanorlhf import utils


def rank():
    return int(os.environ.get("RANK", 0))


def local_rank():
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size():
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main():
    """Rank 0: the one process that prints, writes metrics.jsonl and checkpoints."""
    return rank() == 0


def is_distributed():
    return td.is_available() and td.is_initialized()


def check_grad_accum(grad_accum, flag="--grad_accum"):
    """
    nanoGPT's batch semantics: `flag` counts the micro-batches of one optimizer step over all ranks together, and
    each rank runs grad_accum / WORLD_SIZE of them, so that a step sees the same examples whatever the world size.
    Called before setup(), so that a bad combination stops before any process group or file exists.
    Example: --grad_accum 4 on 2 ranks -> 2 micro-batches per rank; --grad_accum 3 on 2 ranks -> UserError.
    """
    utils.check(grad_accum % world_size() == 0,
                f"{flag} {grad_accum} is the number of micro-batches per step over all ranks and must be divisible "
                f"by the world size {world_size()} (torchrun --nproc_per_node)")
    return grad_accum // world_size()


def check_fsdp(fsdp):
    """--fsdp needs ranks to shard over: a one-line error, before anything is written, when not under torchrun."""
    utils.check(not fsdp or world_size() > 1, "--fsdp shards the model over the ranks of a process group: launch "
                                              "with torchrun --nproc_per_node N (N >= 2)")


def setup(device="auto"):
    """
    Start the process group when launched by torchrun (nccl on CUDA, gloo on a CPU) and return the device this
    rank runs on: cuda:LOCAL_RANK on a GPU machine, else `device` unchanged. Ranks > 0 stop printing (builtins.print
    becomes a no-op there; an exception's traceback still shows). Without torchrun: returns `device`, does nothing.
    """
    if world_size() == 1:
        return device
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        utils.check(torch.cuda.is_available(), f"--device {device}: CUDA is not available on this machine (try "
                                               f"--device cpu)")
        utils.check(local_rank() < torch.cuda.device_count(), f"torchrun started rank {local_rank()} of this "
                    f"machine, but it has {torch.cuda.device_count()} GPUs (--nproc_per_node at most that)")
        device = f"cuda:{local_rank()}"
        torch.cuda.set_device(device)
    if not is_distributed():
        td.init_process_group(backend="nccl" if cuda else "gloo")
    if not is_main():
        builtins.print = lambda *args, **kwargs: None
    return device


def cleanup():
    """End of a run: wait for every rank (rank 0 may still be writing), then take the process group down."""
    if is_distributed():
        td.barrier()
        td.destroy_process_group()


def mine(items):
    """
    This rank's contiguous share of a list of micro-batches (or of prompts): rank r of W gets the r-th of W equal
    slices. Example: 4 micro-batches on 2 ranks -> rank 0 [m0, m1], rank 1 [m2, m3]; 1 process -> all 4.
    """
    n = len(items) // world_size()
    assert n * world_size() == len(items), f"{len(items)} items do not split over {world_size()} ranks"
    return items[rank() * n:(rank() + 1) * n]


def all_reduce_sum(x):
    """
    The sum over ranks of x: a tensor (returned as a new tensor on its device), a number (an int stays an int), or
    a list of numbers (one all-reduce for the whole list, in float64; returned as floats). Without a process
    group: x itself, untouched.
    """
    if not is_distributed():
        return x
    if isinstance(x, torch.Tensor):
        x = x.clone()
        td.all_reduce(x)
        return x
    t = torch.tensor(x if isinstance(x, list) else [x], dtype=torch.float64, device=_comm_device())
    td.all_reduce(t)
    out = t.tolist()
    return out if isinstance(x, list) else type(x)(out[0])


def all_reduce_max(x):
    """The maximum over ranks of a tensor (a new tensor); without a process group x itself."""
    if not is_distributed():
        return x
    x = x.clone()
    td.all_reduce(x, op=td.ReduceOp.MAX)
    return x


def all_reduce_dict(stats):
    """
    {name: number or scalar tensor} summed over ranks in one all-reduce (float64 tensors come back);
    without a process group the dict itself, untouched.
    """
    if not is_distributed():
        return stats
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(_comm_device()).reshape(()) for v in stats.values()])
    return dict(zip(stats, all_reduce_sum(t).unbind()))


def gather_rows(x):
    """
    The rows of every rank, in rank order: (n, ...) on each of W ranks -> (W * n, ...) on every rank (all the
    same shape). With mine() this rebuilds a batch that the ranks computed in slices; one process: x itself.
    """
    if not is_distributed():
        return x
    dev = _comm_device()
    parts = [torch.empty_like(x, device=dev) for _ in range(world_size())]
    td.all_gather(parts, x.contiguous().to(dev))
    return torch.cat(parts).to(x.device)


def from_main(x):
    """
    Rank 0's tensor on every rank (the same dtype and number of dimensions on every rank; the sizes may differ, as a
    sampled response's length may if the ranks' samplers ever drift apart). One process: x itself.
    """
    if not is_distributed():
        return x
    shape = torch.tensor(x.shape, device=_comm_device())
    td.broadcast(shape, src=0)
    out = torch.empty(shape.tolist(), dtype=x.dtype, device=_comm_device())
    if is_main():
        out.copy_(x)
    td.broadcast(out, src=0)
    return out.to(x.device)


def _comm_device():
    """Where a collective's tensors must be: nccl takes this rank's GPU only, gloo the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else torch.device("cpu")


def _sum_hook(state, bucket):
    """A DDP communication hook: all-reduce the gradient bucket as a sum (the default hook divides by world size)."""
    return td.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def wrap(model, fsdp=False):
    """
    The model a rank trains: `model` itself in one process; DistributedDataParallel under torchrun; with fsdp,
    FSDP2's fully_shard on each transformer block and then on the whole model (each rank keeps 1/W of every
    parameter and gathers a block's weights just before using them). Gradients are summed over ranks (see the
    module docstring). FSDP2 shards `model` in place: its parameters become DTensors.
    """
    if fsdp:
        check_fsdp(fsdp)
        from torch.distributed.fsdp import fully_shard
        raw = getattr(model, "_orig_mod", model)  # shard the module under torch.compile in place
        for module in [*raw.transformer.h, raw]:  # the blocks first: the root takes the parameters left over
            fully_shard(module)
            module.set_gradient_divide_factor(1.0)  # per module: the root's setting does not reach the blocks
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
        return model
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel
    device_ids = [local_rank()] if next(model.parameters()).is_cuda else None
    ddp = DistributedDataParallel(model, device_ids=device_ids)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


def unwrap(train_model):
    """The module under a DDP wrapper (for evaluation: its forward runs no collective); anything else as is."""
    return getattr(train_model, "module", train_model)


def sync_grads(train_model, on):
    """
    Call before each micro-batch's forward: on=True (the last micro-batch of a step) makes its backward sum the
    gradients over the ranks (DDP's all-reduce, FSDP2's reduce-scatter); on=False lets them accumulate locally,
    as DDP's no_sync() context does. Nothing in one process.
    """
    if hasattr(train_model, "require_backward_grad_sync"):  # DDP: the flag that no_sync() sets and its forward reads
        train_model.require_backward_grad_sync = on
    elif hasattr(train_model, "set_requires_gradient_sync"):  # FSDP2
        train_model.set_requires_gradient_sync(on)


def is_fsdp(model):
    return hasattr(model, "set_requires_gradient_sync")


def writable(model, name):
    """
    The tensor to change in place for parameter `name` of model: the parameter itself, or under FSDP2 this rank's
    shard of it. FSDP2 first reshards, because after a forward pass the module may still hold the gathered copy,
    and a change to that copy never reaches the shards that the optimizer and the checkpoint read. An elementwise
    change of every rank's shard changes the whole parameter.
    """
    if not is_fsdp(model):
        return model.get_parameter(name)
    model.reshard()
    return model.get_parameter(name).to_local()


def full_state_dict(model):
    """
    The model's complete weights as CPU tensors: a plain state_dict in one process or under DDP; under FSDP2 the
    shards are gathered onto rank 0's CPU (a collective: every rank must call it; the others get an empty dict), so
    that the checkpoint loads into one process like any other.
    """
    if not is_fsdp(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model, optimizer):
    """The optimizer's state_dict; under FSDP2 gathered unsharded onto rank 0's CPU (a collective, as above)."""
    if not is_fsdp(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state):
    """Inverse of full_optimizer_state: every rank loads the full state (under FSDP2 keeping its own shard)."""
    if not is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


class _NoLogger:
    def log(self, row):
        pass


def metrics_logger(out_dir, resume=False, step=None):
    """utils.MetricsLogger on rank 0; on the other ranks a logger that writes nothing."""
    return utils.MetricsLogger(out_dir, resume, step) if is_main() else _NoLogger()
