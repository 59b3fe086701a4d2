"""End-to-end decode benchmark: what LoRA adds to a whole decode step (issue 12, item 1).

The model: a stack of Llama-3-8B layers (hidden 4096, 32 query / 8 key-value heads of 128, MLP
14336, random bf16 weights, RMSNorm, rotary embedding), no embedding and no LM head. Each step
decodes one token per sequence: every layer writes the token's key and value into its static KV
cache at the current position and attends over the cache (scaled_dot_product_attention, masked
past the position, which is the cache's last: every step attends over all of it).
As in a serving engine, q/k/v and gate/up are fused linears (one base GEMM each);
``lora_ops.patch_model`` wraps the four linears of each layer (8 LoRA ops per layer: a shrink and
an expand each) and an ``AdapterPool`` holds 8 adapters of one rank on all seven Llama
projections, random A and B loaded as PEFT state dicts (the pool maps q/k/v and gate/up onto the
fused linears' slices).

For each rank and batch size the step is captured in CUDA graphs, each replayed as one step:
the base graph, outside any adapters block (the LoRA layers call their base linears only), and
the LoRA graphs, inside ``pool.adapters(batch)`` on a fixed-capacity batch (``pool.empty_batch``)
whose contents ``batch.update_`` writes before the replays. Four configurations:

  base             the base graph: the step without LoRA;
  LoRA             the LoRA graph, the sequences round-robin over the 8 adapters; up to 128
                   tokens the layers run each shrink on a side stream beside the base GEMM
                   (the default, ``pool.overlap_shrink``);
  LoRA sequential  the same with ``pool.overlap_shrink = False``: every LoRA kernel after its GEMM;
  no adapter       the LoRA graph, no sequence with an adapter (what a served batch without LoRA
                   costs in a graph captured for LoRA).

Checks, once per configuration before timing: the base step makes no LoRA op call and the LoRA
steps 8 per layer; one replay's output equals the eager step's (relative norm of the
difference <= the dtype's eps: the same kernels on the same inputs, so anything beyond a changed
summation order would be a bug); no adapter equals base (bit for bit is expected: the kernels
leave tokens without adapter untouched and the base GEMMs are the same calls; within the eps if
a kernel takes another path for the fused projections' strided outputs); and LoRA changes the
output by at least 10x that eps, so a lost or misrouted delta could not pass the other checks.

Timing: median microseconds per replay, batches of back-to-back replays between CUDA events after
warm-up (``timing.median_event_us``). The table (printed last) gives each configuration's step
time and the ratios LoRA / base and no adapter / base against issue 12's targets; it is written
to <out-dir>/decode-<device>.md and .csv (and $OUT when set).

    PYTHONPATH=. python python/bench_decode.py [--layers 8] [--ranks 16 64] [--batch-sizes 1 8 32 128 256]
    PYTHONPATH=. python python/bench_decode.py --smoke    # CPU: tiny float32 shapes, eager steps timed
                                                          # with perf_counter, torch_native backend
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

import lora_ops
from lora_ops.patch import LLAMA_TARGETS
from lora_ops.peft import lora_config
from lora_ops.testing import RecordLoraCalls
from report import column_table, copy_to_out, device_short_name, triton_version, write_csv
from timing import median_event_us, time_op, warm_up_on_side_stream

NUM_ADAPTERS = 8
FUSED_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
LORA_TARGETS = {16: 1.05, 64: 1.10}  # rank -> the most a step with LoRA may cost, in steps without LoRA
NO_ADAPTER_TARGET = 1.02  # a batch without adapters, x the step without LoRA
CONFIGS = ("base", "lora", "lora_sequential", "no_adapter")
WARMUP_REPLAYS = 3
TARGET_US_PER_SAMPLE = 10_000.0  # back-to-back replays per CUDA-event pair: about this long


@dataclass(frozen=True)
class Shapes:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    cache_len: int


LLAMA3_8B = Shapes(hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, layers=8, cache_len=1024)
SMOKE = Shapes(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, layers=2, cache_len=16)


# ---- the model: plain torch modules with a serving engine's fused q/k/v and gate/up linears ----


def rotate(x, rotary):
    """Rotary embedding (rotate-half form) of the last dim at the step's position."""
    cos, sin = rotary
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


