"""Serving by registry alias, and following the alias when it moves.

    distill serve RECIPE --model models:/<name>@champion
    distill promote RECIPE 2        (the router answers with version 2 a poll and a model load later)

A thread reads the alias (and the `candidate` alias) every `serve.registry_poll_s`. When one
moves, the new version's student and policy are loaded on that thread, off the request path,
then swapped in as one reference: a request keeps the version it picked, so requests in flight
finish on the old student, which is freed once they have. A version that fails to load is
logged, counted (`distill_errors{kind="model_load"}`) and not retried until its alias moves
again; what was serving keeps serving. While there is a candidate, `serve.candidate_percent` of
requests (by a hash of `user`, else the request id) get its version, with its own policy.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.llm.policy import Policy
from pipeline.registry import CANDIDATE
from pipeline.router.modes import Mode
from pipeline.router.routing import policy_hash

if TYPE_CHECKING:
    from pipeline.registry import Registry, ServedVersion
    from pipeline.router.backends import Backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """One registry version, loaded and ready to answer."""

    version: str
    backend: Backend
    policy: Policy
    policy_hash: str

    @classmethod
    def of(cls, version: str, backend: Backend, policy: Policy) -> Loaded:
        return cls(version, backend, policy, policy_hash(policy))


@dataclass(frozen=True)
class Served:
    """What answers now; replaced whole, so a request reads champion and candidate from one moment."""

    champion: Loaded
    candidate: Loaded | None = None


class Follower:
    """Keeps the version `alias` points at (and the candidate's) loaded; `pick` chooses per request.

    `load`: a registry version -> Loaded (slow: reads the model); raises when it cannot."""

    def __init__(
        self,
        registry: Registry,
        name: str,
        alias: str,
        champion: Loaded,
        load: Callable[[ServedVersion], Loaded],
        poll_s: float = 5.0,
        candidate_percent: float = 0.0,
    ):
        self.registry, self.name, self.alias = registry, name, alias
        self.load = load
        self.poll_s = poll_s
        # The canary mode's stable hash, salted so the candidate's share is not the same users
        # a serve.mode=canary split already picked.
        self._split = Mode("canary", candidate_percent)
        self.served = Served(champion)
        self._failed: dict[str, str] = {}  # alias -> the version that failed to load, until the alias moves
        self._alias_gone = False
        self._synced = threading.Event()
        self.polls = 0  # registry reads completed, failed ones included
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_error: Callable[[str], None] = lambda kind: None

    @property
    def ready(self) -> bool:
        """After the first registry read, so a candidate is loaded (or refused) before /ready says so."""
        return self._synced.is_set()

    @property
    def follows_candidate(self) -> bool:
        return self.alias != CANDIDATE and self._split.percent > 0

    def versions(self, served: Served | None = None) -> dict[str, str]:
        """alias -> version, of what serves now (or of `served`)."""
        return {alias: loaded.version for alias, loaded in self._by_alias(served or self.served)}

    def describe(self, served: Served | None = None) -> dict[str, dict[str, str]]:
        """For /ready: each alias's version and policy hash."""
        return {
            alias: {"version": loaded.version, "policy": loaded.policy_hash}
            for alias, loaded in self._by_alias(served or self.served)
        }

    def _by_alias(self, served: Served) -> list[tuple[str, Loaded]]:
        pairs = [(self.alias, served.champion), (CANDIDATE, served.candidate)]
        return [(alias, loaded) for alias, loaded in pairs if loaded is not None]

    def pick(self, key: str) -> Loaded:
        served = self.served  # one read: a swap between two reads could pair versions that never served together
        if served.candidate is not None and self._split.routed(f"candidate:{key}"):
            return served.candidate
        return served.champion

    # ------------------------------------------------------------ the thread

    def start(self, on_error: Callable[[str], None]) -> None:
        """Follow the registry on a daemon thread; `on_error(kind)` counts each failure."""
        self.on_error = on_error
        self._stop.clear()
        self._thread = threading.Thread(target=self._follow, name=f"follow-{self.name}@{self.alias}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)  # a load in progress finishes first; daemon, so never blocks exit

    def _follow(self) -> None:
        while True:
            try:
                self.sync()
            except Exception as err:  # noqa: BLE001 - one bad poll (store locked, unreachable) must not end following
                self._error(
                    "registry_poll",
                    f"cannot read the registry, still serving {self.versions()}: {type(err).__name__}: {err}",
                )
            self.polls += 1
            self._synced.set()
            if self._stop.wait(self.poll_s):
                return

    # ------------------------------------------------------------ one poll

    def sync(self) -> None:
        """Read the aliases once, load what moved, swap once. Raises when the registry cannot be read."""
        champion_at = self.registry.resolve(self.name, self.alias)
        candidate_at = self.registry.resolve(self.name, CANDIDATE) if self.follows_candidate else None
        current = self.served
        champion = self._champion(current, champion_at)
        if candidate_at is not None and candidate_at.version == champion.version:
            candidate_at = None  # the champion itself (mid-promotion): nothing to canary
        candidate = self._next(CANDIDATE, current, candidate_at)
        fresh = Served(champion, candidate)
        if fresh != current:
            self.served = fresh  # one reference: atomic for the request path
            log.info("%s: serving %s (was %s)", self.name, self.versions(fresh), self.versions(current))

    def _champion(self, current: Served, target: ServedVersion | None) -> Loaded:
        if target is None:
            # A deleted alias is no instruction to stop serving: keep the last version, say so once.
            if not self._alias_gone:
                log.warning(
                    "%s has no '%s' alias any more: still serving version %s",
                    self.name,
                    self.alias,
                    current.champion.version,
                )
            self._alias_gone = True
            return current.champion
        self._alias_gone = False
        loaded = self._next(self.alias, current, target)
        assert loaded is not None  # a target is set, and the champion alias always had a version
        return loaded

    def _next(self, alias: str, current: Served, target: ServedVersion | None) -> Loaded | None:
        """The Loaded for `target`: one already serving, else freshly loaded, else (it does not
        load) what `alias` had; None when the alias points nowhere."""
        if target is None:
            self._failed.pop(alias, None)
            return None
        for loaded in (current.champion, current.candidate):
            if loaded is not None and loaded.version == target.version:
                return loaded  # a promoted candidate is already loaded
        if self._failed.get(alias) == target.version:
            return self._kept(alias, current)
        try:
            loaded = self.load(target)
        except Exception as err:  # noqa: BLE001 - any load failure must leave the serving version in place
            self._failed[alias] = target.version
            self._error(
                "model_load",
                f"{self.name} version {target.version} ({alias}, {target.source}) did not "
                f"load, still serving {self.versions(current)}: {type(err).__name__}: {err}",
            )
            return self._kept(alias, current)
        self._failed.pop(alias, None)
        return loaded

    def _kept(self, alias: str, current: Served) -> Loaded | None:
        return current.champion if alias == self.alias else current.candidate

    def _error(self, kind: str, message: str) -> None:
        log.error(message)
        self.on_error(kind)
