"""Tokens per second of a Hugging Face Llama patched with lora_ops against the same model unpatched
(issue 9), eager and under ``torch.compile(fullgraph=True)``.

The model: ``LlamaForCausalLM`` from a config (random bf16 weights, no download; 8 layers of
hidden 2048, 16 query / 4 key-value heads, MLP 5632, vocabulary 32000). Patched by
``lora_ops.patch_model`` (q/k/v/o and gate/up/down of every layer; q/k/v and gate/up fused), with
4 adapters of ranks 8-64 in one pool; every batch mixes them, one sequence in 8 on the base model.

Two shapes, each a full forward without KV cache (``use_cache=False``), logits of every position:
prefill (8 sequences of 256 tokens) and decode-sized (64 sequences of 1 token). Tokens/s =
tokens per forward / median forward time (CUDA events around back-to-back forwards: host time
included, as a user running the model eagerly pays it). Checks before timing: the patched model's
logits equal a per-sequence reference (each sequence alone through a copy of the model with its
adapter merged into the weights, relative max error against bf16 rounding) and the compiled
model's logits equal the eager patched model's.

    PYTHONPATH=. python python/bench_hf_model.py           # GPU
    PYTHONPATH=. python python/bench_hf_model.py --smoke   # CPU: tiny float32 model, torch_native
"""

import argparse
import copy
import os
import sys
import time

import torch

import lora_ops
from lora_ops.patch import LLAMA_TARGETS
from lora_ops.peft import lora_config
from report import column_table, copy_to_out, device_short_name, write_csv
from timing import median_event_us

ADAPTER_RANKS = {"a8": 8, "b16": 16, "c32": 32, "d64": 64}
SHAPES = {"prefill": (8, 256), "decode": (64, 1)}  # (sequences, tokens per sequence)
SMOKE_SHAPES = {"prefill": (4, 6), "decode": (4, 1)}
COLUMNS = [("shape", "shape", "{}"), ("tokens", "tokens", "{}"), ("model", "model", "{}"),
           ("mode", "mode", "{}"), ("ms", "ms / forward", "{:.3f}"), ("tokens_per_s", "tokens/s", "{:,.0f}"),
           ("vs_unpatched", "vs unpatched", "{:.3f}")]


def llama(smoke, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if smoke:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256)
    else:
        config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                             num_key_value_heads=4, vocab_size=32000)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device, dtype).eval()


def random_adapter(model, rank, generator):
    """A PEFT state dict (random non-zero A and B) on every Llama projection of ``model``."""
    state = {}
    for path, module in model.named_modules():
        if path.rpartition(".")[2] in LLAMA_TARGETS:
            weight = module.weight
            state[f"{path}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator,
                                                         device=weight.device).to(weight.dtype) / module.in_features**0.5
            state[f"{path}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator,
                                                         device=weight.device).to(weight.dtype) / rank**0.5
    return state


def merged_copy(model, state, scaling):
    """``model`` with the adapter merged into its weights: W + scaling * B @ A (float32 math)."""
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            path = key[: -len(".lora_A.weight")]
            b = state[f"{path}.lora_B.weight"]
            weight = modules[path].weight
            weight.data = (weight.float() + scaling * (b.float() @ a.float())).to(weight.dtype)
    return merged


def forward_fn(model, input_ids, mask, pool=None, names=None):
    def forward():
        with torch.no_grad():
            if pool is None:
                return model(input_ids, attention_mask=mask, use_cache=False).logits
            with pool.adapters(names, attention_mask=mask):
                return model(input_ids, attention_mask=mask, use_cache=False).logits
    return forward


