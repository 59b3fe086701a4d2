"""Fine-tune 4 LoRA adapters of different ranks at once, on 4 synthetic tasks, in shared batches.

A small frozen base network; every batch mixes sequences of all four tasks, each sequence
trained through its own adapter (one shrink and one expand per layer for the whole batch).
Prints each adapter's loss falling, saves each adapter as a PEFT adapter directory, and reloads
one with PEFT (if installed) to check that PEFT computes the same outputs.

    python examples/train_mixed_adapters.py [--steps 300] [--device cuda] [--out DIR]
"""

import argparse
import copy
import tempfile

import torch
from torch import nn

import lora_ops

DIM, HIDDEN, SEQ_LEN, SEQS_PER_TASK = 32, 64, 8, 4
TASKS = {"copy": 2, "rotate": 4, "mix": 8, "project": 16}  # adapter name -> rank


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj = nn.Linear(DIM, HIDDEN)
        self.down_proj = nn.Linear(HIDDEN, DIM)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x)))


def make_tasks(base: nn.Module, generator: torch.Generator, device):
    """Each task: the base's output plus a low-rank map of the input, of the adapter's rank."""
    tasks = {}
    for name, rank in TASKS.items():
        left = torch.randn(DIM, rank, generator=generator) / DIM**0.5
        right = torch.randn(rank, DIM, generator=generator) / rank**0.5
        tasks[name] = (left @ right).to(device)

    def targets(x, names):
        with torch.no_grad():
            shift = torch.stack([x[row] @ tasks[name] for row, name in enumerate(names)])
            return base(x) + shift

    return targets


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="where to save the adapters (default: a temporary directory)")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    base = TinyNet().to(args.device).requires_grad_(False)
    model = copy.deepcopy(base)
    pool = lora_ops.AdapterPool(max_adapters=len(TASKS), max_rank=max(TASKS.values()), trainable=True)
    lora_ops.patch_model(model, pool, target_modules=["up_proj", "down_proj"])
    for name, rank in TASKS.items():
        pool.new_adapter(name, r=rank, lora_alpha=2 * rank, generator=generator)
    optimizer = torch.optim.Adam(pool.parameters(), lr=3e-3)
    targets = make_tasks(base, generator, args.device)

    names = [name for name in TASKS for _ in range(SEQS_PER_TASK)]  # one shared batch of 16 sequences
    print(f"{'step':>5}  " + "  ".join(f"{f'{name} r={rank}':>14}" for name, rank in TASKS.items()))
    for step in range(args.steps + 1):
        order = torch.randperm(len(names), generator=generator).tolist()  # tasks interleaved
        batch_names = [names[i] for i in order]
        x = torch.randn(len(batch_names), SEQ_LEN, DIM, generator=generator).to(args.device)
        with pool.adapters(batch_names):
            out = model(x)
        per_sequence = ((out - targets(x, batch_names)) ** 2).mean(dim=(1, 2))
        optimizer.zero_grad()
        per_sequence.mean().backward()
        optimizer.step()
        if step % (args.steps // 6 or 1) == 0:
            losses = {name: per_sequence[[i for i, n in enumerate(batch_names) if n == name]].mean().item()
                      for name in TASKS}
            print(f"{step:>5}  " + "  ".join(f"{losses[name]:>14.5f}" for name in TASKS))

    out_dir = args.out or tempfile.mkdtemp(prefix="lora_ops_adapters_")
    for name in TASKS:
        pool.save(name, f"{out_dir}/{name}")
    print(f"saved {len(TASKS)} PEFT adapters under {out_dir}")
    check_with_peft(base, model, pool, f"{out_dir}/mix", "mix", args.device)


def check_with_peft(base, model, pool, path, name, device):
    try:
        from peft import PeftModel
    except ImportError:
        print("peft is not installed: skipped reloading an adapter with PEFT")
        return
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    x = torch.randn(2, SEQ_LEN, DIM, device=device)
    with torch.no_grad(), pool.adapters([name, name]):
        ours = model(x)
    with torch.no_grad():
        theirs = reloaded(x)
    error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    print(f"PEFT reloaded {path}: max relative difference {error:.2e}")
    assert error < 1e-4


if __name__ == "__main__":
    main()
