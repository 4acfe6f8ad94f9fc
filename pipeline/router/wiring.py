"""Start-up wiring for `distill serve`: the student backend `serve.student` names, the teacher,
the tiers, the policy checked against the export, serving a registry alias (follow.py), and
the teacher-only capture proxy (proxy.py). `serve()`, `serve_alias()` and `serve_proxy()` are
the CLI's entries; they build the app and run it under uvicorn with the serving deadlines
(http_server.py)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, cast

from fastapi import FastAPI

from pipeline.config import ServeConfig
from pipeline.conversation import Shape
from pipeline.errors import DistillError
from pipeline.llm.policy import Policy
from pipeline.router import http_server
from pipeline.router.app import create_app
from pipeline.router.backends import Backend, GgufBackend, StudentBackend, TeacherBackend, UpstreamBackend
from pipeline.router.escalations import EscalationLog
from pipeline.router.follow import Follower, Loaded
from pipeline.router.routing import Tier
from pipeline.router.settings import settings_for
from pipeline.teachers.ledger import read_stored_spend

if TYPE_CHECKING:
    from pipeline.config import Recipe
    from pipeline.registry import Registry, ServedVersion
    from pipeline.task import Task

log = logging.getLogger(__name__)


def check_policy_matches_export(policy_path: Path, export_dir: Path) -> None:
    """Refuse to serve a policy evaluated on another adapter than the one exported (its threshold
    would mean nothing for this model), or on another student input than the export was trained
    on (the router would feed the student a shape it never saw). A folder that is no export (no
    manifest) is served with a warning: nothing says which adapter it holds."""
    from pipeline.artifacts import read_manifest

    try:
        data = json.loads(Path(policy_path).read_text())
        expected = data.get("adapter_sha256")
    except (OSError, ValueError, AttributeError) as err:
        raise DistillError(f"{policy_path}: not a router policy ({type(err).__name__}: {err})") from None
    manifest = read_manifest(Path(export_dir))
    shipped, fed = (manifest.student_input if manifest else None), data.get("student_input", "user")
    if shipped is not None and shipped != fed:
        raise DistillError(
            f"{policy_path} feeds the student its {fed} input (student_input={fed}) but {export_dir} "
            f"was trained on the {shipped} input; rerun `distill evaluate` and `distill export` on "
            "the same curate"
        )
    served = manifest.inputs.get("finetune") if manifest is not None else None
    if served is None:
        log.warning(
            "cannot check the policy against %s: it is no export folder (no manifest naming its adapter)", export_dir
        )
        return
    if expected is None:
        raise DistillError(f"{policy_path}: no adapter_sha256, so not a policy `distill evaluate` wrote; rerun it")
    if expected != served:
        raise DistillError(
            f"{policy_path} was evaluated on adapter {expected[:12]} but {export_dir} was exported from "
            f"adapter {served[:12]}; rerun `distill evaluate` and `distill export` on the same finetune"
        )


def exported_student_input(export_dir: Path) -> Shape:
    """What an export's student was trained on (its manifest says); `user` for a folder that does
    not say (an export from before student_input, or no export at all)."""
    from pipeline.artifacts import read_manifest

    manifest = read_manifest(Path(export_dir))
    shape = (manifest.student_input if manifest is not None else None) or "user"
    return cast(Shape, shape)  # export writes a resolved shape; Policy checks it again


def build_teacher(recipe: Recipe, task: Task, cfg: ServeConfig) -> TeacherBackend:
    """The recipe's teacher for escalations. `logs:` answers from its file (a simulation: module
    docstring of teachers/logs.py); its answers are never bought, so it keeps no cache or ledger."""
    if recipe.teacher.spec.startswith("logs:"):
        return logs_teacher(recipe, task)
    read_stored_spend(cfg.ledger)  # a ledger that does not read fails before the slow load
    return TeacherBackend(recipe.teacher, task, recipe.capture.cache, budget_usd=cfg.budget_usd, ledger_path=cfg.ledger)


def logs_teacher(recipe: Recipe, task: Task) -> TeacherBackend:
    """The logs file answering escalations for the conversations it holds; the rest fall back to
    the student (student-fallback), as when a teacher fails."""
    from pipeline.teachers.logs import LogsTeacher

    ref = recipe.teacher.spec.partition(":")[2]
    teacher = LogsTeacher.for_task(ref, recipe.teacher, task, recipe.eval.cost, recipe.capture.prompts_split)
    price = teacher.price
    log.warning(
        "teacher.spec=%s is a simulation: escalations get the file's answer where it holds the "
        "conversation (route teacher, source logs), student-fallback elsewhere; %s",
        recipe.teacher.spec,
        f"priced at ${price.input_per_mtok}/${price.output_per_mtok} per 1M tokens in/out ({price.source})"
        if price is not None
        else "unpriced: $0 (set eval.cost.teacher_priced_as to price it as an API)",
    )
    return TeacherBackend(recipe.teacher, task, ":memory:", teacher=teacher)


def load_checked_policy(policy_path: Path, export_dir: Path) -> Policy:
    """The policy at `policy_path`, refused when it was evaluated on another adapter."""
    check_policy_matches_export(policy_path, export_dir)
    return Policy.load(policy_path)


def student_for(model_dir: Path, policy: Policy, cfg: ServeConfig) -> Backend:
    """The student `serve.student` names, answering for the export in `model_dir` (whose policy it is)."""
    if cfg.student == "transformers":
        labels = list(policy.labels or []) if policy.needs_label_scores else None  # label signals score every label
        return StudentBackend(
            model_dir,
            score_labels=labels,
            max_batch=cfg.max_batch,
            window_s=cfg.batch_window_ms / 1000,
            decode=policy.decode,
            schema=policy.schema,
        )
    if policy.needs_label_scores:
        raise DistillError(
            f"router signal '{policy.signal}' (decode {policy.decode}) scores every label by "
            f"teacher forcing, which only serve.student=transformers does; serve with it, or "
            "evaluate with router.signal=mean_logprob router.decode=generate"
        )
    if cfg.student == "llama.cpp":
        return GgufBackend(cfg.student_gguf or export_gguf_file(Path(model_dir).parent), schema=policy.schema)
    from pipeline.config import TeacherConfig

    # The teacher section's machinery (spec, key env, timeout) describes any OpenAI-compatible server.
    return UpstreamBackend(
        TeacherConfig(
            spec=cfg.student,
            base_url=cfg.student_base_url,
            api_key_env=cfg.student_api_key_env,
            timeout_s=cfg.deadline_s,
        ),
        schema=policy.schema,
    )


def export_gguf_file(export_dir: Path) -> Path:
    """The export's GGUF for serve.student=llama.cpp: the only one, else the q8_0 one (near-lossless)."""
    from pipeline.artifacts import EXPORT_GGUF, gguf_name

    found = sorted((export_dir / EXPORT_GGUF).glob("*.gguf"))
    if len(found) == 1:
        return found[0]
    preferred = export_dir / EXPORT_GGUF / gguf_name("q8_0")
    if preferred in found:
        return preferred
    if not found:
        raise DistillError(
            f"{export_dir / EXPORT_GGUF}: no GGUF to serve with serve.student=llama.cpp; add gguf to "
            "export.formats and run `make export`, or set serve.student_gguf"
        )
    raise DistillError(
        f"{export_dir / EXPORT_GGUF} holds {', '.join(f.name for f in found)}; choose one with serve.student_gguf"
    )


