"""Multi-LoRA decode under bucketed CUDA graphs: capture once per batch-size bucket, replay every step.

A small Llama-style model (from a config, random weights) with its q/k/v/o and gate/up/down
projections patched by ``lora_ops.patch_model``, 8 adapters of ranks 4 to 64 in one
``AdapterPool``. Requests join and leave, so the live batch changes size every few steps; each
step pads it to the next bucket (1, 2, 4, ... tokens), writes the step's adapters into that
bucket's fixed-capacity batch (``batch.update_``: in place, no host synchronisation) and runs
the model -- eagerly, through ``torch.compile``, or by replaying the bucket's CUDA graph.

1. The changing-requests run, checked against a float32 copy of the model (the bf16 weights
   upcast, the torch_native backend): every mode's logits must be as close to it as eager's
   bf16 logits are (within 2x their largest error), and each mode's next-token choices are
   compared with eager's. All runs are fed the reference's tokens, so a near tie decided
   differently does not change what follows.
2. Timing at fixed live batch sizes: latency per step and tokens/s per mode.

In bfloat16. On a GPU: eager vs compiled (mode="reduce-overhead") vs CUDA graphs. On the CPU
(tiny sizes, the torch_native backend): eager vs compiled (default mode), no graphs.

    PYTHONPATH=. python examples/cuda_graph_decode.py [--batch-sizes 1 32 256] [--steps 48]
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

import lora_ops

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16
ADAPTER_RANKS = (4, 8, 8, 16, 16, 32, 32, 64)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Config:
    vocab: int = 32000
    hidden: int = 1024
    layers: int = 4
    heads: int = 16
    kv_heads: int = 4
    intermediate: int = 2816
    max_requests: int = 256  # KV-cache rows, one per live request
    max_len: int = 128  # positions per request

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


TINY = Config(vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, max_requests=8, max_len=48)


class RMSNorm(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + 1e-6)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden, config.heads * dim, bias=False)
        self.k_proj = nn.Linear(config.hidden, config.kv_heads * dim, bias=False)
        self.v_proj = nn.Linear(config.hidden, config.kv_heads * dim, bias=False)
        self.o_proj = nn.Linear(config.heads * dim, config.hidden, bias=False)

    def forward(self, x, positions, rows, k_cache, v_cache, rotary):
        """One new token per row: write its k/v at (row, position), attend over positions <= it."""
        config, tokens = self.config, x.shape[0]
        q = rotate(self.q_proj(x).view(tokens, config.heads, -1), rotary)
        k = rotate(self.k_proj(x).view(tokens, config.kv_heads, -1), rotary)
        k_cache.index_put_((rows, positions), k)
        v_cache.index_put_((rows, positions), self.v_proj(x).view(tokens, config.kv_heads, -1))
        keys = k_cache[rows].repeat_interleave(config.heads // config.kv_heads, dim=2)  # (tokens, len, heads, dim)
        values = v_cache[rows].repeat_interleave(config.heads // config.kv_heads, dim=2)
        scores = torch.einsum("thd,tlhd->thl", q.float(), keys.float()) / config.head_dim**0.5
        visible = torch.arange(config.max_len, device=x.device) <= positions[:, None]  # (tokens, len)
        weights = scores.masked_fill(~visible[:, None, :], float("-inf")).softmax(-1)
        out = torch.einsum("thl,tlhd->thd", weights, values.float()).to(x.dtype)
        return self.o_proj(out.reshape(tokens, -1))


def rotate(x, rotary):
    cos, sin = rotary
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden, config.intermediate, bias=False)
        self.up_proj = nn.Linear(config.hidden, config.intermediate, bias=False)
        self.down_proj = nn.Linear(config.intermediate, config.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(config.hidden), RMSNorm(config.hidden)
        self.self_attn, self.mlp = Attention(config), MLP(config)


class TinyLlama(nn.Module):
    """Decode only: ``forward(token_ids, positions, rows)`` takes one token per request (its
    KV-cache row and position) and returns the next-token logits. Cache row ``max_requests`` is
    scratch for padding tokens."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab, config.hidden)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.hidden)
        self.lm_head = nn.Linear(config.hidden, config.vocab, bias=False)
        cache_shape = (config.layers, config.max_requests + 1, config.max_len, config.kv_heads, config.head_dim)
        self.register_buffer("k_cache", torch.zeros(cache_shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(cache_shape), persistent=False)

    def forward(self, token_ids, positions, rows):
        dim = self.config.head_dim
        inverse_frequency = 1.0 / 10000 ** (torch.arange(0, dim, 2, device=positions.device) / dim)
        angles = positions[:, None].float() * inverse_frequency  # (tokens, head_dim / 2)
        rotary = (angles.cos()[:, None, :], angles.sin()[:, None, :])
        x = self.embed_tokens(token_ids)
        for index, layer in enumerate(self.layers):
            x = x + layer.self_attn(layer.input_layernorm(x), positions, rows, self.k_cache[index],
                                    self.v_cache[index], rotary)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.norm(x)).float()


