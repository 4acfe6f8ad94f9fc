"""The Ollama Modelfile beside the GGUF files: FROM, the chat template as a Go template, stops.

    ollama create NAME -f runs/<recipe>/export/gguf/Modelfile

Ollama cannot run the Jinja template the model was trained with, so the chat format is read
back from it: the template is rendered with marker contents, which gives the text before each
role's content, after it, the generation prompt, any default system prompt and any text only
the first system block carries (Llama 3.1/3.2's knowledge-cutoff and date lines). The Go template
is built from those pieces, and a Python twin of it must reproduce the Jinja rendering on probe
conversations and the verification prompts, or no TEMPLATE is written (Ollama then falls back
to its own detection from the GGUF) and the Modelfile says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MODELFILE = "Modelfile"
_MARK = {"system": "QQSYSQQ", "user1": "QQUSERONEQQ", "assistant": "QQASSTQQ", "user2": "QQUSERTWOQQ"}
PROBES = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "user", "content": "c"}],
]


@dataclass(frozen=True)
class ChatFormat:
    """A template of the form: prelude, [default system], then per message before[role] + content + after;
    the first system block (given or default) has `intro` between its header and its content."""

    prelude: str
    default_system: str | None  # rendered when the first message is not a system message
    before: dict[str, str]
    after: str
    generation: str
    intro: str = ""

    def render(self, messages: list[dict]) -> str:
        """Python twin of `go_template`: the same branches, in the same order."""
        out = []
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            if i == 0:
                out.append(self.prelude)
                if m["role"] != "system" and self.default_system is not None:
                    out.append(self.before["system"] + self.intro + self.default_system + self.after)
            out.append(self.before[m["role"]] + (self.intro if i == 0 and m["role"] == "system" else "") + m["content"])
            if m["role"] != "assistant" or not last:
                out.append(self.after)
            if last and m["role"] != "assistant":
                out.append(self.generation)
        return "".join(out)

    def go_template(self) -> str:
        # No `{{-` trim markers anywhere: the literal pieces end in newlines that must survive.
        default = ""
        if self.default_system is not None:
            default = (
                f'{{{{ if ne .Role "system" }}}}{self.before["system"]}{self.intro}{self.default_system}'
                f"{self.after}{{{{ end }}}}"
            )
        intro = f"{{{{ if eq $i 0 }}}}{self.intro}{{{{ end }}}}" if self.intro else ""
        return (
            "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            f"{{{{ if eq $i 0 }}}}{self.prelude}{default}{{{{ end }}}}"
            f'{{{{ if eq .Role "system" }}}}{self.before["system"]}{intro}{{{{ .Content }}}}{self.after}'
            f'{{{{ else if eq .Role "user" }}}}{self.before["user"]}{{{{ .Content }}}}{self.after}'
            f'{{{{ else if eq .Role "assistant" }}}}{self.before["assistant"]}{{{{ .Content }}}}'
            f"{{{{ if not $last }}}}{self.after}{{{{ end }}}}{{{{ end }}}}"
            f'{{{{ if and $last (ne .Role "assistant") }}}}{self.generation}{{{{ end }}}}'
            "{{ end }}"
        )


def infer_chat_format(tokenizer, conversations: Sequence[list[dict]] = ()) -> ChatFormat | None:
    """Read the format back from the tokenizer's Jinja template; None when it is not of this form."""
    try:
        candidates = _infer(tokenizer)
    except (ValueError, KeyError, IndexError):
        return None
    for fmt in candidates:
        pieces = [fmt.prelude, fmt.default_system or "", fmt.after, fmt.generation, fmt.intro, *fmt.before.values()]
        if any("{{" in p or '"""' in p for p in pieces):
            continue  # cannot be written literally into a Go template inside """ quotes
        if all(_same(fmt, tokenizer, conv) for conv in [*PROBES, *conversations]):
            return fmt
    return None


