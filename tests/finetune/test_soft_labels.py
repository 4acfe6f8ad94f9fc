"""Training on the teacher's label distribution (train.soft_labels): the targets along the label
trie, the loss against TRL's own hard-label loss, and the stage end to end on a tiny model."""

import json
import math

import pytest
from support.finetune_helpers import LABELS, PROMPTS, recipe

from pipeline.errors import DistillError
from pipeline.llm import soft_labels
from pipeline.llm.trainer import trainer_class as answer_trainer
from pipeline.stages import finetune
from pipeline.tracking import NullTracker

# ---------------------------------------------------------------- targets along the label trie


def test_targets_spread_where_labels_branch_and_are_one_hot_past_the_branch():
    labels = {"card_fee": [5, 6, 9], "card_lost": [5, 7, 9], "atm": [8, 9]}
    q = {"card_fee": 0.5, "card_lost": 0.3, "atm": 0.2}
    ids, probs = soft_labels.token_targets(labels["card_fee"], labels, q, weight=1.0)
    assert [dict(zip(i, p)) for i, p in zip(ids, probs)] == [
        pytest.approx({5: 0.8, 8: 0.2}),  # first token: both card_* labels vs atm
        pytest.approx({6: 0.5 / 0.8, 7: 0.3 / 0.8}),  # given "card": fee vs lost, renormalised
        {9: 1.0},  # given "card_fee": only its EOS
    ]
    half = soft_labels.token_targets(labels["card_fee"], labels, q, weight=0.5)
    assert dict(zip(*[x[0] for x in half])) == pytest.approx({5: 0.5 + 0.5 * 0.8, 8: 0.5 * 0.2})


def test_one_hot_or_missing_distribution_gives_one_hot_targets():
    labels = {"a": [1, 2, 0], "b": [1, 3, 0]}
    for q, weight in (({"a": 1.0}, 1.0), ({}, 1.0), ({"a": 0.4, "b": 0.6}, 0.0)):
        ids, probs = soft_labels.token_targets(labels["a"], labels, q, weight)
        assert [dict(zip(i, p)) for i, p in zip(ids, probs)] == [{1: 1.0}, {2: 1.0}, {0: 1.0}], (q, weight)


def test_an_answer_no_label_shares_stays_one_hot():
    ids, probs = soft_labels.token_targets([4, 0], {"a": [1, 0], "b": [4, 2, 0]}, {"a": 0.6, "b": 0.4}, 1.0)
    assert ids == [[4], [0]] and probs == [[1.0], [1.0]]


def test_top_labels_keep_the_mass_and_renormalise():
    q = {f"l{i}": p for i, p in enumerate([0.6, 0.3, 0.095, 0.004, 0.001])}
    kept = soft_labels.top_labels(q)
    assert list(kept) == ["l0", "l1", "l2"] and sum(kept.values()) == pytest.approx(1.0)
    assert kept["l0"] == pytest.approx(0.6 / 0.995)


def test_bad_distribution_names_the_row():
    with pytest.raises(DistillError, match="row 3: teacher_label_probs is not a JSON object"):
        soft_labels.parse_probs("[0.5, 0.5]", "row 3")


# ---------------------------------------------------------------- the loss, against TRL's


def _rows(tokenizer, probs: list[dict | None], weight: float):
    """Tokenized training rows as the stage builds them, one label distribution per prompt."""
    from datasets import Dataset

    pairs = Dataset.from_list(
        [
            {"prompt": p, "completion": LABELS[i % 4], "teacher_label_probs": json.dumps(probs[i]) if probs[i] else ""}
            for i, p in enumerate(PROMPTS[: len(probs)])
        ]
    )
    return finetune.tokenize_dataset(finetune.to_prompt_completion(pairs, "user"), tokenizer, 128, weight)


def _trainer(model_dir, rows, tmp_path, padding_free: bool):
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer

    cfg = recipe(model_dir, padding_free=padding_free, soft_labels=1.0).train
    plan = device_plan()
    trainer = answer_trainer()(
        model=load_model(str(model_dir), plan),
        args=finetune.build_sft_config(cfg, tmp_path, plan),
        train_dataset=rows,
        processing_class=load_tokenizer(str(model_dir)),
        peft_config=finetune.build_lora_config(cfg.lora),
    )
    trainer.data_collator = soft_labels.collate(trainer.data_collator)
    return trainer


