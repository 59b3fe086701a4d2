"""Quickstart: one mixed-adapter batch through a LoRA qkv projection, on every backend that runs here.

Runs on a CPU-only machine (torch_native) and uses the GPU when there is one (triton, csgmv).
"""

import torch

import lora_ops

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
hidden, q_size, kv_size, num_slots, max_rank = 256, 256, 64, 4, 16

# Four adapter slots with different ranks (slot 3 unused) and PEFT scalings alpha / r.
ranks = [16, 8, 4, 0]
scalings = [32 / r if r else 0.0 for r in ranks]
# Three sequences: 5 tokens with adapter 0, 3 with no adapter (-1), 7 with adapter 2.
batch = lora_ops.LoRABatch.build([5, 3, 7], [0, -1, 2], ranks, scalings, device=device)

x = torch.randn(batch.num_tokens, hidden, device=device, dtype=dtype)
A = torch.randn(num_slots, 3 * max_rank, hidden, device=device, dtype=dtype) / hidden**0.5
B = torch.randn(num_slots, q_size + 2 * kv_size, max_rank, device=device, dtype=dtype) / max_rank**0.5
base = torch.randn(batch.num_tokens, q_size + 2 * kv_size, device=device, dtype=dtype)  # base layer output

results = {}
for backend in lora_ops.BACKENDS:
    reason = lora_ops.dispatch.rejection_reason(backend, torch.device(device), dtype)
    if reason:
        print(f"{backend:>12}: skipped ({reason})")
        continue
    out = base.clone()
    y = lora_ops.sgmv_shrink(x, A, batch, num_slices=3, backend=backend)  # LoRA A, (s, 3R)
    lora_ops.qkv_expand(y, B, batch, out, q_size, kv_size, backend=backend)  # out += scaling * y @ B.T
    results[backend] = out
    print(f"{backend:>12}: ran on {device}, output {tuple(out.shape)} {out.dtype}")

# Check against PEFT's per-token formula base + scaling * (x @ A.T) @ B.T: each backend's error
# against float64 must stay within twice the error of torch doing the same math in `dtype`.
def peft_formula(compute_dtype):
    out = base.to(compute_dtype).clone()
    offsets = [0, q_size, q_size + kv_size, q_size + 2 * kv_size]
    for t, slot in enumerate(batch.token_adapter.tolist()):
        if slot < 0 or ranks[slot] == 0:
            continue
        r = ranks[slot]
        for i, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
            y_t = x[t].to(compute_dtype) @ A[slot, i * max_rank : i * max_rank + r].to(compute_dtype).T
            out[t, lo:hi] += scalings[slot] * (y_t @ B[slot, lo:hi, :r].to(compute_dtype).T)
    return out.double()


reference = peft_formula(torch.float64)
torch_error = ((peft_formula(dtype) - reference).norm() / reference.norm()).item()
for backend, out in results.items():
    error = ((out.double() - reference).norm() / reference.norm()).item()
    print(f"{backend:>12}: relative error vs float64 PEFT reference {error:.2e} (torch in {dtype}: {torch_error:.2e})")
    assert error <= 2 * torch_error + 4 * torch.finfo(dtype).eps, backend
print(lora_ops.explain("sgmv_shrink", batch, A))  # what auto runs for this batch, and why
