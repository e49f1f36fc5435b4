"""The trainable weights (LoRA + head) as the payload that crosses the wire, and PEFT export."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from peft import PeftModel

from fedtune.durable import make_dirs_durable, replace_dir_atomic


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name -> detached CPU copy of every parameter that trains (LoRA and head)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


INITIAL_STATE = "fedtune_initial_state"  # an attribute of every model the builders make


def remember_initial_state(model: torch.nn.Module) -> None:
    """Keep the trainable weights a builder made (the seed's), for restore_initial_state."""
    setattr(model, INITIAL_STATE, trainable_state(model))


def restore_initial_state(model: torch.nn.Module) -> None:
    """Put back the trainable weights the model was built with. The builders cache one instance per
    process and config, and whatever was loaded into it last stays there: without this, a second run
    in the same process (a test session, `fedtune audit`) would start from the first one's result."""
    load_record(model, ArrayRecord(torch_state_dict=getattr(model, INITIAL_STATE)))


def to_record(model: torch.nn.Module) -> ArrayRecord:
    return ArrayRecord(torch_state_dict=trainable_state(model))


def load_record(model: torch.nn.Module, record: ArrayRecord) -> None:
    """Copy a payload into the model's trainable parameters; keys and shapes must match."""
    incoming = record.to_torch_state_dict()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if incoming.keys() != params.keys():
        missing, extra = params.keys() - incoming.keys(), incoming.keys() - params.keys()
        raise ValueError(f"Adapter payload does not match the model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(extra)[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(incoming[name].to(param.device, param.dtype))


def base_model_bytes(model: torch.nn.Module) -> int:
    """Size of the frozen base model's weights, in bytes."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


def save_adapter(model: PeftModel, directory: Path) -> None:
    """Write the adapter in PEFT format, atomically (the old one stays until the new is whole)."""
    make_dirs_durable(directory.parent)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        model.save_pretrained(staging)
        replace_dir_atomic(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # gone once renamed; else a half-written copy
        raise
