from pathlib import Path

import pytest

from pipeline.config import Recipe, available_recipes, load_recipe, recipe_schema
from pipeline.errors import DistillError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", available_recipes(ROOT))
def test_every_shipped_recipe_validates(name):
    recipe = load_recipe(name, root=ROOT)
    assert recipe.name == name


def test_shipped_recipes_include_the_defaults():
    assert {"smollm2-135m-cpu", "mistral7b"} <= set(available_recipes(ROOT))


def test_mistral7b_is_qlora_nf4_on_all_projections():
    r = load_recipe("mistral7b", root=ROOT)
    assert r.model.base == "mistralai/Mistral-7B-Instruct-v0.3"
    assert r.train.method == "qlora"
    q = r.train.quant
    assert (q.load_in_4bit, q.quant_type, q.double_quant, q.compute_dtype) == (True, "nf4", True, "bfloat16")
    assert (r.train.lora.r, r.train.lora.alpha, r.train.lora.dropout) == (16, 32, 0.05)
    assert set(r.train.lora.targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert r.train.gradient_checkpointing and r.train.optim == "paged_adamw_8bit" and r.train.max_seq_len == 2048


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


def test_unknown_key_names_the_key_and_the_nearest_valid_one(tmp_path):
    path = _write(tmp_path, "name: x\ntrain:\n  lerning_rate: 0.1\n  epochz: 2\n")
    with pytest.raises(DistillError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert path in msg
    assert "unknown key 'train.epochz'" in msg and "did you mean 'train.epochs'" in msg
    assert "unknown key 'train.lerning_rate'" in msg  # every error reported at once


def test_qlora_requires_4bit_with_a_message_that_names_the_fix(tmp_path):
    path = _write(tmp_path, "name: x\ntrain:\n  method: qlora\n")
    with pytest.raises(DistillError, match=r"train.quant.load_in_4bit must be true when train.method='qlora'"):
        load_recipe(path)


def test_overrides_go_through_the_same_validation(tmp_path):
    path = _write(tmp_path, "name: x\n")
    r = load_recipe(path, ["train.epochs=3", "train.lora.r=32", "train.lora.targets=[q_proj,v_proj]"])
    assert (r.train.epochs, r.train.lora.r, r.train.lora.targets) == (3, 32, ["q_proj", "v_proj"])
    with pytest.raises(DistillError, match="unknown key 'train.lora.rank'"):
        load_recipe(path, ["train.lora.rank=4"])
    with pytest.raises(DistillError, match="train.epochs"):
        load_recipe(path, ["train.epochs=-1"])


def test_broken_yaml_names_file_and_line(tmp_path):
    path = _write(tmp_path, "name: x\ntrain:\n  epochs: [1,\n")
    with pytest.raises(DistillError, match=rf"{path}:\d+: invalid YAML"):
        load_recipe(path)


def test_unknown_recipe_lists_the_ones_that_exist():
    with pytest.raises(DistillError) as err:
        load_recipe("nope", root=ROOT)
    assert "unknown recipe 'nope'" in str(err.value) and "smollm2-135m-cpu" in str(err.value)


def test_loading_a_recipe_does_not_touch_the_environment(monkeypatch):
    import os

    before = dict(os.environ)
    load_recipe("mistral7b", root=ROOT)
    assert dict(os.environ) == before


def test_schema_has_descriptions_for_fields():
    schema = recipe_schema()
    train = schema["$defs"]["TrainConfig"]["properties"]
    assert train["lr"]["description"] and train["max_seq_len"]["description"]
    assert Recipe.model_fields["name"].description


def test_generated_reference_and_schema_are_up_to_date():
    """recipes/REFERENCE.md and schema.json come from the models; `make schema` regenerates them."""
    import json

    from pipeline.config import recipe_reference

    assert recipe_reference() in (ROOT / "recipes" / "REFERENCE.md").read_text(), "run `make schema`"
    assert json.loads((ROOT / "recipes" / "schema.json").read_text()) == recipe_schema(), "run `make schema`"