def random_adapter(model: TinyLlama, rank: int, generator: torch.Generator) -> tuple[dict, dict]:
    """A PEFT-format state dict and config for every target module, A and B random."""
    state = {}
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in TARGETS:
            state[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) / rank**0.5
    return state, {"r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS)}


def buckets_up_to(max_requests: int) -> list[int]:
    sizes = [1]
    while sizes[-1] < max_requests:
        sizes.append(min(2 * sizes[-1], max_requests))
    return sizes


class Server:
    """Per bucket: static inputs, a fixed-capacity LoRA batch, and (``mode="graphs"``) a CUDA graph."""

    def __init__(self, model: TinyLlama, pool: lora_ops.AdapterPool, mode: str):
        self.model, self.pool, self.mode = model, pool, mode
        self.run = model
        if mode == "compiled":
            self.run = torch.compile(model, mode="reduce-overhead" if ON_GPU else "default", fullgraph=True)
        self.buckets = {}
        for size in reversed(buckets_up_to(model.config.max_requests)):  # largest first: graphs share its memory
            token_ids, positions = (torch.zeros(size, dtype=torch.long, device=DEVICE) for _ in range(2))
            rows = torch.full((size,), model.config.max_requests, device=DEVICE)
            self.buckets[size] = [pool.empty_batch(size), (token_ids, positions, rows), None, None]

    def capture(self) -> None:
        memory = None
        for bucket in self.buckets.values():
            batch, inputs, _, _ = bucket
            with torch.no_grad(), self.pool.adapters(batch):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs need
                    for _ in range(2):
                        self.model(*inputs)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=memory):
                    bucket[3] = self.model(*inputs)
            bucket[2], memory = graph, graph.pool()

    def step(self, token_ids, positions, rows, adapter_names) -> torch.Tensor:
        """Next-token logits of the live requests (one token each), padded to the next bucket."""
        live = token_ids.shape[0]
        size = next(size for size in sorted(self.buckets) if size >= live)
        batch, (static_ids, static_positions, static_rows), graph, graph_logits = self.buckets[size]
        batch.update_([1] * live, self.pool.slots(adapter_names))
        static_ids[:live], static_positions[:live], static_rows[:live] = token_ids, positions, rows
        static_rows[live:] = self.model.config.max_requests  # padding writes to the scratch row
        static_positions[live:] = 0
        if graph is not None:
            graph.replay()
            return graph_logits[:live].clone()  # the next replay overwrites it
        with torch.no_grad(), self.pool.adapters(batch):
            return self.run(static_ids, static_positions, static_rows)[:live].clone()


@dataclass(frozen=True)
class Request:
    row: int  # its KV-cache row
    adapter: str | None
    start: int  # the step it joins
    length: int  # steps it stays


