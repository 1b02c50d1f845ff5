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


# ------------------------------------------------------------------------------------------------ device / dtype
from h1bkv_lite.runtime import device_info, resolve_device, resolve_device_dtype, resolve_dtype  # noqa: E402


def _fake_cuda(monkeypatch, n=2, bf16=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_auto_without_cuda_is_cpu_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device_dtype("auto", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype() == (torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("bf16,want", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_with_cuda_is_cuda_half(monkeypatch, bf16, want):
    _fake_cuda(monkeypatch, bf16=bf16)
    assert resolve_device_dtype("auto", "auto") == (torch.device("cuda", 0), want)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(" CUDA:1 ") == torch.device("cuda", 1)
    assert resolve_device_dtype("cpu", "auto") == (torch.device("cpu"), torch.float32)  # auto follows the device


@pytest.mark.parametrize("name,want", [("float32", torch.float32), ("float16", torch.float16),
                                       ("bfloat16", torch.bfloat16), ("BFloat16", torch.bfloat16),
                                       ("torch.float16", torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_explicit_dtypes(name, want):
    assert resolve_dtype(name, torch.device("cpu")) == want
    assert resolve_device_dtype("cpu", name)[1] == want


@pytest.mark.parametrize("bad", ["gpu", "mps", "meta", "cuda:x", "cuda:", "cuda:-1", "", 0, None, 1.5])
def test_bad_device_names_the_parameter(bad):
    with pytest.raises(ValueError, match=r"DEVICE must be one of 'auto', 'cpu', 'cuda', 'cuda:N'"):
        resolve_device_dtype(bad, "auto")


@pytest.mark.parametrize("bad", ["fp32", "half", "float64", "int8", "", None, torch.float64, torch.int8])
def test_bad_dtype_names_the_parameter(bad):
    with pytest.raises(ValueError, match=r"DTYPE must be one of 'auto', 'float32', 'float16', 'bfloat16'"):
        resolve_device_dtype("cpu", bad)


def test_cuda_asked_without_cuda_or_beyond_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for dev in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="DEVICE=.* CUDA is not available"):
            resolve_device_dtype(dev, "auto")
    _fake_cuda(monkeypatch, n=2)
    with pytest.raises(ValueError, match=r"only 2 CUDA device\(s\)"):
        resolve_device("cuda:2")


def test_bad_device_fails_before_the_dtype_is_read():
    with pytest.raises(ValueError, match="DEVICE"):
        resolve_device_dtype("gpu", "fp32")


def test_device_info_records_device_and_dtype():
    info = device_info(torch.device("cpu"), torch.bfloat16)
    assert info["device"] == "cpu" and info["dtype"] == "bfloat16" and isinstance(info["device_name"], str)


def test_resolve_dtype_without_auto():
    """``allow_auto=False`` (random_model's fixed defaults): names and dtypes as usual, "auto" refused by name."""
    assert resolve_dtype("Torch.BFloat16", allow_auto=False, name="dtype") == torch.bfloat16
    with pytest.raises(ValueError, match=r"^dtype must be one of 'float32', 'float16', 'bfloat16', got 'auto'$"):
        resolve_dtype("auto", allow_auto=False, name="dtype")
    with pytest.raises(ValueError, match=r"DTYPE must be one of 'auto', 'float32', 'float16', 'bfloat16', got 'half'"):
        resolve_dtype("half")


def test_model_device_is_where_the_first_parameter_lives():
    """Inputs go to the device of a model's first parameter (h1bkv_lite._device.model_device, used by every helper
    that runs a model on host token ids); a model without parameters is refused by name, not with StopIteration."""
    from h1bkv_lite._device import model_device

    assert model_device(torch.nn.Linear(2, 3)) == torch.device("cpu")
    assert model_device(torch.nn.Linear(2, 3, device="meta")) == torch.device("meta")
    with pytest.raises(ValueError, match=r"model \(ReLU\) has no parameters"):
        model_device(torch.nn.ReLU())
