"""Settings from a TOML file and --set flags: clear one-line errors naming the key."""

import pytest
from click.testing import CliRunner

from tapio_core.cli import cli
from tapio_core.config import ConfigError, apply_overrides, load_config_file, load_settings


def test_file_and_overrides(tmp_path):
    path = tmp_path / "tapio.toml"
    path.write_text('[network]\nrst_storm_threshold = 10\nname = "a"\n')
    assert load_settings(path, ["network.rst_storm_threshold=20", "file.max_files=5"]) == {
        "network": {"rst_storm_threshold": 20, "name": "a"}, "file": {"max_files": 5},
    }


def test_override_values_are_toml_values_and_bare_words_are_strings():
    assert apply_overrides({}, ["a.i=3", "a.f=2.5", "a.b=true", "a.l=[1, 2]", "a.s=fast", 'a.q="x y"']) == {
        "a": {"i": 3, "f": 2.5, "b": True, "l": [1, 2], "s": "fast", "q": "x y"},
    }


@pytest.mark.parametrize("assignment", ["novalue", "nosection=3", ".key=3", "section.=3"])
def test_malformed_override(assignment):
    with pytest.raises(ConfigError, match=r"expected SECTION\.KEY=VALUE"):
        apply_overrides({}, [assignment])


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[network\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config_file(bad)


def test_replay_rejects_a_setting_for_nothing_loaded(tmp_path):
    recording = tmp_path / "rec"
    recording.write_bytes(b"TAPIOREC\x01\x00")
    result = CliRunner().invoke(cli, ["replay", str(recording), "--set", "martian.x=1"])
    assert result.exit_code == 1
    assert "config [martian]: no loaded observer, enricher or sink has that name" in result.output


def test_unknown_key_in_a_nested_table_lists_that_tables_keys():
    import attrs

    from tapio_core.config import build_settings

    @attrs.frozen
    class Device:
        match: str = "*"

    @attrs.frozen
    class Settings:
        devices: list[Device] = attrs.field(factory=list)

    with pytest.raises(ConfigError, match=r"unknown key bogus \(known: match\)"):
        build_settings(Settings, "storage", {"storage": {"devices": [{"bogus": 1}]}})
