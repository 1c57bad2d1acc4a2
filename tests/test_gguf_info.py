"""malhae.runtime.gguf_info reads what gguf-py's reader reads (the reference), only faster."""

from __future__ import annotations

import gguf
import pytest

from malhae.convert import pipeline
from malhae.errors import UserError
from malhae.runtime.gguf_info import read_info


@pytest.mark.parametrize("type_name", ["f16", "q4_k_m"])
def test_matches_gguf_reader(type_name, checkpoints, tmp_path):
    path = pipeline.convert(checkpoints("tf4-st-f16"), type_name, tmp_path / "m.gguf").path
    info = read_info(path, arrays=("tokenizer.ggml.token_type",))
    ref = gguf.GGUFReader(path)
    assert [t.name for t in info.tensors] == [t.name for t in ref.tensors]
    for mine, theirs in zip(info.tensors, ref.tensors, strict=True):
        assert mine.type == theirs.tensor_type
        assert mine.shape == tuple(int(d) for d in theirs.shape)
        assert mine.nbytes == int(theirs.n_bytes)
        assert info.data_offset + mine.offset == int(theirs.data_offset)
    assert info.metadata["gptneox.block_count"] == int(ref.fields["gptneox.block_count"].parts[-1][0])
    assert info.metadata["general.name"] == bytes(ref.fields["general.name"].parts[-1]).decode()
    assert info.metadata["tokenizer.ggml.tokens"] == len(ref.fields["tokenizer.ggml.tokens"].data)
    assert len(info.metadata["tokenizer.ggml.token_type"]) == info.metadata["tokenizer.ggml.tokens"]
    assert info.architecture == "gptneox"


def test_truncated_and_foreign_files(checkpoints, tmp_path):
    path = pipeline.convert(checkpoints("tf4-st-f16"), "f16", tmp_path / "m.gguf").path
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(UserError, match="is truncated"):
        read_info(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:5000])
    with pytest.raises(UserError, match="not a valid GGUF file|is truncated"):
        read_info(tmp_path / "head.gguf")
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(UserError, match="not a GGUF file"):
        read_info(tmp_path / "x.gguf")


def _corruptions(data: bytes) -> dict[str, bytes]:
    """The reported cases, made from a real file: counts of 2⁴⁰, an unknown value type, random bytes in the
    vocabulary, and a header cut at a few places."""
    import os
    import struct

    key_len = struct.unpack_from("<Q", data, 24)[0]
    bad_type = bytearray(data)
    struct.pack_into("<I", bad_type, 32 + key_len, 99)
    noise = bytearray(data)
    noise[3000:3100] = os.urandom(100)
    return {"n_tensors": data[:8] + struct.pack("<Q", 1 << 40) + data[16:],
            "n_kv": data[:16] + struct.pack("<Q", 1 << 40) + data[24:],
            "value type": bytes(bad_type), "random bytes at 3000": bytes(noise),
            "cut at 30": data[:30], "cut at 12": data[:12], "cut at 6": data[:6]}


def test_corrupt_headers_are_one_line_errors_that_name_the_file(checkpoints, tmp_path):
    """Every count and length in a header is bounded by the file's size: no MemoryError, OverflowError or KeyError
    (they were internal errors in complete, ask, info, models import and chat /model)."""
    path = pipeline.convert(checkpoints("tf4-st-f16"), "f16", tmp_path / "m.gguf").path
    for what, data in _corruptions(path.read_bytes()).items():
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(data)
        with pytest.raises(UserError) as e:
            read_info(bad)
        message = str(e.value)
        assert str(bad) in message and "\n" not in message, what
        assert "header: )" not in message, (what, message)  # a truncated file once said "corrupt header: )"


def test_no_corruption_of_a_header_escapes_as_another_exception(checkpoints, tmp_path):
    """A fuzz of 2,000 random byte changes over the header of a real file: each is read or refused as a UserError."""
    import random

    path = pipeline.convert(checkpoints("tf4-st-f16"), "f16", tmp_path / "m.gguf").path
    data = path.read_bytes()
    header = read_info(path).data_offset
    rng = random.Random(12)
    refused = 0
    bad = tmp_path / "fuzz.gguf"
    for _ in range(2000):
        mutated = bytearray(data)
        for _ in range(rng.choice((1, 2, 8))):
            mutated[rng.randrange(header)] = rng.randrange(256)
        bad.write_bytes(mutated)
        try:
            read_info(bad)
        except UserError:
            refused += 1
    assert refused > 500  # most changes break something; the point is that nothing else was raised
