"""Backends behind one interface: the in-process transformers engine, or a remote TGI server."""
from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod

from text_generation import Client
from text_generation.errors import OverloadedError, ValidationError

from ilf.auth import client_headers
from ilf.fleet import PointerFollower
from ilf.errors import FailedPrecondition, InvalidArgument, InvalidField, ResourceExhausted, Unavailable
from ilf.modeling import Sample, configure_torch
from ilf.registry import Registry
from ilf.sampling import Sampling

from .allocator import keep_freed_memory
from .config import GenerationConfig
from . import metrics
from .engine import Engine
from .models import CHANNEL, ModelManager, initial_version
from .detokenize import cut_at_stop
from .request import GenerationHandle, TokenEvent, validate, validate_sampling

log = logging.getLogger(__name__)


class Backend(ABC):
    name: str

    @abstractmethod
    def start(self) -> None:
        """Gets ready to serve (may take minutes: loads the first model); raises if it cannot."""

    def submit(self, prompt: str, settings: Sampling, model_version: str = "") -> GenerationHandle:
        """Starts a request; the one place requests are validated, whichever protocol brought them."""
        validate(prompt, settings, self.settings)
        return self._submit(prompt, settings, model_version)

    def submit_chat(self, messages: list[dict], settings: Sampling, model_version: str = "") -> GenerationHandle:
        """Starts a chat request: messages are {"role", "content"} with text content."""
        validate_sampling(settings, self.settings)
        if not messages:
            raise InvalidField("messages", "is empty")
        return self._submit_chat(messages, settings, model_version)

    @abstractmethod
    def _submit(self, prompt: str, settings: Sampling, model_version: str) -> GenerationHandle: ...

    def _submit_chat(self, messages: list[dict], settings: Sampling, model_version: str) -> GenerationHandle:
        """The model's chat template turns the messages into a prompt."""
        return self._submit(self._chat_prompt(messages, model_version), settings, model_version)

    def _chat_prompt(self, messages: list[dict], model_version: str) -> str:
        raise FailedPrecondition(f"the {self.name} backend has no chat template; use the completions route")

    def model_info(self) -> dict:
        """What is known of the serving model: dtype, device_type, max_total_tokens (absent when unknown)."""
        return {}

    @abstractmethod
    def load(self, version: str) -> dict: ...

    @abstractmethod
    def switch(self, version: str) -> dict: ...

    @abstractmethod
    def rollback(self) -> dict: ...

    @abstractmethod
    def status(self) -> dict:
        """ModelStatus fields."""

    def close(self) -> None:
        pass


class TransformersBackend(Backend):
    name = "transformers"

    def __init__(self, registry: Registry, settings: GenerationConfig | None = None, *, engine: Engine | None = None,
                 manager: ModelManager | None = None):
        keep_freed_memory()  # before the engine's thread exists, so its allocations follow it too
        self.registry = registry
        self.settings = settings = settings or GenerationConfig.from_env()
        self.models = manager or ModelManager(registry, max_loaded=settings.max_loaded)
        self.engine = engine or Engine(max_rows=settings.max_batch_rows, max_queue=settings.max_queue)
        poll_s = settings.serving_poll_s
        # This replica serves what the generation pointer says, and keeps pi_Refine (the refinement pointer's
        # version, which the refinement service asks for by name) loaded, whichever replica a call reaches.
        self.follower = PointerFollower(registry, CHANNEL, self.models.follow, poll_s, describe=self.models.describe)
        self.refinement_follower = PointerFollower(registry, "refinement", lambda p: self.models.load(p["version"]),
                                                   poll_s)

    def start(self) -> None:
        configure_torch()
        version = initial_version(self.registry, self.settings)
        # An empty pointer gets the start-up version, so the first switch can be rolled back.
        self.models.serve(version, promote=self.registry.serving_version(CHANNEL) is None)
        # Started on `version` (a pinned ILF_GENERATION_MODEL included): of the pointer, only its canary is left.
        self.follower.start(self.registry.serving(CHANNEL), lambda p: self.models.follow({**p, "version": version}))
        self.refinement_follower.start()

    def _submit(self, prompt, settings, model_version):
        handle = self.engine.submit(self.models.resolve(model_version), prompt, settings)
        metrics.REQUESTS.labels(handle.model_version).inc()
        return handle

    def _chat_prompt(self, messages, model_version):
        tokenizer = self.models.resolve(model_version).tokenizer
        if not tokenizer.chat_template:
            raise FailedPrecondition(f"model version {model_version or 'serving'} has no chat template; "
                                     "use the completions route")
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The engine tokenizes with special tokens: a template that writes the BOS token would get it twice.
        bos = tokenizer.bos_token
        if bos and prompt.startswith(bos) and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]:
            prompt = prompt[len(bos):]
        return prompt

    def model_info(self):
        try:
            loaded = self.models.serving
        except Unavailable:  # nothing loaded yet
            return {}
        return {"dtype": str(next(loaded.model.parameters()).dtype), "device_type": loaded.device.split(":")[0],
                "max_total_tokens": getattr(loaded.model.config, "max_position_embeddings", None)}

    def load(self, version):
        self.models.load(version)
        return self.status()

    def switch(self, version):
        self.models.serve(version, promote=True)
        return self.status()

    def rollback(self):
        self.models.rollback()
        return self.status()

    def status(self):
        return {**self.models.status(), "backend": self.name}

    def close(self):
        self.follower.stop()
        self.refinement_follower.stop()
        self.engine.stop()


