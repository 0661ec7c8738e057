"""`dsmoe bench`: the models are Table 6's, the JSON carries every figure and ratios from the same run."""

import json
from pathlib import Path

import pytest
import torch

from dsmoe.bench.commands import format_table
from dsmoe.bench.models import bench_models
from dsmoe.bench.throughput import BenchSettings, run_benchmark
from dsmoe.cli import main
from dsmoe.config import ConfigError, preset
from dsmoe.kernels import onednn


def skip_unless_peers_build():
    transformers = pytest.importorskip("transformers")
    from dsmoe.bench.peers import olmoe_config_builds

    if not olmoe_config_builds(transformers):
        pytest.skip(
            f"transformers {transformers.__version__}'s OlmoeConfig rejects its own defaults: no OLMoE peer"
        )


TINY = dict(
    size="toy",
    d_model=64,
    n_layers=1,
    vocab_size=64,
    input_len=8,
    max_input_batch=2,
    decode_tokens=3,
    decode_prompt=2,
    decode_batches=(1, 16),
    latency_batch=2,
    latency_prompt=4,
    latency_new=2,
    mlp_tokens=16,
    repeats=1,
    bandwidth_mb=1,
)


@pytest.mark.parametrize("size", ["10b", "14b", "19b"])
def test_bench_models_at_paper_scale_are_table_6(size):
    """At the paper's width and depth the benchmark's three models are the Table 6 presets."""
    d_model = {"10b": 5120, "14b": 6144, "19b": 7168}[size]
    smoe = {"10b": "smoe-17b", "14b": "smoe-25b", "19b": "smoe-34b"}[size]
    models = {m.name: m for m in bench_models(d_model, 36, 51200, 2048)}
    for name, preset_name in (("dense", f"dense-{size}"), ("smoe", smoe), ("ds-moe", f"ds-moe-{size}")):
        expected = preset(preset_name)
        assert models[name].cfg.non_embedding_params == expected.non_embedding_params, name
    assert models["ds-moe"].mlp.k == 4 and models["smoe"].cfg.smoe_top_k == 2


def test_run_benchmark_reports_every_figure_and_ratios_to_dense():
    result = run_benchmark(BenchSettings(**TINY))
    assert set(result["models"]) == {"dense", "smoe", "ds-moe"}
    for name, figures in result["models"].items():
        for key in (
            "input_tps",
            "output_tps_b1",
            "output_tps_b16",
            "latency_s",
            "active_params",
            "total_params",
        ):
            assert figures[key] > 0, (name, key)
            assert result["ratios"][name][key] == pytest.approx(figures[key] / result["models"]["dense"][key])
    dense, dsmoe = result["models"]["dense"], result["models"]["ds-moe"]
    assert dense["active_params"] == dense["total_params"]
    assert dsmoe["active_params"] < 0.5 * dsmoe["total_params"]  # 4 of 32 MLP experts
    assert result["models"]["smoe"]["total_params"] > 1.5 * dense["total_params"]  # twice the MLP
    assert set(result["mlp_flops"]) == {
        "dense/dense",
        "smoe/sparse-fast",
        "smoe/sparse-reference",
        "ds-moe/sparse-fast",
        "ds-moe/sparse-reference",
    }
    assert result["mlp_flops"]["ds-moe/sparse-fast"]["gflop"] == pytest.approx(
        result["mlp_flops"]["dense/dense"]["gflop"] * 4 / 32
    )


@pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)  # inductor's own use
def test_run_benchmark_compiled_decode_rows_and_bandwidth_share():
    """--decode both: each of our models also decodes through the compiled step, as a '+compiled' row with the same
    active parameters; batch-1 decode's weight reads are (active params + LM head) x bytes x tokens/s, divided by
    the read bandwidth measured in the same run."""
    result = run_benchmark(BenchSettings(**TINY, models=["dense", "ds-moe"], decode="both"))
    rows = result["models"]
    assert set(rows) == {"dense", "dense+compiled", "ds-moe", "ds-moe+compiled"}
    assert rows["ds-moe+compiled"]["active_params"] == rows["ds-moe"]["active_params"]
    read = result["memory_bandwidth"]["read_gb_per_s"]
    assert read > 0 and result["memory_bandwidth"]["copy_gb_per_s"] > 0
    assert result["memory_bandwidth"]["matvec_gb_per_s"] > 0
    for r in rows.values():
        per_token = (r["active_params"] + 64 * 64) * 4  # fp32; LM head of vocabulary x width
        assert r["decode_b1_weight_bytes_per_token"] == per_token
        assert r["decode_b1_bandwidth_share"] == pytest.approx(per_token * r["output_tps_b1"] / 1e9 / read)
    assert "share of read bandwidth" in format_table(result)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.usefixtures("int8_on_this_cpu")
