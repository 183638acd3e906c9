"""transformers' own generate(), the reference the generation engine's outputs are checked against."""
from __future__ import annotations

import torch

from ilf.modeling import LoadedModel, Sample, eos_token_ids


def sample(loaded: LoadedModel, prompt: str, *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
           top_k: int = 0, max_new_tokens: int = 128, stop: list[str] | tuple[str, ...] = (),
           repetition_penalty: float = 1.0, seed: int | None = None) -> list[Sample]:
    """n completions of prompt, generated as one batch; each cut at the first stop string."""
    tokenizer, model = loaded.tokenizer, loaded.model
    inputs = tokenizer(prompt, return_tensors="pt").to(loaded.device)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    eos_ids = eos_token_ids(tokenizer)
    kwargs = dict(max_new_tokens=max_new_tokens, num_return_sequences=n, eos_token_id=eos_ids,
                  pad_token_id=tokenizer.pad_token_id, repetition_penalty=repetition_penalty or 1.0)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p or 1.0, top_k=top_k or 0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stop:
        kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        output = model.generate(**inputs, **kwargs)
    return [_finish(tokenizer, row[prompt_tokens:].tolist(), eos_ids, stop, prompt_tokens) for row in output]


def _finish(tokenizer, token_ids: list[int], eos_ids: list[int], stop, prompt_tokens: int) -> Sample:
    """Decodes one sampled row and decides why it ended."""
    reason = "length"
    for i, token in enumerate(token_ids):
        if token in eos_ids:
            token_ids, reason = token_ids[:i], "eos"
            break
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    if cut >= 0:
        text, reason = text[:cut], "stop"
        # count only the tokens that made the kept text plus the stop string
        token_ids = tokenizer(text, add_special_tokens=False)["input_ids"] or token_ids[:0]
    return Sample(text=text, finish_reason=reason, generated_tokens=len(token_ids), prompt_tokens=prompt_tokens)