@pytest.mark.parametrize("padding_free", [True, False])
def test_one_hot_soft_loss_equals_trls_hard_label_loss(tiny_llama_dir, tmp_path, padding_free):
    """The numerical reduction: with one-hot teacher distributions the soft-label loss is the
    hard-label loss, to float precision, on the same batch (padding-free and padded)."""
    import torch
    from trl import SFTTrainer

    from pipeline.llm.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_llama_dir))
    rows = _rows(tokenizer, [{LABELS[i % 4]: 1.0} for i in range(4)], 1.0)
    trainer = _trainer(tiny_llama_dir, rows, tmp_path, padding_free)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    assert batch[soft_labels.SOFT_IDS].shape[0] == int((batch["labels"][:, 1:] != -100).sum())
    hard_inputs = {k: v for k, v in batch.items() if k not in (soft_labels.SOFT_IDS, soft_labels.SOFT_PROBS)}
    trainer.model.eval()
    with torch.no_grad():
        soft = trainer.compute_loss(trainer.model, dict(batch))
        hard = SFTTrainer.compute_loss(trainer, trainer.model, dict(hard_inputs))
    assert float(soft) == pytest.approx(float(hard), rel=1e-5)
    assert 0 < float(hard) < 2 * math.log(len(tokenizer))


def test_soft_loss_is_the_cross_entropy_against_the_targets(tiny_llama_dir, tmp_path):
    """A spread distribution: the loss equals -sum(target * log p) over the answer tokens computed by
    hand from the full logits, and it differs from the hard-label loss."""
    import torch

    from pipeline.llm.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_llama_dir))
    q = {LABELS[0]: 0.5, LABELS[1]: 0.3, LABELS[2]: 0.2}
    rows = _rows(tokenizer, [q, q], 1.0)
    trainer = _trainer(tiny_llama_dir, rows, tmp_path, padding_free=True)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))
    trainer.model.eval()
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, dict(batch)))
        logits = trainer.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    targets = [(i, p) for r in range(2) for i, p in zip(rows[r]["soft_ids"], rows[r]["soft_probs"])]
    positions = (batch["labels"][0, 1:] != -100).nonzero().flatten()
    by_hand = -sum(
        sum(pk * float(logp[pos, ik]) for ik, pk in zip(ids, probs))
        for pos, (ids, probs) in zip(positions.tolist(), targets)
    ) / len(targets)
    hard = -sum(float(logp[pos, batch["labels"][0, pos + 1]]) for pos in positions.tolist()) / len(targets)
    assert loss == pytest.approx(by_hand, rel=1e-5)
    assert abs(loss - hard) > 1e-3
    assert any(len(ids) > 1 for ids, _ in targets), "no answer token got a spread target"


# ---------------------------------------------------------------- the stage


def _curated(folder, distribution):
    """A curate-stage folder whose rows carry `distribution(i)` as the teacher's label distribution."""
    from datasets import Dataset, DatasetDict

    rows = [
        {
            "id": str(i),
            "prompt": p,
            "completion": LABELS[i % 4],
            "label": LABELS[i % 4],
            "teacher_label_probs": json.dumps(distribution(i)),
        }
        for i, p in enumerate(PROMPTS * 3)
    ]
    DatasetDict(
        {
            "train": Dataset.from_list(rows[:20]),
            "validation": Dataset.from_list(rows[20:]),
            "test": Dataset.from_list(rows[20:]),
        }
    ).save_to_disk(str(folder / "dataset"))
    return folder