class Attention(nn.Module):
    """Grouped-query attention of one new token per sequence over the layer's KV cache
    (``max_batch`` sequences of ``cache_len`` positions, random contents)."""

    def __init__(self, shapes, max_batch, device, dtype):
        super().__init__()
        self.shapes = shapes
        q_size, kv_size = shapes.heads * shapes.head_dim, shapes.kv_heads * shapes.head_dim
        make = dict(bias=False, device=device, dtype=dtype)
        self.sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = nn.Linear(shapes.hidden, sum(self.sizes), **make)
        self.o_proj = nn.Linear(q_size, shapes.hidden, **make)
        cache_shape = (max_batch, shapes.kv_heads, shapes.cache_len, shapes.head_dim)
        self.register_buffer("k_cache", torch.randn(cache_shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.randn(cache_shape, device=device, dtype=dtype), persistent=False)

    def forward(self, x, position, rotary, visible):
        shapes, batch_size = self.shapes, x.shape[0]
        group = shapes.heads // shapes.kv_heads
        # each key-value head's query heads become its rows of queries: no key-value repeat
        query, key, value = self.qkv_proj(x).split(self.sizes, dim=-1)
        queries = rotate(query.reshape(batch_size, shapes.kv_heads, group, shapes.head_dim), rotary)
        key = rotate(key.reshape(batch_size, shapes.kv_heads, 1, shapes.head_dim), rotary)
        value = value.reshape(batch_size, shapes.kv_heads, 1, shapes.head_dim)
        keys, values = self.k_cache[:batch_size], self.v_cache[:batch_size]
        keys.index_copy_(2, position, key)
        values.index_copy_(2, position, value)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=visible)
        return self.o_proj(out.reshape(batch_size, -1))


class MLP(nn.Module):
    def __init__(self, shapes, device, dtype):
        super().__init__()
        make = dict(bias=False, device=device, dtype=dtype)
        self.gate_up_proj = nn.Linear(shapes.hidden, 2 * shapes.intermediate, **make)
        self.down_proj = nn.Linear(shapes.intermediate, shapes.hidden, **make)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, shapes, max_batch, device, dtype):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(shapes.hidden, eps=1e-5, device=device, dtype=dtype)
        self.self_attn = Attention(shapes, max_batch, device, dtype)
        self.post_attention_layernorm = nn.RMSNorm(shapes.hidden, eps=1e-5, device=device, dtype=dtype)
        self.mlp = MLP(shapes, device, dtype)


class DecodeStack(nn.Module):
    """``forward(x, position)``: x ``(batch, hidden)`` holds each sequence's new token, position
    ``(1,)`` its index in the cache; returns the normed hidden states after the last layer."""

    def __init__(self, shapes, max_batch, device, dtype):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(shapes, max_batch, device, dtype) for _ in range(shapes.layers))
        self.norm = nn.RMSNorm(shapes.hidden, eps=1e-5, device=device, dtype=dtype)
        exponents = torch.arange(0, shapes.head_dim, 2, device=device, dtype=torch.float32) / shapes.head_dim
        self.register_buffer("inverse_frequency", 500000.0 ** -exponents, persistent=False)  # Llama 3's theta
        self.register_buffer("cache_positions", torch.arange(shapes.cache_len, device=device), persistent=False)

    def forward(self, x, position):
        angles = position.float() * self.inverse_frequency
        rotary = (angles.cos().to(x.dtype), angles.sin().to(x.dtype))
        visible = self.cache_positions[None, :] <= position  # (query rows, positions): those written so far
        for layer in self.layers:
            x = x + layer.self_attn(layer.input_layernorm(x), position, rotary, visible)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)


# ---- LoRA ----


