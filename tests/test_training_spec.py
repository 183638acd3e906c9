"""The training spec checks itself: every bad field fails when the object is built, with its name."""
from __future__ import annotations

import pytest

from ilf.errors import InvalidArgument
from ilf.training_spec import HYPERPARAMETER_FIELDS, Hyperparameters, RunSpec, with_defaults
from ilf.v1 import training_pb2


def spec(**overrides) -> RunSpec:
    fields = dict(run_id="run-1", dataset="datasets/d.jsonl", base_model_version="base-x",
                  hyperparameters=Hyperparameters(), output_version="gen-lora-1")
    return RunSpec(**{**fields, **overrides})


@pytest.mark.parametrize("fields, named", [
    ({"method": "qlora"}, "method"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": 3.0}, "learning_rate"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 5000}, "batch_size"),
    ({"batch_size": 4.0}, "batch_size"),
    ({"batch_size": True}, "batch_size"),
    ({"epochs": 101}, "epochs"),
    ({"max_seq_len": 4}, "max_seq_len"),
    ({"lora_rank": 0}, "lora_rank"),
    ({"lora_alpha": 0.0}, "lora_alpha"),
    ({"lora_alpha": "32"}, "lora_alpha"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"lora_dropout": -0.1}, "lora_dropout"),
    ({"seed": -1}, "seed"),
    ({"merge_weights": 1}, "merge_weights"),
    ({"method": "full", "merge_weights": True}, "merge_weights"),
])
def test_each_bad_hyperparameter_is_rejected_with_its_name(fields, named):
    with pytest.raises(InvalidArgument, match=named):
        Hyperparameters(**fields)


def test_learning_rate_defaults_by_method_and_numbers_are_stored_as_floats():
    assert Hyperparameters().learning_rate == 2e-4
    assert Hyperparameters(method="full").learning_rate == 5e-6
    hp = Hyperparameters(learning_rate=1e-3, lora_alpha=8)
    assert hp.learning_rate == 1e-3 and isinstance(hp.lora_alpha, float) and hp.lora_alpha == 8.0


def test_hyperparameters_are_frozen():
    with pytest.raises(AttributeError):
        Hyperparameters().batch_size = 4


def test_a_request_treats_zero_as_unset_like_proto3():
    hp = with_defaults({"batch_size": 4, "epochs": 0, "lora_dropout": 0.0, "method": ""})
    assert (hp.batch_size, hp.epochs, hp.lora_dropout, hp.method) == (4, 2, 0.05, "lora")
    assert Hyperparameters(lora_dropout=0.0).lora_dropout == 0.0  # built directly, zero is a value


def test_unknown_fields_are_rejected_by_name():
    with pytest.raises(InvalidArgument, match="warmup_steps"):
        with_defaults({"warmup_steps": 10})
    with pytest.raises(InvalidArgument, match="priority"):
        RunSpec.from_json({**spec().to_json(), "priority": 1})


def test_the_proto_carries_exactly_the_hyperparameter_fields():
    assert set(HYPERPARAMETER_FIELDS) == set(training_pb2.Hyperparameters.DESCRIPTOR.fields_by_name)
    training_pb2.Hyperparameters(**Hyperparameters().to_json())  # every value fits its proto field


@pytest.mark.parametrize("overrides, named", [
    ({"dataset": ""}, "dataset"),
    ({"base_model_version": ""}, "base_model_version"),
    ({"purpose": "poetry"}, "purpose"),
    ({"run_id": ""}, "run_id"),
    ({"output_version": ""}, "output_version"),
    ({"hyperparameters": {"batch_size": 4}}, "hyperparameters"),
])
def test_each_bad_run_spec_field_is_rejected_with_its_name(overrides, named):
    with pytest.raises(InvalidArgument, match=named):
        spec(**overrides)


def test_a_run_spec_survives_its_json_round_trip():
    original = spec(hyperparameters=Hyperparameters(method="full", batch_size=8, seed=7), purpose="refinement",
                    created_at=1.5)
    assert RunSpec.from_json(original.to_json()) == original
    assert original.to_json()["hyperparameters"]["learning_rate"] == 5e-6


def test_a_spec_written_by_hand_without_created_at_reads_back():
    written = {"run_id": "r", "dataset": "datasets/d.jsonl", "base_model_version": "b", "purpose": "generation",
               "hyperparameters": with_defaults({"batch_size": 4}).to_json(), "output_version": "out-r"}
    assert RunSpec.from_json(written).created_at is None


def test_a_tampered_spec_file_fails_its_checks_when_read_back():
    tampered = spec().to_json()
    tampered["hyperparameters"]["epochs"] = 0
    with pytest.raises(InvalidArgument, match="epochs"):
        RunSpec.from_json(tampered)
