"""`distill loop-sim` at tiny size: two rounds of a few requests each (one, then one more by running
it again), end to end. Round 0 is the
tiny random Llama trained on the demo prompts imported as labelled logs; each round the real
router (uvicorn on loopback, the real `openai` SDK as the client) serves unseen queries from the
same file, the logs teacher answers what the champion escalates, `retrain` trains on it, and the
candidate is promoted only when the comparison says so."""

from __future__ import annotations

import json

import pytest
import yaml
from support.e2e_recipe import ROOT, write_recipe

from pipeline.artifacts import read_jsonl
from pipeline.cli import main

REQUESTS = 12  # unseen queries per round


@pytest.fixture(scope="module")
def simulated(tmp_path_factory, tiny_llama_dir):
    folder = tmp_path_factory.mktemp("loop-sim")
    recipe_path = write_recipe(folder, tiny_llama_dir)
    recipe = yaml.safe_load(recipe_path.read_text())
    # The demo prompts' gold labels stand in for a teacher: a labelled dataset, as Banking77 is.
    recipe["teacher"] = {"spec": f"logs:{ROOT / 'data' / 'prompts.jsonl'}", "label_col": "gold"}
    recipe["eval"] |= {"cost": {"teacher_priced_as": "openai:gpt-4o-mini"}, "bootstrap": 200}
    recipe["export"] |= {"parity_limit": 4, "parity_max_new_tokens": 4}  # three exports: keep each quick
    recipe["serve"] = {"escalations": str(folder / "unused-escalations.jsonl")}
    recipe["retrain"] = {"holdout": 0.25}
    recipe_path.write_text(yaml.safe_dump(recipe))
    runs = folder / "runs"
    argv = ["loop-sim", str(recipe_path), "--runs-dir", str(runs), "--rounds", "1", "--requests", str(REQUESTS)]
    assert main(argv) == 0
    assert main(argv) == 0  # continued later: round 0 is not redone, and the table keeps round 1
    result = json.loads((runs / "e2e" / "rounds" / "loop_sim.json").read_text())
    return folder, runs / "e2e", result


def test_rounds_are_numbered_and_round_zero_is_the_recipes_run(simulated):
    _, run, result = simulated
    assert [r["round"] for r in result["rounds"]] == [0, 1, 2]
    assert set(result["rounds"][0]["stages_s"]) == {"capture", "curate", "finetune", "evaluate", "export"}
    zero = result["rounds"][0]
    assert zero["served"] is None and zero["escalations_logged"] == 0 and zero["examples_added"] == 0
    assert zero["train_examples"] == len(read_jsonl(run / "curate" / "train.jsonl"))
    assert result["teacher"].startswith("logs:") and result["requests_per_round"] == REQUESTS
    assert result["escalations_priced_at"]["source"] == "priced as openai:gpt-4o-mini (prices.yaml)"


def test_each_round_served_unseen_queries_and_the_logs_teacher_answered_its_escalations(simulated):
    _, run, result = simulated
    curated = {
        r["messages"][0]["content"]
        for s in ("train", "validation", "test")
        for r in read_jsonl(run / "curate" / f"{s}.jsonl")
    }
    sent_before: set[str] = set()
    for row in result["rounds"][1:]:
        served, n = row["served"], row["round"]
        assert served["sent"] == REQUESTS and sum(served["routes"].values()) == REQUESTS
        logged = read_jsonl(run / "rounds" / f"r{n}-escalations.jsonl")
        assert row["escalations_logged"] == len(logged) == served["routes"].get("teacher", 0) > 0
        assert served["teacher_sources"] == {"logs": len(logged)}  # every teacher answer said it came from the file
        assert all(r["meta"]["teacher_source"] == "logs" and r["meta"]["cost_usd"] > 0 for r in logged)
        queries = {r["messages"][0]["content"] for r in logged}
        assert not queries & curated and not queries & sent_before
        sent_before |= queries


def test_what_each_round_added_is_what_its_router_escalated(simulated):
    _, run, result = simulated
    for row in result["rounds"][1:]:
        accounted = row["examples_added"] + row["escalated_slice"] + sum(row["skipped"].values())
        assert accounted == row["escalations_logged"] and row["examples_added"] > 0
        gathered = json.loads((run / "rounds" / f"r{row['round']}" / "gather" / "gather.json").read_text())
        assert gathered["added"] == row["examples_added"]
    one, two = result["rounds"][1:]
    assert two["train_examples"] >= one["train_examples"]


def test_figures_carry_their_confidence_intervals_and_the_named_price(simulated):
    _, _, result = simulated
    for row in result["rounds"]:
        for key in ("test_agreement", "test_accuracy", "local_share"):
            f = row[key]
            assert 0 <= f["lo"] <= f["value"] <= f["hi"] <= 1 and f["n"] > 0, (row["round"], key)
        cost = row["routed_usd_per_1k_priced"]
        assert cost["spec"] == "openai:gpt-4o-mini" and 0 < cost["value"] and cost["lo"] <= cost["hi"]
        assert row["train_s"] > 0


def test_the_curves_are_drawn(simulated):
    _, run, _ = simulated
    assert (run / "rounds" / "loop_sim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_candidate_is_promoted_exactly_when_the_verdict_says_so(simulated):
    from pipeline.registry import CHAMPION, Registry

    folder, _, result = simulated
    champion = None
    for row in result["rounds"][1:]:
        assert row["verdict"] in ("promote", "keep") and row["promoted"] == (row["verdict"] == "promote")
        if row["promoted"]:
            assert row["champion_after"] == row["candidate_version"]
        elif champion is not None:
            assert row["champion_after"] == champion
        champion = row["champion_after"]
    registry = Registry(f"sqlite:///{folder / 'mlflow.db'}")
    assert registry.require("e2e", CHAMPION).version == result["champion"] == champion


def test_a_recipe_whose_teacher_is_not_a_logs_file_is_refused(tmp_path, tiny_llama_dir, capsys):
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    assert main(["loop-sim", str(recipe), "--runs-dir", str(tmp_path / "runs")]) == 1
    assert "not logs:<file>" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
