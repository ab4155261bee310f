"""When the engine turns on Inductor's programmatic dependent launch: CUDA GPUs of compute capability 9+, unless
the user set TORCHINDUCTOR_ENABLE_PDL.
"""

import pytest
import torch


@pytest.fixture
def inductor_config(monkeypatch):
    from torch._inductor import config

    monkeypatch.delenv("TORCHINDUCTOR_ENABLE_PDL", raising=False)
    monkeypatch.setattr(config.triton, "enable_pdl", False)
    return config


def test_cpu_engine_leaves_inductor_alone(inductor_config):
    from thresher.engine.sparse_models import enable_inductor_pdl

    assert not enable_inductor_pdl(torch.device("cpu"))
    assert inductor_config.triton.enable_pdl is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_hopper_engine_turns_it_on_unless_the_user_chose(inductor_config, monkeypatch):
    from thresher.engine.sparse_models import enable_inductor_pdl

    device = torch.device("cuda")
    hopper = torch.cuda.get_device_capability(device)[0] >= 9
    assert enable_inductor_pdl(device) is hopper
    assert inductor_config.triton.enable_pdl is hopper
    inductor_config.triton.enable_pdl = False
    monkeypatch.setenv("TORCHINDUCTOR_ENABLE_PDL", "0")
    assert not enable_inductor_pdl(device)
    assert inductor_config.triton.enable_pdl is False
