"""What the student and the teacher are shown of a conversation (pipeline/conversation.py), and the
proof that the student is trained, evaluated and served on the same tokens.

    .venv/bin/pytest -q tests/core/test_conversation.py
"""

import json

import pytest

from pipeline.conversation import (
    Unsupported,
    read_messages,
    read_student_view,
    request_params,
    resolve_student_input,
    split_answer,
    student_messages,
    write_student_view,
)
from pipeline.task import Task, WorkedExample

SYSTEM = {"role": "system", "content": "Customer profile: Premium since 2015."}
HISTORY = [
    {"role": "user", "content": "hi, it's about order A-12"},
    {"role": "assistant", "content": "Sure, what happened?"},
    {"role": "user", "content": "it never arrived"},
]


def test_text_parts_are_joined_and_roles_kept_as_sent():
    raw = [
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "input_text", "text": "brief."}]},
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": None, "refusal": None},
    ]
    assert read_messages(raw) == [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": ""},
    ]


@pytest.mark.parametrize(
    "turn,kind",
    [
        ({"role": "tool", "content": "42", "tool_call_id": "1"}, "tool calls"),
        ({"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, "tool calls"),
        ({"role": "assistant", "content": None, "function_call": {"name": "f"}}, "tool calls"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "images"),
        ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, "audio"),
        ({"role": "assistant", "content": None, "audio": {"id": "a"}}, "audio"),
        ({"role": "user", "content": [{"type": "file", "file": {}}]}, "files"),
    ],
)
def test_content_the_student_cannot_read_is_named_by_kind(turn, kind):
    with pytest.raises(Unsupported) as err:
        read_messages([{"role": "user", "content": "x"}, turn])
    assert err.value.kind == kind and str(err.value) == f"{kind} are not supported"


def test_a_record_is_a_conversation_ending_with_a_user_turn_then_the_answer():
    context, answer = split_answer([SYSTEM, *HISTORY, {"role": "assistant", "content": "track_order"}])
    assert (context, answer) == ([SYSTEM, *HISTORY], "track_order")
    with pytest.raises(ValueError, match="does not end in an assistant answer"):
        split_answer(HISTORY)
    with pytest.raises(ValueError, match="no user turn right before the answer"):
        split_answer([SYSTEM, {"role": "assistant", "content": "x"}])


def test_the_student_reads_the_conversation_or_its_user_and_assistant_turns():
    second = {"role": "developer", "content": "Reply with one label."}
    conversation = [SYSTEM, second, *HISTORY]
    assert student_messages(conversation, "conversation") == [
        {"role": "system", "content": f"{SYSTEM['content']}\n\n{second['content']}"},
        *HISTORY,
    ]
    assert student_messages(conversation, "user") == HISTORY
    assert student_messages(HISTORY, "conversation") == HISTORY  # no system prompt: none invented
    with pytest.raises(ValueError):
        student_messages(HISTORY, "auto")


@pytest.mark.parametrize(
    "systems,shape,static",
    [
        (["You triage messages."] * 3, "user", "You triage messages."),
        ([None] * 3, "user", None),
        (["Customer #1", "Customer #2", "Customer #1"], "conversation", None),
        (["You triage messages.", None, "You triage messages."], "conversation", None),
    ],
)
def test_auto_learns_a_shared_system_prompt_away_and_keeps_a_varying_one(systems, shape, static):
    conversations = [([{"role": "system", "content": s}] if s else []) + HISTORY for s in systems]
    view = resolve_student_input("auto", conversations)
    assert (view.shape, view.static_system_prompt, view.requested) == (shape, static, "auto")
    assert view.system_prompts == len(set(systems))
    forced = resolve_student_input("user", conversations)
    assert forced.shape == "user" and ("distinct system prompts" in forced.reason) == (len(set(systems)) > 1)
    assert resolve_student_input("conversation", conversations).shape == "conversation"


def test_the_resolved_view_is_written_and_read_back_and_an_old_curate_reads_user(tmp_path):
    view = resolve_student_input("auto", [[SYSTEM, *HISTORY], HISTORY])
    write_student_view(tmp_path, view)
    assert read_student_view(tmp_path) == view
    assert read_student_view(tmp_path / "missing").shape == "user"


def test_the_teacher_gets_the_task_instructions_only_before_a_conversation_without_its_own():
    task = Task(
        name="t",
        instructions="Reply with one label.",
        labels=["a", "b"],
        examples=[WorkedExample(prompt="x", label="a")],
    )
    assert task.teacher_messages(HISTORY) == [
        {"role": "system", "content": "Reply with one label."},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "a"},
        *HISTORY,
    ]
    assert task.teacher_messages(HISTORY, few_shot=False)[1:] == HISTORY
    developer = {"role": "developer", "content": SYSTEM["content"]}
    assert task.teacher_messages([developer, *HISTORY]) == [SYSTEM, *HISTORY]
    assert Task(name="t", kind="generation", instructions="").teacher_messages(HISTORY) == HISTORY


