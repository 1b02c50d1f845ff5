"""runtime: CPU count from affinity and cgroup quotas (on fake cgroup trees), thread-pool configuration."""
import os

import pytest
import torch

from h1bkv_lite.runtime import OFFLINE_ENV_VARS, THREAD_ENV_VARS, available_cpus, configure_offline, configure_threads

AFFINITY = len(os.sched_getaffinity(0))


def _tree(tmp_path, files: dict, proc_cgroup: str = "0::/\n"):
    for rel, text in files.items():
        path = tmp_path / "cg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "self_cgroup").write_text(proc_cgroup)
    return dict(cgroup_root=tmp_path / "cg", proc_cgroup=tmp_path / "self_cgroup")


@pytest.mark.parametrize("quota,expected", [("100000 100000", 1), ("150000 100000", 2), ("50000 100000", 1)])
def test_cgroup_v2_quota_caps_the_count(tmp_path, quota, expected):
    paths = _tree(tmp_path, {"cpu.max": quota})
    assert available_cpus(**paths) == min(AFFINITY, expected)


def test_cgroup_v2_nested_group_of_this_process(tmp_path):
    paths = _tree(tmp_path, {"cpu.max": "max 100000", "ci/job/cpu.max": "100000 100000"}, "0::/ci/job\n")
    assert available_cpus(**paths) == 1


def test_cgroup_v1_quota(tmp_path):
    paths = _tree(tmp_path, {"cpu,cpuacct/cpu.cfs_quota_us": "100000", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
                  "4:cpu,cpuacct:/\n")
    assert available_cpus(**paths) == 1


@pytest.mark.parametrize("files", [{"cpu.max": "max 100000"}, {"cpu/cpu.cfs_quota_us": "-1",
                                                              "cpu/cpu.cfs_period_us": "100000"}, {}])
def test_no_quota_means_the_affinity_mask(tmp_path, files):
    assert available_cpus(**_tree(tmp_path, files)) == AFFINITY


def test_unreadable_cgroup_files_are_ignored(tmp_path):
    paths = _tree(tmp_path, {"cpu.max": "garbage"})
    assert available_cpus(**paths) == AFFINITY
    paths = _tree(tmp_path / "words", {"cpu.max": "abc 100000"})
    assert available_cpus(**paths) == AFFINITY
    assert available_cpus(cgroup_root=tmp_path / "missing", proc_cgroup=tmp_path / "missing") == AFFINITY


@pytest.fixture
def clean_env(monkeypatch):
    for var in (*THREAD_ENV_VARS, *OFFLINE_ENV_VARS, "OMP_WAIT_POLICY"):
        monkeypatch.delenv(var, raising=False)
    before = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(before)


def test_configure_threads_sets_every_pool(clean_env):
    assert configure_threads(1) == 1
    assert torch.get_num_threads() == 1
    assert all(os.environ[var] == "1" for var in THREAD_ENV_VARS)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_configure_threads_keeps_the_users_setting(clean_env):
    clean_env.setenv("OMP_NUM_THREADS", "1")
    clean_env.setenv("MKL_NUM_THREADS", "3")
    clean_env.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert configure_threads() == 1
    assert torch.get_num_threads() == 1
    assert os.environ["MKL_NUM_THREADS"] == "3" and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_configure_threads_default_is_available_cpus(clean_env):
    assert configure_threads() == available_cpus()
    assert os.environ["OMP_NUM_THREADS"] == str(available_cpus())


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", True])
def test_configure_threads_rejects_bad_counts(clean_env, bad):
    with pytest.raises(ValueError, match="n must be a positive int"):
        configure_threads(bad)
    assert "OMP_NUM_THREADS" not in os.environ


def test_configure_offline_sets_unset_vars_only(clean_env):
    clean_env.setenv("HF_HUB_OFFLINE", "0")
    configure_offline()
    assert os.environ["HF_HUB_OFFLINE"] == "0"
    assert all(os.environ[var] == "1" for var in OFFLINE_ENV_VARS[1:])
