"""`engine: sim`: an emulator of vLLM's OpenAI server, for clusters of many instances in tests and benchmarks.

It is never the real thing and says so: every response carries `"system_fingerprint": "pdctl-sim"`, /metrics
opens with a `# pdctl-sim` line, and the log's first line names it. It emulates what pdctl relies on: the
OpenAI endpoints (plain and streamed, in vLLM's shapes), vLLM's metric names, a prefix cache,
--max-num-seqs admission with vLLM's priority order, --api-key (or VLLM_API_KEY) guarding /v1 as vLLM's
does, and the NixlConnector's two-hop flow, where the decode sim "reads the KV cache" of the prefill sim by
pulling it over HTTP (unguarded, as NIXL's side channel is).

Tokens are prompt bytes, as with the builtin model's byte-level tokenizer; output tokens are words derived
from a hash of the prompt. Compute is slept: per prompt token computed, then per output token; or, with
--hardware, as pdctl's engine model times each step of vLLM's scheduler (pdctl.perfmodel).

The parts, one job each: schemas (the OpenAI shapes), tokens, prefixcache, admission, metrics, kvstore (the
NIXL flow), scheduler (when tokens are ready), endpoints (whole and streamed answers), server, cli.
"""

from pdctl.engines.sim.admission import Admission
from pdctl.engines.sim.cli import main, parse_args
from pdctl.engines.sim.config import Role, SimConfig
from pdctl.engines.sim.metrics import Histogram, Metrics
from pdctl.engines.sim.prefixcache import PrefixCache
from pdctl.engines.sim.schemas import FINGERPRINT
from pdctl.engines.sim.server import SimEngine, serve
from pdctl.engines.sim.tokens import BLOCK_SIZE, block_hashes, output_words, prompt_digest

__all__ = [
    "BLOCK_SIZE",
    "FINGERPRINT",
    "Admission",
    "Histogram",
    "Metrics",
    "PrefixCache",
    "Role",
    "SimConfig",
    "SimEngine",
    "block_hashes",
    "main",
    "output_words",
    "parse_args",
    "prompt_digest",
    "serve",
]
