"""Shared fixtures: MBPP data from ILF_DATA_DIR, a tiny random model, stores, free ports."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("ILF_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_model(target: Path) -> Path:
    """A randomly initialised two-layer Llama with SmolLM2's real tokenizer, saved as a local folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ilf.modeling import embedded_gguf
    gguf = embedded_gguf("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def ilf_env(tmp_path, monkeypatch, tiny_model_dir):
    """A private ILF_HOME with a local store and the tiny model as the base model."""
    monkeypatch.setenv("ILF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ILF_STORE", f"file://{tmp_path / 'store'}")
    monkeypatch.setenv("ILF_BASE_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("ILF_DEVICE", "cpu")
    return tmp_path


@pytest.fixture
def local_registry(ilf_env):
    from ilf.registry import Registry
    from ilf.store import open_store
    return Registry(open_store())
