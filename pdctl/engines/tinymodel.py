"""The builtin model of the local profile: a two-layer Llama with random weights that pdctl writes itself.

Only the config and the tokenizer are written; vLLM serves it with `--load-format dummy`, which fills the
weights at random, so nothing is downloaded. Random weights give noise for text, but with a fixed seed and
temperature 0 the same prompt gives the same tokens, which is what the PD-versus-one-instance checks need.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from pdctl.engines.runtime import RuntimeInstallError, default_runtime_dir, missing_message, runtime_python
from pdctl.errors import EngineRuntimeMissing
from pdctl.perfmodel.arch import (
    BOS,
    EOS,
    MAX_POSITIONS,
    SPECIAL_TOKENS,
    TINY_MODEL_NAME,
    UNK,
    VOCAB_SIZE,
    tiny_model_config,
)

# Bump when any written file changes, so an older model directory is rewritten rather than served stale.
MODEL_VERSION = 1
MARKER = "pdctl-model.json"

TOKENIZER_BUILD_TIMEOUT_S = 120

# Role-prefixed turns: enough structure for /v1/chat/completions; the model's output is noise anyway.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

# Runs in the engine runtime's python: `tokenizers` is a dependency of vLLM, never of pdctl.
# A byte-level BPE with the 256 byte symbols and no merges encodes any text, one token per byte.
_TOKENIZER_SCRIPT = """
import json, sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

out, specials = sys.argv[1], json.loads(sys.argv[2])

def byte_symbols():
    # GPT-2's byte-to-unicode table, the one ByteLevel uses, so that token id = 3 + byte value.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [table[b] for b in range(256)]

symbols = byte_symbols()
assert set(symbols) == set(pre_tokenizers.ByteLevel.alphabet())
vocab = {tok: i for i, tok in enumerate(specials)}
vocab.update({symbol: len(specials) + b for b, symbol in enumerate(symbols)})
unk, bos, eos = specials
tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
tok.decoder = decoders.ByteLevel()
tok.add_special_tokens(list(specials))
tok.post_processor = processors.TemplateProcessing(
    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
)
tok.save(out)
print(tok.get_vocab_size())
"""


def printable_token_ids() -> list[int]:
    """The tokens of printable ASCII (bytes 32 to 126). Random weights otherwise emit bytes that open UTF-8
    sequences which never complete, and vLLM's detokenizer holds such bytes back: a stream then arrives in
    bursts, and TTFT and ITL measure the model's luck. Sampling only these (`allowed_token_ids`) makes every
    token stream as it is generated."""
    return [len(SPECIAL_TOKENS) + byte for byte in range(32, 127)]


def default_model_dir() -> Path:
    """`$PDCTL_MODEL_HOME`, else `$XDG_DATA_HOME/pdctl/models/pdctl-tiny-llama`."""
    override = os.environ.get("PDCTL_MODEL_HOME")
    if override:
        return Path(override).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home).expanduser() / "pdctl" / "models" / TINY_MODEL_NAME


def generation_config() -> dict[str, Any]:
    return {"bos_token_id": SPECIAL_TOKENS.index(BOS), "eos_token_id": SPECIAL_TOKENS.index(EOS)}


def tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def _json_files() -> dict[str, dict[str, Any]]:
    return {
        "config.json": tiny_model_config(),
        "generation_config.json": generation_config(),
        "tokenizer_config.json": tokenizer_config(),
        "special_tokens_map.json": {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK},
    }


def model_files() -> list[str]:
    return [*_json_files(), "tokenizer.json"]


def is_complete(dest: Path) -> bool:
    """The marker is written last, so its version plus every file present means a finished write."""
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("version") != MODEL_VERSION:
        return False
    return all((dest / name).is_file() for name in model_files())


def write_tiny_model(dest: Path, *, python: Path | None = None) -> Path:
    """Write the model directory (idempotent) and return it. `python` is the engine runtime's python."""
    if is_complete(dest):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for name, content in _json_files().items():
        write_json_atomic(dest / name, content)
    _build_tokenizer(dest / "tokenizer.json", python or runtime_python(default_runtime_dir()))
    write_json_atomic(dest / MARKER, {"name": TINY_MODEL_NAME, "version": MODEL_VERSION, "vocab_size": VOCAB_SIZE})
    return dest


def _build_tokenizer(target: Path, python: Path) -> None:
    if not python.exists():
        raise EngineRuntimeMissing(missing_message(python))
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    argv = [str(python), "-c", _TOKENIZER_SCRIPT, str(tmp), json.dumps(SPECIAL_TOKENS)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TOKENIZER_BUILD_TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise RuntimeInstallError(f"building the tiny model's tokenizer with {python} failed:\n{done.stderr}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, content: Any) -> None:
    # A reader (or a crash) never sees half a file: write beside it, then rename over it.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp's 0600 would hide the file from other users of a shared install.
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "w") as handle:
            json.dump(content, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
