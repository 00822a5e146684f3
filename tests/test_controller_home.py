"""The controller's signing key and settings on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from controller.keys import SigningKeyError, create_signing_key, load_signing_key
from controller.settings import (
    SettingsError,
    default_settings,
    load_settings,
    write_settings,
)


def test_the_signing_key_is_private_and_never_replaced(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    created = create_signing_key(keys)
    assert (keys / "signing-key.pem").stat().st_mode & 0o777 == 0o600
    assert keys.stat().st_mode & 0o777 == 0o700
    assert load_signing_key(keys).key_id == created.key_id
    with pytest.raises(SigningKeyError, match="refusing to replace"):
        create_signing_key(keys)


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    create_signing_key(tmp_path)
    os.chmod(tmp_path / "signing-key.pem", 0o644)
    with pytest.raises(SigningKeyError, match="chmod 600"):
        load_signing_key(tmp_path)


def test_a_missing_key_says_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="edgefleet init"):
        load_signing_key(tmp_path)


def test_settings_round_trip(tmp_path: Path) -> None:
    settings = default_settings(tmp_path)
    write_settings(tmp_path, settings)
    assert load_settings(tmp_path) == settings


@pytest.mark.parametrize(("text", "field"), [
    ('database_url = "sqlite://"\nchunk_size = "big"\n', "chunk_size"),
    ('database_url = "sqlite://"\n[broker]\nport = "x"\n', "broker.port"),
    ('database_url = "sqlite://"\n[broker]\nhots = "x"\n', "broker"),
    ("chunk_size = 1\n", ""),
])
def test_broken_settings_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    (tmp_path / "controller.toml").write_text(text)
    with pytest.raises(SettingsError) as err:
        load_settings(tmp_path)
    assert f"field '{field}'" in str(err.value)


def test_missing_settings_say_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="edgefleet init"):
        load_settings(tmp_path)
