"""The loop's parts on small inputs: gathering escalations, the frozen test split, the paired
comparison, and the registry's aliases on a real MLflow store (`.venv/bin/pytest -q tests/loop/test_loop.py`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.artifacts import read_jsonl
from pipeline.errors import DistillError
from pipeline.loop.compare import Routing, mcnemar_exact, paired, verdict
from pipeline.loop.gather import Mix, gather, in_slice, prompt_key


def record(rid: str, prompt: str, answer: str, **meta) -> dict:
    return {
        "id": rid,
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        "meta": meta,
    }


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


PREVIOUS = [record("t1", "Where is my parcel?", "track_order"), record("t2", "Refund me please", "refund_status")]
NEW = [
    record(
        f"req-{i}", f"My order {i} never arrived, what now?", "track_order", source="router", reason="low_confidence"
    )
    for i in range(40)
]


# ---------------------------------------------------------------- gather


def test_importing_the_same_escalations_twice_adds_nothing(tmp_path):
    log = write(tmp_path / "esc.jsonl", NEW)
    first = gather(PREVIOUS, [log], set(), holdout=0.2, round_no=1)
    assert len(first.added) + len(first.slice) == 40
    again = gather(first.pool, [log, log], {prompt_key(r) for r in first.slice}, holdout=0.2, round_no=2)
    assert again.added == [] and again.slice == []
    held = len(first.slice)
    assert again.skipped == {"already_known": 2 * (40 - held), "test_or_slice": 2 * held}


def test_an_escalated_test_prompt_never_joins_the_pool(tmp_path):
    test_prompt = "I was charged twice for one order"
    log = write(tmp_path / "esc.jsonl", [record("r1", test_prompt + "  ", "payment_failed", source="router")])
    result = gather(PREVIOUS, [log], {prompt_key(record("x", test_prompt, ""))}, holdout=0.0, round_no=1)
    assert result.added == [] and result.skipped == {"test_or_slice": 1}


def test_holdout_is_a_stable_share_of_prompts_the_same_in_every_process(tmp_path):
    keys = [prompt_key(r) for r in NEW]
    here = [in_slice(k, 0.25) for k in keys]
    code = (
        "import json, sys; from pipeline.loop.gather import in_slice; "
        "print(json.dumps([in_slice(k, 0.25) for k in json.load(sys.stdin)]))"
    )
    there = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(keys),
        capture_output=True,
        text=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
        check=True,
    )
    assert json.loads(there.stdout) == here
    assert 0 < sum(here) < len(here)  # some held back, not all


def test_escalation_ids_are_made_unique_and_marked_with_their_round(tmp_path):
    log = write(tmp_path / "esc.jsonl", [record("t1", "A brand new question about invoices", "invoice_request")])
    result = gather(PREVIOUS, [log], set(), holdout=0.0, round_no=3)
    assert [r["id"] for r in result.added] == ["t1~2"] and result.added[0]["meta"]["round"] == 3


def test_replay_keeps_a_stable_share_of_the_old_pool_and_what_it_drops_stays_known(tmp_path):
    old = [record(f"o{i}", f"An old question number {i} about cards", "card_issue") for i in range(60)]
    dropped_then_escalated = write(tmp_path / "esc.jsonl", old[:60])
    half = gather(old, [dropped_then_escalated], set(), holdout=0.0, round_no=1, mix=Mix(replay=0.5))
    kept = [r["id"] for r in half.pool]
    assert 15 < len(kept) < 45  # about half, by a hash of the prompt
    assert kept == [r["id"] for r in gather(old, [], set(), 0.0, 1, Mix(replay=0.5)).pool]  # the same half again
    assert half.added == [] and half.skipped == {"already_known": 60}  # the old prompts it left out are known


def test_weighted_escalations_carry_their_weight_and_old_records_do_not(tmp_path):
    log = write(tmp_path / "esc.jsonl", NEW)
    result = gather(PREVIOUS, [log], set(), holdout=0.0, round_no=1, mix=Mix(weight=4))
    assert {r["meta"].get("weight") for r in result.added} == {4}
    assert [r["meta"].get("weight") for r in result.pool[:2]] == [None, None]
    unweighted = gather(PREVIOUS, [log], set(), holdout=0.0, round_no=1)
    assert all("weight" not in r["meta"] for r in unweighted.added)


def test_a_line_that_is_not_an_escalation_names_file_and_line(tmp_path):
    log = tmp_path / "esc.jsonl"
    log.write_text(json.dumps(NEW[0]) + "\n" + json.dumps({"id": "x", "prompt": "no messages"}) + "\n")
    with pytest.raises(DistillError, match=r"esc\.jsonl:2: not an escalation record"):
        gather(PREVIOUS, [log], set(), holdout=0.0, round_no=1)


def test_a_round_is_what_the_champion_trained_on_plus_what_it_escalated(tmp_path):
    from pipeline.config import load_recipe
    from pipeline.loop.retrain import Rounds, freeze, gather_round, round_recipe_for
    from pipeline.registry import ServedVersion

    base = tmp_path / "runs" / "b77"
    (base / "capture").mkdir(parents=True)
    (base / "curate").mkdir()
    # A labelled logs file: the capture holds every query, curate selected two of them to train on.
    unselected = record("t9", "Why was my top-up declined?", "top_up_failed")
    write(base / "capture" / "teacher.jsonl", [*PREVIOUS, unselected])
    write(base / "curate" / "train.jsonl", PREVIOUS[:1])
    write(base / "curate" / "validation.jsonl", PREVIOUS[1:])
    write(base / "curate" / "test.jsonl", [record("f1", "Is there a fee for transfers?", "transfer_fee")])
    escalated = write(tmp_path / "esc.jsonl", [{**unselected, "id": "req-1", "meta": {"source": "router"}}])
    overrides = ["retrain.holdout=0", "retrain.warm_start=true", "retrain.epochs=1", "retrain.lr=2e-4"]
    recipe = load_recipe("banking77-cpu", overrides)
    rounds = Rounds(base)
    frozen = freeze(rounds)

    gathered = gather_round(recipe, rounds, 1, frozen, [escalated])
    # The unselected capture record is no reason to skip the escalation: the champion never saw it.
    assert [r["id"] for r in gathered.added] == ["req-1"] and not gathered.skipped
    # Round 0's validation split stays the validation split (frozen): it is not in the pool.
    assert [r["id"] for r in gathered.pool] == ["t1", "req-1"]

    champion = ServedVersion("b77", "1", base / "export" / "merged")
    round_one = round_recipe_for(recipe, rounds, 1, frozen, champion)
    assert round_one.curate.target_size is None  # the gathered pool is kept whole, not re-selected
    assert round_one.curate.frozen_validation == base / "rounds" / "frozen_validation.jsonl"
    assert read_jsonl(round_one.curate.frozen_validation) == PREVIOUS[1:]
    assert round_one.train.epochs == 1 and round_one.train.lr == 2e-4
    assert round_one.train.init_adapter == base / "finetune" / "adapter"
    # retrain.replay and escalation_weight reach the pool
    weighted = load_recipe("banking77-cpu", [*overrides, "retrain.escalation_weight=3", "retrain.replay=0.5"])
    assert gather_round(weighted, rounds, 1, frozen, [escalated]).added[0]["meta"]["weight"] == 3
    assert (recipe.train.epochs, recipe.train.lr) == (4, 1e-3)  # round 0's own settings are untouched


# ---------------------------------------------------------------- frozen test split (curate)


def frozen_split(words: str, labels: list[str], n: int = 6) -> list[dict]:
    """Examples as curate loads a frozen split back (`load_frozen_split`)."""
    return [
        {
            "id": f"{words[0]}{i}",
            "messages": [{"role": "user", "content": f"{words} {i} about my account and its settings today"}],
            "completion": labels[i % 3],
            "label": labels[i % 3],
            "gold": None,
            "teacher": "t",
            "teacher_logprob": None,
            "confidence": None,
        }
        for i in range(n)
    ]


def test_frozen_test_split_is_used_verbatim_and_its_near_duplicates_do_not_train(embedded_dir):
    from pipeline.config import Recipe
    from pipeline.curation.steps import CurateContext
    from pipeline.llm.loading import load_tokenizer
    from pipeline.stages.curate import curate_records
    from pipeline.task import load_task

    task = load_task(Path(__file__).resolve().parents[2] / "data" / "task.yaml")
    labels = task.labels
    frozen = frozen_split("frozen question number", labels)
    raw = [
        record(f"r{i:03d}", f"Question {i}: how do I do thing {i} with order {1000 + i}?", labels[i % 4])
        for i in range(60)
    ]
    near_copy = "frozen question number 2 about my account and its settings today please"
    raw.append(record("r999", near_copy, labels[0]))
    recipe = Recipe(name="t", curate={"min_examples": 3, "labels_only": True})
    ctx = CurateContext.from_recipe(recipe, task, load_tokenizer(str(embedded_dir)), None, frozen)
    result = curate_records(raw, ctx)
    assert [ex["id"] for ex in result.splits["test"]] == [ex["id"] for ex in frozen]
    trained = {ex["prompt"] for s in ("train", "validation") for ex in result.splits[s]}
    assert near_copy not in trained
    assert len(result.splits["validation"]) > 0 and len(trained) == 60
    step = next(s for s in result.steps if s.name == "decontaminate (frozen splits)")
    assert step.n_in - step.n_out == 1


def test_a_frozen_validation_split_is_used_verbatim_and_the_examples_all_train(embedded_dir):
    from pipeline.config import Recipe
    from pipeline.curation.steps import CurateContext
    from pipeline.llm.loading import load_tokenizer
    from pipeline.stages.curate import curate_records
    from pipeline.task import load_task

    task = load_task(Path(__file__).resolve().parents[2] / "data" / "task.yaml")
    test, validation = frozen_split("test question", task.labels), frozen_split("validation question", task.labels)
    raw = [
        record(f"r{i:03d}", f"Question {i}: how do I do thing {i} with order {1000 + i}?", task.labels[i % 4])
        for i in range(40)
    ]
    near_copy = "validation question 4 about my account and its settings today please"
    raw.append(record("r999", near_copy, task.labels[0]))
    recipe = Recipe(name="t", curate={"min_examples": 3, "labels_only": True})
    tokenizer = load_tokenizer(str(embedded_dir))
    result = curate_records(raw, CurateContext.from_recipe(recipe, task, tokenizer, None, test, validation))
    assert [ex["id"] for ex in result.splits["validation"]] == [ex["id"] for ex in validation]
    assert [ex["id"] for ex in result.splits["test"]] == [ex["id"] for ex in test]
    # Every other example trains; a near copy of a validation prompt does not.
    assert sorted(ex["id"] for ex in result.splits["train"]) == [f"r{i:03d}" for i in range(40)]


# ---------------------------------------------------------------- paired comparison


def test_paired_comparison_on_a_known_case():
    champion = [True] * 10 + [False] * 10
    candidate = [True] * 16 + [False] * 4  # right on everything the champion got, plus 6
    result = paired(champion, candidate, reps=500)
    assert (result.champion_only, result.candidate_only) == (0, 6)
    assert result.mcnemar_p == pytest.approx(2 * 0.5**6)
    assert result.delta.value == pytest.approx(0.3) and result.delta.lo > 0
    routing = Routing(None, 0.0, 1.0, 0.02)
    assert verdict(result, None, routing, routing)[0] == "promote"


def test_a_candidate_worse_beyond_the_ci_is_kept_and_flagged():
    champion = [True] * 18 + [False] * 2
    candidate = [False] * 12 + [True] * 6 + [False] * 2
    result = paired(champion, candidate, reps=500)
    assert result.delta.hi < 0
    decision, worse, why = verdict(result, None, Routing(0.5, 0.6, 0.9, 0.01), Routing(0.5, 0.9, 0.9, 0.005))
    assert (decision, worse) == ("keep", True) and "beyond the 95% CI" in why


def test_no_better_on_any_figure_means_keep_without_the_worse_flag():
    same = [True, False] * 10
    result = paired(same, same, reps=200)
    assert result.mcnemar_p == 1.0 and result.delta.value == 0
    routing = Routing(0.5, 0.3, 0.9, 0.01)
    assert verdict(result, None, routing, routing)[:2] == ("keep", False)


def test_mcnemar_is_symmetric():
    assert mcnemar_exact(2, 9) == mcnemar_exact(9, 2) < 0.07


# ---------------------------------------------------------------- registry aliases (real MLflow store)


@pytest.fixture
def registry(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.registry import Registry

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("task")
    for n in (1, 2, 3):
        source = tmp_path / f"run{n}" / "export" / "merged"
        source.mkdir(parents=True)
        client.create_model_version("task", source=str(source), tags={"artifact": "merged", "round": str(n - 1)})
    return Registry(uri), tmp_path


def test_promote_moves_champion_and_keeps_previous_then_rollback_goes_back(registry):
    from pipeline.registry import CANDIDATE, CHAMPION, PREVIOUS

    reg, _ = registry
    reg.promote("task", "1")
    reg.set_alias("task", CANDIDATE, "2")
    assert reg.promote("task").version == "2"  # the candidate by default
    assert reg.resolve("task", CHAMPION).version == "2" and reg.resolve("task", PREVIOUS).version == "1"
    assert reg.resolve("task", CANDIDATE) is None  # promoted: nothing left to canary
    reg.promote("task", "3")
    assert reg.rollback("task").version == "2"
    assert reg.resolve("task", PREVIOUS).version == "1"
    assert reg.rollback("task").version == "1" and reg.resolve("task", PREVIOUS) is None
    with pytest.raises(DistillError, match="nothing to roll back to"):
        reg.rollback("task")


def test_promotion_of_a_worse_candidate_is_refused_unless_forced(registry):
    from pipeline.registry import CHAMPION, WORSE_TAG

    reg, _ = registry
    reg.promote("task", "1")
    reg.tag("task", "2", {WORSE_TAG: "true"})
    with pytest.raises(DistillError, match="worse than the champion beyond the CI"):
        reg.promote("task", "2")
    assert reg.resolve("task", CHAMPION).version == "1"
    assert reg.promote("task", "2", force=True).version == "2"


def test_the_loop_simulation_promotes_a_candidate_only_on_a_promote_verdict(registry):
    from pipeline.loop.sim import settle
    from pipeline.registry import CHAMPION

    reg, _ = registry
    reg.promote("task", "1")
    assert settle(reg, "task", "keep", "2") is False and reg.resolve("task", CHAMPION).version == "1"
    assert settle(reg, "task", "promote", "2") is True and reg.resolve("task", CHAMPION).version == "2"


def test_alias_resolution_gives_the_served_folder_and_its_runs_policy(registry):
    from pipeline.registry import parse_model_uri

    reg, root = registry
    reg.promote("task", "2")
    policy = root / "run2" / "evaluate" / "router_policy.json"
    policy.parent.mkdir(parents=True)
    policy.write_text("{}")
    served = reg.require(*parse_model_uri("models:/task@champion"))
    assert served.source == root / "run2" / "export" / "merged" and served.policy_path == policy
    assert served.round == 1
    assert reg.merged_version_for("task", root / "run3").version == "3"
    with pytest.raises(DistillError, match="expected models:/"):
        parse_model_uri("models:/task/2")


def test_a_lower_local_share_is_kept_even_with_better_agreement():
    champion = [True] * 10 + [False] * 10
    candidate = [True] * 14 + [False] * 6
    decision, worse, why = verdict(
        paired(champion, candidate, reps=200), None, Routing(0.8, 0.40, 0.95, 0.016), Routing(0.9, 0.27, 0.98, 0.018)
    )
    assert (decision, worse) == ("keep", False) and "local share" in why


def test_escalation_reasons_are_counted_by_kind_not_by_score():
    from pipeline.loop.gather import reason_kind

    kinds = {reason_kind(record("a", "p", "x", reason=f"label_prob 0.{n}1 < threshold 0.825")) for n in range(5)}
    assert kinds == {"label_prob < threshold"}


# ---------------------------------------------------------------- the escalated slice, answered as served


def test_the_slice_is_answered_as_served_by_label_posterior(tiny_llama_dir, tmp_path):
    """A label_posterior recipe: the loop's champion-vs-candidate slice must read the labels'
    posterior, as the router serves, not greedy text (a random model's greedy text is no label)."""
    from pipeline.config import Recipe
    from pipeline.conversation import user_turn
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer
    from pipeline.llm.scoring import label_logprobs
    from pipeline.loop.retrain import slice_outcomes
    from pipeline.task import load_task

    task_file = Path(__file__).resolve().parents[2] / "data" / "task.yaml"
    task = load_task(task_file)
    prompts = [f"My order {i} never arrived, what now?" for i in range(6)]
    model, tokenizer = load_model(str(tiny_llama_dir), device_plan()).eval(), load_tokenizer(str(tiny_llama_dir))
    scores = label_logprobs(model, tokenizer, [user_turn(p) for p in prompts], task.labels)
    likeliest = [max(task.labels, key=s.__getitem__) for s in scores]  # the oracle: brute-force scoring
    records = [record(f"s{i}", p, label) for i, (p, label) in enumerate(zip(prompts, likeliest))]
    served = Recipe(name="t", router={"decode": "label_posterior", "signal": "label_prob"})
    assert slice_outcomes(tiny_llama_dir, records, task_file, served, "user") == [True] * len(prompts)
    greedy = Recipe(name="t", router={"decode": "generate"})
    assert slice_outcomes(tiny_llama_dir, records, task_file, greedy, "user") != [True] * len(prompts)
