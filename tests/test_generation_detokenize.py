"""Detokenisation as a sample grows: streamed text, held-back partial characters, stop sequences."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from services.generation.detokenize import StreamDecoder, cut_at_stop

CODE = "def f(x):\n    return x + 1  # café 龘 done\n"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_cut_at_stop_takes_the_earliest_sequence():
    assert cut_at_stop("a = 1\nb = 2\n# end", ("# end", "\nb")) == ("a = 1", True)
    assert cut_at_stop("a = 1", ("\n\n",)) == ("a = 1", False)


def test_streamed_pieces_join_to_the_full_decode_and_hold_back_partial_characters(tokenizer):
    ids = tokenizer(CODE, add_special_tokens=False)["input_ids"]
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(token) for token in ids]
    assert "".join(pieces) == decoder.text == tokenizer.decode(ids) == decoder.final_text()
    assert not any("\ufffd" in piece for piece in pieces)
    # 龘 takes three byte tokens: the first two emit nothing, the third the whole character
    split = [i for i, piece in enumerate(pieces) if "龘" in piece]
    assert len(split) == 1 and pieces[split[0] - 2:split[0]] == ["", ""]
    assert not decoder.stopped


def test_a_stop_sequence_across_tokens_stops_at_the_token_that_completes_it(tokenizer):
    ids = tokenizer(CODE, add_special_tokens=False)["input_ids"]
    decoder = StreamDecoder(tokenizer, stop=("return x",))
    for count, token in enumerate(ids, start=1):
        decoder.push(token)
        if decoder.stopped:
            break
    assert decoder.stopped and decoder.text.endswith("return x")
    assert "return x" not in tokenizer.decode(ids[:count - 1])
    assert decoder.final_text() == "def f(x):\n    "
