"""Generation speed: the gRPC service vs plain transformers and vLLM, batching gain, hot swap, prompt-KV memory.

Workload A (the ILF shape): P MBPP prompts x 30 samples, temperature 0.8, max_new_tokens 128. Workload R
(pi_Refine's shape): 8 refinement prompts (task, failing program, feedback; about 4x longer) x 30 samples x 256
tokens. Each goes through the gRPC service (one request per prompt, as the round sends them), through
transformers generate(num_return_sequences=30) in process in the service's dtype and in float32, and with
--vllm through vllm.LLM in that interpreter (`make bench-setup` builds one), all on the same prompts, timed after
loading. Also the bound from the FLOPs per token and the measured matmul rate in the dtype used, workload B
(8 concurrent clients with n = 1 vs the same requests one after another), the prompt-KV memory of one n = 30
refinement request, and a hot swap to a LoRA version under load.

    .venv/bin/python benchmarks/generation.py [--workloads A,R] [--prompts 10] [--refinement-prompts 8]
        [--samples 30] [--max-new-tokens 128] [--refinement-max-new-tokens 256] [--vllm .venv-vllm/bin/python]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ilf import data, prompts  # noqa: E402
from ilf.grpc_util import channel, wait_healthy  # noqa: E402
from ilf.modeling import (configure_torch, dtype_name, eos_token_ids, load_version, model_dtype,  # noqa: E402
                          resolve_source)
from ilf.registry import ModelVersion, Registry  # noqa: E402
from ilf.sampling import Sampling  # noqa: E402
from ilf.store import open_store  # noqa: E402
from ilf.v1 import common_pb2, generation_pb2, generation_pb2_grpc  # noqa: E402
from services.generation.batch import Batch  # noqa: E402
from services.generation.decode import PackedLinear  # noqa: E402
from services.generation.request import GenerationHandle  # noqa: E402

MODEL = "embedded:smollm2-135m-instruct"
TEMPERATURE = 0.8


@dataclass
class Workload:
    name: str
    prompts: list[str]
    max_new_tokens: int


def matmul_gflops(rows: int = 1024, inner: int = 1024, columns: int = 1024, dtype: torch.dtype = torch.float32,
                  repeats: int = 20) -> float:
    """The best of 3 timings of `repeats` products [rows x inner] @ [inner x columns], each as a plain matmul and
    as the decode step runs it (PackedLinear: on a CPU, the weight in oneDNN's layout): the faster one counts, so
    the bound is what this hardware gives, not what the engine's own kernel gives."""
    a, b = torch.randn(rows, inner).to(dtype), torch.randn(inner, columns).to(dtype)
    packed = PackedLinear(b.t().contiguous())
    best = float("inf")
    for product in (lambda: a @ b, lambda: packed(a)):
        product()
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(repeats):
                product()
            best = min(best, time.perf_counter() - started)
    return 2 * rows * inner * columns * repeats / best / 1e9


def flops_per_token(model, context: int) -> float:
    """2 x parameters used per token (the tied embedding counted once, as the output projection)
    plus attention over `context` earlier tokens (QK^T and AV)."""
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    attention = 2 * 2 * config.num_hidden_layers * context * config.hidden_size
    return 2 * params + attention


def transformers_baseline(loaded, prompt: str, samples: int, max_new_tokens: int) -> tuple[int, float]:
    """Tokens generated (an end-of-text token counts, as in the service) and seconds."""
    tokenizer, eos = loaded.tokenizer, set(eos_token_ids(loaded.tokenizer))
    tokens, started = 0, time.perf_counter()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, do_sample=True, temperature=TEMPERATURE, top_p=1.0, top_k=0,
                                    num_return_sequences=samples, max_new_tokens=max_new_tokens,
                                    eos_token_id=sorted(eos), pad_token_id=tokenizer.pad_token_id)
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        ended = next((i for i, t in enumerate(row) if t in eos), None)
        tokens += len(row) if ended is None else ended + 1
    return tokens, time.perf_counter() - started


def request(prompt: str, n: int, max_new_tokens: int, seed: int) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(prompt=prompt, params=common_pb2.SamplingParams(
        n=n, temperature=TEMPERATURE, max_new_tokens=max_new_tokens, seed=seed))


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


VLLM_SCRIPT = """
import json, sys, time


def main():
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"], seed=0)
    print("READY", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        # no per-request seed: vLLM-CPU's sampler crashes on seeded generators
        params = SamplingParams(n=job["n"], temperature=job["temperature"], top_p=1.0,
                                max_tokens=job["max_new_tokens"], stop_token_ids=spec["eos"])
        started = time.perf_counter()
        output = llm.generate([job["prompt"]], params, use_tqdm=False)[0]
        seconds = time.perf_counter() - started
        print(json.dumps({"tokens": sum(len(c.token_ids) for c in output.outputs), "seconds": seconds,
                          "text": output.outputs[0].text}), flush=True)


if __name__ == "__main__":
    main()
"""


