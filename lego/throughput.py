"""How fast a model trained: tokens/s, model TFLOP/s from `lego.cost`'s MACs, MFU against the GPU's peak, and
peak device memory (each training's result.json; `lego.training.fit`).

    training_throughput(tokens=1.2e6, train_s=60.0, train_macs=3.4e14, device=torch.device("cuda"))
    # {"tokens_per_s": 20000.0, "model_tflops_per_s": 11.3, "mfu": 0.0115, "peak_memory_bytes": 2.1e9}

Model FLOPs are 2 per multiply-add of the model's own arithmetic (`lego.cost`: no attention softmax, norms or
optimizer), so MFU here is the PaLM paper's model FLOPs utilization, not the hardware's.
"""

from __future__ import annotations

import re
from typing import Dict, Optional

import torch

# Dense (no sparsity) bf16 tensor-core peak of one GPU, TFLOP/s, from the vendor's datasheets; the first pattern
# that matches `torch.cuda.get_device_name()` wins (so "H100 PCIe" before "H100"). V100 has no bf16: its fp16.
PEAK_TFLOPS = (
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bG?H100\b", 989.0),  # SXM
    (r"\bG?H200\b", 989.0),
    (r"\bB200\b", 2250.0),
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bA10G?\b", 125.0),  # the A10's datasheet figure; AWS's A10G runs at lower clocks
    (r"\bV100\b", 125.0),  # fp16 (SXM2)
)


def peak_tflops(device_name: str) -> Optional[float]:
    """The dense bf16 peak TFLOP/s of the GPU named `device_name` (as torch.cuda.get_device_name gives it, e.g.
    "NVIDIA H100 80GB HBM3"); None when it is not in `PEAK_TFLOPS`."""
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tflops
    return None


def device_peak_tflops(device: torch.device) -> Optional[float]:
    """`peak_tflops` of a CUDA device; None on any other device (CPU peaks are not tabulated)."""
    return peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    """Start counting a training's peak device memory (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def training_throughput(*, tokens: float, train_s: float, train_macs: float, device: torch.device) -> Dict[str, object]:
    """tokens_per_s (training tokens over training seconds, validation excluded), model_tflops_per_s (2 FLOPs per
    training MAC over the same seconds), mfu (that over the device's peak; None where the peak is unknown, CPUs
    included) and peak_memory_bytes (torch.cuda.max_memory_allocated since `reset_peak_memory`; None off CUDA).
    Under DDP each rank's tokens and MACs are its own: the rates are per device."""
    seconds = max(train_s, 1e-9)
    tflops = 2 * train_macs / seconds / 1e12
    peak = device_peak_tflops(device)
    return {"tokens_per_s": tokens / seconds, "model_tflops_per_s": tflops,
            "mfu": tflops / peak if peak else None,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
