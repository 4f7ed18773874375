"""Settings: secrets have no default, are refused when weak, and never printed; a database URL
may list several hosts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr
from sqlalchemy import make_url

from shared.errors import ConfigError
from workers.config import Settings

ROOT = Path(__file__).resolve().parents[2]
GOOD = "k" * 40


def _secret_settings() -> set[str]:
    return {
        f"NUDGE_{name.upper()}"
        for name, f in Settings.model_fields.items()
        if f.annotation in (SecretStr, SecretStr | None)
    }


def test_every_secret_setting_is_in_the_kubernetes_secret_example() -> None:
    docs = yaml.safe_load_all((ROOT / "infra/k8s/secret.example.yaml").read_text())
    nudge = next(d for d in docs if d["metadata"]["name"] == "nudge-secrets")
    assert _secret_settings() == {
        "NUDGE_WEBHOOK_SECRET",
        "NUDGE_UNSUBSCRIBE_SECRET",
        "NUDGE_TRACKING_SECRET",
        "NUDGE_SMTP_PASSWORD",
    }
    assert _secret_settings() <= set(nudge["stringData"])


@pytest.mark.parametrize("name", ["webhook_secret", "unsubscribe_secret", "tracking_secret"])
@pytest.mark.parametrize(
    "value", ["change-me", "change-me-too", "x" * 31, "CHANGE-ME-to-a-long-random-string"]
)
def test_a_weak_secret_is_refused_naming_the_setting_and_not_the_value(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"NUDGE_{name.upper()}", value)
    with pytest.raises(ConfigError) as refused:
        Settings.load()
    assert f"NUDGE_{name.upper()}: " in str(refused.value)
    assert value not in str(refused.value)
    assert refused.value.__cause__ is None  # the validation error would carry the value


def test_a_channel_without_its_secret_is_refused_naming_both_settings() -> None:
    settings = Settings.load(webhook_url="http://127.0.0.1:9/hook", smtp_host="127.0.0.1")
    with pytest.raises(ConfigError) as refused:
        settings.require_channel_secrets()
    assert str(refused.value).startswith(
        "invalid configuration: NUDGE_WEBHOOK_SECRET: required when NUDGE_WEBHOOK_URL is set"
    )
    assert "NUDGE_UNSUBSCRIBE_SECRET: required when NUDGE_SMTP_HOST is set" in str(refused.value)
    Settings.load(webhook_secret=GOOD, unsubscribe_secret=GOOD).require_channel_secrets()
    Settings.load(
        webhook_url="http://127.0.0.1:9/hook",
        webhook_secret=GOOD,
        smtp_host="127.0.0.1",
        unsubscribe_secret=GOOD,
    ).require_channel_secrets()


def test_secrets_are_masked_when_settings_are_printed() -> None:
    settings = Settings.load(webhook_secret=GOOD, unsubscribe_secret=GOOD, smtp_password=GOOD)
    for text in (repr(settings), str(settings), str(settings.model_dump())):
        assert GOOD not in text
    assert settings.webhook_secret is not None
    assert settings.webhook_secret.get_secret_value() == GOOD


def test_a_database_url_listing_several_hosts_reaches_sqlalchemy_as_its_host_parameters() -> None:
    listed = (
        "postgresql+psycopg://nudge:pw@pg-1:5432,pg-2:5433/nudge?target_session_attrs=read-write"
    )
    url = make_url(Settings.load(database_url=listed).database_url)
    assert url.query == {
        "host": ("pg-1:5432", "pg-2:5433"),
        "target_session_attrs": "read-write",
    }
    assert (url.username, url.password, url.database) == ("nudge", "pw", "nudge")
    single = "postgresql+psycopg://nudge@pg-1:5432/nudge"
    assert Settings.load(database_url=single).database_url == single


def test_a_database_url_with_an_empty_host_in_its_list_is_refused_naming_the_setting() -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.load(database_url="postgresql+psycopg://nudge@pg-1:5432,,pg-2:5432/nudge")
    assert "NUDGE_DATABASE_URL" in str(refused.value)
    assert "empty host" in str(refused.value)
