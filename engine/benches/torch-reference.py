#!/usr/bin/env python3
"""A reference for the CUDA bench (benches/cuda.rs): the same Qwen3-30B-A3B-shaped layers
written in PyTorch as a fast PyTorch stack would run them, timed on the same GPU beside the
same limits (device-to-device copy, bf16 GEMM on 8192^3), so the engine's figures can be read
against what cuBLAS, cuDNN/flash attention and CUTLASS's grouped GEMM (torch._grouped_mm)
reach on these shapes, not only against the physical limits.

- prefill of a 2k and an 8k prompt, and of four 2k prompts in one pass: embedding, 8 layers (RMSNorm, fused q/k/v, q/k norms, RoPE,
  causal GQA attention by scaled_dot_product_attention, o, router top-8 renormalized, the
  routing slots sorted by expert, gate/up and down as grouped GEMMs, weighted scatter-add),
  final norm, LM head on the last row, argmax; eager and replayed as a CUDA graph;
- the expert GEMMs of a 2k prompt alone, as the share of the copy rate their weight reads
  reach (the 2k pass's floor is reading every expert's weights);
- a decode step at batch 1 and 8 with 2k of KV, replayed as a CUDA graph (no launch gaps),
  eager and compiled by torch.compile (Inductor's fused elementwise kernels), against the
  same HBM floor the bench uses.

Random weights as the bench's checkpoint; times are medians of CUDA-event timings.
Usage (GPU machine, the image's python3 with torch >= 2.8): python3 torch-reference.py
"""

import statistics
import sys
import traceback

import torch
import torch.nn.functional as F

HIDDEN = 2048
EXPERTS = 128
TOP_K = 8
EXPERT_WIDTH = 768
HEADS = 32
KV_HEADS = 4
HEAD_DIM = 128
VOCAB = 151_936
LAYERS = 8
CONTEXT = 2048
EPS = 1e-6
BF16 = 2
EXPERT_PARAMS = 3 * HIDDEN * EXPERT_WIDTH
DEV = "cuda"


def timed_ms(fn, samples=10, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn, samples):
    """Median ms of fn replayed as one CUDA graph, or None (and why) where capture fails."""
    try:
        replay = graphed(fn)
    except Exception as error:  # a capture-unsafe op in this torch: the eager row stands
        print(f"(no CUDA graph: {type(error).__name__}: {str(error).splitlines()[0]})")
        return None
    return timed_ms(replay, samples=samples)