def test_run_benchmark_int8_rows_beside_fp32():
    """--quantize int8: each of our models also runs with int8 weights (a '+int8' row, and '+int8+compiled'), the
    same active parameters, its weight reads counted at one byte per weight."""
    result = run_benchmark(BenchSettings(**TINY, models=["dense", "ds-moe"], decode="both", quantize="int8"))
    rows = result["models"]
    assert set(rows) == {
        f"{m}{q}{c}" for m in ("dense", "ds-moe") for q in ("", "+int8") for c in ("", "+compiled")
    }
    assert rows["ds-moe+int8+compiled"]["active_params"] == rows["ds-moe"]["active_params"]
    for name, r in rows.items():
        size = 1 if "+int8" in name else 4
        assert r["decode_b1_weight_bytes_per_token"] == (r["active_params"] + 64 * 64) * size
    assert result["settings"]["quantize"] == "int8"
    with pytest.raises(ConfigError, match="--quantize"):
        BenchSettings(quantize="int4").check()


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.usefixtures("int8_on_this_cpu")
def test_int8_rows_leave_the_peers_weight_reads_at_full_precision():
    skip_unless_peers_build()
    settings = BenchSettings(**TINY, shape="llama", peers=True, decode="eager", quantize="int8")
    rows = run_benchmark(settings)["models"]
    assert {"hf-llama", "hf-olmoe", "dense+int8"} <= set(rows)
    for name, r in rows.items():
        size = 1 if "+int8" in name else 4
        assert r["decode_b1_weight_bytes_per_token"] == (r["active_params"] + 64 * 64) * size, name


def test_bench_rejects_an_unknown_decode_mode():
    with pytest.raises(ConfigError, match="decode mode"):
        BenchSettings(decode="jit").check()


@pytest.mark.parametrize("peers", [False, True])
def test_bench_cli_writes_json(tmp_path, capsys, peers):
    if peers:
        skip_unless_peers_build()
    out = tmp_path / "b" / "result.json"
    args = [
        "bench",
        "--json",
        "--out",
        str(out),
        "--d-model",
        "64",
        "--n-layers",
        "1",
        "--vocab-size",
        "64",
        "--input-len",
        "8",
        "--max-input-batch",
        "1",
        "--decode-tokens",
        "2",
        "--decode-batches",
        "1",
        "2",
        "--latency-batch",
        "1",
        "--latency-prompt",
        "4",
        "--latency-new",
        "1",
        "--mlp-tokens",
        "8",
        "--repeats",
        "1",
    ] + (["--shape", "llama", "--peers"] if peers else [])
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    assert "output_tps_b2" in printed["models"]["ds-moe"]
    assert printed["settings"]["peers"] is peers and ("hf-olmoe" in printed["models"]) is peers
    assert printed["shapes"]["dense"]["activation"] == ("swiglu" if peers else "gelu")
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left behind


@pytest.mark.parametrize(
    "bad,message",
    [
        (dict(dtype="fp8"), "unknown dtype"),
        (dict(d_model=100), "multiple of 64"),
        (dict(mlp_k=33), "--mlp-k"),
        (dict(repeats=0), "repeats"),
        (dict(memory_gb=1e-6), "--memory-gb"),
    ],
)
def test_bench_rejects_bad_settings(bad, message):
    with pytest.raises(ConfigError, match=message):
        run_benchmark(BenchSettings(**{**TINY, **bad}))


def test_bench_cli_error_exit_code(capsys):
    assert main(["bench", "--d-model", "100"]) == 2
    assert "multiple of 64" in capsys.readouterr().err


