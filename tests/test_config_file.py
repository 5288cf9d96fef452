"""Config files and overrides: valid input becomes an OffloadConfig; each kind of bad input is one line that
names the key, the value and the fix."""

import dataclasses
import json
from pathlib import Path

import pytest

from offload.config import (ENV_VAR, ConfigError, OffloadConfig, config_from_dict, config_from_env, config_to_dict,
                            load_config, parse_bytes)
from scheduler import profile
from storage import Tier

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text):
    p = tmp_path / "offload.toml"
    p.write_text(text)
    return str(p)


def test_file_and_overrides(tmp_path):
    path = write(tmp_path, 'state_tier = "nvme"\nnvme_dirs = ["/a", "/b"]\nhost_budget_bytes = "1GiB"\n'
                           'prefetch = 3\n[store]\nblock_bytes = "4MiB"\nverify = false\n')
    cfg = load_config(path, ["prefetch=1", "store.workers=4", "param_tier=nvme", "max_grad_norm=0.5"])
    assert cfg.state_tier is Tier.NVME and cfg.param_tier is Tier.NVME
    assert cfg.nvme_dirs == ("/a", "/b")
    assert cfg.host_budget_bytes == 1 << 30
    assert cfg.prefetch == 1  # the override wins over the file
    assert cfg.max_grad_norm == 0.5
    assert cfg.store.block_bytes == 4 << 20 and cfg.store.workers == 4 and cfg.store.verify is False


def test_round_trip_through_dict_and_env(tmp_path):
    cfg = OffloadConfig(state_tier="nvme", param_tier="nvme", nvme_dirs=str(tmp_path), update_on=["cpu", "device"],
                        loss_scale="dynamic", device_budget_bytes=123 << 20, replan=True, profile="cpu-dev-2core")
    d = config_to_dict(cfg)
    assert d["replan"] is True and d["profile"] == "cpu-dev-2core"
    assert config_from_dict(json.loads(json.dumps(d))) == cfg
    assert config_from_env({ENV_VAR: json.dumps(d)}) == cfg
    assert config_from_env({}) is None


def test_env_gives_each_rank_its_own_store_dir(tmp_path):
    d = config_to_dict(OffloadConfig(state_tier="nvme", nvme_dirs=str(tmp_path)))
    cfg = config_from_env({ENV_VAR: json.dumps(d), "WORLD_SIZE": "2", "RANK": "1"})
    assert cfg.nvme_dirs == (str(tmp_path / "rank1"),)
    assert (tmp_path / "rank1").is_dir()


@pytest.mark.parametrize("override,words", [
    (["stat_tier=nvme"], ["unknown key 'stat_tier'", "did you mean 'state_tier'", "valid keys"]),
    (["store.blok_bytes=4"], ["unknown key 'store.blok_bytes'", "did you mean 'block_bytes'"]),
    (["prefetch=two"], ["prefetch = 'two'", "expected an integer", "prefetch = 4"]),
    (["overlap_update=1"], ["overlap_update = 1", "expected true or false"]),
    (["host_budget_bytes=lots"], ["host_budget_bytes = 'lots'", "expected a size", "8GiB"]),
    (["host_budget_bytes=900TiB"], ["host_budget_bytes", "of memory this process may use", "lower it"]),
    (["state_tier=disk"], ["state_tier", "'disk'", "nvme"]),
    (["state_tier=nvme"], ["nvme_dirs", "needs a directory"]),
    (["buffers=0"], ["buffers", "expected >= 1"]),
    (["prefetch"], ["expected KEY=VALUE"]),
    (["replan=yes"], ["replan = 'yes'", "expected true or false", "replan = true"]),
    (["profile=3"], ["profile = 3", "expected a string", 'profile = "cpu-dev-2core"']),
    (["profile=h100"], ["OffloadConfig.profile = 'h100'", "expected one of", "'h100-pcie5-gen4nvme'", "JSON profile"]),
    (["profile=/no/such/profile.json"], ["OffloadConfig.profile = '/no/such/profile.json'", "no such file",
                                         "offload probe --json"]),
    (["replan=true", "accumulation_steps=4"], ["OffloadConfig.replan", "expected accumulation_steps=1", "got 4",
                                               "replan=false"]),
])
def test_bad_input_is_one_clear_line(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "state_tier = \n"))
    with pytest.raises(ConfigError, match=r"offload.toml: unknown key 'nvme_dir' \(did you mean 'nvme_dirs'\?\)"):
        load_config(write(tmp_path, 'nvme_dir = "/x"\n'))


def test_parse_bytes():
    assert parse_bytes("8GiB") == 8 << 30
    assert parse_bytes("2TB") == 2 * 10**12
    assert parse_bytes("1.5 MiB") == 3 << 19
    assert parse_bytes(4096) == 4096
    with pytest.raises(ValueError):
        parse_bytes("8 gigs")


def test_replan_and_profile_from_a_file_and_overrides(tmp_path):
    """Off by default; on from TOML or --set; the profile a shipped name or a JSON file (checked when the config is
    made, so `offload run` refuses a bad one before the script starts)."""
    assert OffloadConfig().replan is False and OffloadConfig().profile is None
    assert "profile" not in config_to_dict(OffloadConfig())  # None: left out, and back to None
    mine = tmp_path / "mine.json"
    dataclasses.replace(profile.resolve("cpu-dev-2core"), name="mine").save(mine)
    cfg = load_config(write(tmp_path, f'replan = true\nprofile = "{mine}"\n'))
    assert cfg.replan is True and cfg.profile == str(mine)
    cfg = load_config(None, ["replan=true", "profile=rtx4090-pcie4-gen4nvme"])
    assert cfg.replan is True and cfg.profile == "rtx4090-pcie4-gen4nvme"
    not_a_profile = tmp_path / "other.json"
    not_a_profile.write_text('{"format": "something else"}')
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"profile={not_a_profile}"])
    assert f"{not_a_profile}: expected a JSON object with format" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="OffloadConfig.profile"):
        OffloadConfig(profile="nope")
    # Made in code, a path is read when re-planning starts, not on every copy of the config (the runtime makes
    # some while training); read from a file, --set or the environment, it is read now.
    later = str(tmp_path / "later.json")
    assert OffloadConfig(profile=later).profile == later
    with pytest.raises(ConfigError, match="no such file"):
        config_from_env({ENV_VAR: json.dumps({"profile": later})})


def test_example_config_documents_replanning():
    text = (ROOT / "examples" / "offload.toml").read_text()
    assert "\nreplan = false" in text and "# profile = " in text
    cfg = load_config(str(ROOT / "examples" / "offload.toml"), ["profile=cpu-dev-2core"])
    assert cfg.replan is False and cfg.profile == "cpu-dev-2core"