def _losses(run_dir) -> list[float]:
    return [
        json.loads(line)["loss"]
        for line in (run_dir / "train_log.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]


def test_the_stage_on_one_hot_distributions_trains_exactly_as_on_hard_labels(tiny_llama_dir, tmp_path):
    """End to end through the stage (tokenizing, TRL's dataset preparation, the collator, the optimizer):
    one-hot distributions with train.soft_labels=1 give hard-label training's losses step for step, so the
    targets line up with the answer tokens; a spread distribution gives different ones."""
    one_hot = _curated(tmp_path / "one-hot", lambda i: {LABELS[i % 4]: 1.0})
    spread = _curated(tmp_path / "spread", lambda i: {LABELS[i % 4]: 0.6, LABELS[(i + 1) % 4]: 0.4})
    train = {"max_steps": 4, "lr": 5e-2, "warmup_ratio": 0.0}
    hard = finetune.run(recipe(tiny_llama_dir, **train), {"curate": one_hot}, tmp_path / "hard", NullTracker())
    soft = finetune.run(
        recipe(tiny_llama_dir, soft_labels=1.0, **train), {"curate": one_hot}, tmp_path / "soft", NullTracker()
    )
    finetune.run(
        recipe(tiny_llama_dir, soft_labels=1.0, **train), {"curate": spread}, tmp_path / "spread", NullTracker()
    )
    assert soft.counts["steps"] == hard.counts["steps"] == 4
    assert _losses(tmp_path / "soft") == pytest.approx(_losses(tmp_path / "hard"), rel=1e-5)
    assert _losses(tmp_path / "hard")[-1] < _losses(tmp_path / "hard")[0]  # it trains
    # Near-uniform random student: any target's cross-entropy is close to log(vocab), so the gap is small,
    # but a thousand times the one-hot run's (~1e-6).
    assert all(abs(a - b) > 1e-3 for a, b in zip(_losses(tmp_path / "spread"), _losses(tmp_path / "hard")))


def test_soft_labels_without_any_distribution_fail_clearly(tiny_llama_dir, tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"id": str(i), "prompt": p, "completion": LABELS[i % 4]} for i, p in enumerate(PROMPTS)]
    DatasetDict({s: Dataset.from_list(rows) for s in ("train", "validation", "test")}).save_to_disk(
        str(tmp_path / "curate" / "dataset")
    )
    with pytest.raises(DistillError, match="train.soft_labels is set but no curated training example carries"):
        finetune.run(
            recipe(tiny_llama_dir, soft_labels=0.5), {"curate": tmp_path / "curate"}, tmp_path / "out", NullTracker()
        )


# ---------------------------------------------------------------- where the distribution comes from


def test_a_local_teacher_records_its_label_distribution_and_curate_reads_it(tiny_llama_dir):
    """teacher.label_distribution on a local teacher: every answer carries each label's log-likelihood,
    the capture record keeps it, and curate turns it into the posterior the stage trains on."""
    import asyncio

    from pipeline.config import TeacherConfig
    from pipeline.curation.records import to_example
    from pipeline.stages.capture import make_record
    from pipeline.task import Task
    from pipeline.teachers import build_teacher

    task = Task(name="t", kind="classification", instructions="Pick the intent.", labels=LABELS)
    cfg = TeacherConfig(spec=f"local:{tiny_llama_dir}", max_new_tokens=8, label_distribution=True)
    teacher = build_teacher(cfg.spec, cfg, LABELS)
    plain = build_teacher(cfg.spec, cfg.model_copy(update={"label_distribution": False}), LABELS)
    assert teacher.identity() != plain.identity(), "scored and unscored answers must not share a cache entry"
    completion = asyncio.run(teacher.complete([{"role": "user", "content": PROMPTS[0]}]))
    assert set(completion.label_logprobs) == set(LABELS) and all(v < 0 for v in completion.label_logprobs.values())
    record = make_record(
        {"id": "1", "messages": [{"role": "user", "content": PROMPTS[0]}]},
        completion,
        cfg.spec,
        teacher.identity(),
        "capture",
        None,
    )
    probs = to_example(record, task, "user")["label_probs"]
    assert sum(probs.values()) == pytest.approx(1.0)
    assert max(probs, key=probs.get) == max(completion.label_logprobs, key=completion.label_logprobs.get)
    with pytest.raises(DistillError, match="teacher.label_distribution scores the task's labels"):
        build_teacher(cfg.spec, cfg, None)
