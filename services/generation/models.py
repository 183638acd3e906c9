"""Which model versions are loaded, which one serves, and hot swaps between them.

A swap loads the new version next to the serving one (serving goes on meanwhile), then moves one
reference under a lock: requests already running keep the model object they started with.
A version that fails to load changes nothing but `last_load_error`.
During a canary a second loaded version, the candidate, gets a share of the requests that name no version.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict
from typing import Callable

from ilf.errors import FailedPrecondition, NotFound, Unavailable
from ilf.metrics import track
from ilf.modeling import LoadedModel, check_source, dtype_name, load_version, model_dtype
from ilf.registry import Registry
from ilf.store import CorruptArtifact

from . import metrics
from .attention import use_native_gqa
from .config import GenerationConfig
from .decode import decoder_for

log = logging.getLogger(__name__)

CHANNEL = "generation"
# transformers builds a model on the meta device through process-wide switches, so two loads at once (a LoadModel
# next to the pointer follower's swap) can leave one of them without weights: loads take turns.
_LOADING = threading.Lock()


def initial_version(registry: Registry, settings: GenerationConfig) -> str:
    """ILF_GENERATION_MODEL, else the channel's serving pointer, else the base model."""
    pinned, serving, base = settings.start_model, registry.serving_version(CHANNEL), settings.base_model
    if not pinned and serving and registry.chain(serving)[-1].source != base:
        log.info("serving %s, the channel's pointer in the store; ILF_BASE_MODEL=%s applies only to a store whose "
                 "channel serves nothing (switch with `ilf promote VERSION`)", serving, base)
    return pinned or serving or registry.ensure_base(base, check=check_source).version


def load_for_serving(registry: Registry, version: str) -> LoadedModel:
    """A version in ILF_DTYPE (auto: bfloat16 where the hardware computes in it natively)."""
    return load_version(registry, version, dtype=model_dtype())


