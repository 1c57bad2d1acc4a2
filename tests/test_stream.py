"""TextStream: whole characters only, stop strings never shown even in part, nothing lost at the end."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from malhae.runtime.stream import TextStream

KOREAN = ("대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다. 뷁똠햏 ㅋㅋㅋ 大韓民國 😀👍🏽 "
          "3·1운동\n\n다음 줄 끝.")


def token_bytes(checkpoints) -> list[bytes]:
    """The byte pieces a real byte-level BPE produces for KOREAN: many end inside a character."""
    tok = Tokenizer.from_file(str(checkpoints("tf4-st-f16") / "tokenizer.json"))
    byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
    return [bytes(byte_decoder[c] for c in tok.id_to_token(i)) for i in tok.encode(KOREAN).ids]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte ↔ printable character table (the ByteLevel alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars), strict=True))


def test_real_tokens_never_split_a_character(checkpoints):
    pieces = token_bytes(checkpoints)
    assert b"".join(pieces) == KOREAN.encode()
    assert any(_splits_char(p) for p in pieces), "the sample should contain tokens ending mid-character"
    stream = TextStream()
    out = [stream.feed(p) for p in pieces] + [stream.finish()]
    assert all("\ufffd" not in piece for piece in out)
    assert "".join(out) == KOREAN == stream.text


def _splits_char(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_byte_by_byte():
    stream = TextStream()
    out = "".join(stream.feed(bytes([b])) for b in KOREAN.encode()) + stream.finish()
    assert out == KOREAN and "\ufffd" not in out


def test_stop_string_across_pieces_is_never_shown():
    stream = TextStream(["\n사용자:"])
    shown = [stream.feed(p.encode()) for p in ["안녕하세요. 반갑", "습니다.\n", "사", "용", "자: 다음 질문"]]
    assert "".join(shown) == "안녕하세요. 반갑습니다."
    assert stream.stopped
    assert all("\n" not in s and "사" not in s for s in shown[1:])
    assert stream.feed("더".encode()) == "" and stream.finish() == ""


def test_held_text_is_released_when_it_is_not_a_stop():
    stream = TextStream(["\n사용자:"])
    assert stream.feed("답입니다.\n사".encode()) == "답입니다."
    assert stream.feed("과가 좋아요".encode()) == "\n사과가 좋아요"
    assert stream.feed(b"\n") == ""
    assert stream.finish() == "\n"
    assert not stream.stopped and stream.text == "답입니다.\n사과가 좋아요\n"


def test_stop_inside_one_piece_and_multibyte_stop():
    stream = TextStream(["###", "끝."])
    assert stream.feed("답변 본문 ##".encode()) == "답변 본문 "
    assert stream.feed("# 질문".encode()) == ""
    assert stream.stopped and stream.text == "답변 본문 "
    other = TextStream(["끝."])
    data = "이것으로 끝.".encode()
    assert "".join(other.feed(data[i:i + 1]) for i in range(len(data))) == "이것으로 "


@pytest.mark.parametrize("cut", ["가", "😀", "é"])
def test_a_character_cut_off_at_the_end_is_dropped_not_shown_broken(cut):
    """Generation stopped (max_tokens, a full context, Ctrl-C) between the bytes of a character: the part is no
    text, so nothing of it is shown, as llama-server does; what came before is all there."""
    data = cut.encode()
    for n in range(1, len(data)):
        stream = TextStream(["\n사용자:"])
        assert stream.feed("끝.\n".encode() + data[:n]) == "끝."
        assert stream.finish() == "\n"
        assert stream.text == "끝.\n"


def test_invalid_bytes_still_read_as_replacement_characters():
    """Only the beginning of a character at the very end is dropped: bytes no continuation could make valid, in the
    middle or at the end, stay U+FFFD (one per maximal invalid run, as Python and llama.cpp decode them)."""
    stream = TextStream()
    assert stream.feed(b"a\xffb\xea") == "a\ufffdb"
    assert stream.feed(b"\xb0") == ""
    assert stream.feed(b"\x80c\xed\xa0") == "\uac00c"  # ED A0 begins a surrogate, never a character
    assert stream.finish() == "\ufffd\ufffd"


def test_an_answer_starts_at_its_first_character():
    """A chat answer: the whitespace the prompt format leaves before it ("어시스턴트:" then " 대한…") is not part
    of it, however the tokens split it; the spaces inside the answer are."""
    stream = TextStream(["\n사용자:"], answer=True)
    assert stream.feed(b" ") == ""
    assert stream.feed(b"\n") == ""  # held: it may begin the stop text, then released as leading space
    assert stream.feed(" 대한".encode()) == "대한"
    assert stream.feed(" 민국 ".encode()) == " 민국 "
    assert stream.finish() == "" and stream.text == "대한 민국 "
    raw = TextStream()  # a continuation (`complete`, /v1/completions) keeps its leading space
    assert raw.feed(" 대한".encode()) + raw.finish() == " 대한"
    empty = TextStream(answer=True)
    assert empty.feed(b"  \n") == "" and empty.finish() == "" and empty.text == ""
