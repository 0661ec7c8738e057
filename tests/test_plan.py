"""`dsmoe plan`: the traced memory of a training step against the CPU allocator's measured peak, FSDP2's per-rank
split, the micro-batch search and the command line."""

import json

import pytest
import torch

from dsmoe.cli import main
from dsmoe.model.transformer import Transformer
from dsmoe.training.config import TrainConfig
from dsmoe.training.optim import build_optimizer
from dsmoe.training.plan import fit, trace_step
from dsmoe.training.transforms import checkpoint_activations

MODEL = {"preset": "tiny-ds-moe", "n_layers": 3, "vocab_size": 4096, "max_seq_len": 128}


def config(micro_batch: int, seq_len: int, accumulation: int = 1, **overrides) -> TrainConfig:
    return TrainConfig(
        model=MODEL,
        data="unused",
        seq_len=seq_len,
        micro_batch_size=micro_batch,
        global_batch_tokens=micro_batch * seq_len * accumulation,
        total_tokens=10**9,
        warmup_tokens=0,
        dtype="fp32",
        **overrides,
    )


def measured_cpu_peak(cfg: TrainConfig, checkpointing: bool) -> int:
    """The CPU allocator's peak of live bytes (from the profiler's allocation events) over building the model and
    two optimizer steps of the training loop, in fp32 on one process."""
    from torch.profiler import ProfilerActivity, profile

    accumulation = cfg.accumulation_steps(1)

    def run():
        model = Transformer(cfg.model_config())
        if checkpointing:
            checkpoint_activations(model)
        optimizer = build_optimizer(model, cfg)
        x = torch.randint(0, cfg.model_config().vocab_size, (cfg.micro_batch_size, cfg.seq_len))
        for _ in range(2):
            for _ in range(accumulation):
                out = model(x, x)
                (out.loss / accumulation).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize(
    "checkpointing,accumulation", [(False, 1), (True, 2)], ids=["no-ac", "ac-accumulating"]
)
def test_traced_peak_is_within_15_percent_of_measured_cpu_peak(checkpointing, accumulation):
    cfg = config(micro_batch=4, seq_len=128, accumulation=accumulation)
    traced = trace_step(cfg, 1, 4, checkpointing, bf16=False, foreach=False)
    measured = measured_cpu_peak(cfg, checkpointing)
    assert traced.accumulation == (accumulation > 1)
    assert measured > 30e6  # large enough that the allocator's small blocks do not decide the comparison
    assert abs(traced.peak - measured) <= 0.15 * measured, (traced.peak, measured)
    assert sum(traced.parts.values()) == traced.peak


def test_activation_checkpointing_and_micro_batch_lower_the_activations():
    cfg = config(micro_batch=4, seq_len=128)
    full, ac, half = (trace_step(cfg, 1, b, on, bf16=False) for b, on in ((4, False), (4, True), (2, False)))
    assert ac.parts["activations"] < 0.7 * full.parts["activations"]
    assert half.parts["activations"] < full.parts["activations"]
    assert ac.peak < full.peak and half.peak < full.peak
    assert full.parts["parameters"] == ac.parts["parameters"] == half.parts["parameters"]


def test_fsdp2_shards_parameters_gradients_and_state_per_rank():
    cfg = config(micro_batch=2, seq_len=64)
    one, four = trace_step(cfg, 1, 2, True), trace_step(cfg, 4, 2, True)
    params = sum(p.numel() for p in Transformer(cfg.model_config()).parameters()) * 4  # fp32 bytes
    assert one.parts["parameters"] >= params and one.parts["gathered"] == 0
    assert four.parts["parameters"] == pytest.approx(params / 4, rel=0.05)  # FSDP2 pads each shard a little
    assert four.parts["gathered"] > 0  # the all-gathered bf16 block being computed
    # AdamW's exp_avg and exp_avg_sq of the shards, plus the foreach step's temporaries of one more copy
    assert four.parts["optimizer"] <= 3.1 * four.parts["parameters"]
    assert four.peak < one.peak


def test_unsharded_gradients_of_accumulation_count_as_gradients():
    single = trace_step(config(micro_batch=2, seq_len=64, accumulation=1), 4, 1, True)
    accumulating = trace_step(config(micro_batch=2, seq_len=64, accumulation=4), 4, 1, True)
    assert accumulating.accumulation and not single.accumulation
    params = sum(p.numel() for p in Transformer(config(2, 64).model_config()).parameters()) * 4
    assert accumulating.parts["gradients"] > 0.5 * params > single.parts["gradients"]


def test_fit_returns_the_largest_micro_batch_that_the_trace_confirms():
    cfg = config(micro_batch=8, seq_len=64)  # valid micro-batches on one rank: 1, 2, 4, 8
    at4, at8 = trace_step(cfg, 1, 4, False), trace_step(cfg, 1, 8, False)
    result = fit(cfg, 1, budget=(at4.peak + at8.peak) // 2, checkpointing=False)
    assert result.largest_micro_batch == 4 and result.peak_at_largest == at4.peak
    assert fit(cfg, 1, budget=1000, checkpointing=False).largest_micro_batch == 0


def test_plan_command_prints_json_and_a_table(capsys):
    args = ["plan", "--preset", "tiny-ds-moe", "model.n_layers=1", "seq_len=64", "global_batch_tokens=512"]
    assert main([*args, "--gpus", "2", "--gpu-memory-gb", "1", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    off, on = plan["settings"]
    assert plan["world_size"] == 2 and plan["seq_len"] == 64 and plan["dtype"] == "bf16"
    assert off["largest_micro_batch"] == on["largest_micro_batch"] == 4  # the whole per-rank batch fits
    assert not off["checkpointing"] and on["checkpointing"]
    assert main([*args, "--gpus", "2", "--gpu-memory-gb", "1"]) == 0
    table = capsys.readouterr().out
    assert "largest micro-batch that fits" in table and "Not counted" in table


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--preset", "tiny-ds-moe", "--gpus", "0"], "--gpus must be >= 1"),
        (["--preset", "ds-moe-7b", "--gpus", "8"], "unknown preset"),
        (["--preset", "tiny-ds-moe", "--gpus", "2", "--headroom", "1.5"], "headroom"),
        (["--preset", "tiny-ds-moe", "--gpus", "8", "global_batch_tokens=256"], "raise global_batch_tokens"),
    ],
)
def test_plan_bad_input_is_one_line(capsys, extra, message):
    assert main(["plan", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
