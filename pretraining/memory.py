"""Does a batch fit in memory? An estimate from one pass of the method's own loss on a synthetic batch.

The pass runs exactly what training runs (every view, every module the loss calls: student and teacher, heads,
reconstruction), so it works for any method by construction. It uses 2 samples, the fewest that BatchNorm layers in
training mode accept, and counts the bytes of every leaf module's output per sample.
"""

import math

import torch

from pretraining.methods.base import SSPMethod, Step

# forward activations are kept for backward, their gradients and the optimizer's work buffers come on top
_TRAINING_OVERHEAD = 3.0
_USABLE_FRACTION = 0.6
#: samples of the measuring pass: BatchNorm in training mode needs more than one value per channel
SIZING_SAMPLES = 2


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info["MemTotal"])


def activation_bytes_per_sample(method: SSPMethod, model: torch.nn.Module, num_channels: int) -> int:
    """Bytes of all leaf-module outputs per sample in one no-grad pass of ``method.loss`` on
    :meth:`SSPMethod.example_batch` (model in training mode, on its own device)."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        for t in output if isinstance(output, (list, tuple)) else (output,):
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        device = next(model.parameters()).device
        model.train()
        with torch.no_grad():
            method.loss(model, method.example_batch(SIZING_SAMPLES, num_channels, device), Step(0, 0, 1, 1))
    finally:
        for hook in hooks:
            hook.remove()
    return math.ceil(total / SIZING_SAMPLES)


def affordable_batch_size(
    method: SSPMethod, model: torch.nn.Module, num_channels: int, requested: int, device: torch.device
) -> int:
    """The largest power-of-two fraction of ``requested`` whose estimated training memory fits the device."""
    per_sample = activation_bytes_per_sample(method, model, num_channels) * _TRAINING_OVERHEAD
    budget = available_bytes(device) * _USABLE_FRACTION
    batch_size = requested
    while batch_size > 1 and batch_size * per_sample > budget:
        batch_size //= 2
    return batch_size
