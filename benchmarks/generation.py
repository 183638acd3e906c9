"""Generation speed on the CPU: the gRPC service vs plain transformers, batching gain, hot swap.

Workload A (the ILF shape): P MBPP prompts x 30 samples, temperature 0.8, max_new_tokens 128, through the
gRPC service (one request per prompt, as the round sends them) vs transformers generate(num_return_sequences=30)
in process on the same prompts. Workload B: 8 concurrent clients with n = 1 vs the same 8 requests one after
another. Also the physical bound (FLOPs per token, measured matmul rate) and a hot swap to a LoRA version
under load (time from the request to the first response on the new version, and the service's peak memory).

    .venv/bin/python benchmarks/generation.py [--prompts 10] [--samples 30] [--max-new-tokens 128]
                                              [--prompt-kind refinement]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ilf import data, prompts  # noqa: E402
from ilf.grpc_util import channel, wait_healthy  # noqa: E402
from ilf.modeling import configure_torch, eos_token_ids, load_version, resolve_source  # noqa: E402
from ilf.registry import ModelVersion, Registry  # noqa: E402
from ilf.store import open_store  # noqa: E402
from ilf.v1 import common_pb2, generation_pb2, generation_pb2_grpc  # noqa: E402

MODEL = "embedded:smollm2-135m-instruct"


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - started) / 1e9


def flops_per_token(model, context: int) -> float:
    """2 x parameters used per token (the tied embedding counted once, as the output projection)
    plus attention over `context` earlier tokens (QK^T and AV)."""
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    attention = 2 * 2 * config.num_hidden_layers * context * config.hidden_size
    return 2 * params + attention


def transformers_baseline(loaded, prompt: str, samples: int, max_new_tokens: int) -> tuple[int, float]:
    tokenizer, eos = loaded.tokenizer, set(eos_token_ids(loaded.tokenizer))
    tokens, started = 0, time.perf_counter()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, do_sample=True, temperature=0.8, top_p=1.0, top_k=0,
                                    num_return_sequences=samples, max_new_tokens=max_new_tokens,
                                    eos_token_id=sorted(eos), pad_token_id=tokenizer.pad_token_id)
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        ended = next((i for i, t in enumerate(row) if t in eos), None)
        tokens += len(row) if ended is None else ended + 1   # the end-of-text token counts, as in the service
    return tokens, time.perf_counter() - started


def request(prompt: str, n: int, max_new_tokens: int, seed: int) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(prompt=prompt, params=common_pb2.SamplingParams(
        n=n, temperature=0.8, max_new_tokens=max_new_tokens, seed=seed))


def timed(stub, requests: list, concurrent: bool) -> tuple[int, float]:
    replies = [None] * len(requests)

    def run(i):
        replies[i] = stub.Generate(requests[i], timeout=3600)
    started = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(len(requests)):
            run(i)
    elapsed = time.perf_counter() - started
    return sum(c.generated_tokens for r in replies for c in r.completions), elapsed


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def make_lora(registry: Registry, base: str, base_dir: str, version: str) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    if any(v.version == version for v in registry.list()):
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                               LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        model.save_pretrained(folder)
        registry.register(ModelVersion(version=version, kind="lora", base_version=base), files_dir=Path(folder))


def swap_under_load(stub, pid: int, version: str, prompt: str) -> tuple[float, float, int, int]:
    """Two clients stream while the service switches to version; returns (switch call s, first new response s,
    RSS before in KiB, peak RSS in KiB)."""
    stop, first_new = threading.Event(), []
    rss_before = memory_kib(pid, "VmRSS")
    peak = [rss_before]

    def client(seed):
        while not stop.is_set():
            reply = stub.Generate(request(prompt, 1, 32, seed), timeout=600)
            if reply.model_version == version and not first_new:
                first_new.append(time.perf_counter())

    def watch_memory():
        while not stop.is_set():
            peak[0] = max(peak[0], memory_kib(pid, "VmRSS"))
            time.sleep(0.05)
    threads = [threading.Thread(target=client, args=(s,)) for s in (1, 2)] + [threading.Thread(target=watch_memory)]
    for t in threads:
        t.start()
    time.sleep(3)
    asked = time.perf_counter()
    stub.SwitchModel(generation_pb2.SwitchModelRequest(model_version=version), timeout=600)
    switched = time.perf_counter() - asked
    while not first_new:
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join()
    return switched, first_new[0] - asked, rss_before, peak[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--port", type=int, default=50161)
    parser.add_argument("--prompt-kind", choices=("generation", "refinement"), default="generation",
                        help="refinement: the paper's refinement prompts (task, failing program, feedback), "
                             "about 4x longer, as pi_Refine sees them")
    args = parser.parse_args(argv)
    shared_data = Path(__file__).resolve().parents[2] / "shared" / "data"
    if shared_data.is_dir():
        os.environ.setdefault("ILF_DATA_DIR", str(shared_data))
    # A private store: the benchmark's swap must not move the serving pointer of a real deployment.
    os.environ["ILF_STORE"] = f"file://{tempfile.mkdtemp(prefix='ilf-bench-store-')}"
    configure_torch()
    registry = Registry(open_store())
    base = registry.ensure_base(MODEL).version
    if args.prompt_kind == "refinement":
        prompt_texts = [prompts.refinement_prompt(a.failing_program, a.feedback, prompts.mbpp_prompt(data.task(a.task_id)))
                        for a in data.annotations("train")[:args.prompts]]
    else:
        prompt_texts = [prompts.mbpp_prompt(t) for t in data.split_tasks("test")[:args.prompts]]
    rate = matmul_gflops()
    loaded = load_version(registry, base)
    print(f"torch threads: {torch.get_num_threads()}; matmul rate: {rate:.1f} GFLOP/s (fp32, 1024x1024)")

    mean_prompt = sum(len(loaded.tokenizer(p)["input_ids"]) for p in prompt_texts) / len(prompt_texts)
    flops = flops_per_token(loaded.model, int(mean_prompt + args.max_new_tokens / 2))
    make_lora(registry, base, resolve_source(MODEL), "bench-lora-r8")

    env = {**os.environ, "ILF_GENERATION_PORT": str(args.port), "ILF_GENERATION_MODEL": base}
    service = subprocess.Popen([sys.executable, "-m", "services.generation"], env=env,
                               cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        address = f"127.0.0.1:{args.port}"
        wait_healthy(address, timeout_s=600)
        stub = generation_pb2_grpc.GenerationStub(channel(address))
        stub.Generate(request(prompt_texts[0], 2, 4, 0))   # warm-up
        # Prompt by prompt, baseline then service, so other load on the machine hits both alike.
        totals = {"transformers": [0, 0.0], "service": [0, 0.0]}
        for i, prompt in enumerate(prompt_texts):
            for name, (tokens, seconds) in (
                    ("transformers", transformers_baseline(loaded, prompt, args.samples, args.max_new_tokens)),
                    ("service", timed(stub, [request(prompt, args.samples, args.max_new_tokens, i)], False))):
                totals[name][0] += tokens
                totals[name][1] += seconds
        del loaded
        (base_tokens, base_seconds), (tokens, seconds) = totals["transformers"], totals["service"]
        baseline, service_rate = base_tokens / base_seconds, tokens / seconds
        print(f"A transformers generate(num_return_sequences={args.samples}): {base_tokens} tokens in "
              f"{base_seconds:.1f} s = {baseline:.1f} tokens/s")
        print(f"A service (gRPC, n={args.samples} per request): {tokens} tokens in {seconds:.1f} s "
              f"= {service_rate:.1f} tokens/s")
        print(f"generation ratio vs transformers: {service_rate / baseline:.2f}")
        print(f"physical bound: {flops / 1e9:.3f} GFLOP/token (2 x params + attention at "
              f"context {int(mean_prompt + args.max_new_tokens / 2)}) -> at most {rate * 1e9 / flops:.0f} tokens/s "
              f"at the measured matmul rate; workload A reaches {100 * service_rate * flops / (rate * 1e9):.0f}%")

        requests_b = [request(prompt_texts[i % len(prompt_texts)], 1, args.max_new_tokens, 100 + i)
                      for i in range(args.clients)]
        seq_tokens, seq_seconds = timed(stub, requests_b, concurrent=False)
        par_tokens, par_seconds = timed(stub, requests_b, concurrent=True)
        print(f"B {args.clients} requests one after another: {seq_tokens / seq_seconds:.1f} tokens/s; "
              f"concurrent: {par_tokens / par_seconds:.1f} tokens/s (same {par_tokens} tokens: {seq_tokens == par_tokens})")
        print(f"concurrency gain: {(par_tokens / par_seconds) / (seq_tokens / seq_seconds):.2f}x")

        switched, first, rss_before, peak = swap_under_load(stub, service.pid, "bench-lora-r8", prompt_texts[0])
        print(f"hot swap to a LoRA version under load: SwitchModel returned after {switched:.1f} s; first response "
              f"on the new version {first:.1f} s after the request; service RSS {rss_before / 1024:.0f} MiB before, "
              f"peak {peak / 1024:.0f} MiB during the swap")
    finally:
        service.terminate()
        service.wait(timeout=60)


if __name__ == "__main__":
    main()