def _same(fmt: ChatFormat, tokenizer, conv: list[dict]) -> bool:
    from jinja2 import TemplateError

    try:
        expected = _render(tokenizer, conv, True)
    except TemplateError:  # a template may refuse a probe (a system turn mid-conversation): nothing to compare
        return True
    return fmt.render(conv) == expected


def _render(tokenizer, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)


def _infer(tokenizer) -> list[ChatFormat]:
    """Candidate formats (no prelude, or the BOS text as prelude); the caller keeps the first
    that reproduces the template. Empty when the template is not of this form at all."""
    m = _MARK
    conv = [
        {"role": "system", "content": m["system"]},
        {"role": "user", "content": m["user1"]},
        {"role": "assistant", "content": m["assistant"]},
        {"role": "user", "content": m["user2"]},
    ]
    full, closed = _render(tokenizer, conv, True), _render(tokenizer, conv, False)
    if not full.startswith(closed):
        return []
    generation = full[len(closed) :]
    pos = [closed.index(m[k]) for k in ("system", "user1", "assistant", "user2")]
    ends = [p + len(m[k]) for p, k in zip(pos, ("system", "user1", "assistant", "user2"))]
    if pos != sorted(pos):
        return []
    head, after = closed[: pos[0]], closed[ends[3] :]
    joins = [closed[ends[i] : pos[i + 1]] for i in range(3)]
    if not after or not all(j.startswith(after) for j in joins):
        return []
    before_user, before_assistant = joins[0][len(after) :], joins[1][len(after) :]
    if joins[2] != after + before_user:
        return []
    # Without a system message: is a default one injected, and what comes before everything?
    alone = _render(tokenizer, [{"role": "user", "content": m["user1"]}], False)
    tail = before_user + m["user1"] + after
    if not alone.endswith(tail):
        return []
    lead = alone[: -len(tail)]
    later_system = _later_system_header(tokenizer, after)
    bos = tokenizer.bos_token or ""
    found = []
    for prelude in ["", bos] if bos and head.startswith(bos) else [""]:
        if lead == prelude:
            default = None
        elif lead.startswith(head) and lead.endswith(after):
            default = lead[len(head) : -len(after)]
        else:
            continue
        system, intro = head[len(prelude) :], ""
        if later_system is not None and system.startswith(later_system):
            system, intro = later_system, system[len(later_system) :]
        before = {"system": system, "user": before_user, "assistant": before_assistant}
        found.append(ChatFormat(prelude, default, before, after, generation, intro))
    return found


def _later_system_header(tokenizer, after: str) -> str | None:
    """What a system message after the first is preceded by (None: the template refuses one)."""
    from jinja2 import TemplateError

    m = _MARK
    try:
        mid = _render(
            tokenizer,
            [
                {"role": "user", "content": m["user1"]},
                {"role": "system", "content": m["system"]},
                {"role": "user", "content": m["user2"]},
            ],
            False,
        )
    except TemplateError:
        return None
    start = mid.find(m["user1"] + after)
    end = mid.find(m["system"])
    if start < 0 or end < start:
        return None
    return mid[start + len(m["user1"] + after) : end]


def stop_strings(fmt: ChatFormat | None, tokenizer) -> list[str]:
    """The EOS text, and where the next turn would begin: what ends an answer."""
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    if fmt is not None:
        stops += [fmt.after.strip(), fmt.before["user"].strip()]
    return list(dict.fromkeys(s for s in stops if s))


def modelfile_text(gguf_file: str, fmt: ChatFormat | None, stops: list[str], temperature: float = 0.0) -> str:
    lines = [
        f"# ollama create <name> -f {MODELFILE}   (run in this folder; FROM is relative to it)",
        f"FROM ./{gguf_file}",
    ]
    if fmt is not None:
        lines.append(f'TEMPLATE """{fmt.go_template()}"""')
    else:
        lines.append(
            "# TEMPLATE omitted: the chat template is not of a prefix/content/suffix form this export "
            "can translate; Ollama detects one from the GGUF's tokenizer.chat_template"
        )
    lines += [f"PARAMETER stop {_quote(s)}" for s in stops]
    lines.append(f"PARAMETER temperature {temperature:g}")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
