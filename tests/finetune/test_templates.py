"""The shipped chat templates against their models' own, on the real tokenizers (tests/support/real_tokenizers.py).

    .venv/bin/pytest -q tests/finetune/test_templates.py

Llama 3.2: recipes/templates/llama3.2.jinja is Meta's format with the date pinned; its bytes equal
Meta's template rendered with date_string="26 Jul 2024", never today's date. Mistral v0.3:
recipes/templates/mistral-v0.3.jinja's token ids equal what mistral-common 1.13.1 encodes (its v3
tokenizer, the one Mistral-7B-Instruct-v0.3 ships), recorded below because mistral-common is not
a dependency (it pins numpy<2.4); and on prompts (a conversation ending with a user turn) its bytes
equal the hub template's.
"""

from datetime import datetime
from pathlib import Path

import pytest
from support import real_tokenizers
from support.official_templates import MISTRAL_V03_OFFICIAL

ROOT = Path(__file__).resolve().parents[2]
SYSTEM = "Classify the banking request."
DATE_LINES = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"

# meta-llama/Llama-3.2-1B-Instruct's chat_template (tokenizer_config.json), verbatim.
LLAMA32_OFFICIAL = """\
{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CONVERSATIONS = {
    "user": [{"role": "user", "content": "my card never arrived"}],
    "system+user": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "my card never arrived"}],
    "multi": [
        {"role": "user", "content": "refund"},
        {"role": "assistant", "content": "Request a refund, please."},
        {"role": "user", "content": "Où est ma carte ? 2 semaines déjà…"},
    ],
    "system+multi": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "refund"},
        {"role": "assistant", "content": "refund"},
        {"role": "user", "content": "how do I top up by bank transfer? it has been pending for days"},
    ],
    "train": [{"role": "user", "content": "my card never arrived"}, {"role": "assistant", "content": "card_arrival"}],
    "system+train": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "my card never arrived"},
        {"role": "assistant", "content": "card_arrival"},
    ],
}
# mistral-common 1.13.1, MistralTokenizer.v3(): encode_chat_completion(ChatCompletionRequest(messages=...)).tokens
# for the conversations ending with a user turn; instruct_tokenizer.encode_instruct(InstructRequest(messages=...,
# system_prompt=...)).tokens for the finished ones (train*). Run once in a throwaway venv
# (pip install mistral-common==1.13.1 sentencepiece).
MISTRAL_COMMON_V3 = {
    "user": [1, 3, 1354, 4916, 2252, 7560, 4],
    "system+user": [1, 3, 5718, 2343, 1040, 23033, 2927, 29491, 781, 781, 2684, 4916, 2252, 7560, 4],
    "multi": [
        1,
        3,
        20874,
        4,
        12284,
        1032,
        20874,
        29493,
        5433,
        29491,
        2,
        3,
        1219,
        29680,
        1702,
        4896,
        2021,
        1192,
        2318,
        29473,
        29518,
        4314,
        18019,
        29088,
        29646,
        4,
    ],
    "system+multi": [
        1,
        3,
        20874,
        4,
        20874,
        2,
        3,
        5718,
        2343,
        1040,
        23033,
        2927,
        29491,
        781,
        781,
        6613,
        1279,
        1083,
        2598,
        1350,
        1254,
        5974,
        6766,
        29572,
        1146,
        1427,
        1518,
        16234,
        1122,
        2970,
        4,
    ],
    "train": [1, 3, 1354, 4916, 2252, 7560, 4, 4916, 29498, 1051, 1582, 1050, 2],
    "system+train": [
        1,
        3,
        5718,
        2343,
        1040,
        23033,
        2927,
        29491,
        781,
        781,
        2684,
        4916,
        2252,
        7560,
        4,
        4916,
        29498,
        1051,
        1582,
        1050,
        2,
    ],
}


def _tokenizer(folder: Path, template: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = template
    return tok


def _render(tok, conv: list[dict], **kwargs) -> str:
    prompt = conv[-1]["role"] == "user"
    return tok.apply_chat_template(conv, add_generation_prompt=prompt, tokenize=False, **kwargs)


@pytest.fixture(scope="module")
def llama3_dir() -> Path:
    return real_tokenizers.llama3_dir()


@pytest.fixture(scope="module")
def mistral_dir() -> Path:
    return real_tokenizers.mistral_v03_dir()


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_llama32_template_is_metas_with_the_date_pinned(name, llama3_dir):
    conv = CONVERSATIONS[name]
    ours = _tokenizer(llama3_dir, (ROOT / "recipes" / "templates" / "llama3.2.jinja").read_text())
    meta = _tokenizer(llama3_dir, LLAMA32_OFFICIAL)
    text = _render(ours, conv)
    assert text == _render(meta, conv, date_string="26 Jul 2024")
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + DATE_LINES)
    # Meta's, as transformers renders it (strftime_now defined): today's date, so data would change daily
    today = _render(meta, conv)
    assert f"Today Date: {datetime.now().strftime('%d %b %Y')}\n" in today
    assert ours.apply_chat_template(conv, add_generation_prompt=True, tokenize=False) == meta.apply_chat_template(
        conv, add_generation_prompt=True, tokenize=False, date_string="26 Jul 2024"
    )


def test_llama32_prompt_is_a_prefix_of_the_training_text_and_ends_on_eot(llama3_dir):
    """What finetune trains on: the prompt as inference renders it, then the answer and <|eot_id|>."""
    from pipeline.stages import finetune

    tok = _tokenizer(llama3_dir, (ROOT / "recipes" / "templates" / "llama3.2.jinja").read_text())
    tok.pad_token = tok.eos_token
    prompt = CONVERSATIONS["system+user"]
    ex = finetune.tokenize_prompt_completion(tok, prompt, [{"role": "assistant", "content": "card_arrival"}], 256)
    answer = [t for t, m in zip(ex["input_ids"], ex["completion_mask"]) if m]
    assert tok.decode(answer) == "card_arrival<|eot_id|>"
    assert tok.decode([t for t, m in zip(ex["input_ids"], ex["completion_mask"]) if not m]).count(DATE_LINES) == 1


def test_llama32_modelfile_template_carries_the_date_lines_in_the_first_system_block(llama3_dir):
    from pipeline.export.modelfile import PROBES, infer_chat_format

    tok = _tokenizer(llama3_dir, (ROOT / "recipes" / "templates" / "llama3.2.jinja").read_text())
    prompts = [c for c in CONVERSATIONS.values() if c[-1]["role"] == "user"]  # a final assistant turn is a prefill
    fmt = infer_chat_format(tok, prompts)
    assert fmt is not None and fmt.intro == DATE_LINES and fmt.default_system == ""
    for conv in [*PROBES, *prompts]:  # PROBES has a system message after the first turn: no date lines there
        assert fmt.render(conv) == tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    go = fmt.go_template()
    assert go.count("Today Date: 26 Jul 2024") == 2 and "{{ if eq $i 0 }}Cutting Knowledge" in go


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_mistral_template_encodes_as_mistral_common(name, mistral_dir):
    tok = _tokenizer(mistral_dir, (ROOT / "recipes" / "templates" / "mistral-v0.3.jinja").read_text())
    text = _render(tok, CONVERSATIONS[name])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == MISTRAL_COMMON_V3[name], f"{text!r} -> {tok.convert_ids_to_tokens(ids)}"


@pytest.mark.parametrize("name", [n for n in CONVERSATIONS if not n.startswith(("train", "system+train"))])
def test_mistral_prompts_are_the_hub_templates_bytes(name, mistral_dir):
    """Where the published template is consistent (the conversation ends with the user turn it
    puts the system text into), ours renders the same string: [INST] / [/INST] and their spaces."""
    conv = CONVERSATIONS[name]
    ours = _render(_tokenizer(mistral_dir, (ROOT / "recipes" / "templates" / "mistral-v0.3.jinja").read_text()), conv)
    assert ours == _render(_tokenizer(mistral_dir, MISTRAL_V03_OFFICIAL), conv)
    assert ours.startswith("<s>[INST] ") and ours.endswith("[/INST]")
