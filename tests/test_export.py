"""`fedtune export` of a classification run: the adapter loads with peft, the merged model with
transformers alone, and both give the run's model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedtune.data.demo import LABELS
from fedtune.errors import ConfigError
from fedtune.export import export_run
from fedtune.models.adapter import trainable_state
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.server.run_dir import Checkpoint, RunDirectory


@pytest.fixture
def run_dir(tmp_path, tiny_cfg, tiny_model):
    """A run directory whose last checkpoint holds trained-looking (non-initial) weights."""
    cfg = dataclasses.replace(tiny_cfg, data=dataclasses.replace(tiny_cfg.data, labels=LABELS))
    run = RunDirectory.create(tmp_path / "run", cfg)
    weights = {name: t + 0.01 * torch.randn_like(t) for name, t in trainable_state(tiny_model).items()}
    run.commit(Checkpoint(1, weights, [], PrivacyLedger("prv", True).to_dict(), {}))
    return run.path, weights


def test_classification_adapter_and_merged_model(run_dir, tmp_path, tokenized):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedtune.data.text import pad_batch
    from fedtune.models.build import default_model_dir

    path, weights = run_dir
    written = export_run(path, adapter=tmp_path / "adapter", merged=tmp_path / "merged")
    assert written.paths == [tmp_path / "adapter", tmp_path / "merged"]
    assert (written.round, written.rounds) == (1, 2), "the last finished round (1 of the 2 planned), and which it is"
    base = AutoModelForSequenceClassification.from_pretrained(default_model_dir(), num_labels=len(LABELS))
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    params = dict(adapted.named_parameters())
    for name, tensor in weights.items():
        torch.testing.assert_close(params[name].detach(), tensor)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label[3] == LABELS[3]
    batch = pad_batch([tokenized[i] for i in range(4)])
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted(**inputs).logits, rtol=1e-4, atol=1e-4)


def test_export_refuses_to_overwrite(run_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        export_run(run_dir[0], adapter=tmp_path / "taken")


@pytest.mark.parametrize("adapter, merged", [("same", "same"), ("out", "out/merged"), ("out/adapter", "out")])
def test_export_refuses_the_same_or_nested_adapter_and_merged_paths_writing_nothing(run_dir, tmp_path, monkeypatch,
                                                                                    adapter, merged):
    """`--adapter same --merged same` used to write the adapter into same/ and then fail (exit 2) on
    renaming the merged model onto it, naming a temporary directory and leaving half an export."""
    from typer.testing import CliRunner

    from fedtune.cli import cli

    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(cli, ["export", str(run_dir[0]), "--adapter", adapter, "--merged", merged])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"--adapter {adapter}" in said and f"--merged {merged}" in said, said
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing written"


def test_a_failed_export_writes_neither_output(run_dir, tmp_path, monkeypatch):
    """The merged model cannot be written (the disk fills while it is staged), so the adapter is not left
    behind either."""
    import fedtune.export as export

    stage = export._stage

    def full_disk_for_merged(target, write):
        def write_until_full(directory):
            write(directory)
            raise OSError(28, "No space left on device")

        return stage(target, write_until_full if target.name == "merged" else write)

    monkeypatch.setattr(export, "_stage", full_disk_for_merged)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OSError):
        export_run(run_dir[0], adapter=tmp_path / "adapter", merged=tmp_path / "out" / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "no adapter, no staging directory, no parent"


def _fail_renaming_merged(monkeypatch) -> None:
    """Renaming anything to a `merged` directory fails, as on a full disk."""
    from pathlib import Path

    rename = Path.rename

    def failing_rename(self, target):
        if Path(target).name == "merged":
            raise OSError(28, "No space left on device", str(target))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)


def test_an_export_whose_last_rename_fails_takes_back_the_first(run_dir, tmp_path, monkeypatch):
    """Both outputs are complete before either is renamed into place; if the second rename fails,
    the first output is removed again."""
    _fail_renaming_merged(monkeypatch)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OSError):
        export_run(run_dir[0], adapter=tmp_path / "adapter", merged=tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "no adapter, no staging directory"


def test_a_failed_export_removes_the_parent_directories_it_made(run_dir, tmp_path, monkeypatch):
    """The outputs' missing parents are created for the export; when it fails, they go too, while a
    parent that existed before stays."""
    (tmp_path / "kept").mkdir()
    before = [p.name for p in tmp_path.iterdir()]
    _fail_renaming_merged(monkeypatch)
    with pytest.raises(OSError):
        export_run(run_dir[0], adapter=tmp_path / "kept" / "new" / "adapter",
                   merged=tmp_path / "out" / "deeper" / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before), "out/deeper made and removed"
    assert list((tmp_path / "kept").iterdir()) == [], "kept/new made and removed; kept itself stays"


def test_recipe_layout_merged_model_pools_by_the_mean_without_fedtune(tmp_path, tiny_cfg, tokenized):
    """The private recipe's layout (mean pooling, LoRA in the last layer, so the frozen layers below are
    cached in training): the merged model loads with transformers' own classes and trust_remote_code,
    and gives the logits of the model the run trained; without trust_remote_code it refuses to load."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedtune.config import LoraConfig, ModelConfig
    from fedtune.data.text import pad_batch
    from fedtune.models.adapter import load_record, to_record
    from fedtune.models.build import build_model
    from fedtune.models.prefix_cache import FrozenPrefix

    cfg = dataclasses.replace(
        tiny_cfg, model=ModelConfig(pooling="mean"),
        lora=LoraConfig(r=2, alpha=4.0, modules_to_save=(),
                        target_modules=("layer.5.attention.self.query", "layer.5.attention.self.value")),
        data=dataclasses.replace(tiny_cfg.data, labels=LABELS))
    trained = build_model(cfg.model, cfg.lora, num_labels=len(LABELS), seed=0)
    assert isinstance(trained.base_model.model.bert.embeddings, FrozenPrefix), "training caches layers 0-4"
    initial = to_record(trained)
    weights = {name: t + 0.05 * torch.randn_like(t) for name, t in trainable_state(trained).items()}
    run = RunDirectory.create(tmp_path / "run", cfg)
    run.commit(Checkpoint(1, weights, [], PrivacyLedger("prv", True).to_dict(), {}))
    batch = pad_batch([tokenized[i] for i in range(6)])
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    assert inputs["attention_mask"].min() == 0, "some texts are padded, so the mean must skip padding"
    try:
        trained.load_state_dict(weights, strict=False)
        with torch.no_grad():
            expected = trained.eval()(**inputs).logits
    finally:
        load_record(trained, initial)

    export_run(run.path, merged=tmp_path / "merged")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", trust_remote_code=True).eval()
    assert "fedtune" not in type(merged).__module__.split(".")[0]
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")("a text")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-4, atol=1e-4)