def test_only_the_request_parameters_that_change_the_answer_are_kept():
    body = {
        "model": "m",
        "messages": [],
        "max_tokens": 20,
        "temperature": 0,
        "top_p": None,
        "stream": True,
        "response_format": {"type": "json_object"},
        "user": "u",
        "seed": 1,
        "stop": ["\n"],
    }
    assert request_params(body) == {
        "max_tokens": 20,
        "temperature": 0,
        "response_format": {"type": "json_object"},
        "seed": 1,
        "stop": ["\n"],
    }


# ---------------------------------------------------------------- one rendered prompt everywhere


def test_finetune_evaluate_and_the_router_feed_the_student_the_same_token_ids(tiny_llama_dir):
    """One conversation with per-request context and history: the prompt tokens finetune trains
    on, the tokens evaluate's answer_all feeds the student and the tokens the served router feeds
    it are the same ids."""
    import openai
    from datasets import Dataset
    from support.router_helpers import running

    from pipeline.config import Recipe
    from pipeline.evaluation.answering import answer_all
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer
    from pipeline.llm.policy import Policy
    from pipeline.router.app import create_app
    from pipeline.router.backends import StudentBackend
    from pipeline.router.settings import ServeSettings
    from pipeline.stages import finetune

    conversation = [SYSTEM, *HISTORY]
    row = {"id": "c1", "messages": conversation, "completion": "track_order"}
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    pairs = finetune.to_prompt_completion(Dataset.from_list([row]), "conversation")
    (trained,) = finetune.tokenize_dataset(pairs, tokenizer, max_len=512)
    trained_prompt = [t for t, m in zip(trained["input_ids"], trained["completion_mask"]) if not m]

    fed: list[list[int]] = []

    def spy(model):
        generate = model.generate

        def recording(*args, **kwargs):
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
            fed.extend(row[m.bool()].tolist() for row, m in zip(ids, mask))  # left padding removed
            return generate(*args, **kwargs)

        model.generate = recording
        return model

    model = spy(load_model(str(tiny_llama_dir), device_plan()).eval())
    recipe = Recipe(name="t", model={"base": str(tiny_llama_dir)}, eval={"max_new_tokens": 4})
    answer_all(
        model, tokenizer, [row], recipe, Task(name="t", kind="generation", instructions=""), "tuned", "conversation"
    )

    student = StudentBackend(tiny_llama_dir)
    spy(student.model)
    app = create_app(ServeSettings(max_tokens=4), {"m": student}, Policy.student_only(student_input="conversation"))
    with running(app) as url:
        openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).chat.completions.create(
            model="m", messages=conversation, max_tokens=4
        )
    assert len(fed) == 2 and fed[0] == fed[1] == trained_prompt
    assert tokenizer.decode(trained_prompt).count(SYSTEM["content"]) == 1
    assert json.dumps(HISTORY[1]["content"])[1:-1] in tokenizer.decode(trained_prompt)