def random_adapter(projections, rank, generator, device, dtype):
    """A PEFT state dict with random non-zero A ``(rank, in)`` and B ``(out, rank)`` for each
    projection path in ``projections`` ({path: (in, out)})."""
    state = {}
    for path, (in_features, out_features) in projections.items():
        state[f"{path}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator, device=device,
                                                     dtype=dtype) / in_features**0.5
        state[f"{path}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator, device=device,
                                                     dtype=dtype) / rank**0.5
    return state


def adapter_projections(shapes):
    """{PEFT module path: (in, out)} of the seven Llama projections of every layer: adapters
    target the unfused names, which the pool maps onto slices of the fused linears."""
    q_size, kv_size = shapes.heads * shapes.head_dim, shapes.kv_heads * shapes.head_dim
    widths = dict(q_proj=(shapes.hidden, q_size), k_proj=(shapes.hidden, kv_size), v_proj=(shapes.hidden, kv_size),
                  o_proj=(q_size, shapes.hidden), gate_proj=(shapes.hidden, shapes.intermediate),
                  up_proj=(shapes.hidden, shapes.intermediate), down_proj=(shapes.intermediate, shapes.hidden))
    parent = dict(q_proj="self_attn", k_proj="self_attn", v_proj="self_attn", o_proj="self_attn")
    return {f"layers.{layer}.{parent.get(name, 'mlp')}.{name}": width
            for layer in range(shapes.layers) for name, width in widths.items()}


def lora_model(shapes, rank, max_batch, device, dtype):
    """The stack (same weights and cache for every rank: seeded), patched, with NUM_ADAPTERS
    random adapters of ``rank`` loaded (alpha = rank: scaling 1)."""
    torch.manual_seed(0)
    model = DecodeStack(shapes, max_batch, device, dtype).eval()
    pool = lora_ops.AdapterPool(max_adapters=NUM_ADAPTERS, max_rank=rank)
    lora_ops.patch_model(model, pool, target_modules=FUSED_TARGETS,
                         qkv_sizes=(shapes.heads * shapes.head_dim, shapes.kv_heads * shapes.head_dim))
    projections = adapter_projections(shapes)
    config = lora_config(rank, rank, list(LLAMA_TARGETS))
    generator = torch.Generator(device=device).manual_seed(rank)
    for index in range(NUM_ADAPTERS):
        pool.load(f"adapter{index}", random_adapter(projections, rank, generator, device, dtype), config=config)
    return model, pool


# ---- one batch size: capture, check, time ----


