"""Model architectures as data: the figures of a `config.json` that decide compute, weight bytes and KV bytes.

The public models are written by hand from their published config.json (data/models.json); pdctl's own
builtin model is defined here, and `pdctl/engines/tinymodel.py` writes its config.json from this definition,
so the two never disagree."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

DATA = Path(__file__).parent / "data"
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1}

# pdctl's builtin model: a two-layer Llama over byte tokens.
TINY_MODEL_NAME = "pdctl-tiny-llama"
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (UNK, BOS, EOS)
# 256 byte symbols after the three special tokens.
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256
MAX_POSITIONS = 4096


def tiny_model_config() -> dict[str, Any]:
    """The builtin model's config.json."""
    # float32 runs on every CPU; bfloat16 without AVX-512 BF16 falls back to slow torch matmuls. vLLM's
    # `--dtype auto` still downcasts float32 to bfloat16 on the CPU, so the engine needs `--dtype float32` too.
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "hidden_act": "silu",
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": SPECIAL_TOKENS.index(BOS),
        "eos_token_id": SPECIAL_TOKENS.index(EOS),
        "torch_dtype": "float32",
    }


class ModelArch(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    hf_name: str | None = None
    num_hidden_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    torch_dtype: str = "bfloat16"

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.torch_dtype]

    def shard(self, tp: int) -> dict[str, tuple[int, int]]:
        """(K, N) of each linear layer of one tensor-parallel shard, split as vLLM splits them (KV heads
        replicated when there are fewer than tp)."""
        d, hd = self.hidden_size, self.head_dim
        heads, kv = self.num_attention_heads // tp, max(1, self.num_key_value_heads // tp)
        ff = self.intermediate_size // tp
        return {"qkv": (d, (heads + 2 * kv) * hd), "o": (heads * hd, d), "gate_up": (d, 2 * ff), "down": (ff, d)}

    def kv_heads_per_gpu(self, tp: int) -> int:
        return max(1, self.num_key_value_heads // tp)

    @property
    def layer_params(self) -> int:
        return sum(k * n for k, n in self.shard(1).values())

    @property
    def params(self) -> int:
        """Weights: decoder layers (the full SwiGLU MLP: gate, up and down) plus embedding and LM head."""
        return self.num_hidden_layers * self.layer_params + 2 * self.vocab_size * self.hidden_size

    def weight_bytes_per_gpu(self, tp: int, pp: int = 1) -> float:
        layers = self.num_hidden_layers * sum(k * n for k, n in self.shard(tp).values()) / pp
        return (layers + 2 * self.vocab_size * self.hidden_size / tp) * self.dtype_bytes

    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers: layers x KV heads x head dim x 2 x dtype bytes."""
        return self.num_hidden_layers * self.num_key_value_heads * self.head_dim * 2 * self.dtype_bytes

    def kv_bytes_per_token_per_gpu(self, tp: int, pp: int = 1) -> float:
        return self.num_hidden_layers / pp * self.kv_heads_per_gpu(tp) * self.head_dim * 2 * self.dtype_bytes


class UnknownModel(KeyError):
    pass


@cache
def models() -> dict[str, ModelArch]:
    raw = json.loads((DATA / "models.json").read_text())
    known = {name: ModelArch(name=name, **spec) for name, spec in raw.items() if not name.startswith("_")}
    tiny = ModelArch(name=TINY_MODEL_NAME, **tiny_model_config())
    # Profiles name it by its path, builtin:tiny-llama.
    known[TINY_MODEL_NAME] = known["tiny-llama"] = tiny
    return known


def get_model(name: str) -> ModelArch:
    found = models().get(name) or models().get(name.removeprefix("builtin:"))
    if found is None:  # a hub id or a local directory named after one
        tail = name.rstrip("/").lower()
        found = next((m for m in models().values() if m.hf_name and tail.endswith(m.hf_name.lower())), None)
    if found is None:
        raise UnknownModel(f"unknown model architecture {name!r}; known: {', '.join(sorted(models()))}")
    return found
