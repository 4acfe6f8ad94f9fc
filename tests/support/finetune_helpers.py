"""Shared by the finetune tests: a small labelled set and a tiny recipe, and a spy on the stage's
trainer callback."""

from pathlib import Path

from pipeline.config import Recipe
from pipeline.stages import finetune

LABELS = ["card_arrival", "lost_or_stolen_card", "refund", "top_up_failed"]
PROMPTS = [
    "my card has not arrived yet",
    "I lost my card yesterday",
    "please refund my payment",
    "top up did not work",
    "where is my new card",
    "someone stole my wallet and card",
    "I want my money back",
    "my top-up was declined",
]


def recipe(base: Path, **train) -> Recipe:
    train = {
        "max_steps": 2,
        "batch_size": 4,
        "logging_steps": 1,
        "max_seq_len": 128,
        "lr": 1e-3,
        "eos_check": "off",
        "save_steps": 50,
        **train,
    }
    return Recipe.model_validate({"name": "t", "model": {"base": str(base)}, "train": train})


def _then(hook, inherited):
    """A callback method that calls `hook(state=..., **kw)`, then the inherited method."""

    def method(self, args, state, control, **kw):
        hook(state=state, **kw)
        return inherited(self, args, state, control, **kw)

    return method


def spy_on_trainer(monkeypatch, **hooks):
    """Add hooks (on_train_begin(model=...), on_step_end(state=...), ...) to the stage's own callback."""
    original = finetune._metrics_callback

    def patched(*args, **kwargs):
        callback = original(*args, **kwargs)
        methods = {name: _then(hook, getattr(type(callback), name)) for name, hook in hooks.items()}
        callback.__class__ = type("Spy", (type(callback),), methods)
        return callback

    monkeypatch.setattr(finetune, "_metrics_callback", patched)