def test_llama_shape_is_the_reference_shape_of_the_peers():
    """Issue #17's reference: width 1024, 4 layers, SwiGLU FFN 2,816, 16 query heads of 64, 4 K/V heads, untied
    embeddings; DS-MoE with 32 experts of 88 units, top-4, dense attention."""
    models = {m.name: m for m in bench_models(1024, 4, 4096, 528, shape="llama")}
    for m in models.values():
        cfg = m.cfg
        assert (cfg.activation, cfg.norm, cfg.tie_embeddings) == ("swiglu", "rmsnorm", False)
        assert (cfg.n_query_heads, cfg.head_dim, cfg.n_kv_heads) == (16, 64, 4)
    assert models["dense"].cfg.d_expert == 2816
    dsmoe = models["ds-moe"]
    assert (dsmoe.cfg.n_mlp_experts, dsmoe.cfg.d_expert, dsmoe.mlp.k, dsmoe.att) == (32, 88, 4, None)
    assert not dsmoe.mlp.normalize  # unnormalised top-k scores, which hf-olmoe's norm_topk_prob must match
    assert (models["smoe"].cfg.n_mlp_experts, models["smoe"].cfg.d_expert) == (16, 352)


def test_peers_need_the_llama_shape(capsys):
    with pytest.raises(ConfigError, match="--shape llama"):
        run_benchmark(BenchSettings(**TINY, peers=True))
    assert main(["bench", "--peers"]) == 2
    assert "--shape llama" in capsys.readouterr().err


def test_run_benchmark_measures_the_peers_beside_ours():
    skip_unless_peers_build()
    from dsmoe.bench.commands import format_table

    result = run_benchmark(BenchSettings(**TINY, shape="llama", peers=True))
    figures = result["models"]
    assert list(figures) == ["dense", "smoe", "ds-moe", "hf-llama", "hf-olmoe"]
    metrics = ("input_tps", "output_tps_b1", "output_tps_b16", "latency_s", "active_params", "total_params")
    for name in figures:
        for key in metrics:
            assert figures[name][key] > 0, (name, key)
            assert result["ratios"][name][key] == pytest.approx(figures[name][key] / figures["dense"][key])
    assert {ours: r["peer"] for ours, r in result["peer_ratios"].items()} == {
        "dense": "hf-llama",
        "ds-moe": "hf-olmoe",
    }
    for ours, r in result["peer_ratios"].items():
        for key in metrics:
            assert r[key] == pytest.approx(figures[ours][key] / figures[r["peer"]][key]), (ours, key)
    llama, olmoe = result["peers"]["hf-llama"], result["peers"]["hf-olmoe"]
    assert llama["attn_implementation"] == olmoe["attn_implementation"] == "sdpa"
    # same non-embedding parameters: Llama exactly; OLMoE apart from its QK-norms and our attention routers
    assert llama["param_check"]["peer"] == llama["param_check"]["dsmoe"] == figures["dense"]["total_params"]
    assert not llama["param_check"]["only_in_peer"] and not llama["param_check"]["only_in_dsmoe"]
    check, cfg = olmoe["param_check"], result["shapes"]["ds-moe"]
    qk_norms = cfg["n_layers"] * (cfg["d_model"] + cfg["n_kv_heads"] * cfg["head_dim"])
    routers = cfg["n_layers"] * cfg["n_att_experts"] * cfg["d_model"]
    assert check["only_in_peer"] == {"q/k norms (QK-norm)": qk_norms}
    assert check["only_in_dsmoe"] == {"attention routers": routers}
    assert check["peer"] - qk_norms == check["dsmoe"] - routers == check["shared"]
    assert olmoe["config"]["num_experts"] == 32 and olmoe["config"]["num_experts_per_tok"] == 4
    assert (
        olmoe["config"]["norm_topk_prob"] is False and olmoe["config"]["intermediate_size"] == cfg["d_expert"]
    )
    # top-4 of 32 experts on both sides (our router count is on the shared side of both)
    assert figures["hf-olmoe"]["active_params"] == figures["ds-moe"]["active_params"] + qk_norms - routers
    assert figures["hf-llama"]["embedding_params"] == figures["dense"]["embedding_params"]
    table = format_table(result)
    assert (
        "| ratio to peer |" in table and "| dense / hf-llama |" in table and "| ds-moe / hf-olmoe |" in table
    )
    assert "| hf-olmoe |" in table and "hf-olmoe (OlmoeForCausalLM, attention sdpa" in table