class VllmEngine:
    """vllm.LLM in another interpreter (its own virtual environment), fed one request at a time over stdin."""

    def __init__(self, python: str, model_dir: str, dtype: torch.dtype, eos: list[int], max_model_len: int):
        self.script = Path(tempfile.mkdtemp(prefix="ilf-bench-vllm-")) / "run_vllm.py"
        self.script.write_text(VLLM_SCRIPT)
        spec = {"model": model_dir, "dtype": dtype_name(dtype), "eos": eos, "max_model_len": max_model_len}
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
        self.process = subprocess.Popen([python, str(self.script), json.dumps(spec)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        for line in self.process.stdout:
            if line.startswith("READY"):
                return
        raise RuntimeError(f"vLLM did not start (exit {self.process.wait()}); run `make bench-setup`")

    def generate(self, prompt: str, n: int, max_new_tokens: int) -> tuple[int, float, str]:
        job = {"prompt": prompt, "n": n, "max_new_tokens": max_new_tokens, "temperature": TEMPERATURE}
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        reply = json.loads(self.process.stdout.readline())
        return reply["tokens"], reply["seconds"], reply["text"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=120)


def short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def prompt_kv_bytes(loaded, prompt: str, samples: int) -> tuple[int, int]:
    """Bytes of one n-sample request's prompt KV in the engine's cache, and per generated token of one row."""
    input_ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"].to(loaded.device)
    with torch.inference_mode():
        batch = Batch.prefill(loaded, input_ids, GenerationHandle(n=samples, model_version="bench", seeds=[0] * samples),
                              Sampling(n=samples, temperature=TEMPERATURE))
    shared = batch.cache.prompt_nbytes
    return shared, shared // input_ids.shape[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="A,R", help="comma-separated: A (MBPP prompts), R (refinement prompts)")
    parser.add_argument("--prompts", type=int, default=10, help="MBPP prompts of workload A")
    parser.add_argument("--refinement-prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="of workload A")
    parser.add_argument("--refinement-max-new-tokens", type=int, default=256)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--port", type=int, default=50161)
    parser.add_argument("--vllm", metavar="PYTHON", help="interpreter with vllm-cpu installed (make bench-setup)")
    parser.add_argument("--skip-extras", action="store_true", help="only workloads A and R: no B, no hot swap")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # each figure as soon as it is measured, also into a file
    shared_data = Path(__file__).resolve().parents[2] / "shared" / "data"
    if shared_data.is_dir():
        os.environ.setdefault("ILF_DATA_DIR", str(shared_data))
    # A private store: the benchmark's swap must not move the serving pointer of a real deployment.
    os.environ["ILF_STORE"] = f"file://{tempfile.mkdtemp(prefix='ilf-bench-store-')}"
    configure_torch()
    registry = Registry(open_store())
    base = registry.ensure_base(MODEL).version
    dtype = model_dtype()
    workloads = []
    for name in args.workloads.split(","):
        if name == "A":
            workloads.append(Workload("A", [prompts.mbpp_prompt(t) for t in data.split_tasks("test")[:args.prompts]],
                                      args.max_new_tokens))
        elif name == "R":
            workloads.append(Workload("R", [prompts.refinement_prompt(a.failing_program, a.feedback,
                                                                      prompts.mbpp_prompt(data.task(a.task_id)))
                                            for a in data.annotations("train")[:args.refinement_prompts]],
                                      args.refinement_max_new_tokens))
        else:
            parser.error(f"unknown workload {name!r}")
    baselines = {d: load_version(registry, base, dtype=d) for d in dict.fromkeys([dtype, torch.float32])}
    reference = baselines[dtype]
    config = reference.model.config
    square_rate = matmul_gflops()
    # the decode step's typical product: all rows of a request by the MLP's up projection
    decode_rate = matmul_gflops(args.samples, config.hidden_size, config.intermediate_size, dtype, repeats=200)
    print(f"torch threads: {torch.get_num_threads()}; matmul rate: {square_rate:.1f} GFLOP/s (fp32, 1024x1024), "
          f"{decode_rate:.1f} GFLOP/s ({short(dtype)}, {args.samples}x{config.hidden_size} by "
          f"{config.hidden_size}x{config.intermediate_size}); service dtype {dtype_name(dtype)}")
    make_lora(registry, base, resolve_source(MODEL), "bench-lora-r8")

    vllm = None
    if args.vllm:
        longest = max(len(reference.tokenizer(p)["input_ids"]) + w.max_new_tokens for w in workloads for p in w.prompts)
        vllm = VllmEngine(args.vllm, resolve_source(MODEL), dtype, eos_token_ids(reference.tokenizer), longest + 16)
    env = {**os.environ, "ILF_GENERATION_PORT": str(args.port), "ILF_GENERATION_MODEL": base,
           "ILF_DTYPE": dtype_name(dtype)}
    service = subprocess.Popen([sys.executable, "-m", "services.generation"], env=env,
                               cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        address = f"127.0.0.1:{args.port}"
        wait_healthy(address, timeout_s=600)
        stub = generation_pb2_grpc.GenerationStub(channel(address))
        stub.Generate(request(workloads[0].prompts[0], 2, 4, 0))   # warm-up
        if vllm:
            vllm.generate(workloads[0].prompts[0], 2, 4)
        for workload in workloads:
            run_workload(workload, args.samples, stub, baselines, dtype, vllm, decode_rate, square_rate)
        memory_workload = next((w for w in workloads if w.name == "R"), workloads[0])
        shared, per_token = prompt_kv_bytes(reference, memory_workload.prompts[0], args.samples)
        before = args.samples * shared + args.samples * memory_workload.max_new_tokens * per_token
        after = shared + args.samples * memory_workload.max_new_tokens * per_token
        mib = 1 << 20
        print(f"{memory_workload.name} prompt KV of one n={args.samples} request ({short(dtype)}): {shared / mib:.1f} MiB "
              f"stored once (was {args.samples} copies, {args.samples * shared / mib:.1f} MiB: {args.samples}x less); "
              f"with its {memory_workload.max_new_tokens} generated tokens per sample {after / mib:.1f} MiB "
              f"instead of {before / mib:.1f} MiB ({before / after:.1f}x less)")
        baselines.clear()
        if args.skip_extras:
            return
        prompt_texts = workloads[0].prompts
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
        if vllm:
            vllm.close()


def run_workload(workload: Workload, samples: int, stub, baselines: dict, dtype: torch.dtype, vllm,
                 decode_rate: float, square_rate: float) -> None:
    """Prompt by prompt, every engine in turn, so other load on the machine hits them alike."""
    w = workload.name
    totals: dict[str, list] = {}

    def add(name: str, tokens: int, seconds: float) -> None:
        totals.setdefault(name, [0, 0.0])
        totals[name][0] += tokens
        totals[name][1] += seconds
    if w != "A":
        baselines = {dtype: baselines[dtype]}
    for i, prompt in enumerate(workload.prompts):
        for baseline_dtype, loaded in baselines.items():
            add(f"transformers ({short(baseline_dtype)})",
                *transformers_baseline(loaded, prompt, samples, workload.max_new_tokens))
        add("service", *timed(stub, [request(prompt, samples, workload.max_new_tokens, i)], False))
        if vllm:
            add("vllm", *vllm.generate(prompt, samples, workload.max_new_tokens)[:2])
        print(f"{w}: prompt {i + 1} of {len(workload.prompts)} done on every engine", file=sys.stderr, flush=True)
    rates = {name: tokens / seconds for name, (tokens, seconds) in totals.items()}
    for name, (tokens, seconds) in totals.items():
        engine = {"service": f"service (gRPC, n={samples} per request, {short(dtype)})",
                  "vllm": f"vllm.LLM (n={samples} per request, {short(dtype)})"}.get(
            name, f"{name.replace(' (', ' generate(num_return_sequences=' + str(samples) + ', ', 1)}")
        print(f"{w} {engine}: {tokens} tokens in {seconds:.1f} s = {rates[name]:.1f} tokens/s")
    service_rate = rates["service"]
    if w == "A":  # the line this benchmark always printed: the float32 baseline
        print(f"generation ratio vs transformers: {service_rate / rates['transformers (fp32)']:.2f}")
    for baseline_dtype in baselines:
        print(f"{w} generation ratio vs transformers ({short(baseline_dtype)}): "
              f"{service_rate / rates[f'transformers ({short(baseline_dtype)})']:.2f}")
    loaded = baselines[dtype]
    mean_prompt = sum(len(loaded.tokenizer(p)["input_ids"]) for p in workload.prompts) / len(workload.prompts)
    context = int(mean_prompt + workload.max_new_tokens / 2)
    flops = flops_per_token(loaded.model, context)
    print(f"{w} share of the {short(dtype)} matmul bound: {100 * service_rate * flops / (decode_rate * 1e9):.0f}% "
          f"(bound {decode_rate * 1e9 / flops:.0f} tokens/s: {flops / 1e9:.3f} GFLOP/token at context {context})")
    if w == "A":
        print(f"physical bound: {flops / 1e9:.3f} GFLOP/token (2 x params + attention at context {context}) -> at "
              f"most {square_rate * 1e9 / flops:.0f} tokens/s at the fp32 1024x1024 matmul rate; workload A reaches "
              f"{100 * service_rate * flops / (square_rate * 1e9):.0f}%")
    if vllm:
        print(f"{w} generation ratio vs vllm: {service_rate / rates['vllm']:.2f}")


if __name__ == "__main__":
    main()
