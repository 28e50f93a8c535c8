"""Measure a GPU for pdctl's engine performance model: the figures a hardware profile is made of.

`pdctl calibrate` runs this file on a GPU host with a Python that has PyTorch (its own, or the engine
runtime's). It needs PyTorch only (no pdctl, no vLLM), so it also runs alone, copied to the machine to profile:

    python3 measure_gpu.py --models models.json --out raw.json   # models.json: pdctl/perfmodel/data/models.json

It times, in bf16 and with CUDA graphs (so launch overhead is not counted, as vLLM's decode graphs do not):
- memory bandwidth (a device-to-device copy),
- the linear layers of every shipped model at tensor-parallel sizes 1, 2, 4, 8 (the shard's GEMM) over token
  counts 1 to 16384, each replay cycling through enough weight copies that no weight stays in L2,
- attention: decode (batch x context) and prefill (chunk) kernels through scaled_dot_product_attention,
- the elementwise rest of a decoder layer (RMSNorm, RoPE, SiLU-and-mul, residual adds) over token counts,
- whole decoder layers (the GPU fidelity check: `pdctl.perfmodel.calibrate` predicts them from the above),
- with two or more GPUs, NCCL all-reduce over message sizes and a peer-to-peer copy.

`python -m pdctl.perfmodel.calibrate raw.json` turns the output into a hardware profile data file. `--quick`
times fewer token counts, attention shapes and layers (the fit interpolates between them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
QUICK_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
TPS = (1, 2, 4, 8)
# Weights cycled per replay add up to at least this, so the L2 cache (50 MB on an H100) holds none of them.
COLD_BYTES = 256 * 2**20
DTYPE = torch.bfloat16


def timed(fn: Callable[[], Any], reps: int, device: str) -> float:
    """Seconds per call of fn, from one CUDA graph of `reps` calls (plain wall time on the CPU)."""
    if device == "cpu":
        fn()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, begin.elapsed_time(end) / 1000 / reps)
    del graph
    return best


def copies(nbytes_each: int, device: str) -> int:
    return 1 if device == "cpu" else max(1, min(32, -(-COLD_BYTES // max(1, nbytes_each))))


def shard_shapes(model: dict[str, Any], tp: int) -> dict[str, tuple[int, int]]:
    """(K, N) of each linear layer of one tensor-parallel shard, as vLLM splits them."""
    d, hd = model["hidden_size"], model["head_dim"]
    heads, kv = model["num_attention_heads"] // tp, max(1, model["num_key_value_heads"] // tp)
    ff = model["intermediate_size"] // tp
    return {
        "qkv": (d, (heads + 2 * kv) * hd),
        "o": (heads * hd, d),
        "gate_up": (d, 2 * ff),
        "down": (ff, d),
        "lm_head": (d, model["vocab_size"] // tp),
    }


def measure_bandwidth(device: str) -> dict[str, float]:
    n = 2**30 if device != "cpu" else 2**24
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), 10, device)
    return {"copy_bytes": n, "seconds": seconds, "read_write_bytes_per_s": 2 * n / seconds}


def measure_gemms(models: dict[str, Any], device: str, small: bool, quick: bool) -> list[dict[str, Any]]:
    shapes: set[tuple[int, int]] = set()
    for model in models.values():
        for tp in TPS:
            shapes.update(shard_shapes(model, tp).values())
    tokens = QUICK_TOKENS if quick else TOKENS
    if small:
        shapes, tokens = {min(shapes, key=lambda s: s[0] * s[1])}, (1, 16, 64)
    rows = []
    for k, n in sorted(shapes):
        weights = [torch.randn(k, n, dtype=DTYPE, device=device) for _ in range(copies(k * n * 2, device))]
        for m in tokens:
            x = torch.randn(m, k, dtype=DTYPE, device=device)
            out = torch.empty(m, n, dtype=DTYPE, device=device)
            reps = max(len(weights), 8 if m <= 4096 else 3)
            counter = iter(range(10**9))

            def step(x=x, out=out, weights=weights, counter=counter) -> None:
                torch.matmul(x, weights[next(counter) % len(weights)], out=out)

            rows.append({"m": m, "k": k, "n": n, "seconds": timed(step, reps, device)})
            del x, out
        del weights
        if device != "cpu":
            torch.cuda.empty_cache()
    return rows


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, hd] against a KV cache k, v [B, Hkv, ctx, hd]: each KV head's query group is one short
    non-causal query block, so the cache is read once per KV head, as FlashDecoding does."""
    b, hq, hd = q.shape
    hkv = k.shape[1]
    grouped = q.view(b, hkv, hq // hkv, hd)
    return F.scaled_dot_product_attention(grouped, k, v).view(b, hq, hd)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [1, Hq, c, hd], k, v [1, Hkv, c, hd], causal."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def measure_attention(device: str, small: bool, quick: bool) -> dict[str, list[dict[str, Any]]]:
    hd = 128
    decode, prefill = [], []
    head_pairs = ((64, 8), (16, 2), (8, 1)) if not small else ((8, 1),)
    batches = (1, 4) if small else (1, 32, 256) if quick else (1, 8, 32, 128, 256)
    contexts = (64,) if small else (512, 8192) if quick else (128, 512, 2048, 8192)
    for hq, hkv in head_pairs:
        for batch in batches:
            for ctx in contexts:
                if batch * ctx * hkv * hd * 4 > 16 * 2**30:
                    continue
                q = torch.randn(batch, hq, hd, dtype=DTYPE, device=device)
                k = torch.randn(batch, hkv, ctx, hd, dtype=DTYPE, device=device)
                v = torch.randn_like(k)
                seconds = timed(lambda q=q, k=k, v=v: decode_attention(q, k, v), 10, device)
                decode.append({"hq": hq, "hkv": hkv, "hd": hd, "batch": batch, "ctx": ctx, "seconds": seconds})
        for chunk in (128, 512, 2048, 8192) if not small else (64,):
            q = torch.randn(1, hq, chunk, hd, dtype=DTYPE, device=device)
            k = torch.randn(1, hkv, chunk, hd, dtype=DTYPE, device=device)
            v = torch.randn_like(k)
            seconds = timed(lambda q=q, k=k, v=v: prefill_attention(q, k, v), 10, device)
            prefill.append({"hq": hq, "hkv": hkv, "hd": hd, "chunk": chunk, "seconds": seconds})
    return {"decode": decode, "prefill": prefill}


class Layer:
    """One tensor-parallel shard of a Llama decoder layer, with its own weights and KV cache."""

    def __init__(self, model: dict[str, Any], tp: int, batch: int, ctx: int, device: str):
        shapes = shard_shapes(model, tp)
        self.hd = model["head_dim"]
        self.hq = model["num_attention_heads"] // tp
        self.hkv = max(1, model["num_key_value_heads"] // tp)
        self.w = {
            name: torch.randn(*shapes[name], dtype=DTYPE, device=device) * 0.02 for name in shapes if name != "lm_head"
        }
        self.norm = torch.ones(model["hidden_size"], dtype=DTYPE, device=device)
        self.cache = None
        if batch and ctx:
            self.cache = torch.randn(2, batch, self.hkv, ctx, self.hd, dtype=DTYPE, device=device)

    def __call__(self, x: torch.Tensor, rope: torch.Tensor, prefill_tokens: int, batch: int) -> torch.Tensor:
        hq, hkv, hd = self.hq, self.hkv, self.hd
        h = F.rms_norm(x, self.norm.shape, self.norm)
        qkv = h @ self.w["qkv"]
        q = qkv[:, : hq * hd] * rope[:, : hq * hd]
        k = qkv[:, hq * hd : (hq + hkv) * hd] * rope[:, : hkv * hd]
        outs = []
        if prefill_tokens:
            c = prefill_tokens
            qp = q[:c].view(c, hq, hd).transpose(0, 1).unsqueeze(0)
            kp = k[:c].view(c, hkv, hd).transpose(0, 1).unsqueeze(0)
            vp = qkv[:c, (hq + hkv) * hd :].reshape(c, hkv, hd).transpose(0, 1).unsqueeze(0)
            outs.append(prefill_attention(qp, kp, vp).squeeze(0).transpose(0, 1).reshape(c, -1))
        if batch and self.cache is not None:
            qd = q[prefill_tokens:].reshape(batch, hq, hd)
            outs.append(decode_attention(qd, self.cache[0], self.cache[1]).reshape(batch, -1))
        attn = torch.cat(outs) if len(outs) > 1 else outs[0]
        x = x + attn @ self.w["o"]
        h = F.rms_norm(x, self.norm.shape, self.norm)
        g, u = (h @ self.w["gate_up"]).chunk(2, dim=1)
        return x + (F.silu(g) * u) @ self.w["down"]


def elementwise(
    x: torch.Tensor, qkv: torch.Tensor, rope: torch.Tensor, gu: torch.Tensor, norm: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The non-GEMM, non-attention work of one layer on the same tensor sizes: two RMSNorms, RoPE on q and k,
    SiLU-and-mul, two residual adds."""
    h = F.rms_norm(x, norm.shape, norm)
    q = qkv * rope
    g, u = gu.chunk(2, dim=1)
    a = F.silu(g) * u
    y = x + h
    return F.rms_norm(y, norm.shape, norm) + x, q, a


LAYER_CASES = (
    # (model, tp): which shards are timed whole
    ("llama-3.1-8b", 1),
    ("llama-3.1-8b", 2),
    ("llama-2-70b", 4),
    ("llama-2-70b", 8),
)
SHAPES = (
    # (prefill tokens, decode batch, decode context)
    (512, 0, 0), (2048, 0, 0), (8192, 0, 0),
    (0, 1, 512), (0, 16, 512), (0, 64, 2048), (0, 256, 512), (0, 256, 2048), (0, 32, 8192),
    (256, 64, 2048), (1024, 128, 1024),
)  # fmt: skip


def measure_layers(models: dict[str, Any], device: str, small: bool, quick: bool) -> list[dict[str, Any]]:
    rows = []
    smallest = min(models, key=lambda name: models[name]["hidden_size"])  # --small: its TP 8 shard
    cases = ((smallest, 8),) if small else LAYER_CASES[::3] if quick else LAYER_CASES
    shapes = SHAPES if not small else ((32, 0, 0), (0, 4, 64), (16, 2, 64))
    for name, tp in cases:
        model = models[name]
        for prefill, batch, ctx in shapes:
            m = prefill + batch
            layer_bytes = sum(k * n * 2 for k, n in list(shard_shapes(model, tp).values())[:4])
            cache_bytes = 2 * batch * max(1, model["num_key_value_heads"] // tp) * ctx * model["head_dim"] * 2
            n_layers = copies(layer_bytes + cache_bytes, device) if device != "cpu" else 1
            n_layers = min(n_layers, 8, max(1, int(20 * 2**30 // max(1, layer_bytes + cache_bytes))))
            layers = [Layer(model, tp, batch, ctx, device) for _ in range(n_layers)]
            x = torch.randn(m, model["hidden_size"], dtype=DTYPE, device=device)
            rope = torch.randn(m, model["num_attention_heads"] * model["head_dim"], dtype=DTYPE, device=device)
            row: dict[str, Any] = {"model": name, "tp": tp, "prefill_tokens": prefill, "batch": batch, "ctx": ctx}

            def forward(x=x, rope=rope, layers=layers, prefill=prefill, batch=batch) -> None:
                y = x
                for layer in layers:
                    y = layer(y, rope, prefill, batch)

            row["seconds"] = timed(forward, 3, device) / len(layers)
            qkv_n, gu_n = layers[0].w["qkv"].shape[1], layers[0].w["gate_up"].shape[1]
            qkv = torch.randn(m, qkv_n, dtype=DTYPE, device=device)
            gu = torch.randn(m, gu_n, dtype=DTYPE, device=device)
            rope_q = rope[:, :qkv_n] if rope.shape[1] >= qkv_n else torch.randn(m, qkv_n, dtype=DTYPE, device=device)
            norm = layers[0].norm
            row["elementwise_seconds"] = timed(
                lambda x=x, qkv=qkv, rope_q=rope_q, gu=gu, norm=norm: elementwise(x, qkv, rope_q, gu, norm), 3, device
            )
            rows.append(row)
            del layers, x, rope, qkv, gu
            if device != "cpu":
                torch.cuda.empty_cache()
    return rows


def _allreduce_worker(rank: int, world: int, out_path: str) -> None:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(29500 + world)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    rows = []
    for size in (2**13, 2**15, 2**17, 2**19, 2**21, 2**23, 2**25, 2**27):
        t = torch.ones(size // 2, dtype=DTYPE, device="cuda")
        for _ in range(5):
            dist.all_reduce(t)
        torch.cuda.synchronize()
        dist.barrier()
        reps = 20
        start = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(t)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / reps
        rows.append({"bytes": size, "seconds": seconds, "bus_bytes_per_s": 2 * (world - 1) / world * size / seconds})
    if rank == 0:
        peer = {}
        src = torch.ones(2**28, dtype=torch.uint8, device="cuda:0")
        dst = torch.empty_like(src, device="cuda:1")
        dst.copy_(src)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            dst.copy_(src)
        torch.cuda.synchronize()
        peer = {"bytes": 2**28, "seconds": (time.perf_counter() - start) / 10}
        Path(out_path).write_text(json.dumps({"world": world, "allreduce": rows, "p2p": peer}))
    dist.destroy_process_group()


def measure_collectives(out_dir: Path) -> dict[str, Any] | None:
    """All-reduce at every power-of-two world size the machine has (2, 4, 8), and a peer-to-peer copy."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return None
    import torch.multiprocessing as mp

    by_world = {}
    for world in (w for w in (2, 4, 8) if w <= count):
        path = out_dir / f"collectives-{world}.tmp.json"
        mp.spawn(_allreduce_worker, args=(world, str(path)), nprocs=world, join=True)
        by_world[world] = json.loads(path.read_text())
        path.unlink()
    largest = by_world[max(by_world)]
    return largest | {"by_world": by_world}


def device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "host": platform.node(), "device": device,
                            "cpu": cpu_model(), "cores": os.cpu_count()}  # fmt: skip
    if device != "cpu":
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, sms=props.multi_processor_count, memory_bytes=props.total_memory,
                    gpus=torch.cuda.device_count(), cuda=torch.version.cuda, driver=driver_version())  # fmt: skip
    return info


def cpu_model() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def driver_version() -> str | None:
    """The NVIDIA driver's version (torch does not say it); None where nvidia-smi is not there."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.splitlines()[0].strip() if done.stdout.strip() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--small", action="store_true", help="tiny shapes, to check the script on a CPU")
    parser.add_argument("--quick", action="store_true", help="fewer token counts, attention shapes and layers")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: gemm,attention,layers,nccl")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = {k: v for k, v in json.loads(args.models.read_text()).items() if not k.startswith("_")}
    skip = set(filter(None, args.skip.split(",")))
    result: dict[str, Any] = {
        "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "script": "pdctl/perfmodel/measure_gpu.py" + (" --quick" if args.quick else ""),
        "info": device_info(device),
    }
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("bandwidth", lambda: measure_bandwidth(device)),
        ("gemm", lambda: measure_gemms(models, device, args.small, args.quick)),
        ("attention", lambda: measure_attention(device, args.small, args.quick)),
        ("layers", lambda: measure_layers(models, device, args.small, args.quick)),
        ("nccl", lambda: measure_collectives(args.out.parent)),
    ]
    for name, step in steps:
        if name in skip:
            continue
        started = time.perf_counter()
        result[name] = step()
        print(f"{name}: {time.perf_counter() - started:.1f} s", flush=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
