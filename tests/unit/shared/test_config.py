"""Settings: defaults, CLIPDEX_* variables, lists, overrides, and errors that name the variable."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from shared.cliargs import add_setting_flag, setting_overrides
from shared.config import load_settings
from shared.errors import ConfigError


def test_defaults_are_the_documented_ones() -> None:
    s = load_settings()
    assert s.data_dir == Path("clipdex-data")
    assert (s.model, s.pretrained, s.device, s.precision) == ("ViT-B-32", "laion2b_s34b_b79k", "auto", "auto")
    assert not s.random_weights
    assert s.model_configs is None and s.api_token is None
    assert s.allowed_roots == [] and s.allowed_url_hosts == []  # no paths, no URL fetching until configured
    assert (s.host, s.index_kind, s.vector_dtype) == ("127.0.0.1", "auto", "float32")
    assert s.db_path == Path("clipdex-data/clipdex.sqlite3") and s.index_dir == Path("clipdex-data/index")


def test_the_contract_variables_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLIPDEX_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("CLIPDEX_MODEL", "ViT-L-14")
    monkeypatch.setenv("CLIPDEX_PRETRAINED", "/models/vit-l.safetensors")
    monkeypatch.setenv("CLIPDEX_MODEL_CONFIGS", str(tmp_path))
    monkeypatch.setenv("CLIPDEX_DEVICE", "cpu")
    monkeypatch.setenv("CLIPDEX_ALLOWED_ROOTS", str(tmp_path))
    monkeypatch.setenv("CLIPDEX_API_TOKEN", "s3cret-token")
    monkeypatch.setenv("CLIPDEX_BATCH_SIZE", "128")
    monkeypatch.setenv("CLIPDEX_FAISS_GPU", "true")
    s = load_settings()
    assert s.data_dir == tmp_path / "d" and s.model == "ViT-L-14" and s.pretrained == "/models/vit-l.safetensors"
    assert s.model_configs == tmp_path and s.device == "cpu" and s.allowed_roots == [tmp_path]
    assert s.api_token is not None and s.api_token.get_secret_value() == "s3cret-token"
    assert "s3cret-token" not in repr(s)  # the token never reaches a log line through the settings
    assert s.batch_size == 128 and s.faiss_gpu is True


def test_none_means_random_weights_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPDEX_PRETRAINED", " NONE ")
    assert load_settings().random_weights


def test_lists_are_comma_separated_and_hosts_lowercased(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPDEX_ALLOWED_ROOTS", "/srv/images, /mnt/photos,,")
    monkeypatch.setenv("CLIPDEX_ALLOWED_URL_HOSTS", "Images.Example.com , cdn.example.com")
    s = load_settings()
    assert s.allowed_roots == [Path("/srv/images"), Path("/mnt/photos")]
    assert s.allowed_url_hosts == ["images.example.com", "cdn.example.com"]


def test_roots_also_split_on_the_path_separator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPDEX_ALLOWED_ROOTS", "/a:/b")
    assert load_settings().allowed_roots == [Path("/a"), Path("/b")]


def test_overrides_beat_the_environment_and_none_does_not_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPDEX_BATCH_SIZE", "16")
    monkeypatch.setenv("CLIPDEX_MODEL", "RN50")
    s = load_settings(batch_size=32, model=None)
    assert (s.batch_size, s.model) == (32, "RN50")


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("CLIPDEX_BATCH_SIZE", "0", "greater than or equal to 1"),
        ("CLIPDEX_BATCH_SIZE", "many", "valid integer"),
        ("CLIPDEX_DEVICE", "tpu", "'auto', 'cpu' or 'cuda'"),
        ("CLIPDEX_PORT", "70000", "less than or equal to 65535"),
        ("CLIPDEX_PRETRAINED", "   ", "checkpoint path"),
        ("CLIPDEX_INDEX_KIND", "annoy", "'flat'"),
        ("CLIPDEX_VECTOR_DTYPE", "int8", "float16"),
        ("CLIPDEX_REFRESH_INTERVAL_MS", "1", "greater than or equal to 10"),
        ("CLIPDEX_FAISS_GPU", "maybe", "valid boolean"),
    ],
)
def test_an_invalid_value_is_a_config_error_naming_the_variable(
    name: str, value: str, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert name in str(err.value) and says in str(err.value) and repr(value.strip() or value) in str(err.value)


def test_every_invalid_variable_is_named_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPDEX_BATCH_SIZE", "-1")
    monkeypatch.setenv("CLIPDEX_MAX_PIXELS", "12")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "CLIPDEX_BATCH_SIZE" in str(err.value) and "CLIPDEX_MAX_PIXELS" in str(err.value)


def test_an_invalid_override_names_the_variable_too() -> None:
    with pytest.raises(ConfigError, match="CLIPDEX_PORT"):
        load_settings(port=-5)


def test_an_empty_api_token_is_no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """`CLIPDEX_API_TOKEN=` (as compose writes an unset variable) must not count as a token: the server's
    rule 'a non-loopback address needs a token' would pass while requests need no token at all."""
    monkeypatch.setenv("CLIPDEX_API_TOKEN", "")
    assert load_settings().api_token is None
    monkeypatch.setenv("CLIPDEX_API_TOKEN", "  ")
    assert load_settings().api_token is None
    assert load_settings(api_token="").api_token is None


# -- CLI flags -----------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipdex")
    add_setting_flag(parser, "--batch-size", "batch_size", type=int)
    add_setting_flag(parser, "--model", "model")
    add_setting_flag(parser, "--faiss-gpu", "faiss_gpu", action="store_true")
    return parser


def test_a_flag_help_names_its_variable_and_default() -> None:
    text = " ".join(_parser().format_help().split())  # argparse wraps lines
    assert "[env: CLIPDEX_BATCH_SIZE, default: 64]" in text
    assert "[env: CLIPDEX_MODEL, default: ViT-B-32]" in text
    assert "[env: CLIPDEX_FAISS_GPU]" in text


def test_flags_override_the_environment_and_absent_flags_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPDEX_BATCH_SIZE", "16")
    monkeypatch.setenv("CLIPDEX_MODEL", "RN50")
    args = _parser().parse_args(["--batch-size", "8"])
    assert setting_overrides(args) == {"batch_size": 8}
    s = load_settings(**setting_overrides(args))
    assert (s.batch_size, s.model, s.faiss_gpu) == (8, "RN50", False)