def capture(step, device):
    """(replay, output): ``replay()`` reruns ``step`` writing into ``output``. On a GPU a CUDA
    graph (warmed up on a side stream first); on the CPU the eager step and a copy."""
    if device.type != "cuda":
        output = step()
        return (lambda: output.copy_(step())), output
    warm_up_on_side_stream(step, 2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step()
    return graph.replay, output


def step_us(replay, device):
    """Median microseconds per step: CUDA-event timing of replays after warm-up; on the CPU
    perf_counter around eager steps (``timing.time_op``)."""
    if device.type != "cuda":
        return time_op(replay, device)[0]
    for _ in range(WARMUP_REPLAYS):
        replay()
    return median_event_us(replay, target_us=TARGET_US_PER_SAMPLE)


def relative_difference(out, reference):
    return ((out.float() - reference.float()).norm() / reference.float().norm()).item()


def correctness(eager, replayed, lora_calls, expected_lora_calls, tolerance):
    """(passed, one line): the checks of the module docstring on one batch size's outputs."""
    problems = []
    if lora_calls["base"]:
        problems.append(f"the base step made {lora_calls['base']} LoRA op calls")
    for config in ("lora", "lora_sequential"):
        if lora_calls[config] != expected_lora_calls:
            problems.append(f"the {config} step made {lora_calls[config]} LoRA op calls, not {expected_lora_calls}")
    if not torch.equal(replayed["lora"], replayed["lora_sequential"]):
        problems.append("the side-stream shrinks change the output")
    for config in CONFIGS:
        difference = relative_difference(replayed[config], eager[config])
        if difference > tolerance:
            problems.append(f"{config} replay differs from its eager step by {difference:.1e}")
    replay_exact = all(torch.equal(replayed[config], eager[config]) for config in CONFIGS)
    no_adapter_difference = relative_difference(replayed["no_adapter"], replayed["base"])
    if no_adapter_difference > tolerance:
        problems.append(f"no adapter differs from base by {no_adapter_difference:.1e}")
    lora_effect = relative_difference(replayed["lora"], replayed["base"])
    if lora_effect < 10 * tolerance:
        problems.append(f"LoRA changes the output by only {lora_effect:.1e}")
    if problems:
        return False, "WRONG: " + "; ".join(problems)
    no_adapter = ("bit-exact" if torch.equal(replayed["no_adapter"], replayed["base"])
                  else f"within rounding ({no_adapter_difference:.1e})")
    return True, (f"ok: replay = eager {'bit-exact' if replay_exact else 'within rounding'}, "
                  f"no adapter = base {no_adapter}, LoRA moves the output {lora_effect:.2f}")


def measure_batch_size(model, pool, position, batch_size, shapes, device, dtype, profile=False):
    """Step times (us) of the three configurations and the correctness line, for one batch size."""
    x = torch.randn(batch_size, shapes.hidden, device=device, dtype=dtype)
    batch = pool.empty_batch(batch_size)
    round_robin = [i % NUM_ADAPTERS for i in range(batch_size)]
    adapter_slots = {"lora": round_robin, "lora_sequential": round_robin, "no_adapter": [-1] * batch_size}

    def base_step():  # no adapters block: every LoRA layer calls its base linear only
        with torch.no_grad():
            return model(x, position)

    def lora_step(overlap_shrink):
        def step():
            pool.overlap_shrink = overlap_shrink
            with torch.no_grad(), pool.adapters(batch):
                return model(x, position)
        return step

    steps = {"base": base_step, "lora": lora_step(True), "lora_sequential": lora_step(False),
             "no_adapter": lora_step(True)}

    def use(config):  # the batch's contents for the configuration (the base step ignores it)
        if config in adapter_slots:
            batch.update_([1] * batch_size, adapter_slots[config])

    eager, lora_calls = {}, {}
    for config in CONFIGS:
        use(config)
        with RecordLoraCalls() as recorder:
            eager[config] = steps[config]().clone()
        lora_calls[config] = len(recorder.calls)

    use("lora")
    replays = {config: capture(steps[config], device) for config in CONFIGS if config != "no_adapter"}
    replays["no_adapter"] = replays["lora"]
    replayed = {}
    for config in CONFIGS:
        use(config)
        replay, output = replays[config]
        replay()
        replayed[config] = output.clone()
    lora_ops_per_step = 8 * shapes.layers  # a shrink and an expand for each of qkv, o, gate_up, down
    passed, check = correctness(eager, replayed, lora_calls, lora_ops_per_step, torch.finfo(dtype).eps)

    times = {}
    for config in CONFIGS:
        use(config)
        times[config] = step_us(replays[config][0], device)
    if profile:
        for config in CONFIGS:
            use(config)
            print(kernel_profile(replays[config][0], times[config], f"{config}, batch {batch_size}"), flush=True)
    return times, passed, check


def kernel_profile(replay, step_time_us, title, replays=20):
    """Lines on one configuration's replays under torch.profiler: the kernels by total time,
    the LoRA kernels' share, and the GPU's idle time per step (step time - kernel time; with
    the side stream, overlapping kernels make this a lower bound)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            replay()
        torch.cuda.synchronize()
    kernels = [(event.key, event.count // replays, event.self_device_time_total / replays)
               for event in prof.key_averages() if event.self_device_time_total > 0]
    kernels.sort(key=lambda kernel: -kernel[2])
    busy = sum(us for _, _, us in kernels)
    lora = sum(us for name, _, us in kernels if name.startswith("_") and "kernel" in name)  # lora_ops' Triton kernels
    lines = [f"profile ({title}): step {step_time_us:.1f} us, kernels {busy:.1f} us (LoRA kernels {lora:.1f} us), "
             f"GPU idle >= {step_time_us - busy:.1f} us per step"]
    lines += [f"    {us:8.2f} us  x{count:<4d} {name[:90]}" for name, count, us in kernels[:12]]
    return "\n".join(lines)


def result_row(rank, batch_size, times, passed, check):
    row = dict(rank=rank, batch=batch_size, base_us=times["base"], lora_us=times["lora"],
               sequential_us=times["lora_sequential"], sequential_ratio=times["lora_sequential"] / times["base"],
               no_adapter_us=times["no_adapter"], lora_ratio=times["lora"] / times["base"],
               no_adapter_ratio=times["no_adapter"] / times["base"], check=check)
    for kind, limit in (("lora", LORA_TARGETS.get(rank)), ("no_adapter", NO_ADAPTER_TARGET)):
        row[f"{kind}_target"] = "" if limit is None else f"<= {limit:.2f}x"
        if not passed:
            row[f"{kind}_verdict"] = "WRONG"
        elif limit is not None:
            row[f"{kind}_verdict"] = "pass" if row[f"{kind}_ratio"] <= limit else "FAIL"
    return row


COLUMNS = [  # (key, header, format): the markdown table and the CSV
    ("rank", "rank", "{}"), ("batch", "batch", "{}"), ("base_us", "base us", "{:.1f}"),
    ("lora_us", "LoRA us", "{:.1f}"), ("sequential_us", "LoRA sequential us", "{:.1f}"),
    ("no_adapter_us", "no adapter us", "{:.1f}"), ("sequential_ratio", "sequential / base", "{:.3f}"),
    ("lora_ratio", "LoRA / base", "{:.3f}"), ("lora_target", "target", "{}"), ("lora_verdict", "verdict", "{}"),
    ("no_adapter_ratio", "no adapter / base", "{:.3f}"), ("no_adapter_target", "target", "{}"),
    ("no_adapter_verdict", "verdict", "{}"), ("check", "check", "{}"),
]


# ---- the run ----


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, help="decoder layers (default 8; 2 with --smoke)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64], help="adapter rank of each pool")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default 1 8 32 128 256 (1 2 with --smoke)")
    parser.add_argument("--cache-len", type=int, help="KV-cache positions (default 1024; 16 with --smoke)")
    parser.add_argument("--backend", help="lora_ops backend (default auto; torch_native with --smoke, where "
                        "triton and csgmv run in Triton's interpreter)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny float32 shapes, eager steps, no graphs")
    parser.add_argument("--profile", type=int, nargs="*", default=[], metavar="BATCH",
                        help="at these batch sizes, also profile the graphs' kernels (torch.profiler): "
                             "the LoRA kernels' time per step and the GPU's idle time between kernels")
    parser.add_argument("--out-dir", default="bench_results")
    return parser.parse_args()


def header_lines(args, shapes, batch_sizes, device, dtype, backend, memory_gb):
    dtype_name = str(dtype).replace("torch.", "")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    smoke = " (smoke: tiny shapes, eager steps, perf_counter timing)" if args.smoke else ""
    targets = ", ".join(f"rank {rank} <= {limit:.2f}x" for rank, limit in LORA_TARGETS.items())
    return [
        f"device: {device_name}{smoke}",
        f"torch {torch.__version__}, triton {triton_version()}, dtype {dtype_name}, "
        f"lora_ops backend {backend}",
        f"model: {shapes.layers} Llama-3-8B-shaped layers (hidden {shapes.hidden}, {shapes.heads} query / "
        f"{shapes.kv_heads} key-value heads of {shapes.head_dim}, MLP {shapes.intermediate}), random weights; "
        f"one new token per sequence attending over a KV cache of {shapes.cache_len} positions; no embedding "
        f"or LM head; {memory_gb:.3g} GB of weights, KV cache and LoRA pool at the largest rank",
        f"LoRA: {NUM_ADAPTERS} adapters of one rank on q/k/v, o, gate/up, down (fused q/k/v and gate/up "
        f"linears, as in a serving engine: 8 LoRA ops per layer); ranks {args.ranks}; batch sizes "
        f"{batch_sizes}, one token per sequence",
        "configurations: base = the step without LoRA (the patched model outside any adapters block); "
        "LoRA = sequences round-robin over the adapters, shrinks on a side stream beside the base GEMMs "
        "(up to 128 tokens); LoRA sequential = the same, every LoRA kernel after its GEMM; no adapter = "
        "the LoRA graph with "
        "no sequence on an adapter",
        "timing: perf_counter around eager steps, median of 5" if device.type != "cuda" else
        "timing: one CUDA graph per step (captured once per rank and batch size), back-to-back replays "
        "between CUDA events after warm-up, median per replay",
        f"check: replay = eager step and no adapter = base, relative norm <= eps of {dtype_name} "
        "(bit-exact expected), LoRA moves the output >= 10 eps; LoRA op calls counted",
        f"targets (issue 12): LoRA / base {targets}; no adapter / base <= {NO_ADAPTER_TARGET:.2f}x",
    ]


def model_gb(model, pool):
    tensors = [*model.parameters(), *model.buffers(), *pool.parameters()]
    return sum(t.numel() * t.element_size() for t in tensors) / 1e9


def main():
    args = parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: the decode benchmark needs a GPU; use --smoke for the CPU check")
    backend = args.backend or ("torch_native" if args.smoke else lora_ops.AUTO)
    if args.smoke and backend != "torch_native":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first Triton kernel is imported
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shapes = SMOKE if args.smoke else LLAMA3_8B
    shapes = replace(shapes, layers=args.layers or shapes.layers, cache_len=args.cache_len or shapes.cache_len)
    batch_sizes = args.batch_sizes or ([1, 2] if args.smoke else [1, 8, 32, 128, 256])
    out_base = os.path.join(args.out_dir, f"decode-{device_short_name(device)}" + ("-smoke" if args.smoke else ""))
    position = torch.tensor([shapes.cache_len - 1], device=device)  # the cache's last: attend over all of it

    t_start = time.perf_counter()
    rows = []
    with lora_ops.use_backend(backend):
        for rank in sorted(args.ranks):
            model, pool = lora_model(shapes, rank, max(batch_sizes), device, dtype)
            memory_gb = model_gb(model, pool)  # the last, at the largest rank, goes to the header
            for batch_size in batch_sizes:
                times, passed, check = measure_batch_size(model, pool, position, batch_size, shapes, device, dtype,
                                                           profile=batch_size in args.profile and device.type == "cuda")
                rows.append(result_row(rank, batch_size, times, passed, check))
                row = rows[-1]
                print(f"[{time.perf_counter() - t_start:6.1f}s] rank {rank:3d} batch {batch_size:4d}: base "
                      f"{row['base_us']:9.1f} us, LoRA {row['lora_ratio']:.3f}x (sequential "
                      f"{row['sequential_ratio']:.3f}x), no adapter "
                      f"{row['no_adapter_ratio']:.3f}x; {check}", flush=True)
                write_csv(rows, out_base + ".csv", COLUMNS)  # after every row: a run cut short keeps its rows
            del model, pool
            if device.type == "cuda":
                torch.cuda.empty_cache()

    header = header_lines(args, shapes, batch_sizes, device, dtype, backend, memory_gb)
    header.append(f"total time: {time.perf_counter() - t_start:.0f} s")
    table = column_table(rows, COLUMNS)
    with open(out_base + ".md", "w") as file:
        file.write("\n".join(["# lora_ops decode step benchmark", ""] + [f"- {line}" for line in header]
                             + ["", table, ""]))
    copy_to_out([out_base + ".md", out_base + ".csv"])
    print("\n" + "\n".join(header) + "\n\n" + table + f"\n\nwrote {out_base}.md, {out_base}.csv", flush=True)
    if any(not row["check"].startswith("ok") for row in rows):
        sys.exit("a correctness check failed (check column)")


if __name__ == "__main__":
    main()
