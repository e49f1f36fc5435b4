"""The command-line options of the config: one per config field, generated from the dataclasses
in config.py (type, help, choices from `Literal[...]`, default), so a field added there is an
option of `fedtune simulate` without a second declaration. Errors name dotted config keys;
`explain` adds each one's flag for a command-line user."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import click
import typer
from rich.markup import escape

from fedtune.config import FedtuneConfig
from fedtune.tasks.registry import TASKS

# Flags that are not the field's name (`--max-length` for model.max_length is the rule).
FLAGS = {
    "model.name_or_path": "--model",
    "recipe.mode": "--recipe",
    "lora.r": "--lora-r",
    "lora.alpha": "--lora-alpha",
    "lora.dropout": "--lora-dropout",
    "lora.aggregation": "--lora-aggregation",
    "lora.target_modules": "--lora-target-modules",
    "lora.modules_to_save": "--lora-modules-to-save",
    "dp.enabled": "--dp/--no-dp",
    "dp.unit": "--privacy-unit",
    "strategy.name": "--strategy",
    "data.path": "--data",
    "data.demo_examples": "--examples",
}

# Fields without an option, and why.
NO_OPTION = {
    "out": "each command declares --out itself, as a path (audit and deploy-local give it their own meaning)",
    "data.source": "derived: `file` whenever data.path (--data) is set",
    "recipe.chosen": "written by the private recipe when a run starts (fedtune/recipe.py)",
    "recipe.advice": "written by the private recipe when a run starts (fedtune/recipe.py)",
    "data.labels": "derived: fixed from the data when the run starts (a config file may still give them)",
}

# Options each command takes besides simulate's full set.
AUDIT = ("clients", "rounds", "seed", "strategy.clients_per_round", "data.canary_repeats", "dp.enabled",
         "dp.noise_multiplier", "dp.max_grad_norm", "dp.delta", "model.task", "model.name_or_path",
         "model.max_length", "data.path", "data.format", "data.demo_examples", "train.local_epochs",
         "train.batch_size", "train.sample_rate", "train.learning_rate", "dp.unit", "data.user_column",
         "dp.max_records_per_user", "dp.user_gradient", "dp.client_dp", "dp.client_dp_side",
         "dp.client_noise_multiplier", "dp.client_clipping_norm", "dp.canary_clients", "data.canary_kind",
         "dp.public_streams")  # data.canaries: audit declares --canaries itself
NOT_DEPLOYED = {
    "clients": "deploy-local runs one client per node: --nodes",
    "num_cpus_per_client": "Ray workers of the Simulation Engine only",
    "simulation.ray_address": "the Deployment Engine runs no Ray",
    "data.canaries": "audit canaries are planted in simulation only",
    "data.canary_repeats": "audit canaries are planted in simulation only",
    "data.canary_kind": "audit canaries are planted in simulation only",
    "dp.canary_clients": "audit canaries are planted in simulation only",
    "dp.public_streams": "a white-box audit's setting, for simulation only",
}

CHOICES = {"model.task": tuple(TASKS)}  # str fields whose values come from a registry, not a Literal

PANELS = {"": "Run", "model": "Model", "lora": "LoRA", "dp": "Differential privacy", "train": "Client training",
          "strategy": "Aggregation", "data": "Data", "recipe": "Run", "simulation": "Run"}


@dataclass(frozen=True)
class Option:
    key: str  # dotted config key, e.g. dp.delta
    flag: str  # e.g. --delta, or --secagg/--no-secagg for a switch
    annotation: Any  # the field's type
    help: str
    default: Any

    @property
    def section(self) -> str:
        return self.key.split(".")[0] if "." in self.key else ""

    @property
    def param(self) -> str:
        """The command function's parameter name: the key with `__` for the dot."""
        return self.key.replace(".", "__")

    def parameter(self) -> inspect.Parameter:
        """The typer option, for a command function's signature; None when not given."""
        literal = typing.get_origin(self.annotation) is Literal
        choices = typing.get_args(self.annotation) if literal else CHOICES.get(self.key)
        python_type = {bool: bool, int: int, float: float}.get(self.annotation, str)
        listed = " Comma-separated." if typing.get_origin(self.annotation) is tuple else ""
        key = f" [config: {self.key}]" if self.key in FLAGS else ""  # a flag not named after its field
        help_text = escape(f"{self.help}{listed} [default: {_shown(self.default)}]{key}")
        info = typer.Option(self.flag, help=help_text, show_default=False, rich_help_panel=PANELS[self.section],
                            click_type=click.Choice(choices) if choices else None)
        return inspect.Parameter(self.param, inspect.Parameter.KEYWORD_ONLY, default=None,
                                 annotation=Annotated[python_type | None, info])


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str):
        return value.encode("unicode_escape").decode() or "none"
    return str(value)


def _options() -> dict[str, Option]:
    table: dict[str, Option] = {}

    def add(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(hints[f.name]):
                add(hints[f.name], f"{key}.")
            elif key not in NO_OPTION:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                flag = FLAGS.get(key) or "--" + f.name.replace("_", "-")
                if hints[f.name] is bool and "/" not in flag:
                    flag = f"{flag}/--no-{flag[2:]}"
                table[key] = Option(key, flag, hints[f.name], f.metadata["help"], default)

    add(FedtuneConfig, "")
    return table


OPTIONS = _options()
SIMULATE = tuple(OPTIONS)
DEPLOY = tuple(key for key in OPTIONS if key not in NOT_DEPLOYED)


def config_options(keys: Iterable[str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give the decorated command, whose signature ends in `**options`, one option per config key;
    `overrides(options)` turns what it receives back into dotted keys."""
    wanted = set(keys)
    generated = [option.parameter() for key, option in OPTIONS.items() if key in wanted]  # in panel order

    def wrap(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        command.__signature__ = signature.replace(parameters=[*own, *generated])  # type: ignore[attr-defined]
        return command

    return wrap


def overrides(options: dict[str, Any]) -> dict[str, Any]:
    """Generated options as dotted-key overrides; None: not given."""
    return {name.replace("__", "."): value for name, value in options.items()}


# How the command line spells a config key: --delta for dp.delta, --dp/--no-dp for dp.enabled.
FLAGS_OF_KEYS = {**{key: option.flag for key, option in OPTIONS.items()}, "out": "--out"}
_KEY = re.compile(r"`([a-z_0-9.]+)`|(?<![\w.-])((?:model|lora|dp|train|strategy|data)\.[a-z_0-9]+)(?![\w=])")


def explain(message: str) -> str:
    """The message with each config key it names followed, once, by its flag."""
    seen: set[str] = set()

    def add_flag(match: re.Match[str]) -> str:
        key = match.group(1) or match.group(2)
        if key not in FLAGS_OF_KEYS or key in seen:
            return match.group(0)
        seen.add(key)
        return f"{match.group(0)} ({FLAGS_OF_KEYS[key]})"

    return _KEY.sub(add_flag, message)
