"""torch.compile(fullgraph=True, dynamic=True) of a module calling all five ops."""

import expecttest
import pytest
import torch

import lora_ops
from conftest import DEVICE, Dims, Scenario, fresh_generator, make_batch

DIMS = Dims()


class TinyLoRAModel(torch.nn.Module):
    """Embedding LoRA, then qkv and gate-up LoRA projections over one batch's metadata."""

    def __init__(self, num_slots: int, dtype=torch.float32):
        super().__init__()
        gen, _ = fresh_generator()
        d, r = DIMS, DIMS.max_rank

        def param(*shape):
            return torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=dtype) / shape[-1] ** 0.5, requires_grad=False)

        self.embedding_a = param(num_slots, r, d.vocab)
        self.embedding_b = param(d.in_features, r)
        self.qkv_a = param(num_slots, 3 * r, d.in_features)
        self.qkv_b = param(num_slots, d.q_size + 2 * d.kv_size, r)
        self.gate_up_a = param(num_slots, 2 * r, d.in_features)
        self.gate_up_b = param(num_slots, 2 * d.intermediate, r)
        self.expand_b = param(num_slots, d.in_features, r)

    def forward(self, token_ids, x, batch, backend):
        hidden = x + lora_ops.embedding_a(token_ids, self.embedding_a, batch, backend=backend) @ self.embedding_b.T
        qkv = hidden.new_zeros(hidden.shape[0], DIMS.q_size + 2 * DIMS.kv_size)
        lora_ops.qkv_expand(lora_ops.sgmv_shrink(hidden, self.qkv_a, batch, 3, backend=backend),
                            self.qkv_b, batch, qkv, DIMS.q_size, DIMS.kv_size, backend=backend)
        gate_up = hidden.new_zeros(hidden.shape[0], 2 * DIMS.intermediate)
        lora_ops.gate_up_expand(lora_ops.sgmv_shrink(hidden, self.gate_up_a, batch, 2, backend=backend),
                                self.gate_up_b, batch, gate_up, backend=backend)
        out = hidden.clone()
        y = lora_ops.sgmv_shrink(hidden, self.qkv_a[:, :DIMS.max_rank].contiguous(), batch, 1, backend=backend)
        lora_ops.sgmv_expand(y, self.expand_b, batch, out, [0, DIMS.in_features], backend=backend)
        return qkv.sum(1, keepdim=True) + gate_up.sum(1, keepdim=True) + out


def _inputs(seq_lens, adapters):
    gen, _ = fresh_generator()
    batch = make_batch(Scenario("compile", seq_lens, adapters, (8, 4, 0)))
    s = batch.num_tokens
    return (torch.randint(0, DIMS.vocab, (s,), generator=gen).to(DEVICE),
            torch.randn(s, DIMS.in_features, generator=gen).to(DEVICE), batch)


class _GraphRecorder:
    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm


@pytest.mark.parametrize("backend", ["torch_native", "triton"])
def test_compiles_without_graph_breaks_and_matches_eager(backend):
    model = TinyLoRAModel(num_slots=3).to(DEVICE)
    token_ids, x, batch = _inputs((3, 5, 2), (0, 1, -1))
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    expected = model(token_ids, x, batch, backend)
    torch.testing.assert_close(compiled(token_ids, x, batch, backend), expected)


class TestGraph(expecttest.TestCase):
    def test_each_op_is_one_node_and_token_count_changes_do_not_recompile(self):
        torch._dynamo.reset()
        model = TinyLoRAModel(num_slots=3).to(DEVICE)
        recorder = _GraphRecorder()
        compiled = torch.compile(model, backend=recorder, fullgraph=True, dynamic=True)
        for seq_lens in [(3, 5, 2), (4, 1, 6), (7, 2, 2), (1, 1, 1)]:
            token_ids, x, batch = _inputs(seq_lens, (0, 1, -1))
            torch.testing.assert_close(compiled(token_ids, x, batch, "torch_native"),
                                       model(token_ids, x, batch, "torch_native"))
        self.assertLessEqual(len(recorder.graphs), 2, "recompiled more than once")
        lora_nodes = [
            str(node.target) for node in recorder.graphs[-1].graph.nodes
            if node.op == "call_function" and str(node.target).startswith("lora.")
        ]
        self.assertExpectedInline("\n".join(lora_nodes), """\
lora.embedding_a
lora.sgmv_shrink
lora.qkv_expand
lora.sgmv_shrink
lora.gate_up_expand
lora.sgmv_shrink
lora.sgmv_expand""")
