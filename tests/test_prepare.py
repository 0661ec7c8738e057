"""``dsmoe.inference.prepare``: the one pipeline (load -> plan -> quantize -> device -> compile) every entry point
calls, so that each gets the same model, plan and kernel choice from the same inputs."""

import pytest
import torch
from helpers import small_config

from dsmoe.config import ConfigError
from dsmoe.inference.prepare import prepare
from dsmoe.inference.quantize import is_quantized
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import Kernels, SparseSetting
from dsmoe.model.transformer import Transformer
from dsmoe.training import checkpoint as ckpt

TOPK = SparseSetting("topk", k=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = small_config()
    torch.manual_seed(0)
    return ckpt.write_checkpoint(
        tmp_path_factory.mktemp("prepare") / "ckpt", Transformer(cfg).state_dict(), cfg
    )


def test_a_checkpoint_is_loaded_with_its_plan_checked_first(checkpoint, monkeypatch):
    prepared = prepare(checkpoint, lambda cfg: SparsePlan.build(cfg, mlp=TOPK))
    assert prepared.plan.setting("mlp", 0) == TOPK and not prepared.model.training and not prepared.compile
    assert prepared.plan.kernels == Kernels("cpu")  # 'auto' resolved once, for the device
    monkeypatch.setattr(ckpt, "load_model_state", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError, match="needs an integer k in 1..8"):
        prepare(checkpoint, lambda cfg: SparsePlan.build(cfg, mlp=SparseSetting("topk", k=9)))


def test_quantizing_implies_the_compiled_decode_and_a_named_kernel_is_kept(checkpoint):
    prepared = prepare(checkpoint, quantize="int8", kernels="reference")
    assert is_quantized(prepared.model) and prepared.compile
    assert prepared.plan.kernels == Kernels("reference") and prepared.plan.is_trained


def test_a_built_model_is_prepared_the_same_way(checkpoint):
    from_file = prepare(checkpoint, SparsePlan.build(small_config(), mlp=TOPK))
    model = Transformer(small_config())
    model.load_state_dict(from_file.model.state_dict())
    built = prepare(model, SparsePlan.build(model.cfg, mlp=TOPK))
    assert built.model is model and built.plan == from_file.plan
    idx = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        a = from_file.model(idx, plan=from_file.plan).logits
        b = built.model(idx, plan=built.plan).logits
    assert torch.equal(a, b)
    assert (
        prepare(Transformer(small_config()), dtype=torch.bfloat16).model.embed.weight.dtype == torch.bfloat16
    )
