"""Distributed data-parallel pretraining through torch.distributed: process group, rank helpers, collectives.

Launch with ``torchrun --nproc_per_node N ssp_pretrain ...`` or ``ssp_pretrain --num-gpus N ...`` (which runs torchrun
for the user). Each process (rank) trains the same model under DistributedDataParallel on its own device
(``cuda:LOCAL_RANK``, backend nccl; or the CPU, backend gloo) and takes a disjoint equal share of every global batch,
so W processes see exactly the batches of one process.

The rule that makes a W-process step equal to the one-process step: every rank computes the same global loss, from
its own rows and what the autograd-aware collectives here bring from the others (:func:`gather_cat` of embeddings,
:func:`all_reduce_sum`/:func:`all_reduce_mean` of partial sums). Their backward passes sum the gradients of all ranks'
(identical) losses, W times the global loss, and DDP averages the parameter gradients over the W ranks: the result is
the gradient of the global loss. :class:`GlobalBatchNorm` normalises over the global batch the same way.

Without a process group (one process, the default) every helper is the identity or a no-op, so the methods and the
loop run unchanged.
"""

import os
import sys
import warnings
from datetime import timedelta
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from nnunet_ssp.errors import SSPError

#: variables torchrun sets for every process it starts
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
#: how long :func:`barrier` waits for rank 0 (e.g. while it builds a large slice cache); a rank that fails ends the
#: run sooner: torchrun stops the others
BARRIER_TIMEOUT = timedelta(hours=12)
_barrier_group = None  # a gloo group for barrier(): CPU-side waits that NCCL's watchdog would cut after 10 minutes


# ----------------------------------------------------------------------------------------------- process group
def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def requested_world_size() -> int:
    """The number of processes torchrun started (1 when it did not start this one)."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def is_main() -> bool:
    """Whether this process writes files and logs (rank 0, or the only process)."""
    return rank() == 0


def backend() -> Optional[str]:
    return dist.get_backend() if is_distributed() else None


def init_from_env(device_type: str) -> bool:
    """Joins the process group that torchrun's variables describe (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT): backend nccl with ``device_type`` "cuda" (this process on cuda:LOCAL_RANK), gloo on the CPU. Does
    nothing and returns False outside torchrun or with a single process."""
    global _barrier_group
    if is_distributed():
        return True
    if requested_world_size() <= 1:
        return False
    if device_type == "cuda":
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise SSPError(
                f"process {os.environ['RANK']} (local rank {local}) has no GPU: this machine has "
                f"{torch.cuda.device_count()}; start at most that many processes per node"
            )
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    _barrier_group = dist.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)
    return True


def teardown() -> None:
    global _barrier_group
    if is_distributed():
        dist.destroy_process_group()
    _barrier_group = None


def device(device_type: str) -> torch.device:
    """This process's device: cuda:LOCAL_RANK for "cuda" in a distributed run, else ``device_type`` as given."""
    if is_distributed() and torch.device(device_type).type == "cuda":
        return torch.device("cuda", local_rank())
    return torch.device(device_type)


