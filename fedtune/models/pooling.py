"""Mean pooling for a BERT-style sequence classifier (model.pooling = "mean").

transformers' sequence-classification heads read a fixed input (BERT: a dense+tanh "pooler" on the
first token), and sentence-transformers, which pools by the mean, is not built for peft's
sequence-classification models. So this swaps the encoder's pooler for a masked mean of the last
layer's token states, leaving the model class, its `classifier` and peft's adapter format as they are.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from fedtune.errors import ConfigError


class MaskedMeanPooler(torch.nn.Module):
    """Mean of the token states over each text's real tokens. It has no weights; the attention mask
    of the current call is handed to it by use_mean_pooling's hook on the encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.token_mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.token_mask is None:
            return hidden_states.mean(dim=1)
        mask = self.token_mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def use_mean_pooling(model: torch.nn.Module) -> None:
    """Make `model` (an AutoModelForSequenceClassification) classify the mean of its token states."""
    encoder = getattr(model, model.base_model_prefix, None)
    if getattr(encoder, "pooler", None) is None:
        raise ConfigError(f"Invalid option `model.pooling`: `mean` needs a BERT-style model whose classifier "
                          f"reads the encoder's pooler, and {type(model).__name__} has none. Use pooling = \"cls\".")
    install_mean_pooler(encoder)


def install_mean_pooler(encoder: torch.nn.Module) -> None:
    """Replace `encoder`'s pooler by a MaskedMeanPooler that sees each call's attention mask."""
    pooler = MaskedMeanPooler()
    encoder.pooler = pooler

    def remember_mask(_module, args, kwargs):
        pooler.token_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    encoder.register_forward_pre_hook(remember_mask, with_kwargs=True)


# ---- a merged model that pools by the mean without fedtune ---------------------------------------
# transformers has no classifier that pools by the mean, so `fedtune export --merged` writes one beside
# the weights as Hugging Face custom code (config.json's auto_map): the two definitions above, taken
# from this file so that the export pools exactly as training did, and a subclass of the base's own
# classifier that installs them. Its model_type is new, so loading it without trust_remote_code=True
# fails loudly instead of reading the untrained first-token pooler.
EXPORT_MODULE = "fedtune_mean_pooling"

_EXPORT_HEADER = '''"""Written by `fedtune export --merged`: {model_class} whose classifier reads the mean of the last
layer's states over each text's real tokens (fedtune's model.pooling = "mean"), not a pooler over its
first token. Load it with AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True)."""

from __future__ import annotations

import torch
from transformers import {config_class}, {model_class}


class MeanPooled{config_class}({config_class}):
    model_type = "{model_type}"


class MeanPooled{model_class}({model_class}):
    config_class = MeanPooled{config_class}

    def __init__(self, config):
        super().__init__(config)
        install_mean_pooler(getattr(self, self.base_model_prefix))

'''


def write_mean_pooling_code(directory: Path, model: torch.nn.Module) -> None:
    """Make the classifier saved in `directory` (from `model`, which pools by the mean) load with its pooling."""
    model_class, config_class = type(model).__name__, type(model.config).__name__
    model_type = f"{model.config.model_type}-mean-pooled"
    header = _EXPORT_HEADER.format(model_class=model_class, config_class=config_class, model_type=model_type)
    body = "\n\n".join(inspect.getsource(part) for part in (MaskedMeanPooler, install_mean_pooler))
    (directory / f"{EXPORT_MODULE}.py").write_text(header + body)
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config.update(model_type=model_type, architectures=[f"MeanPooled{model_class}"],
                  auto_map={"AutoConfig": f"{EXPORT_MODULE}.MeanPooled{config_class}",
                            "AutoModelForSequenceClassification": f"{EXPORT_MODULE}.MeanPooled{model_class}"})
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
