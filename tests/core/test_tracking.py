from pipeline.tracking import Tracker, redact


def test_redact_masks_secret_keys_and_key_shaped_values():
    out = redact(
        {
            "teacher.api_key": "abc",
            "note": "uses sk-abcdefghijklmnop here",
            "teacher.api_key_env": "OPENAI_API_KEY",
            "lr": 0.1,
        }
    )
    assert out["teacher.api_key"] == "***"
    assert "sk-abcdefghijklmnop" not in out["note"]
    assert out["teacher.api_key_env"] == "OPENAI_API_KEY"  # the variable's name is not the secret
    assert out["lr"] == "0.1"


def test_nested_runs_params_metrics_and_artifacts_land_in_a_real_store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "exp")
    note = tmp_path / "card.md"
    note.write_text("# card")
    with tracker.run("parent") as parent_id:
        tracker.params({"teacher": {"api_key": "sk-secretsecretsecret", "model": "m"}})
        with tracker.run("child", nested=True) as child_id:
            tracker.metrics({"loss": 1.5}, step=1)
            tracker.artifact(note)
    client = MlflowClient(uri)
    parent, child = client.get_run(parent_id), client.get_run(child_id)
    assert parent.data.params == {"teacher.api_key": "***", "teacher.model": "m"}
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.data.metrics["loss"] == 1.5
    assert [a.path for a in client.list_artifacts(child_id)] == ["card.md"]
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts beside the store, not in the cwd


def test_every_recipe_field_reaches_a_real_store_verbatim_except_secrets(tmp_path):
    """The runner logs the resolved recipe this way: no field may be masked because its name
    merely contains "token" (max_new_tokens, the curate token limits) or lost on the way."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import Recipe
    from pipeline.tracking import flatten

    recipe = Recipe(
        name="verbatim",
        teacher={"max_new_tokens": 7, "api_key_env": "MY_KEY"},
        eval={"max_new_tokens": 9},
        curate={"max_prompt_tokens": 77, "max_completion_tokens": 33, "min_prompt_tokens": 2},
    )
    expected = {k: str(v) for k, v in flatten({"recipe": recipe.model_dump(mode="json")}).items()}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "exp")
    with tracker.run("parent") as run_id:
        tracker.params({"recipe": recipe.model_dump(mode="json")})
    logged = MlflowClient(uri).get_run(run_id).data.params
    assert logged == expected
    for key, value in {
        "teacher.max_new_tokens": "7",
        "eval.max_new_tokens": "9",
        "curate.max_prompt_tokens": "77",
        "curate.max_completion_tokens": "33",
        "teacher.api_key_env": "MY_KEY",
    }.items():
        assert logged[f"recipe.{key}"] == value, key
    assert redact({"hf_token": "x", "access_token": "y", "teacher.max_new_tokens": 7}) == {
        "hf_token": "***",
        "access_token": "***",
        "teacher.max_new_tokens": "7",
    }
