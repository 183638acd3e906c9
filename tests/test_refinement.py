"""The refinement service's plain functions, sampling from a real generation service on the tiny model."""
import pytest

from conftest import free_port
from ilf import data, prompts
from ilf.errors import InvalidArgument, NotFound, Unavailable
from ilf.grpc_util import channel, wait_healthy
from ilf.v1 import generation_pb2_grpc
from services.generation.server import build_server
from ilf.sampling import Sampling
from services.refinement.config import RefinementConfig
from services.refinement.refiner import Refiner, TaskSpec, task_prompt


@pytest.fixture
def generation(ilf_env):
    server = build_server(0)
    server.start()
    address = f"127.0.0.1:{server.port}"
    wait_healthy(address)
    yield generation_pb2_grpc.GenerationStub(channel(address))
    server.stop(grace=0)


@pytest.fixture
def refiner(local_registry, generation):
    refiner = Refiner(local_registry, generation, RefinementConfig.from_env())
    refiner.switch(refiner.start_version())
    return refiner


def test_task_prompt_from_id_or_from_fields():
    task = data.task(11)
    assert task_prompt(TaskSpec(task_id=11)) == prompts.mbpp_prompt(task)
    by_value = TaskSpec(text="Add.", tests=("assert add(1, 2) == 3",), code_prefix="def add(a, b):")
    assert task_prompt(by_value).endswith("def add(a, b):")
    with pytest.raises(NotFound):
        task_prompt(TaskSpec(task_id=9999))
    with pytest.raises(InvalidArgument, match="code_prefix"):
        task_prompt(TaskSpec(text="Add.", tests=("assert add(1, 2) == 3",)))


def test_refine_builds_the_paper_prompt_and_returns_whole_programs(refiner, local_registry):
    note = data.annotations("train")[0]
    refined, prompt, version = refiner.refine(TaskSpec(task_id=note.task_id), note.failing_program, note.feedback,
                                              Sampling(n=3, temperature=0.8, max_new_tokens=8, seed=7))
    gen_prompt = prompts.mbpp_prompt(data.task(note.task_id))
    assert prompt.startswith("OLD CODE:\n") and f"\n\nFEEDBACK:\n{note.feedback}\n\nREFINEMENT:\n" in prompt
    assert prompt.endswith(gen_prompt)
    assert len(refined) == 3 and all(r.program.startswith(gen_prompt) for r in refined)
    assert all(r.completion.generated_tokens <= 8 for r in refined)
    assert version == local_registry.serving_version("refinement")
    again, _, _ = refiner.refine(TaskSpec(task_id=note.task_id), note.failing_program, note.feedback,
                                              Sampling(n=3, temperature=0.8, max_new_tokens=8, seed=7))
    assert [r.program for r in again] == [r.program for r in refined]  # same seed, same output


def test_old_code_is_truncated_so_the_prompt_fits_1024_tokens(refiner):
    long_program = "def f():\n" + "    x = 1\n" * 2000
    _, prompt, _ = refiner.refine(TaskSpec(task_id=11), long_program, "Shorter.", Sampling(max_new_tokens=1))
    old_code = prompt.split("\n\nFEEDBACK:\n")[0].removeprefix("OLD CODE:\n")
    assert old_code == long_program[:prompts.REFINEMENT_OLD_CODE_CHARS]
    refined, _, _ = refiner.refine(TaskSpec(task_id=11), long_program, "Shorter.", Sampling(max_new_tokens=1))
    assert refined[0].completion.prompt_tokens <= 1024


@pytest.mark.parametrize("program, feedback, n, message", [
    ("", "fix it", 1, "failing_program is empty"),
    ("def f(): pass", "  ", 1, "feedback is empty"),
    ("def f(): pass", "fix it", 0, "n must be between 1 and 64"),
    ("def f(): pass", "x" * 9000, 1, "feedback is longer"),
])
def test_bad_requests_are_refused(refiner, program, feedback, n, message):
    with pytest.raises(InvalidArgument, match=message):
        refiner.refine(TaskSpec(task_id=11), program, feedback, Sampling(n=n, max_new_tokens=4))


def test_a_failed_switch_keeps_the_serving_version(refiner):
    current = refiner.version
    with pytest.raises(NotFound):
        refiner.switch("v-does-not-exist")
    assert refiner.version == current


def test_refines_again_after_the_generation_service_dropped_the_model(local_registry, tiny_model_dir, monkeypatch):
    from ilf.v1 import generation_pb2
    monkeypatch.setenv("ILF_GENERATION_MAX_LOADED", "1")  # keep only the serving version and the newest load
    server = build_server(0)
    server.start()
    try:
        wait_healthy(f"127.0.0.1:{server.port}")
        stub = generation_pb2_grpc.GenerationStub(channel(f"127.0.0.1:{server.port}"))
        # two more versions of the same weights under other ids
        pi_refine, other = (local_registry.ensure_base(f"{tiny_model_dir}/{suffix}").version for suffix in (".", "./."))
        refiner = Refiner(local_registry, stub, RefinementConfig.from_env())
        refiner.switch(pi_refine)
        stub.LoadModel(generation_pb2.LoadModelRequest(model_version=other))
        assert pi_refine not in stub.GetModelStatus(generation_pb2.GetModelStatusRequest()).loaded_versions
        assert refiner.refine(TaskSpec(task_id=11), "def f(): pass", "Fix it.", Sampling(max_new_tokens=2))[2] == pi_refine
    finally:
        server.stop(0)


def test_an_unreachable_generation_service_is_unavailable(local_registry):
    refiner = Refiner(local_registry, generation_pb2_grpc.GenerationStub(channel(f"127.0.0.1:{free_port()}")),
                      RefinementConfig.from_env())
    local_registry.ensure_base(refiner.settings.base_model)   # registered (by a generation service that then went away)
    with pytest.raises(Unavailable, match="generation service"):
        refiner.switch(refiner.start_version())