def launch(num_processes: int, module: str, argv: Sequence[str]) -> None:
    """Replaces this process by ``python -m torch.distributed.run --standalone --nproc-per-node N -m module argv``
    (single node, a free port), as ``nnUNetv2_train -num_gpus`` starts its workers: signals and the exit status are
    torchrun's from here on."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={num_processes}",
        "-m",
        module,
        *argv,
    ]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


# ----------------------------------------------------------------------------------------------- collectives
def barrier() -> None:
    """Waits until every rank got here (e.g. until rank 0 has written the slice cache or a checkpoint)."""
    if is_distributed():
        dist.barrier(group=_barrier_group)


def _autograd_collectives():
    """torch.distributed.nn.functional, whose collectives carry gradients (it warns that it is deprecated)."""
    import torch.distributed.nn.functional as functional

    return functional


def gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """The ranks' ``tensor`` (equal shapes) concatenated along dim 0 in rank order: the global batch's rows when each
    rank holds its contiguous block. Gradients flow back to each rank's own rows."""
    if not is_distributed():
        return tensor
    if tensor.requires_grad:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            parts = _autograd_collectives().all_gather(tensor)
    else:
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks (a new tensor; gradients flow back to every rank's summand). Identity in one process."""
    if not is_distributed():
        return tensor
    if tensor.requires_grad:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return _autograd_collectives().all_reduce(tensor)
    summed = tensor.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(summed)
    return summed


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over the ranks, with gradients as :func:`all_reduce_sum`. Identity in one process."""
    if not is_distributed():
        return tensor
    return all_reduce_sum(tensor) / world_size()


def all_reduce_mean_many(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Means over the ranks of several tensors without gradients, in one collective. Identity in one process."""
    if not is_distributed():
        return tensors
    packed = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    dist.all_reduce(packed)
    packed /= world_size()
    out, offset = [], 0
    for t in tensors:
        out.append(packed[offset : offset + t.numel()].view(t.shape).to(t.dtype))
        offset += t.numel()
    return tuple(out)


def mean_of_values(values: Sequence[float], device: torch.device) -> List[float]:
    """Means over the ranks of python floats (e.g. the logged loss and metrics), in one collective."""
    if not is_distributed():
        return list(values)
    packed = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    return (packed / world_size()).tolist()


def min_int(value: int, device: torch.device) -> int:
    """The smallest ``value`` of all ranks (e.g. the batch size that fits on every GPU)."""
    if not is_distributed():
        return value
    packed = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.MIN)
    return int(packed.item())


def agreed_signal(signum: Optional[int], device: torch.device) -> Optional[int]:
    """A stop request agreed by all ranks: the largest signal number any rank received (None: none did), so all
    ranks stop and save at the same step. ``signum`` itself in one process."""
    if not is_distributed():
        return signum
    packed = torch.tensor([signum or 0], dtype=torch.int64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return int(packed.item()) or None


def local_rows(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous block of a tensor over the global batch (dim 0), e.g. random masks every rank draws for
    the whole global batch. Identity in one process."""
    if not is_distributed():
        return tensor
    if len(tensor) % world_size():
        raise ValueError(f"{len(tensor)} rows do not split evenly over {world_size()} processes")
    share = len(tensor) // world_size()
    return tensor[rank() * share : (rank() + 1) * share]


# ----------------------------------------------------------------------------------------------- modules
class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation whose training statistics are over the global batch (every rank's rows), with gradients
    through the all-reduce: W processes normalise exactly as one process would on the whole batch. Works on the CPU
    (gloo) as on CUDA, unlike ``nn.SyncBatchNorm``. Outside a process group or in eval mode it is ordinary BatchNorm;
    parameters, buffers and state-dict keys are BatchNorm's."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        self._check_input_dim(input)
        x = input.float()
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        sums = all_reduce_sum(torch.cat([x.sum(dims), count]))
        n = sums[-1].detach()
        mean = sums[:-1] / n
        centred = x - mean.view(shape)
        var = all_reduce_sum((centred * centred).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return y.to(input.dtype)


def global_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by a :class:`GlobalBatchNorm` holding the same parameters and
    buffers (in place where possible; the result must be used)."""
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, global_batch_norm(child))
    return converted


def data_parallel(module: nn.Module) -> Optional[nn.Module]:
    """``module`` under DistributedDataParallel (None in one process): gradients are averaged over the ranks in
    backward. Parameters a method never uses (e.g. the decoder of the embedding methods) keep no gradient, as in one
    process. Buffers are not broadcast: every rank updates them the same way from global quantities."""
    if not is_distributed():
        return None
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    no_buffer_sync = (
        {"forward_sync_buffers": False}  # torch >= 2.13 deprecates broadcast_buffers
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(module, device_ids=None, find_unused_parameters=True, **no_buffer_sync)
