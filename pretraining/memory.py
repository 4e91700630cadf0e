"""Does a batch fit in memory? A cheap estimate from one forward pass at batch size 1."""
import torch

# forward activations are kept for backward, their gradients and the optimizer's work buffers come on top
_TRAINING_OVERHEAD = 3.0
_USABLE_FRACTION = 0.6


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info["MemTotal"])


def activation_bytes_per_sample(model: torch.nn.Module, num_channels: int, patch_size) -> int:
    """Bytes of all leaf-module outputs for one sample, measured with forward hooks on a CPU copy-free pass."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        for t in output if isinstance(output, (list, tuple)) else (output,):
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, num_channels, *patch_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def affordable_batch_size(model: torch.nn.Module, num_channels: int, patch_size, requested: int,
                          views_per_sample: int, device: torch.device) -> int:
    """The largest power-of-two fraction of ``requested`` whose estimated training memory fits the device."""
    per_sample = activation_bytes_per_sample(model, num_channels, patch_size) * _TRAINING_OVERHEAD * views_per_sample
    budget = available_bytes(device) * _USABLE_FRACTION
    batch_size = requested
    while batch_size > 1 and batch_size * per_sample > budget:
        batch_size //= 2
    return batch_size
