"""The [executors] section: default, named Ray tables, restart-only."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobworker.config import ConfigError, is_reloadable, parse_config

CLUSTER = """
[executors]
default = "cluster"

[executors.cluster]
kind = "ray"
address = "10.0.0.1:6379"
cpus_per_job = 0.5
token_file = "ray-token"
"""


def test_named_ray_tables_and_the_default() -> None:
    executors = parse_config(CLUSTER, Path("/etc/jobworker")).executors
    assert executors.default == "cluster"
    cluster = executors.named()["cluster"]
    assert (cluster.kind, cluster.address, cluster.cpus_per_job) == ("ray", "10.0.0.1:6379", 0.5)
    assert cluster.token_file == Path("/etc/jobworker/ray-token")


def test_without_the_section_only_local() -> None:
    executors = parse_config("", Path("/")).executors
    assert executors.default == "local" and executors.named() == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[executors]\ndefault = "x"', "default = 'x' names no [executors.NAME] table"),
        ('[executors.c]\nkind = "k8s"', 'executors.c.kind = "k8s" (line 2): must be "ray"'),
        ('[executors.c]\naddress = "nope"', "must be the cluster's GCS address, host:port"),
        ("[executors.c]\ncpus_per_job = 0", "must be a number of CPUs above 0"),
        ("[executors.c]\nport = 1", "unknown key executors.c.port (line 2); known keys"),
        ('[executors.local]\nkind = "ray"', '"local" is the built-in executor'),
    ],
)
def test_bad_tables_are_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, Path("/"))
    assert message in str(caught.value)


def test_restart_only() -> None:
    assert not is_reloadable("executors.default")
    assert not is_reloadable("executors.cluster.address")
