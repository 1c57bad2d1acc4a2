"""app.runtime.gguf_info reads what gguf-py's reader reads (the reference), only faster."""

from __future__ import annotations

import gguf
import pytest

from app.errors import UserError
from app.runtime.gguf_info import read_info
from convert import pipeline


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