def graphed(fn):
    """fn replayed as one CUDA graph (its outputs are the graph's static tensors)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def limits():
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    copy_ms = timed_ms(lambda: dst.copy_(src), samples=20)
    copy = 2 * src.numel() / (copy_ms / 1e3)
    del src, dst
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    gemm_ms = timed_ms(lambda: a @ b)
    gemm = 2 * 8192**3 / (gemm_ms / 1e3)
    return copy, gemm


def weight(*shape):
    return (torch.randn(*shape, device=DEV, dtype=torch.bfloat16) * shape[-1] ** -0.5).contiguous()


class Layer:
    def __init__(self):
        self.attn_norm = torch.ones(HIDDEN, device=DEV, dtype=torch.bfloat16)
        self.qkv = weight((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN)
        self.q_norm = torch.ones(HEAD_DIM, device=DEV, dtype=torch.bfloat16)
        self.k_norm = torch.ones(HEAD_DIM, device=DEV, dtype=torch.bfloat16)
        self.o = weight(HIDDEN, HEADS * HEAD_DIM)
        self.moe_norm = torch.ones(HIDDEN, device=DEV, dtype=torch.bfloat16)
        self.router = weight(EXPERTS, HIDDEN)
        # [expert, out, in] as the checkpoint stores them; grouped_mm takes [expert, in, out].
        self.gate_up = weight(EXPERTS, 2 * EXPERT_WIDTH, HIDDEN).transpose(-2, -1)
        self.down = weight(EXPERTS, HIDDEN, EXPERT_WIDTH).transpose(-2, -1)


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_tables(positions):
    inv = 1.0 / (1_000_000 ** (torch.arange(0, HEAD_DIM, 2, device=DEV).float() / HEAD_DIM))
    angles = positions.float()[:, None] * inv[None, :]
    return angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)


def moe(layer, h):
    """Top-8 of 128 experts: slots sorted by expert, two grouped GEMMs, weighted sum."""
    probs = torch.softmax((h @ layer.router.T).float(), dim=-1)
    top_p, top_e = probs.topk(TOP_K, dim=-1)
    top_p = (top_p / top_p.sum(-1, keepdim=True)).to(h.dtype)
    flat_e = top_e.flatten()
    order = flat_e.argsort()
    counts = torch.zeros(EXPERTS, device=DEV, dtype=torch.int32)
    counts.scatter_add_(0, flat_e, torch.ones_like(flat_e, dtype=torch.int32))
    offsets = counts.cumsum(0, dtype=torch.int32)
    token = order // TOP_K
    gate_up = torch._grouped_mm(h[token], layer.gate_up, offs=offsets)
    act = F.silu(gate_up[:, :EXPERT_WIDTH]) * gate_up[:, EXPERT_WIDTH:]
    down = torch._grouped_mm(act, layer.down, offs=offsets)
    down = down * top_p.flatten()[order, None]
    return torch.zeros_like(h).index_add_(0, token, down)


def attention_block(layer, x, cos, sin, prompts, cache=None, position=None):
    """Prefill (cache None: x is `prompts` prompts of equal length, each causal) or decode
    (one row a sequence, cache [k, v])."""
    rows = x.shape[0]
    h = F.rms_norm(x, (HIDDEN,), layer.attn_norm, EPS)
    q, k, v = (h @ layer.qkv.T).split(
        [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1
    )
    q = F.rms_norm(q.view(rows, HEADS, HEAD_DIM), (HEAD_DIM,), layer.q_norm, EPS)
    k = F.rms_norm(k.view(rows, KV_HEADS, HEAD_DIM), (HEAD_DIM,), layer.k_norm, EPS)
    q, k = rope(q, cos[:, None], sin[:, None]), rope(k, cos[:, None], sin[:, None])
    v = v.view(rows, KV_HEADS, HEAD_DIM)
    if cache is None:
        by_prompt = lambda t: t.view(prompts, rows // prompts, -1, HEAD_DIM).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(
            by_prompt(q), by_prompt(k), by_prompt(v), is_causal=True, enable_gqa=True
        ).transpose(1, 2)
    else:
        keys, values = cache  # [rows, KV_HEADS, CONTEXT, HEAD_DIM]
        keys.index_copy_(2, position, k[:, :, None])
        values.index_copy_(2, position, v[:, :, None])
        out = F.scaled_dot_product_attention(
            q[:, :, None], keys, values, enable_gqa=True
        )[:, :, 0]
    return x + out.reshape(rows, HEADS * HEAD_DIM) @ layer.o.T


class Model:
    def __init__(self):
        self.embed = weight(VOCAB, HIDDEN)
        self.layers = [Layer() for _ in range(LAYERS)]
        self.norm = torch.ones(HIDDEN, device=DEV, dtype=torch.bfloat16)
        self.lm_head = weight(VOCAB, HIDDEN)

    def forward(self, tokens, cos, sin, prompts=1, caches=None, position=None):
        x = self.embed[tokens]
        for i, layer in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            x = attention_block(layer, x, cos, sin, prompts, cache, position)
            x = x + moe(layer, F.rms_norm(x, (HIDDEN,), layer.moe_norm, EPS))
        last = x if caches is not None else x.view(prompts, -1, HIDDEN)[:, -1]
        return (F.rms_norm(last, (HIDDEN,), self.norm, EPS) @ self.lm_head.T).argmax(-1)


def prefill_flops(prompts, length):
    """The bench's count: 2 per active parameter per token, each prompt's causal attention
    and its first token's LM head."""
    attention_params = HIDDEN * (HEADS + 2 * KV_HEADS) * HEAD_DIM + HEADS * HEAD_DIM * HIDDEN
    expert_params = TOP_K * EXPERT_PARAMS + HIDDEN * EXPERTS
    dense = 2.0 * length * (attention_params + expert_params) * LAYERS
    attention = 2.0 * length * length * HEADS * HEAD_DIM * LAYERS
    return prompts * (dense + attention + 2.0 * VOCAB * HIDDEN)


def decode_floor_bytes(batch, touched):
    dense = HIDDEN * (HEADS + 2 * KV_HEADS) * HEAD_DIM + HEADS * HEAD_DIM * HIDDEN + HIDDEN * EXPERTS
    kv = 2 * batch * CONTEXT * KV_HEADS * HEAD_DIM
    return (LAYERS * (touched * EXPERT_PARAMS + dense + kv) + VOCAB * HIDDEN) * BF16


def section(name, fn):
    try:
        fn()
    except Exception:  # one section's failure (an old torch, memory) leaves the others' rows
        print(f"{name}: failed")
        traceback.print_exc(file=sys.stdout)


