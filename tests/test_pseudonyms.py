"""The run's salted pseudonym mapping: one per run, stored inside it, the same bytes for the same seed in any folder,
unrelated pseudonyms for another secret, and no raw id recoverable from a pseudonym without the secret."""

from __future__ import annotations

import json

import pytest

from gestalt_xai.errors import InputError
from gestalt_xai.pseudonyms import LENGTH, PseudonymMap, derived_secret
from gestalt_xai.runs import LAYOUT, Run

IDS = [f"img_{i:04d}" for i in range(300)]


def test_same_seed_same_bytes_in_two_folders(tmp_path) -> None:
    a, b = Run(tmp_path / "a"), Run(tmp_path / "elsewhere" / "b")
    ta, tb = a.pseudonyms(seed=3).table("case", IDS), b.pseudonyms(seed=3).table("case", IDS)
    assert ta.equals(tb)
    assert (a.path / LAYOUT.pseudonym_secret).read_bytes() == (b.path / LAYOUT.pseudonym_secret).read_bytes()
    assert json.loads((a.path / LAYOUT.pseudonym_secret).read_text())["source"] == "derived from study seed 3"


def test_study_seed_wins_and_the_mapping_is_kept_once_made(tmp_path) -> None:
    run = Run(tmp_path / "r")
    run.set_study("s", 7, {})
    first = run.pseudonyms(seed=0)
    assert first.secret == derived_secret(7)
    run.set_study("s", 8, {})  # a later seed change does not change the pseudonyms already handed out
    assert Run(run.path).pseudonyms(seed=1).pseudonym("case", "x") == first.pseudonym("case", "x")


def test_pseudonyms_are_distinct_stable_and_depend_on_secret_and_kind(tmp_path) -> None:
    m0 = PseudonymMap(derived_secret(0), "t")
    table = m0.table("case", IDS + IDS[:5])  # duplicates collapse
    assert len(table) == len(IDS) and table["pseudonym"].is_unique
    assert all(p.startswith("C-") and len(p) == 2 + LENGTH for p in table["pseudonym"])
    m1 = PseudonymMap(derived_secret(1), "t")
    assert not set(table["pseudonym"]) & set(m1.table("case", IDS)["pseudonym"])
    subjects = m0.table("subject", IDS)["pseudonym"].str[2:]
    assert not set(table["pseudonym"].str[2:]) & set(subjects)
    with pytest.raises(ValueError, match="unknown pseudonym kind"):
        m0.pseudonym("image", "x")


def test_user_secret_replaces_derivation_and_is_protected(tmp_path) -> None:
    run = Run(tmp_path / "r")
    user = run.set_pseudonym_secret()
    assert user.source == "set by the user" and user.secret != derived_secret(0)
    assert run.pseudonyms(seed=0).secret == user.secret
    with pytest.raises(InputError, match="already has a pseudonym secret"):
        run.set_pseudonym_secret("ab" * 16)
    assert run.set_pseudonym_secret("AB" * 16, replace=True).secret == "ab" * 16
    with pytest.raises(InputError, match="128 bits"):
        run.set_pseudonym_secret("abcd", replace=True)
    with pytest.raises(InputError, match="hexadecimal"):
        run.set_pseudonym_secret("not hex at all, not hex at all!!", replace=True)
    assert "secret=" not in repr(run.pseudonyms())


def test_a_damaged_secret_file_is_named_not_silently_replaced(tmp_path) -> None:
    run = Run(tmp_path / "r")
    path = run.path / LAYOUT.pseudonym_secret
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(InputError, match="pseudonym_secret.json: not a pseudonym secret file"):
        run.pseudonyms()
    assert path.read_text() == "{not json"
