"""The one offline check (utils/offline.py)."""

from __future__ import annotations

import pytest
from huggingface_hub import constants

from invsr_pl.utils.offline import hub_offline


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
@pytest.mark.parametrize("name", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_flags_set_at_call_time_count(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert not hub_offline()
    monkeypatch.setenv(name, value)
    assert hub_offline()


def test_unset_or_false_is_online_unless_the_library_says_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert not hub_offline()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_offline()
