"""Mean pooling for a BERT-style sequence classifier (model.pooling = "mean").

transformers' sequence-classification heads read a fixed input (BERT: a dense+tanh "pooler" on the
first token), and sentence-transformers, which pools by the mean, is not built for peft's
sequence-classification models. So this swaps the encoder's pooler for a masked mean of the last
layer's token states, leaving the model class, its `classifier` and peft's adapter format as they are.
"""

from __future__ import annotations

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
    pooler = MaskedMeanPooler()
    encoder.pooler = pooler

    def remember_mask(_module, args, kwargs):
        pooler.token_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    encoder.register_forward_pre_hook(remember_mask, with_kwargs=True)