def build_tiers(cfg: ServeConfig) -> tuple[Tier, ...]:
    """serve.tiers as Tiers, each with its backend and its own policy; a policy that does not load,
    or a backend that cannot be built, is refused naming the tier's setting."""
    tiers = []
    for i, tier in enumerate(cfg.tiers):
        where = f"serve.tiers.{i} ({tier.name})"
        if not Path(tier.policy).is_file():
            raise DistillError(
                f"{where}.policy: {tier.policy} does not exist; point it at that tier's "
                "router_policy.json (`distill evaluate` on that model writes one)"
            )
        try:
            if tier.student == "transformers":
                assert tier.model_dir is not None  # TierConfig requires it of a transformers tier
                check_policy_matches_export(tier.policy, Path(tier.model_dir).parent)
            policy = Policy.load(tier.policy)
        except DistillError as err:
            raise DistillError(f"{where}.policy: {err}") from None
        if tier.student == "transformers":
            assert tier.model_dir is not None  # TierConfig requires it of a transformers tier
            if not (Path(tier.model_dir) / "config.json").is_file():
                raise DistillError(f"{where}.model_dir: {tier.model_dir} has no config.json, so no model to serve")
        # The tier is a student of its own: serve.student's machinery builds it.
        as_student = cfg.model_copy(
            update={
                "student": tier.student,
                "student_gguf": tier.gguf,
                "student_base_url": tier.base_url,
                "student_api_key_env": tier.api_key_env,
            }
        )
        try:
            backend = student_for(Path(tier.model_dir or "."), policy, as_student)
        except DistillError as err:
            raise DistillError(f"{where}: {err}") from None
        tiers.append(Tier.of(tier.name, backend, policy, tier.timeout_s))
    return tuple(tiers)


