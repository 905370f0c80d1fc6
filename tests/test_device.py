"""`--device`: auto, cpu, cuda, cuda:N, mps; a device the machine lacks is refused in one line naming what it has.

The machine's GPUs are simulated by monkeypatching torch's availability checks (the tests run on a CPU).
"""
from __future__ import annotations

import re

import pytest
import torch

from medcycle.cli import main
from medcycle.device import available_devices, resolve_device
from medcycle.errors import UsageError


@pytest.fixture
def machine(monkeypatch):
    """machine(gpus, mps): pretend this machine has `gpus` CUDA devices and (or not) Apple's MPS."""

    def set_up(gpus: int = 0, mps: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return set_up


@pytest.mark.parametrize("gpus, mps, expected", [(2, True, "cuda"), (0, True, "mps"), (0, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(machine, gpus, mps, expected):
    machine(gpus, mps)
    for name in (None, "", "auto", "AUTO"):
        assert resolve_device(name) == torch.device(expected)


def test_named_devices_the_machine_has(machine):
    machine(gpus=2, mps=True)
    assert available_devices() == ["cpu", "cuda:0", "cuda:1", "mps"]
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(" Cuda:0 ") == torch.device("cuda", 0)
    assert resolve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert resolve_device("mps") == torch.device("mps")


@pytest.mark.parametrize("gpus, mps, name, available", [
    (1, False, "cuda:3", "cpu, cuda:0"),
    (1, False, "cuda:1", "cpu, cuda:0"),
    (0, False, "cuda", "cpu"),
    (0, False, "cuda:0", "cpu"),
    (0, False, "mps", "cpu"),  # e.g. Linux
    (2, False, "mps", "cpu, cuda:0, cuda:1"),
    (0, True, "cuda", "cpu, mps"),
])
def test_a_device_the_machine_lacks_is_refused_naming_what_it_has(machine, gpus, mps, name, available):
    machine(gpus, mps)
    with pytest.raises(UsageError) as info:
        resolve_device(name)
    assert str(info.value) == f"--device {name}: not available on this machine (available: {available})"
    assert info.value.exit_code == 2


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:-1", "cpu:0", "mps:1", "cuda:0:1", "tpu"])
def test_what_is_not_a_device_name_is_refused(machine, name):
    machine(gpus=1)
    with pytest.raises(UsageError, match=rf"^--device {re.escape(name)}: not a device name; use auto \(default"):
        resolve_device(name)


def test_training_takes_the_named_gpu_and_torchrun_takes_its_local_rank(machine, monkeypatch):
    from medcycle.engine import distributed

    machine(gpus=2)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: chosen[-1] if chosen else 0)
    assert distributed.setup("cuda:1").device == torch.device("cuda", 1)
    assert distributed.setup("cpu").device == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UsageError, match="under torchrun each process takes the GPU of its LOCAL_RANK"):
        distributed.setup("cuda:0")
    with pytest.raises(UsageError, match=r"--device cuda:3: not available on this machine \(available: cpu, cuda:0, cuda:1\)"):
        distributed.setup("cuda:3")


@pytest.mark.parametrize("command", [
    ["train", "--data", "cache", "--out", "run"],
    ["convert", "-i", "mr.nii.gz", "-o", "sct.nii.gz", "-m", "run"],
    ["demo", "--out", "demo"],
])
def test_the_command_line_refuses_an_unavailable_device_first_in_one_line(tmp_path, monkeypatch, capsys, command):
    # this machine has no GPU (the tests run on a CPU) and, being Linux, no MPS
    assert not torch.cuda.is_available() and not torch.backends.mps.is_available()
    monkeypatch.chdir(tmp_path)
    for name in ("cuda:3", "mps"):
        assert main([*command, "--device", name]) == 2
        out, err = capsys.readouterr()
        assert err.splitlines() == [
            f"medcycle {command[0]}: error: --device {name}: not available on this machine (available: cpu)"]
        assert out == "" and list(tmp_path.iterdir()) == []  # refused before anything else: no input was needed
