"""Config files and overrides: valid input becomes an OffloadConfig; each kind of bad input is one line that
names the key, the value and the fix."""

import json

import pytest

from offload.config import (ENV_VAR, ConfigError, OffloadConfig, config_from_dict, config_from_env, config_to_dict,
                            load_config, parse_bytes)
from storage import Tier


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
                        loss_scale="dynamic", device_budget_bytes=123 << 20)
    d = config_to_dict(cfg)
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
    (["host_budget_bytes=900TiB"], ["host_budget_bytes", "more than this machine's", "lower it"]),
    (["state_tier=disk"], ["state_tier", "'disk'", "nvme"]),
    (["state_tier=nvme"], ["nvme_dirs", "needs a directory"]),
    (["buffers=0"], ["buffers", "expected >= 1"]),
    (["prefetch"], ["expected KEY=VALUE"]),
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