def _teacher(recipe: Recipe | None, cfg: ServeConfig, needed: bool) -> TeacherBackend | None:
    from pipeline.task import load_task

    if recipe is None or not needed:
        return None
    return build_teacher(recipe, load_task(recipe.capture.task), cfg)


def _escalations(cfg: ServeConfig, teacher: TeacherBackend | None) -> EscalationLog | None:
    return EscalationLog(cfg.escalations, scrub_pii=cfg.scrub_pii) if teacher is not None else None


def serve(
    model_dir: Path, policy: Policy, cfg: ServeConfig, recipe: Recipe | None = None, policy_path: Path | None = None
) -> None:
    """Load the student from `model_dir` and serve it until interrupted (`make serve`).
    `recipe`: where the teacher comes from; None serves without one (live mode only).
    `policy_path`: where `policy` came from, read again on SIGHUP or POST /admin/reload-policy."""
    model_dir = Path(model_dir)
    if cfg.student == "transformers" and not (model_dir / "config.json").is_file():
        raise DistillError(f"{model_dir}: no config.json, so no exported student to serve; run `make export` first")
    settings = settings_for(cfg)  # before the slow load: fail fast
    teacher = _teacher(recipe, cfg, needed=policy.threshold != -math.inf or settings.mode.needs_teacher)
    tiers = build_tiers(cfg)  # before the student: a bad tier fails before the slow load
    student = student_for(model_dir, policy, cfg)
    reload = (lambda: load_checked_policy(policy_path, model_dir.parent)) if policy_path is not None else None
    app = create_app(
        settings,
        {cfg.model_name: student},
        policy,
        teacher=teacher,
        escalations=_escalations(cfg, teacher),
        reload_policy=reload,
        tiers=tiers,
    )
    log.info(
        "serving %s (%s) as '%s' on http://%s:%d/v1 (mode %s, policy %s: %s threshold %s, teacher %s)",
        model_dir,
        cfg.student,
        cfg.model_name,
        cfg.host,
        cfg.port,
        settings.mode,
        app.state.router.policy_hash,
        policy.signal,
        policy.threshold,
        teacher.spec if teacher else "none",
    )
    if tiers:
        log.info(
            "tiers between the student and the teacher: %s",
            ", ".join(f"{t.name} ({t.policy.signal} threshold {t.policy.threshold})" for t in tiers),
        )
    http_server.run(app, settings, cfg.host, cfg.port)


# ---------------------------------------------------------------- serving a registry alias (follow.py)


def load_version(version: ServedVersion, cfg: ServeConfig, signal_name: str = "mean_logprob") -> Loaded:
    """A registry version's student and its run's evaluated policy, checked against its export
    (student-only, with a warning, when the run has none). Raises DistillError or the loader's
    error; the policy is checked before the slow model load."""
    if not (version.source / "config.json").is_file():
        raise DistillError(
            f"{version.name} version {version.version}: {version.source} has no config.json, so no "
            "exported student to serve"
        )
    if version.policy_path is None:
        log.warning(
            "%s version %s: no evaluated policy beside %s; serving it student-only, nothing escalates",
            version.name,
            version.version,
            version.source,
        )
        policy = Policy.student_only(signal_name, exported_student_input(version.source.parent))
    else:
        policy = load_checked_policy(version.policy_path, version.source.parent)
    return Loaded.of(version.version, student_for(version.source, policy, cfg), policy)


