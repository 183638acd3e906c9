"""The trainer's CPU LoRA dropout: nn.Dropout's distribution, seeded, and swapped into every LoRA layer."""
import pytest
import torch

from trainer.dropout import QuarteredDropout, quarter_lora_dropout


def test_it_drops_each_element_independently_with_probability_p_and_scales_the_rest():
    dropout = QuarteredDropout(0.05).train()
    x = torch.full((1000, 997), 2.0)  # an odd element count: the last draw is cut
    out = dropout(x)
    dropped = out == 0
    assert dropout.p == pytest.approx(0.05, abs=1e-5)
    assert dropped.float().mean().item() == pytest.approx(dropout.p, abs=0.002)  # 1M Bernoulli draws: sd 0.0002
    kept = out[~dropped]
    assert torch.allclose(kept, torch.full_like(kept, 2.0 / (1 - dropout.p)))
    # Independent across positions: each of the four quarters of a draw drops at p, and neighbours together at p^2.
    per_lane = dropped.flatten()[: 996_000].view(-1, 4).float().mean(dim=0)
    assert torch.all((per_lane - dropout.p).abs() < 0.003)
    pairs = (dropped.flatten()[:-1] & dropped.flatten()[1:]).float().mean().item()
    assert pairs == pytest.approx(dropout.p ** 2, abs=0.0005)
    assert out.mean().item() == pytest.approx(2.0, rel=0.01)  # expectation kept


def test_masks_follow_torchs_seed_and_evaluation_is_the_identity():
    dropout = QuarteredDropout(0.3).train()
    x = torch.randn(64, 33)
    torch.manual_seed(7)
    first = dropout(x)
    torch.manual_seed(7)
    assert torch.equal(dropout(x), first)
    assert not torch.equal(dropout(x), first)
    assert dropout.eval()(x) is x
    assert QuarteredDropout(0.0).train()(x) is x
    with pytest.raises(ValueError):
        QuarteredDropout(1.0)


def test_the_gradient_flows_through_the_kept_elements_only():
    x = torch.randn(50, 40, requires_grad=True)
    out = QuarteredDropout(0.5).train()(x)
    out.sum().backward()
    kept = out.detach() != 0
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 2.0))
    assert torch.all(x.grad[~kept] == 0)


def test_every_peft_lora_dropout_is_swapped(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"))
    before = sum(isinstance(m, torch.nn.Dropout) for name, m in model.named_modules() if "lora_dropout" in name)
    assert before > 0
    assert quarter_lora_dropout(model) == before
    assert not any(isinstance(m, torch.nn.Dropout) for name, m in model.named_modules() if "lora_dropout" in name)
