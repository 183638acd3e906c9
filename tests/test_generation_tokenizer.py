"""The embedded model's tokenizer as its GGUF describes it: GPT-2 byte-level BPE, the GGUF's special tokens, no BOS."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ilf import data
from ilf.modeling import embedded_gguf, gguf_tokenizer

VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
CODE = "def f(x):\n    return x + 1\n\n\tif a != b:  # café 龘 12345\n        pass\n"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    gguf_tokenizer(embedded_gguf("smollm2-135m-instruct")).save_pretrained(folder)
    return folder


def test_code_round_trips_exactly_and_no_bos_is_added(saved):
    tokenizer = AutoTokenizer.from_pretrained(saved)
    programs = [CODE] + [task.code for task in data.split_tasks("test")]
    for program in programs:
        ids = tokenizer(program)["input_ids"]
        assert tokenizer.decode(ids) == program
        assert ids[0] != tokenizer.bos_token_id
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert tokenizer("<|im_end|><file_sep>")["input_ids"] == [2, 5]   # control tokens stay one token each
    assert tokenizer.decode([2, 5], skip_special_tokens=True) == ""
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


def test_the_same_tokens_as_the_gguf_reader_less_its_bos(saved):
    gguf = embedded_gguf("smollm2-135m-instruct")
    llama_style = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ours = AutoTokenizer.from_pretrained(saved)
    for program in [CODE] + [task.code for task in data.split_tasks("test")[:20]]:
        assert llama_style(program)["input_ids"] == [llama_style.bos_token_id] + ours(program)["input_ids"]


@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM environment (make bench-setup)")
def test_vllms_transformers_decodes_it_too(saved):
    """vLLM 0.32 installs transformers 5, under which the GGUF's Llama-style tokenizer lost every space."""
    script = ("import json, sys; from transformers import AutoTokenizer; t = AutoTokenizer.from_pretrained(sys.argv[1]); "
              "code = sys.argv[2]; print(json.dumps(t.decode(t(code)['input_ids'])))")
    output = subprocess.run([str(VLLM_PYTHON), "-c", script, str(saved), CODE], capture_output=True, text=True,
                            timeout=300, check=True).stdout
    assert json.loads(output.strip().splitlines()[-1]) == CODE
