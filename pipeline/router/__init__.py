"""OpenAI-compatible serving of the exported student (`make serve` / `distill serve RECIPE`).

app.py          create_app(settings, backends, policy): the routes, admission, SSE, /metrics
guards.py       bearer auth, the body limit, the error handlers (every error in OpenAI's envelope)
settings.py     ServeSettings and the bearer keys
wiring.py       start-up: the student serve.student names, the teacher, tiers, serving an alias
routing.py      per request: student, policy (pipeline/llm/policy.py), tiers, teacher, modes
backends.py     transformers / llama.cpp / upstream students and the teacher
protocol.py     OpenAI request and response models; errors.py typed errors; metrics.py Prometheus
escalations.py  the escalation log (the next round's training data); follow.py registry aliases
modes.py        live, shadow, off and the automatic rollback
"""
