"""KV-cache decoding, sampling and the active-parameter meter."""

import json

import pytest
import torch
from helpers import small_config

from dsmoe.cli import main
from dsmoe.config import ConfigError
from dsmoe.inference.generate import generate, sample_next, stream
from dsmoe.inference.meter import ActiveMeter
from dsmoe.model.plan import SparsePlan
from dsmoe.model.settings import SparseSetting
from dsmoe.model.transformer import Transformer

SETTINGS = {
    "dense": (None, None),
    "topk": (SparseSetting("topk", k=2), SparseSetting("topk", k=3)),
    "threshold": (SparseSetting("threshold", threshold=1.0), SparseSetting("threshold", threshold=1.2)),
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
@pytest.mark.parametrize("regime", ["dsmoe", "smoe", "dense"])
def test_kv_cache_decoding_equals_full_recomputation(name, regime):
    model = Transformer(small_config(regime)).eval()
    plan = SparsePlan.build(model.cfg, *SETTINGS[name])
    idx = torch.randint(0, 97, (2, 12))
    cache = model.new_cache(2, 12)
    with torch.no_grad():
        cached = [model(idx[:, :5], plan=plan, cache=cache).logits[:, -1]]
        cached += [
            model(idx[:, p : p + 1], plan=plan, cache=cache, start_pos=p).logits[:, -1] for p in range(5, 12)
        ]
        for p, logits in zip(range(4, 12), cached, strict=True):
            full = model(idx[:, : p + 1], plan=plan).logits[:, -1]
            torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_into_cache_equals_full_recomputation():
    model = Transformer(small_config()).eval()
    plan = SparsePlan.build(model.cfg, mlp=SparseSetting("threshold", threshold=1.0))
    idx = torch.randint(0, 97, (1, 10))
    cache = model.new_cache(1, 10)
    with torch.no_grad():
        model(idx[:, :4], plan=plan, cache=cache)
        chunk = model(idx[:, 4:10], plan=plan, cache=cache, start_pos=4).logits
        torch.testing.assert_close(chunk, model(idx, plan=plan).logits[:, 4:], rtol=1e-5, atol=1e-5)


def test_threshold_topk_decoding_at_batch_one_is_threshold():
    """threshold_topk takes K from the batch's mean count; one decoded token's K is its own threshold count."""
    model = Transformer(small_config()).eval()
    idx = torch.randint(0, 97, (1, 6))
    outs = []
    for strategy in ("threshold", "threshold_topk"):
        s = SparseSetting(strategy, threshold=1.1)
        outs.append(generate(model, idx, 8, plan=SparsePlan.build(model.cfg, s, s)))
    assert torch.equal(outs[0], outs[1])


def test_generate_greedy_matches_argmax_of_full_forward():
    model = Transformer(small_config()).eval()
    plan = SparsePlan.build(model.cfg, mlp=SparseSetting("topk", k=2))
    prompt = torch.randint(0, 97, (2, 4))
    out = generate(model, prompt, 6, plan=plan)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], prompt)
    with torch.no_grad():
        for p in range(4, 10):
            assert torch.equal(model(out[:, :p], plan=plan).logits[:, -1].argmax(-1), out[:, p])


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_left_padded_prompts_generate_as_they_would_alone(name):
    model = Transformer(small_config()).eval()
    plan = SparsePlan.build(model.cfg, *SETTINGS[name])
    prompts = [torch.randint(1, 97, (n,)) for n in (6, 2, 4)]
    batch, mask = torch.zeros(3, 6, dtype=torch.long), torch.zeros(3, 6, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        batch[row, 6 - len(prompt) :], mask[row, 6 - len(prompt) :] = prompt, True
    together = generate(model, batch, 5, prompt_mask_BT=mask, plan=plan)
    for row, prompt in enumerate(prompts):
        alone = generate(model, prompt[None], 5, plan=plan)[0, len(prompt) :]
        assert torch.equal(together[row, 6:], alone)


def test_sampling_is_reproducible_and_top_p_restricts_the_nucleus():
    model = Transformer(small_config()).eval()
    prompt = torch.randint(0, 97, (1, 4))
    run = lambda: generate(
        model, prompt, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(run(), run())
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]])
    picks = {sample_next(logits, 1.0, 0.5, torch.Generator().manual_seed(s)).item() for s in range(50)}
    assert picks == {0}  # token 0 alone holds 73% of the mass
    picks = {sample_next(logits, 1.0, 0.99, torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert picks >= {0, 1}


def test_generation_stops_at_eos():
    model = Transformer(small_config()).eval()
    prompt = torch.randint(0, 97, (1, 3))
    first = generate(model, prompt, 1)[0, -1].item()
    out = generate(model, prompt, 10, eos_token_id=first)
    assert out.shape == (1, 4)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stream_yields_what_generate_returns(temperature):
    model = Transformer(small_config()).eval()
    prompt = torch.randint(0, 97, (1, 5))
    sample = dict(temperature=temperature, top_p=0.9)
    whole = generate(model, prompt, 7, **sample, generator=torch.Generator().manual_seed(1))[0, 5:]
    assert (
        list(stream(model, prompt[0], 7, **sample, generator=torch.Generator().manual_seed(1)))
        == whole.tolist()
    )
    first = whole[0].item()
    assert list(
        stream(model, prompt[0], 7, eos_token_id=first, **sample, generator=torch.Generator().manual_seed(1))
    ) == [first]


def test_active_meter_counts_experts_per_token():
    cfg = small_config()
    model = Transformer(cfg).eval()
    meter = ActiveMeter(cfg)
    plan = SparsePlan.build(cfg, mlp=SparseSetting("topk", k=2))
    with torch.no_grad():
        meter.update(model(torch.randint(0, 97, (2, 8)), plan=plan).routers)
    assert meter.mean_active("mlp") == [2.0, 2.0] and meter.mean_active("att") == [4.0, 4.0]
    assert meter.active_params == cfg.active_params(4, 2)
    meter.reset()
    threshold = SparseSetting("threshold", threshold=1.0)
    with torch.no_grad():
        meter.update(
            model(torch.randint(0, 97, (2, 8)), plan=SparsePlan.build(cfg, threshold, threshold)).routers
        )
    summary = meter.summary()
    for kind in ("att", "mlp"):
        for layer in summary["layers"][kind]:
            assert 0 < layer["min"] <= layer["mean"] <= layer["max"] <= 1
    assert 0 < summary["active_hidden"] < 1


def test_a_plan_refuses_impossible_settings():
    cfg = small_config()
    with pytest.raises(ConfigError, match="mlp: strategy .topk. needs an integer k in 1..8 .*got k=9"):
        SparsePlan.build(cfg, mlp=SparseSetting("topk", k=9))
    with pytest.raises(ConfigError, match="one value for all layers or one per layer"):
        SparsePlan.build(cfg, mlp=[SparseSetting("topk", k=2)] * 3)
    with pytest.raises(ConfigError, match="needs threshold > 0"):
        SparseSetting("threshold", threshold=0.0)
    with pytest.raises(ConfigError, match="unknown sparse strategy"):
        SparseSetting("top_k", k=2)


def test_per_layer_settings():
    cfg = small_config()
    model = Transformer(cfg).eval()
    meter = ActiveMeter(cfg)
    plan = SparsePlan.build(cfg, mlp=[SparseSetting("topk", k=1), SparseSetting("topk", k=5)])
    with torch.no_grad():
        meter.update(model(torch.randint(0, 97, (1, 5)), plan=plan).routers)
    assert meter.mean_active("mlp") == [1.0, 5.0]


def test_cli_info_json(capsys):
    assert main(["info", "--preset", "ds-moe-6b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert isinstance(info["total_params"], int) and isinstance(info["non_embedding_params"], int)
    assert info["active_hidden"] == 1.0
    assert main(["info", "--preset", "ds-moe-6b", "--strategy", "topk", "--k", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["active_params"] < info["non_embedding_params"] / 2


def test_cli_reports_bad_settings(capsys):
    assert main(["info", "--preset", "ds-moe-1b", "--strategy", "topk", "--k", "40"]) == 2
    assert (
        "needs an integer k in 1..32 (the layer's 32 experts), got k=40; pass --k N"
        in capsys.readouterr().err
    )


def test_command_line_values_are_validated_as_settings_files_are(capsys):
    argv = ["info", "--preset", "ds-moe-1b", "--strategy", "threshold"]
    assert main([*argv, "--threshold", "99"]) == 2  # above the 32 experts: only the top one would ever run
    assert "needs a threshold in (0, 32]" in capsys.readouterr().err
    assert main([*argv, "--threshold", "1.0", "--k", "2"]) == 2
    assert "k is read by strategy 'topk' only" in capsys.readouterr().err