class ModelManager:
    def __init__(self, registry: Registry, *, max_loaded: int = 3,
                 loader: Callable[[Registry, str], LoadedModel] = load_for_serving):
        self.registry = registry
        self.max_loaded = max(1, max_loaded)
        self._load = loader
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()   # least recently used first
        self._serving: LoadedModel | None = None
        self._canary: tuple[LoadedModel, float] | None = None         # the candidate and its share of requests
        self._lock = threading.Lock()                                  # guards _loaded and _serving
        self._swap_lock = threading.Lock()                             # one switch or rollback at a time
        self._version_locks: dict[str, threading.Lock] = {}
        self.loading: set[str] = set()
        self.last_swap_duration_seconds = 0.0
        self.last_load_error = ""
        track(self, metrics.MODELS)

    @property
    def serving(self) -> LoadedModel:
        serving = self._serving
        if serving is None:
            raise Unavailable("no model is loaded yet; retry when the health check reports SERVING")
        return serving

    def resolve(self, version: str = "") -> LoadedModel:
        """The loaded model named by version; for none, the serving model (or during a canary, for its share of
        requests, the candidate)."""
        if not version:
            serving, canary = self.serving, self._canary
            return canary[0] if canary and random.random() < canary[1] else serving
        with self._lock:
            loaded = self._loaded.get(version)
        if loaded is None:
            self.registry.get(version)  # NotFound for an unregistered version
            raise NotFound(f"model version {version!r} is registered but not loaded; call LoadModel first")
        return loaded

    def load(self, version: str) -> LoadedModel:
        """Loads a registered version (once) without serving it."""
        self.registry.get(version)
        with self._lock:
            version_lock = self._version_locks.setdefault(version, threading.Lock())
        with version_lock:
            with self._lock:
                if version in self._loaded:
                    self._loaded.move_to_end(version)
                    return self._loaded[version]
                self.loading.add(version)
            started = time.monotonic()
            try:
                with _LOADING:
                    loaded = self._load(self.registry, version)
                use_native_gqa(loaded.model)
                decoder_for(loaded.model)   # fuses its weights now, and refuses a model it cannot decode
            except Exception as error:  # noqa: BLE001 - any load failure leaves serving as it was
                current = self._serving.version if self._serving else "nothing"
                self.last_load_error = f"{version}: {type(error).__name__}: {error}"
                metrics.LOAD_FAILURES.inc()
                log.warning("loading %s failed; still serving %s: %s", version, current, error)
                kind = CorruptArtifact if isinstance(error, CorruptArtifact) else FailedPrecondition
                raise kind(f"model version {version!r} failed to load ({type(error).__name__}: {error}); "
                           f"still serving {current}") from error
            finally:
                with self._lock:
                    self.loading.discard(version)
            log.info("loaded %s (%s) in %.1f s", version, dtype_name(loaded.dtype), time.monotonic() - started)
            with self._lock:
                self._loaded[version] = loaded
                self._evict(keep=version)
            return loaded

    def serve(self, version: str, *, promote: bool) -> LoadedModel:
        """Loads version and makes it the serving one; promote also moves the registry pointer."""
        with self._swap_lock:
            started = time.monotonic()
            loaded = self.load(version)
            if promote:
                self.registry.promote(CHANNEL, version)
            self._swap_to(loaded, started)
            return loaded

    def rollback(self) -> LoadedModel:
        """Serves the version served before the current one (per the registry's pointer history)."""
        with self._swap_lock:
            started = time.monotonic()
            pointer = self.registry.serving(CHANNEL)
            if not pointer or not pointer["history"]:
                raise FailedPrecondition("there is no earlier generation version to roll back to")
            loaded = self.load(pointer["history"][-1])   # load first: a failed load changes nothing
            self.registry.rollback(CHANNEL)
            self._swap_to(loaded, started)
            return loaded

    def follow(self, pointer: dict) -> None:
        """Serves what the channel's serving pointer names and routes its canary share, if any, to the candidate.

        Versions load before anything changes, so a failed load (raised) leaves the serving version as it was;
        a candidate that fails to load gets no requests."""
        if pointer["version"] != self.serving.version:
            self.serve(pointer["version"], promote=False)
        canary = pointer.get("canary")
        if not canary:
            self._canary = None
            return
        if not self._canary or self._canary[0].version != canary["version"]:
            self._canary = None   # the old candidate gets no new requests while the new one loads
        candidate = self.load(canary["version"])
        self._canary = (candidate, float(canary["share"]))
        log.info("canary: %s gets %.0f%% of new requests, %s the rest", candidate.version, 100 * self._canary[1],
                 self.serving.version)

    def describe(self) -> dict:
        """What this replica serves, for its fleet report."""
        canary = self._canary
        with self._lock:
            return {"serving_version": self._serving.version if self._serving else "",
                    "loaded_versions": list(self._loaded), "canary_version": canary[0].version if canary else "",
                    "canary_share": canary[1] if canary else 0.0}

    def _swap_to(self, loaded: LoadedModel, started: float) -> None:
        with self._lock:
            previous, self._serving = self._serving, loaded
            if self._canary and self._canary[0].version == loaded.version:
                self._canary = None   # the candidate is promoted: it serves every request now
            self._loaded.move_to_end(loaded.version)
            self._evict(keep=loaded.version)
        self.last_swap_duration_seconds = time.monotonic() - started
        metrics.SWAPS.inc()
        log.info("serving %s (was %s); swap took %.2f s", loaded.version,
                 previous.version if previous else None, self.last_swap_duration_seconds)

    def _evict(self, keep: str) -> None:
        """Drops the least recently used versions beyond max_loaded; running requests keep their reference."""
        protected = {keep, self._serving.version if self._serving else None,
                     self._canary[0].version if self._canary else None}
        for version in list(self._loaded):
            if len(self._loaded) <= self.max_loaded:
                break
            if version not in protected:
                del self._loaded[version]
                log.info("unloaded %s", version)

    def status(self) -> dict:
        pointer = self.registry.serving(CHANNEL) or {"history": []}
        with self._lock:
            return {"serving_version": self._serving.version if self._serving else "",
                    "loaded_versions": list(self._loaded), "history": list(pointer["history"]),
                    "last_swap_duration_seconds": self.last_swap_duration_seconds, "last_load_error": self.last_load_error,
                    "loading_versions": sorted(self.loading)}
