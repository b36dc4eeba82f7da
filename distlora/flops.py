"""Model FLOPs of LoRA training, for MFU.

Per token, over the frozen base's matmul weights N (every nn.Linear, lm_head included; embedding
lookups are not matmuls): forward 2N, backward through the activations 2N (frozen weights get no
weight gradient), so 4N. Each LoRA pair (A: d_in -> r, B: r -> d_out) has P = r (d_in + d_out)
parameters: forward 2P, backward 2P (activations) + 2P (weight gradients), so 6P. Attention per
layer for an example of length L: QK^T and AV are 2 L^2 d each forward (d = heads x head dim),
backward twice that, so 12 L^2 d; counted per example, not per packed row, and over the full
L x L product as the kernels compute it. (sdpa and eager run a packed row's attention over the whole
row, masked, e.g. a token budget's row: hardware work beyond these model FLOPs; flash_attention_2
runs it per example.) Recomputation from gradient checkpointing is not counted
(model FLOPs, not hardware FLOPs). Checked against torch.utils.flop_counter.FlopCounterMode in
tests/test_observability.py.
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense bf16 peak FLOP/s by device name fragment (vendor datasheets, without sparsity).
PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16: V100 has no bf16
}


@dataclass
class FlopModel:
    base_matmul_params: int  # frozen nn.Linear weights, lm_head included
    adapter_params: int  # LoRA A + B
    attn_dim: int  # heads x head dim
    layers: int

    def per_token(self) -> float:
        return 4.0 * self.base_matmul_params + 6.0 * self.adapter_params

    def attention(self, lengths) -> float:
        return 12.0 * self.layers * self.attn_dim * sum(float(n) ** 2 for n in lengths)

    def step(self, tokens: int, lengths) -> float:
        """FLOPs of a forward+backward over `tokens` tokens whose attention spans are `lengths`."""
        return self.per_token() * tokens + self.attention(lengths)


def flop_model(model) -> FlopModel:
    """Read the counts off a (PEFT-wrapped) model; works on a prepared/unwrapped model."""
    import torch
    from peft.tuners.lora import LoraLayer

    from distlora.model import numel

    lora_modules = [m for m in model.modules() if isinstance(m, LoraLayer)]
    lora_inner = {id(p) for m in lora_modules for n, p in m.named_parameters() if "lora_" in n}
    base = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            w = m.weight
            if id(w) not in lora_inner:
                base += numel(w)  # a 4-bit base weight counts its real shape, not its packed storage
    adapter = sum(numel(p) for p in model.parameters() if id(p) in lora_inner)
    conf = getattr(model, "config", None) or model.get_base_model().config
    heads = conf.num_attention_heads
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // heads
    return FlopModel(base, adapter, heads * head_dim, conf.num_hidden_layers)


def device_peak_flops(override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak
    return None