def test_a_damaged_last_checkpoint_is_refused_not_replaced_by_an_older_round(run_dir, tmp_path):
    """A review: a damaged round_0001.pt made export hand back round 0, the untrained adapter, with exit 0."""
    path, _ = run_dir
    (path / "checkpoints" / "round_0002.pt").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"damaged checkpoints: round_0002.pt .*newest readable is round 1"):
        export_run(path, adapter=tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_a_run_whose_base_model_is_gone_is_refused_naming_the_option_and_the_file(run_dir, tmp_path):
    """A review: export then failed with "Repo id must be in the form…" naming neither the option nor config.toml."""
    path, _ = run_dir
    config = path / "config.toml"
    config.write_text(config.read_text().replace('name_or_path = ""', 'name_or_path = "/nonexistent/model"', 1))
    with pytest.raises(ConfigError, match=r"model.name_or_path.*/nonexistent/model.*config.toml"):
        export_run(path, adapter=tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_an_output_path_inside_a_file_is_refused_naming_the_option(run_dir, tmp_path):
    """A review: `--adapter afile/x` failed as "cannot use afile/.x._cgfnqww", a hidden name the user never gave."""
    (tmp_path / "afile").write_text("hi")
    with pytest.raises(ConfigError, match=r"--merged .*afile/x: .*afile is a file"):
        export_run(run_dir[0], merged=tmp_path / "afile" / "x")
    assert [p.name for p in tmp_path.iterdir() if p.name != "run"] == ["afile"]
