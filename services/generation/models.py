"""Which model versions are loaded, which one serves, and hot swaps between them.

A swap loads the new version next to the serving one (serving goes on meanwhile), then moves one
reference under a lock: requests already running keep the model object they started with.
A version that fails to load changes nothing but `last_load_error`.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable

from ilf import config
from ilf.errors import FailedPrecondition, NotFound, Unavailable
from ilf.modeling import LoadedModel, load_version
from ilf.registry import Registry
from ilf.store import CorruptArtifact

from .attention import use_native_gqa

log = logging.getLogger(__name__)

CHANNEL = "generation"


def initial_version(registry: Registry) -> str:
    """ILF_GENERATION_MODEL, else the channel's serving pointer, else the base model."""
    return (config.get("ILF_GENERATION_MODEL") or registry.serving_version(CHANNEL)
            or registry.ensure_base(config.get("ILF_BASE_MODEL")).version)


class ModelManager:
    def __init__(self, registry: Registry, *, max_loaded: int = 3,
                 loader: Callable[[Registry, str], LoadedModel] = load_version):
        self.registry = registry
        self.max_loaded = max(1, max_loaded)
        self._load = loader
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()   # least recently used first
        self._serving: LoadedModel | None = None
        self._lock = threading.Lock()                                  # guards _loaded and _serving
        self._swap_lock = threading.Lock()                             # one switch or rollback at a time
        self._version_locks: dict[str, threading.Lock] = {}
        self.loading: set[str] = set()
        self.last_swap_seconds = 0.0
        self.last_load_error = ""

    @property
    def serving(self) -> LoadedModel:
        serving = self._serving
        if serving is None:
            raise Unavailable("no model is loaded yet; retry when the health check reports SERVING")
        return serving

    def resolve(self, version: str = "") -> LoadedModel:
        """The serving model, or the loaded model named by version."""
        if not version:
            return self.serving
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
                loaded = self._load(self.registry, version)
                use_native_gqa(loaded.model)
            except Exception as error:  # noqa: BLE001 - any load failure leaves serving as it was
                current = self._serving.version if self._serving else "nothing"
                self.last_load_error = f"{version}: {type(error).__name__}: {error}"
                log.warning("loading %s failed; still serving %s: %s", version, current, error)
                kind = CorruptArtifact if isinstance(error, CorruptArtifact) else FailedPrecondition
                raise kind(f"model version {version!r} failed to load ({type(error).__name__}: {error}); "
                           f"still serving {current}") from error
            finally:
                with self._lock:
                    self.loading.discard(version)
            log.info("loaded %s in %.1f s", version, time.monotonic() - started)
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

    def _swap_to(self, loaded: LoadedModel, started: float) -> None:
        with self._lock:
            previous, self._serving = self._serving, loaded
            self._loaded.move_to_end(loaded.version)
            self._evict(keep=loaded.version)
        self.last_swap_seconds = time.monotonic() - started
        log.info("serving %s (was %s); swap took %.2f s", loaded.version,
                 previous.version if previous else None, self.last_swap_seconds)

    def _evict(self, keep: str) -> None:
        """Drops the least recently used versions beyond max_loaded; running requests keep their reference."""
        protected = {keep, self._serving.version if self._serving else None}
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
                    "last_swap_seconds": self.last_swap_seconds, "last_load_error": self.last_load_error,
                    "loading_versions": sorted(self.loading)}
