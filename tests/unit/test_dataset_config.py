"""``[[agent.datasets]]``: defaults, a full table, and every validation with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfheal.config import DatasetConfig, load_config
from selfheal.errors import ConfigError


def load(tmp_path: Path, table: str) -> DatasetConfig:
    path = tmp_path / "selfheal.toml"
    path.write_text('[agent]\nnode_id = "node-a"\n' + table, encoding="utf-8")
    (dataset,) = load_config(path, env={}, role="agent").agent.datasets
    return dataset


def error(tmp_path: Path, table: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, table)
    return info.value


def test_defaults(tmp_path: Path) -> None:
    dataset = load(tmp_path, '[[agent.datasets]]\nname = "model"\npath = "/srv/models/current"\n')
    assert dataset == DatasetConfig(name="model", path="/srv/models/current")
    assert (dataset.include, dataset.exclude, dataset.manifest) == ([], [], None)
    assert (dataset.scan_interval, dataset.deep_scan_interval) == (60.0, 86400.0)
    assert (dataset.read_bandwidth, dataset.chunk_size) == (0, 4 * 1024 * 1024)


def test_a_full_table(tmp_path: Path) -> None:
    dataset = load(tmp_path, '[[agent.datasets]]\nname = "features"\npath = "/data/features"\n'
                             'include = ["**/*.parquet"]\nexclude = ["_tmp", "*.crc"]\nscan_interval = 5\n'
                             'deep_scan_interval = 3600\nread_bandwidth = 52428800\nchunk_size = 1048576\n'
                             'manifest = "MANIFEST"\n')
    assert dataset.include == ["**/*.parquet"]
    assert dataset.exclude == ["_tmp", "*.crc"]
    assert (dataset.scan_interval, dataset.deep_scan_interval) == (5.0, 3600.0)
    assert (dataset.read_bandwidth, dataset.chunk_size, dataset.manifest) == (52428800, 1048576, "MANIFEST")


@pytest.mark.parametrize(("table", "where", "message"), [
    ('name = "Model"\npath = "/d"', "agent.datasets[0].name", "must match"),
    ('name = "model"\npath = "relative/dir"', "agent.datasets[0].path", "not an absolute path"),
    ('name = "model"\npath = "/d"\ninclude = ["../up"]', "agent.datasets[0].include", "relative glob"),
    ('name = "model"\npath = "/d"\nexclude = ["/abs"]', "agent.datasets[0].exclude", "relative glob"),
    ('name = "model"\npath = "/d"\nexclude = [""]', "agent.datasets[0].exclude", "relative glob"),
    ('name = "model"\npath = "/d"\nscan_interval = 0', "agent.datasets[0].scan_interval", "must be > 0"),
    ('name = "model"\npath = "/d"\ndeep_scan_interval = -1', "agent.datasets[0].deep_scan_interval", "> 0"),
    ('name = "model"\npath = "/d"\nread_bandwidth = -5', "agent.datasets[0].read_bandwidth", ">= 0"),
    ('name = "model"\npath = "/d"\nchunk_size = 1000', "agent.datasets[0].chunk_size", "between 4096"),
    ('name = "model"\npath = "/d"\nchunk_size = 134217728', "agent.datasets[0].chunk_size", "between 4096"),
    ('name = "model"\npath = "/d"\nmanifest = " "', "agent.datasets[0].manifest", "must be a path"),
    ('name = "model"\npath = "/d"\nscan_every = 5', "agent.datasets[0].scan_every", "unknown key"),
])
def test_invalid_values_name_their_key(tmp_path: Path, table: str, where: str, message: str) -> None:
    problem = error(tmp_path, "[[agent.datasets]]\n" + table + "\n")
    assert problem.path == where
    assert message in str(problem)


def test_dataset_names_are_unique(tmp_path: Path) -> None:
    table = '[[agent.datasets]]\nname = "model"\npath = "/a"\n'
    problem = error(tmp_path, table + table.replace("/a", "/b"))
    assert problem.path == "agent.datasets[1].name"
    assert "duplicate dataset name 'model'" in str(problem)
