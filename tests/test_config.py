"""The settings file: where it is, what it may say, how mistakes are reported, precedence, and how it is written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from malhae.errors import UserError
from malhae.store import config
from malhae.store.config import tomllib  # tomli on Python 3.10


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(UserError) as e:
        config.load(path)
    message = str(e.value)
    assert "\n" not in message
    assert str(path) in message  # every message names the file
    return message


# --- where the file is -------------------------------------------------------------------------------------------

def test_config_path_follows_malhae_config_then_malhae_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MALHAE_HOME", str(tmp_path / "home"))
    assert config.config_path() == tmp_path / "home" / "config.toml"
    monkeypatch.setenv("MALHAE_CONFIG", str(tmp_path / "elsewhere.toml"))
    assert config.config_path() == tmp_path / "elsewhere.toml"


def test_config_path_without_variables_is_the_user_config_dir(monkeypatch):
    import platformdirs

    monkeypatch.delenv("MALHAE_HOME")
    path = config.config_path()
    assert path.name == "config.toml" and path.parent.name == "malhae"
    assert path.parent == Path(platformdirs.user_config_dir("malhae"))


def test_missing_file_means_built_in_defaults(tmp_path):
    settings = config.load(tmp_path / "nope.toml")
    assert not settings.exists and settings.default_model is None and settings.sampling == {}
    values = config.sampling_values("chat", {}, settings)
    assert values["temperature"] == 0.7 and values["max_tokens"] == 512 and values["seed"] is None
    assert config.sampling_values("complete", {}, settings)["max_tokens"] == 256
    assert config.runtime_values({}, settings) == {"ctx": None, "threads": None, "gpu_layers": "auto",
                                                   "device": None, "kv_cache": "f16", "kv_cache_k": None,
                                                   "kv_cache_v": None, "flash_attn": "auto"}


# --- what it may say -----------------------------------------------------------------------------------------

def test_the_readme_example_is_a_valid_settings_file(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    example = re.search(r"```toml\n(.*?)```", readme, re.S).group(1)
    s = config.load(write(tmp_path, example))
    assert s.exists and s.default_model == "polyglot-ko-1.3b-q4_k_m" and s.gpu_layers == "auto" and s.ctx == 2048
    assert s.threads == 8
    assert s.sampling == {"temperature": 0.3, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1,
                          "frequency_penalty": 0.0, "presence_penalty": 0.0, "repeat_last_n": 64, "max_tokens": 512,
                          "seed": 42}
    assert isinstance(s.sampling["temperature"], float)


def test_endpoint_keys_and_never_a_key(tmp_path):
    s = config.load(write(tmp_path, 'endpoint = " http://gpu-box:8000/v1 "\napi_key_env = "TEAM_KEY"\n'
                                    "endpoint_timeout = 300\n"))
    assert (s.endpoint, s.api_key_env, s.endpoint_timeout) == ("http://gpu-box:8000/v1", "TEAM_KEY", 300.0)
    with pytest.raises(UserError, match=r"line 2: endpoint_timeout must be a number of seconds from 0.1"):
        config.load(write(tmp_path, 'endpoint = "h"\nendpoint_timeout = 0\n'))
    with pytest.raises(UserError, match=r"endpoint must be a string"):
        config.load(write(tmp_path, "endpoint = 8000\n"))
    with pytest.raises(UserError, match=r"line 1: a settings file must not hold an API key"):
        config.load(write(tmp_path, 'api_key = "sk-123"\n'))


def test_integers_are_accepted_for_float_settings(tmp_path):
    s = config.load(write(tmp_path, "gpu_layers = 12\nthreads = 3\n[sampling]\ntemperature = 1\nseed = 42\n"))
    assert s.sampling == {"temperature": 1.0, "seed": 42} and s.gpu_layers == 12 and s.threads == 3


def test_invalid_toml_names_the_line(tmp_path):
    message = error_of(write(tmp_path, 'default_model = "a"\nctx = = 3\n'))
    assert "not valid TOML" in message and "line 2" in message


def test_unknown_top_level_key_names_key_and_line(tmp_path):
    message = error_of(write(tmp_path, '# comment\ndefault_model = "a"\ntemprature = 0.2\n'))
    assert "'temprature'" in message and "line 3" in message and "remove or rename" in message
    assert "did you mean [sampling] temperature?" in message  # not a top-level key: the hint says where it goes
    message = error_of(write(tmp_path, "temperature = 0.2\n"))
    assert "did you mean [sampling] temperature?" in message and "line 1" in message


def test_unknown_sampling_key_names_key_and_line(tmp_path):
    message = error_of(write(tmp_path, 'ctx = 512\n\n[sampling]\ntop_p = 0.9\ntopk = 3\n'))
    assert "'topk'" in message and "line 5" in message and "(did you mean 'top_k'?)" in message


@pytest.mark.parametrize("text, key, line", [
    ('[sampling]\ntemperature = "hot"\n', "sampling.temperature", 2),
    ("[sampling]\ntop_k = 4.5\n", "sampling.top_k", 2),
    ("[sampling]\nmax_tokens = true\n", "sampling.max_tokens", 2),
    ('gpu_layers = "all"\n', "gpu_layers", 1),
    ("gpu_layers = -1\n", "gpu_layers", 1),
    ("ctx = 8\n", "ctx", 1),
    ('threads = "4"\n', "threads", 1),
    ("default_model = 3\n", "default_model", 1),
    ("default_model = [1, 2]\n", "default_model", 1),
    ("sampling = 3\n", "sampling", 1),
])
def test_wrong_types_are_one_line_errors(tmp_path, text, key, line):
    message = error_of(write(tmp_path, text))
    assert key in message and f"line {line}" in message


def test_out_of_range_values_are_refused_naming_the_file(tmp_path):
    """The file is checked against the settings table when it is read: the range too, with the key's line."""
    message = error_of(write(tmp_path, "ctx = 512\n[sampling]\ntemperature = 50\n"))
    assert "line 3" in message and "sampling.temperature must be a number from 0 to 10" in message and "50" in message
    assert "repeat_last_n" in error_of(write(tmp_path, "[sampling]\nrepeat_last_n = -1\n"))
    assert "line 1" in error_of(write(tmp_path, "threads = 0\n"))


