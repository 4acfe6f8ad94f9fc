"""The end-to-end recipe at tiny size (the embedded teacher, a tiny student, 32 prompts from data/):
shared by the pipeline and loop end-to-end tests."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def write_recipe(folder: Path, student: Path, **train) -> Path:
    recipe = {
        "name": "e2e",
        "model": {"base": str(student)},
        "teacher": {"spec": "local:embedded:smollm2-135m-instruct", "max_new_tokens": 6, "batch_size": 16},
        "capture": {
            "prompts": str(ROOT / "data" / "prompts.jsonl"),
            "task": str(ROOT / "data" / "task.yaml"),
            "limit": 32,
            "cache": str(folder / "cache.sqlite"),
        },
        # The real teacher answers off-label often at this size; keep them so splits stay non-empty.
        "curate": {"labels_only": False, "min_examples": 10},
        # A random tiny student never learns to stop in 2 steps: the EOS gate only warns here.
        "train": {
            "max_steps": 2,
            "batch_size": 4,
            "logging_steps": 1,
            "max_seq_len": 256,
            "eos_check": "warn",
            **train,
        },
        "eval": {"max_new_tokens": 4, "limit": 8},
        "export": {"verify_prompts": 2, "verify_max_new_tokens": 4},
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "e2e"},
    }
    path = folder / "e2e.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
