"""The finetune trainer's loss (pipeline/llm/trainer.py) equals TRL's hard-label loss on the same
batch, padded and padding-free, with and without label smoothing, while the vocabulary projection
runs on the answer positions alone.

    .venv/bin/python -m pytest -q tests/finetune/test_answer_loss.py
"""

import pytest
from support.finetune_helpers import LABELS, PROMPTS, recipe

from pipeline.llm.trainer import trainer_class
from pipeline.stages import finetune


def _trainer(model_dir, tmp_path, **train):
    from datasets import Dataset

    from pipeline.llm.loading import device_plan, load_model, load_tokenizer

    cfg = recipe(model_dir, **train).train
    plan = device_plan()
    tokenizer = load_tokenizer(str(model_dir))
    pairs = Dataset.from_list([{"prompt": p, "completion": LABELS[i % 4]} for i, p in enumerate(PROMPTS[:4])])
    return trainer_class()(
        model=load_model(str(model_dir), plan),
        args=finetune.build_sft_config(cfg, tmp_path, plan),
        train_dataset=finetune.tokenize_dataset(finetune.to_prompt_completion(pairs, "user"), tokenizer, 128),
        processing_class=tokenizer,
        peft_config=finetune.build_lora_config(cfg.lora),
    )


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("padding_free", [True, False])
def test_answer_only_loss_equals_trls_and_projects_the_answer_tokens_alone(
    tiny_llama_dir, tmp_path, padding_free, label_smoothing
):
    import torch
    from trl import SFTTrainer

    trainer = _trainer(tiny_llama_dir, tmp_path, padding_free=padding_free, label_smoothing=label_smoothing)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    answer = batch["labels"][:, 1:] != -100
    projected = []
    head = trainer.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda _m, args, _o: projected.append(args[0].shape[:-1].numel()))
    trainer.model.eval()
    try:
        with torch.no_grad():
            ours = float(trainer.compute_loss(trainer.model, dict(batch)))
            rows = list(projected)
            theirs = float(SFTTrainer.compute_loss(trainer, trainer.model, dict(batch)))
    finally:
        hook.remove()
    assert ours == pytest.approx(theirs, rel=1e-5)
    # Padding-free: one row, exactly its answer tokens; padded: each row at the union of answer positions.
    assert rows == [batch["labels"].shape[0] * int(answer.any(dim=0).sum())]
    assert rows[0] < batch["input_ids"].numel() / 2


def test_a_batch_without_answer_tokens_gives_a_zero_loss_not_nan(tiny_llama_dir, tmp_path):
    import torch

    trainer = _trainer(tiny_llama_dir, tmp_path, padding_free=True)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[0]]))
    batch["labels"] = torch.full_like(batch["labels"], -100)
    assert float(trainer.compute_loss(trainer.model, batch)) == 0.0
