"""Teachers: one interface over every source of labels.

Spec strings pick one:
  local:<model-ref>     a transformers model in-process, batched (no cost, no network)
  openai:<model>        any OpenAI-compatible chat-completions API (openai_compat.py)
  anthropic:<model>     Anthropic's Messages API (anthropic.py)
  logs:<path>           answers the user already has (logs.py); no calls at all

    distill capture RECIPE teacher.spec=openai:gpt-4o-mini

The pieces:
  protocol.py   `Teacher`: spec, identity(), price, notes, in_process, complete, complete_batch, aclose
  registry.py   provider name -> class; `build_teacher(spec, cfg, labels)`
  service.py    `TeacherService`: the cache, the ledger (price, budget) and the dispatcher
                (concurrency, rate limits, retries) in front of a teacher. Capture, the judge
                and the router's teacher backend ask teachers only through it.
  errors.py     TeacherCallError (billable / unreachable), TeacherAuthError, TeacherUnreachableError, HTTP status rules
  keys.py       API keys: lookup, and keeping them out of records and logs
  cache.py ledger.py dispatch.py   the service's parts; logs.py sources.py   capture's readers
"""

from pipeline.teachers.errors import TeacherAuthError, TeacherCallError, TeacherUnreachableError
from pipeline.teachers.protocol import Teacher
from pipeline.teachers.registry import PROVIDERS, TEACHERS, build_teacher, parse_spec

__all__ = [
    "PROVIDERS",
    "TEACHERS",
    "Teacher",
    "TeacherAuthError",
    "TeacherCallError",
    "TeacherUnreachableError",
    "build_teacher",
    "parse_spec",
]
