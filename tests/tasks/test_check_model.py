"""A base model that cannot serve the run is refused before a run directory exists, naming the option:
weights missing or git-lfs pointers, tokenizer files missing, model.max_length past its positions, and
LoRA targets that are not layers LoRA can adapt."""

from __future__ import annotations

import shutil

import pytest

from fedtune.config import LoraConfig, ModelConfig
from fedtune.errors import ConfigError
from fedtune.tasks.base import get_task

TASK = get_task("classification")


@pytest.fixture
def model_copy(tmp_path):
    """The default classifier's directory, copied so that a test can take files away."""
    copy = tmp_path / "model"
    shutil.copytree(TASK.model_path(ModelConfig()), copy)
    return copy


def test_the_default_model_passes_every_check():
    TASK.check_model(ModelConfig(), LoraConfig())


def test_weights_missing_or_a_git_lfs_pointer_are_refused_naming_the_option(model_copy):
    weights = model_copy / "model.safetensors"
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 90868376\n")
    with pytest.raises(ConfigError, match=r"name_or_path.*model\.safetensors is not a weights file.*git lfs pull"):
        TASK.check_model(ModelConfig(name_or_path=str(model_copy)))
    weights.write_bytes((10**12).to_bytes(8, "little") + b"{}")  # a header longer than the file: truncated
    with pytest.raises(ConfigError, match="is not a weights file"):
        TASK.check_model(ModelConfig(name_or_path=str(model_copy)))
    weights.unlink()
    with pytest.raises(ConfigError, match=r"model\.name_or_path.*has config\.json but no weights"):
        TASK.check_model(ModelConfig(name_or_path=str(model_copy)))


def test_a_model_without_its_tokenizer_files_is_refused(model_copy):
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (model_copy / name).unlink()
    with pytest.raises(ConfigError, match=r"tokenizer of .* has \d+ tokens, but the model 30522"):
        TASK.check_model(ModelConfig(name_or_path=str(model_copy)))


def test_max_length_past_the_models_positions_is_refused():
    with pytest.raises(ConfigError, match=r"model\.max_length.*1024 tokens.*at most 512"):
        TASK.check_model(ModelConfig(max_length=1024))
    TASK.check_model(ModelConfig(max_length=512))


def test_lora_targets_must_be_layers_lora_can_adapt():
    with pytest.raises(ConfigError, match=r"lora\.target_modules.*LayerNorm.*cannot adapt.*query, value"):
        TASK.check_model(ModelConfig(), LoraConfig(target_modules=("LayerNorm",)))
    with pytest.raises(ConfigError, match="has no module called"):
        TASK.check_model(ModelConfig(), LoraConfig(target_modules=("no_such_layer",)))
    TASK.check_model(ModelConfig(), LoraConfig(target_modules=("query", "dense")))