def main():
    torch.manual_seed(7)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    copy, gemm = limits()
    print(f"device-to-device copy {copy / 1e9:.0f} GB/s (read + write); bf16 GEMM 8192^3 {gemm / 1e12:.0f} TFLOP/s")
    model = Model()

    def prefill():
        print("\nprefill (PyTorch)")
        print("| prompt | eager ms | of GEMM rate | CUDA graph ms | of GEMM rate |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for prompts, length in ((1, 2048), (1, 8192), (4, 2048)):
            tokens = torch.randint(0, VOCAB, (prompts * length,), device=DEV)
            cos, sin = rope_tables(torch.arange(length, device=DEV).repeat(prompts))
            share = lambda ms: f"{100 * prefill_flops(prompts, length) / (ms / 1e3) / gemm:.0f}%"  # noqa: E731
            run = lambda: model.forward(tokens, cos, sin, prompts)  # noqa: E731
            eager = timed_ms(run, samples=5)
            graph = graph_ms(run, samples=5)
            cells = [f"{eager:.2f}", share(eager)]
            cells += ["-", "-"] if graph is None else [f"{graph:.2f}", share(graph)]
            name = str(length) if prompts == 1 else f"{prompts} × {length}"
            print(f"| {name} | {' | '.join(cells)} |")

    def expert_gemms():
        print("\n2k prompt's expert GEMMs alone (one layer, torch._grouped_mm)")
        print("| GEMM | µs | weight GB/s | of copy rate |")
        print("| --- | ---: | ---: | ---: |")
        layer = model.layers[0]
        h = torch.randn(2048, HIDDEN, device=DEV, dtype=torch.bfloat16)
        slots = torch.randint(0, EXPERTS, (2048 * TOP_K,), device=DEV).sort().values
        counts = torch.bincount(slots, minlength=EXPERTS).to(torch.int32)
        offsets = counts.cumsum(0, dtype=torch.int32)
        touched = int((counts > 0).sum())
        a = h.repeat_interleave(TOP_K, dim=0)
        act = torch.randn(a.shape[0], EXPERT_WIDTH, device=DEV, dtype=torch.bfloat16)
        for name, lhs, rhs, width in (
            ("gate/up", a, layer.gate_up, 2 * EXPERT_WIDTH * HIDDEN),
            ("down", act, layer.down, EXPERT_WIDTH * HIDDEN),
        ):
            us = 1e3 * timed_ms(lambda: torch._grouped_mm(lhs, rhs, offs=offsets), samples=20)
            rate = touched * width * BF16 / (us / 1e6)
            print(f"| {name} | {us:.0f} | {rate / 1e9:.0f} | {100 * rate / copy:.0f}% |")

    def decode():
        print("\ndecode step, 2k context (PyTorch)")
        print("| batch | eager ms | CUDA graph ms | of HBM floor | torch.compile + CUDA graph ms | of HBM floor |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        # Inductor fuses the norms, RoPE and SiLU-mul, as gpt-fast-style servers run decode.
        compiled = torch.compile(model.forward, dynamic=False)
        for batch in (1, 8):
            caches = [
                [torch.randn(batch, KV_HEADS, CONTEXT, HEAD_DIM, device=DEV, dtype=torch.bfloat16) for _ in range(2)]
                for _ in range(LAYERS)
            ]
            tokens = torch.randint(0, VOCAB, (batch,), device=DEV)
            position = torch.tensor([CONTEXT - 1], device=DEV)
            cos, sin = rope_tables(position.expand(batch))
            step = lambda: model.forward(tokens, cos, sin, 1, caches, position)  # noqa: E731
            eager = timed_ms(step, samples=32)
            graph = graph_ms(step, samples=32)
            fused = graph_ms(lambda: compiled(tokens, cos, sin, 1, caches, position), samples=32)  # noqa: B023
            # Distinct experts of independently routed tokens, as the bench's floor counts.
            touched = EXPERTS * (1 - (1 - TOP_K / EXPERTS) ** batch)
            floor = decode_floor_bytes(batch, touched) / copy * 1e3
            cells = [f"{eager:.3f}"]
            for ms in (graph, fused):
                cells += ["-", "-"] if ms is None else [f"{ms:.3f}", f"{100 * floor / ms:.0f}%"]
            print(f"| {batch} | {' | '.join(cells)} |")
            del caches

    section("prefill", prefill)
    section("expert GEMMs", expert_gemms)
    section("decode", decode)


if __name__ == "__main__":
    main()