_TGI_FINISH = {"length": "length", "eos_token": "eos", "stop_sequence": "stop"}


class TgiBackend(Backend):
    """Generates through a remote TGI server (or another generation service's TGI endpoint).

    The remote server owns its model: versions cannot be loaded or switched from here. Sample i
    of a seeded request uses seed + i, as the in-process engine does, so results agree.
    """
    name = "tgi"

    def __init__(self, url: str, settings: GenerationConfig | None = None, *, timeout_s: float = 600.0):
        if not url:
            raise InvalidArgument("the tgi backend needs ILF_GENERATION_TGI_URL")
        self.settings = settings or GenerationConfig.from_env()
        self.url = url.rstrip("/")
        self.client = Client(self.url, headers=client_headers(), timeout=timeout_s)
        self.version = ""
        self.info: dict = {}

    def start(self) -> None:
        import requests
        info = requests.get(f"{self.url}/info", headers=client_headers(), timeout=30)
        info.raise_for_status()
        self.info = info.json()
        self.version = self.info.get("model_id", "") or self.url

    def _submit(self, prompt, settings, model_version):
        if not self.version:
            raise Unavailable(f"the TGI server at {self.url} has not answered yet")
        if model_version and model_version != self.version:
            raise FailedPrecondition(f"the TGI backend serves only {self.version!r}, not {model_version!r}")
        handle = GenerationHandle(n=settings.n, model_version=self.version,
                                  seeds=[settings.sample_seed(i) for i in range(settings.n)],
                                  dtype=(self.info.get("model_dtype") or "").removeprefix("torch."))
        for index in range(settings.n):
            threading.Thread(target=self._stream_sample, args=(handle, prompt, settings, index),
                             name=f"tgi-sample-{index}", daemon=True).start()
        return handle

    def _stream_sample(self, handle: GenerationHandle, prompt: str, settings: Sampling, index: int) -> None:
        sampling = settings.temperature > 0
        stream = self.client.generate_stream(
            prompt, do_sample=sampling, max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature if sampling else None,
            top_p=settings.top_p if settings.top_p < 1.0 else None, top_k=settings.top_k or None,
            repetition_penalty=settings.repetition_penalty if settings.repetition_penalty != 1.0 else None,
            stop_sequences=list(settings.stop), seed=handle.seeds[index])
        generated = 0
        try:
            for response in stream:
                if handle.cancelled:
                    break
                generated += 1
                completion = None
                if response.details is not None:
                    text, _ = cut_at_stop(response.generated_text or "", settings.stop)
                    completion = Sample(text=text, finish_reason=_TGI_FINISH.get(response.details.finish_reason.value,
                                                                                 "length"),
                                        generated_tokens=response.details.generated_tokens, prompt_tokens=0)
                token = response.token
                handle.push(TokenEvent(index, token.id, "" if token.special else token.text, token.logprob or 0.0,
                                       token.special, completion))
        except ValidationError as error:
            handle.push(InvalidArgument(f"TGI server rejected the request: {error}"))
        except OverloadedError as error:
            handle.push(ResourceExhausted(f"TGI server is overloaded: {error}"))
        except Exception as error:  # noqa: BLE001 - the consumer gets every failure
            handle.push(Unavailable(f"TGI server at {self.url} failed: {type(error).__name__}: {error}"))
        finally:
            stream.close()

    def _fixed(self, *_):
        raise FailedPrecondition(f"the tgi backend serves the remote server's model ({self.version}); "
                                 "load and switch versions on that server")

    load = switch = rollback = _fixed

    def model_info(self):
        return {"dtype": self.info.get("model_dtype"), "device_type": self.info.get("model_device_type"),
                "max_total_tokens": self.info.get("max_total_tokens")}

    def status(self):
        return {"serving_version": self.version, "loaded_versions": [self.version] if self.version else [],
                "history": [], "last_swap_duration_seconds": 0.0, "last_load_error": "", "loading_versions": [],
                "backend": self.name}


def make_backend(registry: Registry, settings: GenerationConfig) -> Backend:
    if settings.backend == "tgi":
        return TgiBackend(settings.tgi_url, settings)
    if settings.backend == "openai":
        from .openai_backend import OpenAIBackend
        return OpenAIBackend(registry, settings)
    return TransformersBackend(registry, settings)