def test_hf_llama_peer_is_our_dense_model():
    """The bench's hf-llama converts (dsmoe convert's exact mapping) into the bench's own Dense model, and the two
    give the same logits: the Dense-vs-Llama comparison times one network in two implementations."""
    pytest.importorskip("transformers")
    import torch
    from transformers import LlamaForCausalLM

    from dsmoe.bench.peers import peer_config
    from dsmoe.convert.from_hf import convert_model

    dense = next(m for m in bench_models(64, 2, 64, 32, shape="llama") if m.name == "dense")
    torch.manual_seed(0)
    name, config, _ = peer_config(dense)
    peer = LlamaForCausalLM(config).eval()
    ours = convert_model(peer)
    fixed = ("max_seq_len", "init_std")  # context length and initialisation: not part of the network
    assert {k: v for k, v in ours.cfg.to_dict().items() if k not in fixed} == {
        k: v for k, v in dense.cfg.to_dict().items() if k not in fixed
    }
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        ref = peer(idx).logits
        assert (ours(idx).logits - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())


def test_peer_param_check_rejects_another_shape():
    skip_unless_peers_build()
    from dataclasses import replace

    from dsmoe.bench.peers import PeerMismatch, build_peers
    from dsmoe.model.transformer import Transformer

    entries = [m for m in bench_models(64, 1, 64, 32, shape="llama") if m.name != "smoe"]
    models = {e.name: Transformer(e.cfg) for e in entries}
    peers = build_peers(entries, models, "cpu", next(iter(models.values())).embed.weight.dtype)
    assert [p.name for p in peers] == ["hf-llama", "hf-olmoe"]
    # the peer built at another FFN width than our model's
    wider = replace(entries[0], cfg=entries[0].cfg.replace(d_expert=512))
    with pytest.raises(PeerMismatch, match="hf-llama is not at the shape of our 'dense'"):
        build_peers([wider], {"dense": models["dense"]}, "cpu", models["dense"].embed.weight.dtype)


@pytest.mark.parametrize("size", ["1b", "3b", "6b", "10b", "14b", "19b"])
@pytest.mark.parametrize("shape", ["table6", "llama"])
def test_named_sizes_are_the_papers_models_per_layer(size, shape):
    """--size NAME builds the paper's Dense / SMoE / DS-MoE of that size, layer for layer; the llama layout keeps
    every width and head and swaps in SwiGLU and RMSNorm."""
    from dsmoe.bench.settings import PAPER_SIZES

    models = {m.name: m for m in bench_models(0, 2, 4096, 64, shape=shape, size=size)}
    for name, preset_name in zip(("dense", "smoe", "ds-moe"), PAPER_SIZES[size], strict=True):
        cfg = models[name].cfg
        paper = preset(preset_name) if preset_name else None
        if paper is not None:
            assert (cfg.d_model, cfg.n_query_heads, cfg.head_dim, cfg.n_kv_heads) == (
                paper.d_model,
                paper.n_query_heads,
                paper.head_dim,
                paper.n_kv_heads,
            )
            assert (cfg.n_att_experts, cfg.n_mlp_experts, cfg.d_expert) == (
                paper.n_att_experts,
                paper.n_mlp_experts,
                paper.d_expert,
            )
            if shape == "table6":
                per_layer = paper.non_embedding_params / paper.n_layers
                assert cfg.non_embedding_params == pytest.approx(2 * per_layer, rel=1e-3), name
        assert (cfg.n_layers, cfg.vocab_size) == (2, 4096)
        expected = ("swiglu", "rmsnorm") if shape == "llama" else ("gelu", "layernorm")
        assert (cfg.activation, cfg.norm) == expected
    smoe, dense = models["smoe"].cfg, models["dense"].cfg
    if size == "6b":  # no 6B SMoE in the paper: Table 6's rule, twice the dense MLP in 16 experts
        assert (smoe.n_mlp_experts, smoe.n_mlp_experts * smoe.d_expert) == (16, 2 * dense.d_expert)
    assert models["ds-moe"].mlp.k == 4 and smoe.smoe_top_k == 2