def relative_error(out, reference):
    return ((out.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def check_against_merged(base, states, names, input_ids, mask, logits):
    """Each sequence's logits against its adapter merged into a copy of the model. The bound
    comes from the data: 4x the error of the base model in its dtype against float32 on the same
    input (the precision of a forward in that dtype), at least 1e-5."""
    with torch.no_grad():
        low = base(input_ids, attention_mask=mask, use_cache=False).logits
        high = copy.deepcopy(base).float()(input_ids, attention_mask=mask, use_cache=False).logits
    bound = max(4 * relative_error(low, high), 1e-5)
    problems = []
    merged = {name: merged_copy(base, states[name], 1.0) if name else base for name in set(names)}
    for row, name in enumerate(names):
        with torch.no_grad():
            expected = merged[name](input_ids[row:row + 1], attention_mask=mask[row:row + 1], use_cache=False).logits
        error = relative_error(logits[row:row + 1], expected)
        if error > bound:
            problems.append(f"row {row} ({name}): {error:.2e} > {bound}")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny float32 model, torch_native backend")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--out-dir", default="bench_results")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --smoke for the CPU check")
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    backend = "torch_native" if args.smoke else lora_ops.AUTO

    unpatched = llama(args.smoke, device, dtype)
    patched = copy.deepcopy(unpatched)
    pool = lora_ops.AdapterPool(max_adapters=len(ADAPTER_RANKS), max_rank=max(ADAPTER_RANKS.values()))
    lora_ops.patch_model(patched, pool)
    generator = torch.Generator(device=device).manual_seed(1)
    states = {}
    for name, rank in ADAPTER_RANKS.items():
        states[name] = random_adapter(unpatched, rank, generator)
        pool.load(name, states[name], config=lora_config(rank, rank, list(LLAMA_TARGETS)))  # alpha = r: scaling 1

    rows, problems = [], []
    modes = ["eager"] if args.no_compile else ["eager", "compiled"]
    with lora_ops.use_backend(backend):
        for shape, (num_seqs, length) in (SMOKE_SHAPES if args.smoke else SHAPES).items():
            input_ids = torch.randint(0, unpatched.config.vocab_size, (num_seqs, length), device=device)
            mask = torch.ones_like(input_ids)
            names = [None if row % 8 == 7 else list(ADAPTER_RANKS)[row % len(ADAPTER_RANKS)] for row in range(num_seqs)]
            eager_logits = forward_fn(patched, input_ids, mask, pool, names)()
            problems += [f"{shape}: {p}" for p in check_against_merged(unpatched, states, names, input_ids, mask,
                                                                        eager_logits)]
            times = {}
            for mode in modes:
                for model_name, model in (("unpatched", unpatched), ("patched", patched)):
                    run_model = torch.compile(model, fullgraph=True) if mode == "compiled" else model
                    forward = forward_fn(run_model, input_ids, mask, *((pool, names) if model is patched else ()))
                    logits = forward()  # compiles
                    if mode == "compiled" and model is patched:
                        error = relative_error(logits, eager_logits)
                        if error > (0.02 if dtype == torch.bfloat16 else 1e-5):
                            problems.append(f"{shape}: compiled patched logits differ from eager by {error:.2e}")
                    if device.type == "cuda":
                        forward()
                        ms = median_event_us(forward, target_us=20_000.0) / 1e3
                    else:
                        start = time.perf_counter()
                        forward()
                        ms = (time.perf_counter() - start) * 1e3
                    times[mode, model_name] = ms
                    tokens = num_seqs * length
                    rows.append(dict(shape=f"{shape} {num_seqs}x{length}", tokens=tokens, model=model_name, mode=mode,
                                     ms=ms, tokens_per_s=tokens / ms * 1e3,
                                     vs_unpatched=ms / times[mode, "unpatched"]))
                    print(f"{shape} {mode} {model_name}: {ms:.3f} ms, {tokens / ms * 1e3:,.0f} tokens/s", flush=True)
                    torch._dynamo.reset()

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    out_base = os.path.join(args.out_dir, f"hf-model-{device_short_name(device)}" + ("-smoke" if args.smoke else ""))
    os.makedirs(args.out_dir, exist_ok=True)
    table = column_table(rows, COLUMNS)
    header = (f"{device_name}, torch {torch.__version__}, {dtype}, backend {backend}; Llama "
              f"{unpatched.config.num_hidden_layers} layers, hidden {unpatched.config.hidden_size}; adapters "
              f"{ADAPTER_RANKS}; checks: {'ok' if not problems else 'FAILED: ' + '; '.join(problems)}")
    with open(out_base + ".md", "w") as file:
        file.write(f"# Patched vs unpatched Hugging Face Llama\n\n{header}\n\n{table}\n")
    write_csv(rows, out_base + ".csv", COLUMNS)
    copy_to_out([out_base + ".md"])
    print(f"\n{header}\n\n{table}")
    if problems:
        sys.exit("a check failed")


if __name__ == "__main__":
    main()