def test_a_directory_or_non_utf8_file_is_an_error(tmp_path):
    (tmp_path / "dir.toml").mkdir()
    assert "directory" in error_of(tmp_path / "dir.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes('default_model = "모델"'.encode("cp949"))
    assert "UTF-8" in error_of(bad)


# --- precedence ----------------------------------------------------------------------------------------------

def test_flag_beats_file_beats_built_in(tmp_path):
    settings = config.load(write(tmp_path, 'ctx = 1024\ngpu_layers = 0\ndevice = "CUDA1"\n[sampling]\n'
                                           'temperature = 0.2\ntop_k = 5\n'))
    values = config.sampling_values("ask", {"temperature": 0.9, "top_k": None}, settings)
    assert values["temperature"] == 0.9  # flag
    assert values["top_k"] == 5  # file
    assert values["top_p"] == 0.95 and values["max_tokens"] == 256  # built-in
    assert config.sampling_values("ask", {"temperature": 0.0}, settings)["temperature"] == 0.0  # 0 is a value
    run = config.runtime_values({"ctx": 64, "threads": None, "gpu_layers": None}, settings)
    assert run == {"ctx": 64, "threads": None, "gpu_layers": 0, "device": "CUDA1", "kv_cache": "f16",
                   "kv_cache_k": None, "kv_cache_v": None, "flash_attn": "auto"}
    assert config.runtime_values({"device": "cpu"}, settings)["device"] == "cpu"


# --- writing -------------------------------------------------------------------------------------------------

def test_set_default_model_keeps_comments_and_other_settings(tmp_path):
    original = '# my settings\nctx = 1024  # small\n\n[sampling]\n# cooler\ntemperature = 0.2\n'
    path = write(tmp_path, original)
    config.set_default_model("polyglot-ko-1.3b-q4_k_m", path)
    text = path.read_text(encoding="utf-8")
    assert "# my settings" in text and "ctx = 1024  # small" in text and "# cooler" in text
    data = tomllib.loads(text)
    assert data == {"default_model": "polyglot-ko-1.3b-q4_k_m", "ctx": 1024, "sampling": {"temperature": 0.2}}

    config.set_default_model("other", path)  # replaced, not added twice
    assert tomllib.loads(path.read_text())["default_model"] == "other"
    assert path.read_text().count("default_model") == 1

    config.set_default_model(None, path)
    assert tomllib.loads(path.read_text()) == {"ctx": 1024, "sampling": {"temperature": 0.2}}
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]  # no temporary file left behind


def test_set_default_model_creates_the_file_and_its_directory(tmp_path):
    path = tmp_path / "a" / "b" / "config.toml"
    value = 'C:\\모델 "quoted"\\x.gguf'
    config.set_default_model(value, path)
    assert config.load(path).default_model == value


def test_set_default_model_in_a_file_that_has_only_tables(tmp_path):
    path = write(tmp_path, "[sampling]\ntop_k = 3")  # no newline at the end either
    config.set_default_model("m", path)
    assert tomllib.loads(path.read_text()) == {"default_model": "m", "sampling": {"top_k": 3}}


def test_set_default_model_refuses_to_build_on_a_broken_file(tmp_path):
    path = write(tmp_path, "ctx = = 1\n")
    with pytest.raises(UserError):
        config.set_default_model("m", path)
    assert path.read_text() == "ctx = = 1\n"


def test_dumps_round_trips_the_supported_kinds():
    data = {"default_model": "말해 \"x\"\t\\", "ctx": 2048, "flag": True, "sampling": {"temperature": 0.25, "seed": 7}}
    assert tomllib.loads(config.dumps(data)) == data