def test_a_named_size_runs_the_whole_benchmark_with_sparse_attention():
    """DS-MoE-1B's 16 attention experts of 2 heads: --att-k 8 of 16 adds a row with sparse attention."""
    settings = {k: v for k, v in TINY.items() if k not in ("d_model", "size")}
    result = run_benchmark(BenchSettings(**settings, size="1b", att_k=8, models=["dense", "ds-moe"]))
    assert result["settings"]["d_model"] == 2048
    assert result["shapes"]["ds-moe"]["n_att_experts"] == 16
    # MLP-only sparsity as in the paper's speed test, and beside it the same model with attention top-8 of 16
    assert result["sparse_settings"]["ds-moe"]["att"] == "trained"
    assert result["sparse_settings"]["ds-moe+att"]["att"].startswith("topk")
    ratios = result["ratios"]
    assert ratios["ds-moe+att"]["active_params"] < ratios["ds-moe"]["active_params"] < 0.5
    assert "ds-moe+att/sparse-fast" not in result["mlp_flops"]  # the same MLP as ds-moe's


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "1b", "--d-model", "1024"], "a named size has its own width"),
        (["--size", "1b", "--att-k", "17"], "16 attention experts"),
    ],
)
def test_named_size_errors(capsys, args, message):
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


def test_the_default_size_is_ds_moe_1b_and_a_width_means_the_toy():
    assert (BenchSettings().size, BenchSettings().width) == ("1b", 2048)
    assert BenchSettings().decode_batches == (1, 16, 64)
    assert (BenchSettings(d_model=512).size, BenchSettings(d_model=512).width) == ("toy", 512)


def test_run_benchmark_mkl_rows_beside_onednn(monkeypatch):
    """--mkl: each of our models again on torch's own products ('+mkl' rows), same parameters, fp32 weight reads;
    the models of the other rows are swapped to oneDNN's products, the '+mkl' ones are not."""
    from dsmoe.bench import throughput
    from dsmoe.inference.onednn_products import uses_onednn

    swapped = {}
    original = throughput.prepare

    def recording_prepare(*args, **kwargs):
        prepared = original(*args, **kwargs)
        swapped.setdefault(kwargs.get("onednn", True), []).append(uses_onednn(prepared.model))
        return prepared

    monkeypatch.setattr(throughput, "prepare", recording_prepare)
    result = run_benchmark(BenchSettings(**TINY, models=["dense", "ds-moe"], mkl=True))
    rows = result["models"]
    assert set(rows) == {"dense", "ds-moe", "dense+mkl", "ds-moe+mkl"}
    for name in ("dense", "ds-moe"):
        assert rows[f"{name}+mkl"]["total_params"] == rows[name]["total_params"]
        assert (
            rows[f"{name}+mkl"]["decode_b1_weight_bytes_per_token"]
            == rows[name]["decode_b1_weight_bytes_per_token"]
        )
    assert swapped == {True: [True, True], False: [False, False]}
    assert result["settings"]["mkl"] is True


@pytest.mark.skipif(not onednn.PACKING, reason="this torch build has no oneDNN weight packing")
def test_run_benchmark_prepack_rows_beside_the_plain_weights(monkeypatch):
    """--prepack: each of our models again with oneDNN's packed weights ('+prepack' rows), the same parameters."""
    from dsmoe.bench import throughput

    packed = []
    original = throughput.prepare

    def recording_prepare(*args, **kwargs):
        prepared = original(*args, **kwargs)
        packed.append(prepared.prepacked)
        return prepared

    monkeypatch.setattr(onednn, "ONEDNN_MIN_WEIGHTS", 0)  # the tiny shapes' weights are below oneDNN's floor
    monkeypatch.setattr(throughput, "prepare", recording_prepare)
    result = run_benchmark(BenchSettings(**TINY, models=["dense", "ds-moe"], prepack=True))
    rows = result["models"]
    assert set(rows) == {"dense", "ds-moe", "dense+prepack", "ds-moe+prepack"}
    for name in ("dense", "ds-moe"):
        assert rows[f"{name}+prepack"]["total_params"] == rows[name]["total_params"]
    assert packed == [False, False, True, True]
    assert result["settings"]["prepack"] is True


def test_the_machine_record_names_the_cpu_and_its_vector_features():
    """Every benchmark JSON names the CPU beside its figures: lscpu's model name, the vector features that decide
    which kernels are fast, and torch's CPU capability."""
    from dsmoe.bench.throughput import CPU_FEATURES, cpu_name, machine

    info = machine("cpu")
    assert info["cpu"] == cpu_name() and info["cpu"].strip()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    for feature in CPU_FEATURES:
        assert (feature in info["cpu"]) == (feature in flags)