def alias_app(registry: Registry, name: str, alias: str, cfg: ServeConfig, recipe: Recipe | None = None) -> FastAPI:
    """The app answering with `name@alias` (and serve.candidate_percent with `name@candidate`),
    following both in `registry` every serve.registry_poll_s."""
    settings = settings_for(cfg)  # before the slow load: fail fast
    tiers = build_tiers(cfg)
    signal_name = recipe.router.signal if recipe is not None else "mean_logprob"

    def load(version: ServedVersion) -> Loaded:
        return load_version(version, cfg, signal_name)

    champion = load(registry.require(name, alias))
    follower = Follower(
        registry, name, alias, champion, load, poll_s=cfg.registry_poll_s, candidate_percent=cfg.candidate_percent
    )
    # Whatever this version's policy, the next one promoted may escalate: keep the teacher at hand.
    teacher = _teacher(recipe, cfg, needed=True)
    app = create_app(
        settings,
        {cfg.model_name: follower},
        champion.policy,
        teacher=teacher,
        escalations=_escalations(cfg, teacher),
        tiers=tiers,
    )
    app.state.follower = follower
    return app


def serve_alias(registry: Registry, name: str, alias: str, cfg: ServeConfig, recipe: Recipe | None = None) -> None:
    """Serve `models:/<name>@<alias>` until interrupted, following the alias when it moves."""
    app = alias_app(registry, name, alias, cfg, recipe)
    teacher = app.state.router.teacher
    log.info(
        "serving models:/%s@%s as '%s' on http://%s:%d/v1 (mode %s, candidate %g%%, registry %s every %g s, "
        "teacher %s)",
        name,
        alias,
        cfg.model_name,
        cfg.host,
        cfg.port,
        cfg.mode,
        cfg.candidate_percent,
        registry.uri,
        cfg.registry_poll_s,
        teacher.spec if teacher else "none",
    )
    http_server.run(app, settings_for(cfg), cfg.host, cfg.port)


# ---------------------------------------------------------------- the teacher-only capture proxy (proxy.py)


def proxy_app(recipe: Recipe) -> FastAPI:
    """`distill serve RECIPE --teacher-only`: the recipe's network teacher behind an OpenAI-compatible
    endpoint, every pair appended to serve.proxy_log."""
    from pipeline.router.proxy import ProxyTeacher, create_proxy_app
    from pipeline.router.record_log import RecordLog
    from pipeline.teachers.registry import build_teacher as build_teacher_now

    cfg = recipe.serve
    provider = recipe.teacher.spec.partition(":")[0]
    if provider not in ("openai", "anthropic"):
        raise DistillError(
            f"--teacher-only forwards requests to a network teacher (openai:<model> or "
            f"anthropic:<model>); teacher.spec={recipe.teacher.spec} cannot take a client's "
            "request as sent"
        )
    settings = settings_for(cfg)
    read_stored_spend(cfg.ledger)
    teacher = ProxyTeacher(recipe.teacher, recipe.capture.cache, budget_usd=cfg.budget_usd, ledger_path=cfg.ledger)
    build_teacher_now(teacher.spec, teacher.cfg)  # a missing key or price fails before the port opens
    return create_proxy_app(
        settings, teacher, RecordLog(cfg.proxy_log, scrub_pii=cfg.scrub_pii), model_names=(cfg.model_name,)
    )


def serve_proxy(recipe: Recipe) -> None:
    cfg = recipe.serve
    app = proxy_app(recipe)
    log.info(
        "capture proxy for %s on http://%s:%d/v1 (point OPENAI_BASE_URL there); recording to %s",
        recipe.teacher.spec,
        cfg.host,
        cfg.port,
        cfg.proxy_log,
    )
    http_server.run(app, settings_for(cfg), cfg.host, cfg.port)