def schedule(config: Config, steps: int, generator: torch.Generator) -> list[list[Request]]:
    """Requests joining and leaving: the live requests of each step."""
    live, events = [], []
    for step in range(steps):
        live = [request for request in live if step - request.start < request.length]
        free = sorted(set(range(config.max_requests)) - {request.row for request in live})
        joining = int(torch.randint(0, max(1, config.max_requests // 4) + 1, (1,), generator=generator))
        for row in free[:joining]:
            adapter = int(torch.randint(-1, len(ADAPTER_RANKS), (1,), generator=generator))
            length = int(torch.randint(2, config.max_len // 2, (1,), generator=generator))
            live.append(Request(row, None if adapter < 0 else f"adapter{adapter}", step, length))
        events.append(live)
    return events


def decode(server: Server, events: list[list[Request]], first_tokens: torch.Tensor,
           forced: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Runs the schedule and returns each step's logits. A request's next token is its argmax,
    or with ``forced`` (another run's choices) that run's token, so that two runs see the same
    inputs and a near tie decided differently does not change what follows."""
    last_token = first_tokens.clone()  # by cache row
    all_logits = []
    for step, live in enumerate(events):
        rows = torch.tensor([request.row for request in live], device=DEVICE)
        positions = torch.tensor([step - request.start for request in live], device=DEVICE)
        logits = server.step(last_token[rows], positions, rows, [request.adapter for request in live])
        last_token[rows] = logits.argmax(-1) if forced is None else forced[step]
        all_logits.append(logits.double())  # a copy: graph replays overwrite their output
    return all_logits


def compare(logits: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    """(the largest logit error against ``reference``, as a fraction of the reference's largest
    logit magnitude; the fraction of tokens chosen as ``reference`` would choose them)."""
    logits, reference = torch.cat(logits), torch.cat(reference)
    error = (logits - reference).abs().max() / reference.abs().max()
    return error.item(), (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()


def time_steps(server: Server, batch_size: int, steps: int) -> float:
    """Seconds per decode step with ``batch_size`` live requests (mixed adapters and none)."""
    rows = torch.arange(batch_size, device=DEVICE)
    names = [None if i % 9 == 8 else f"adapter{i % 8}" for i in range(batch_size)]
    token_ids = torch.randint(0, server.model.config.vocab, (batch_size,), device=DEVICE)
    for warm_up in (True, False):
        if ON_GPU:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for step in range(3 if warm_up else steps):  # warm-up: compile, cudagraph-tree recording
            positions = torch.full((batch_size,), step % server.model.config.max_len, device=DEVICE)
            token_ids = server.step(token_ids, positions, rows, names).argmax(-1)
        if ON_GPU:
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def patched(model: TinyLlama, adapters: list[tuple[dict, dict]], dtype: torch.dtype) -> lora_ops.AdapterPool:
    """Patches ``model``'s projections with a pool holding ``adapters`` (rounded to ``dtype``)."""
    pool = lora_ops.AdapterPool(max_adapters=len(adapters), max_rank=max(ADAPTER_RANKS))
    lora_ops.patch_model(model, pool, target_modules=TARGETS)
    for index, (state, adapter_config) in enumerate(adapters):
        pool.load(f"adapter{index}", {key: value.to(dtype) for key, value in state.items()}, config=adapter_config)
    return pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256] if ON_GPU else [2, 8])
    parser.add_argument("--steps", type=int, default=48 if ON_GPU else 12, help="steps of the changing-requests run")
    parser.add_argument("--timed-steps", type=int, default=50 if ON_GPU else 5)
    args = parser.parse_args()
    config = Config() if ON_GPU else TINY
    torch.manual_seed(0)
    model = TinyLlama(config).to(device=DEVICE, dtype=DTYPE).eval()
    reference_model = copy.deepcopy(model).float()  # the same (rounded) weights, computed in float32
    torch._dynamo.mark_static_address(model.k_cache)  # written in place: cudagraph trees keep its address
    torch._dynamo.mark_static_address(model.v_cache)
    generator = torch.Generator().manual_seed(1)
    adapters = [random_adapter(model, rank, generator) for rank in ADAPTER_RANKS]
    pool = patched(model, adapters, DTYPE)
    reference_pool = patched(reference_model, adapters, DTYPE)
    modes = ["eager", "compiled", "graphs"] if ON_GPU else ["eager", "compiled"]
    print(f"{DEVICE}, {DTYPE}, {config}, adapters of ranks {ADAPTER_RANKS}; modes: {', '.join(modes)}")

    events = schedule(config, args.steps, generator)
    first_tokens = torch.randint(0, config.vocab, (config.max_requests,), generator=generator).to(DEVICE)
    print(f"changing requests: {args.steps} steps, live batch sizes {[len(live) for live in events]}")
    with lora_ops.use_backend("torch_native"):
        reference = decode(Server(reference_model, reference_pool, "eager"), events, first_tokens)
    forced = [logits.argmax(-1) for logits in reference]
    servers, logits = {}, {}
    for mode in modes:
        servers[mode] = Server(model, pool, mode)
        if mode == "graphs":
            servers[mode].capture()
        model.k_cache.zero_(), model.v_cache.zero_()
        logits[mode] = decode(servers[mode], events, first_tokens, forced)
    eager_error, _ = compare(logits["eager"], reference)
    print(f"{sum(map(len, events))} tokens; logit error against the float32 reference (fraction of its largest "
          "logit), and tokens chosen as eager chose them:")
    for mode in modes:
        error, _ = compare(logits[mode], reference)
        _, agree = compare(logits[mode], logits["eager"])
        print(f"  {mode:>8}: error {100 * error:.3f} %, {100 * agree:.2f} % of eager's choices")
        assert error <= 2 * eager_error, f"{mode}'s logits are further from the reference than 2x eager's error"

    print(f"\n{'batch':>6} " + " ".join(f"{mode + ' ms/step':>18} {mode + ' tok/s':>16}" for mode in modes))
    for batch_size in args.batch_sizes:
        cells = []
        for mode in modes:
            seconds = time_steps(servers[mode], batch_size, args.timed_steps)
            cells.append(f"{seconds * 1e3:>18.3f} {batch_size / seconds:>16.0f}")
        print(f"{batch_size:>6} " + " ".join(cells))


if __name__ == "__main__":
    main()
