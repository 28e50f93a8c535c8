"""How long one engine step takes, from the shape of its batch.

Per decoder layer of one tensor-parallel shard: the four linear layers (each the larger of FLOPs over the
achieved FLOP/s and bytes over the achieved bandwidth at this token count), attention (prefill from its FLOPs,
decode from the KV bytes it reads), the elementwise rest, and two all-reduces when tp > 1. Then the LM head on
the sequences that sample, pipeline hand-offs between stages, and the engine's own per-step overhead."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdctl.perfmodel.arch import ModelArch
from pdctl.perfmodel.hardware import HardwareProfile

QUERY_TILE = 128


@dataclass(slots=True)
class BatchShape:
    """One step's work, accumulated request by request as the scheduler builds the batch."""

    tokens: int = 0  # new tokens computed this step
    seqs: int = 0  # sequences in the step (each samples at most one token)
    decode_seqs: int = 0
    decode_context: int = 0  # tokens of KV cache the decode sequences attend over, summed
    prefill_attn_work: float = 0.0  # sum of c x (p + c / 2) over prefill chunks of c tokens after p
    prefill_tiles: int = 0  # 128-token query tiles of the prefill chunks

    def add(self, new_tokens: int, computed_before: int) -> None:
        self.tokens += new_tokens
        self.seqs += 1
        if new_tokens == 1 and computed_before > 0:
            self.decode_seqs += 1
            self.decode_context += computed_before + 1
            return
        self.prefill_attn_work += new_tokens * (computed_before + new_tokens / 2)
        self.prefill_tiles += math.ceil(new_tokens / QUERY_TILE)


class StepModel:
    """Step time for one model on one hardware profile at a tensor- and pipeline-parallel size."""

    def __init__(self, arch: ModelArch, hardware: HardwareProfile, tp: int = 1, pp: int = 1):
        self.arch, self.hw, self.tp, self.pp = arch, hardware, tp, pp
        self.shapes = list(arch.shard(tp).values())
        self.hq = arch.num_attention_heads // tp
        self.hkv = arch.kv_heads_per_gpu(tp)
        qkv_n, gu_n = arch.shard(tp)["qkv"][1], arch.shard(tp)["gate_up"][1]
        # Bytes per token that the elementwise kernels move (reads and writes): the same count calibrate fits by.
        self.elementwise_bytes_per_token = elementwise_bytes_per_token(arch.hidden_size, qkv_n, gu_n, arch.dtype_bytes)
        self._gemm_cache: dict[int, float] = {}

    def linear_seconds(self, m: int) -> float:
        """The four linear layers of one layer shard at m tokens (cached: m repeats step after step)."""
        cached = self._gemm_cache.get(m)
        if cached is None:
            gemm, dtype = self.hw.gemm, self.arch.dtype_bytes
            cached = sum(gemm.seconds(m, k, n, dtype) for k, n in self.shapes)
            if len(self._gemm_cache) < 65536:
                self._gemm_cache[m] = cached
        return cached

    def attention_seconds(self, shape: BatchShape) -> float:
        att, arch = self.hw.attention, self.arch
        kv_bytes = shape.decode_context * self.hkv * arch.head_dim * 2 * arch.dtype_bytes
        decode = att.decode.seconds(kv_bytes, shape.decode_seqs * self.hkv)
        flops = 4.0 * self.hq * arch.head_dim * shape.prefill_attn_work
        prefill = att.prefill.seconds(flops, shape.prefill_tiles * self.hq)
        return decode + prefill

    def layer_seconds(self, shape: BatchShape) -> float:
        """One decoder layer of one shard, without communication: what the GPU fidelity check times."""
        m = shape.tokens
        elementwise = self.hw.elementwise
        elem = elementwise.fixed_s + m * self.elementwise_bytes_per_token / elementwise.bytes_per_s
        return self.linear_seconds(m) + self.attention_seconds(shape) + elem

    def allreduce_seconds(self, m: int) -> float:
        if self.tp == 1:
            return 0.0
        link = self.hw.allreduce
        nbytes = m * self.arch.hidden_size * self.arch.dtype_bytes
        return link.latency_s + 2 * (self.tp - 1) / self.tp * nbytes / link.bytes_per_s

    def step_seconds(self, shape: BatchShape) -> float:
        if shape.tokens == 0:
            return 0.0
        arch, hw = self.arch, self.hw
        per_layer = self.layer_seconds(shape) + 2 * self.allreduce_seconds(shape.tokens)
        lm_head = hw.gemm.seconds(shape.seqs, arch.hidden_size, arch.vocab_size // self.tp, arch.dtype_bytes)
        handoffs = 0.0
        if self.pp > 1:
            nbytes = shape.tokens * arch.hidden_size * arch.dtype_bytes
            handoffs = (self.pp - 1) * (hw.pipeline.latency_s + nbytes / hw.pipeline.bytes_per_s)
        overhead = hw.overhead
        engine = overhead.per_step_s + overhead.per_seq_s * shape.seqs + overhead.per_token_s * shape.tokens
        if shape.seqs > shape.decode_seqs:
            engine += overhead.per_mixed_decode_s * shape.decode_seqs
        return arch.num_hidden_layers * per_layer + lm_head + handoffs + engine

    def kv_transfer_seconds(self, tokens: int) -> float:
        """Moving a prompt's KV cache from a prefill instance to a decode instance."""
        link = self.hw.kv_transfer
        return link.latency_s + tokens * self.arch.kv_bytes_per_token() / link.bytes_per_s

    def kv_cache_tokens(self, gpu_memory_utilization: float = 0.9) -> int:
        """Tokens of KV cache per instance: what is left of the memory fraction after weights and activations,
        as vLLM sizes its cache (per GPU; every GPU of the instance holds its share of every token)."""
        hw, arch = self.hw, self.arch
        free = hw.memory_bytes * gpu_memory_utilization - arch.weight_bytes_per_gpu(self.tp, self.pp)
        free -= hw.activation_reserve_bytes
        return max(0, int(free // arch.kv_bytes_per_token_per_gpu(self.tp, self.pp)))


def elementwise_bytes_per_token(hidden: int, qkv_n: int, gate_up_n: int, dtype_bytes: int) -> float:
    """Two RMSNorms and two residual adds (read and write the hidden state: 8 x hidden), RoPE on q and k
    (2 x qkv), SiLU-and-mul (reads gate and up, writes half: 1.5 x gate_up)."""
    return dtype_bytes * (8 * hidden + 2 * qkv_n + 1.5 * gate_up_n)
