"""Pipeline parallelism (DeepSpeed's PipelineModule / 1F1B engine) with all heads on the last stage.

* Placement (no processes): the embedding on the first stage, the output group (heads, shared norm,
  unembedding, tied embedding copy) whole on the last, for every partition method; DeepSpeed's topology has
  our tp -> dp -> pp rank order; impossible layouts are one-sentence errors.
* Activation checkpointing at module level (one process): the same loss and gradients (within 1e-6), fewer
  saved activation bytes (``saved_tensors_hooks``), for the pipeline stage and the PP = 1 model.
* Training through ``loop.train`` (float32, gloo, 10 steps, 4 heads, grad accumulation 2, global batch 8):
  PP=2 (also tied embeddings and activation checkpointing), PP=4, TP=2 x PP=2 (also with sequence
  parallelism), TP=2 x DP=2 ZeRO-2 with sequence parallelism, and TP=2 x PP=2 x DP=2 with ZeRO-1
  (8 processes, marked slow8) follow the single-process curve within 1e-4, and their parameters,
  gathered by init key from every stage, equal the single-process ones within 1e-4.
"""
import os
import types

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from dist_utils import run_distributed  # noqa: E402
from megatron_mtp.config import ConfigError, load_config, validate  # noqa: E402
from ds_layouts import (CKPT_TOL, assert_same_curve, baseline, check_layout, make_config,  # noqa: E402
                        run_layouts, two_process_results)


# ---------------------------------------------------------------------------------------------------------
# Placement and topology (no processes)


def _cfg(num_layers=6, n_heads=4, tie=False, pp=2, partition="parameters"):
    cfg = load_config(None, [f"--model.num_layers={num_layers}", f"--mtp.n_heads={n_heads}",
                             f"--model.tie_embeddings={tie}", f"--parallel.pp={pp}",
                             f"--parallel.pipeline_partition={partition}", "--model.hidden_size=32",
                             "--model.num_attention_heads=4", "--model.ffn_hidden_size=64", "--model.vocab_size=64",
                             "--model.make_vocab_size_divisible_by=8"])
    return cfg


def _partition(cfg, stage: int = 0):
    """Run MTPPipelineModule's partitioner on a stand-in (a real PipelineModule needs its processes)."""
    from deepspeed.pipe import PipelineModule

    from megatron_mtp.training.pipeline_module import MTPPipelineModule, layer_specs

    fake = types.SimpleNamespace(_layer_specs=layer_specs(cfg), num_stages=cfg.parallel.pp, global_rank=0)
    fake._count_layer_params = types.MethodType(PipelineModule._count_layer_params, fake)
    fake._topo = types.SimpleNamespace(get_coord=lambda rank: types.SimpleNamespace(pipe=stage))
    fake._set_bounds = lambda start, stop: setattr(fake, "bounds", (start, stop))
    MTPPipelineModule._partition_layers(fake, cfg.parallel.pipeline_partition)
    names = [s.typename.__name__ + ("(tied)" if type(s).__name__ == "TiedLayerSpec" else "")
             for s in fake._layer_specs]
    return fake.parts, names


@pytest.mark.parametrize("partition", ["parameters", "uniform", "type:TransformerLayer"])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("pp, num_layers", [(2, 6), (3, 7), (4, 8)])
def test_heads_sit_whole_on_the_last_stage(partition, tie, pp, num_layers):
    parts, names = _partition(_cfg(num_layers=num_layers, tie=tie, pp=pp, partition=partition))
    assert len(parts) == pp + 1 and parts[0] == 0 and parts[-1] == len(names)
    assert all(parts[s] < parts[s + 1] for s in range(pp)), parts  # no empty stage
    stages = [names[parts[s]:parts[s + 1]] for s in range(pp)]
    assert stages[0][0].startswith("EmbeddingPipe")
    assert stages[-1][-1] == "MTPOutputPipe"
    if tie:
        assert stages[-1][-2] == "EmbeddingPipe(tied)"  # the unembedding's copy next to the heads
    for stage in stages[1:-1]:
        assert set(stage) == {"TransformerLayerPipe"}, stages
    assert sum(stage.count("TransformerLayerPipe") for stage in stages) == num_layers - 4


def test_type_partition_balances_trunk_layers():
    parts, names = _partition(_cfg(num_layers=8, pp=2, partition="type:TransformerLayer"))
    stages = [names[parts[s]:parts[s + 1]] for s in range(2)]
    assert [s.count("TransformerLayerPipe") for s in stages] == [2, 2], stages


@pytest.mark.parametrize("pp, partition, words", [
    (5, "parameters", "exceeds the 4 pipeline pieces"),
    (2, "type:Nothing", "matches no layer class"),
    (2, "by_magic", "must be parameters, uniform or type"),
])
def test_impossible_pipelines_are_one_sentence(pp, partition, words):
    from megatron_mtp.validation import check_pipeline_layout

    cfg = _cfg(pp=pp, partition=partition)
    with pytest.raises(ConfigError, match=words):
        if partition.startswith("type:"):
            _partition(cfg)
        else:
            check_pipeline_layout(cfg)


def test_zero2_with_pipeline_is_rejected():
    cfg = _cfg(pp=2)
    cfg.parallel.zero_stage = 2
    with pytest.raises(ConfigError, match="not possible with pipeline parallelism"):
        validate(cfg)


@pytest.mark.parametrize("tp, pp, dp", [(1, 2, 1), (2, 2, 1), (2, 2, 2), (1, 4, 2), (4, 2, 1), (2, 3, 2)])
def test_deepspeed_topology_has_our_rank_order(tp, pp, dp):
    from megatron_mtp.parallel.state import layout_coordinates, rank_of
    from megatron_mtp.training.deepspeed_engine import pipeline_topology

    topo = pipeline_topology(tp, pp, dp)  # raises if any rank maps differently
    for rank in range(tp * pp * dp):
        coord = topo.get_coord(rank)
        assert rank_of(coord.model, coord.data, coord.pipe, tp, dp) == rank
        assert layout_coordinates(rank, tp, dp) == (coord.model, coord.data, coord.pipe)
    # DeepSpeed's data-parallel and pipeline groups are ours
    for ranks in topo.get_axis_comm_lists("data"):
        assert len({layout_coordinates(r, tp, dp)[2] for r in ranks}) == 1 and len(ranks) == dp
    for ranks in topo.get_axis_comm_lists("pipe"):
        assert [layout_coordinates(r, tp, dp)[2] for r in ranks] == list(range(pp))


# ---------------------------------------------------------------------------------------------------------
# Activation checkpointing: same numbers, fewer saved bytes (one process)


def _saved_bytes_and_grads(module, run) -> tuple:
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    module.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run()
    loss.backward()
    # by init key (names differ between the pipeline stage and the model); numpy: the result crosses processes
    grads = {p.init_key: p.grad.numpy().copy() for p in module.parameters() if p.grad is not None}
    return float(loss.detach()), saved[0], grads


def _checkpointing_worker(rank, world_size, vocab):
    import deepspeed

    from megatron_mtp.model.mtp_model import MTPModel
    from megatron_mtp.training.pipeline_module import build_pipeline_module
    from megatron_mtp.parallel import state
    from megatron_mtp.parallel.layers import initialize_parameters
    from megatron_mtp.training.deepspeed_engine import pipeline_topology
    from megatron_mtp.training.ds_compat import quiet_startup

    quiet_startup(torch.device("cpu"))
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    state.initialize_model_parallel(1, 1)
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, vocab, (2, 33), generator=gen)
    out = {}
    for setting in ("none", "full", "every_2"):
        cfg = _cfg(num_layers=8, pp=1)
        cfg.model.vocab_size, cfg.data.seq_length = vocab, 32
        cfg.train.activation_checkpointing = setting
        stage = build_pipeline_module(cfg, pipeline_topology(1, 1, 1))  # one stage holding everything
        initialize_parameters(stage, 7)
        out[("pipeline", setting)] = _saved_bytes_and_grads(
            stage, lambda: stage(tokens))  # one stage: the sample in, the loss out
        model = MTPModel(cfg.model, cfg.mtp, activation_checkpointing=setting)
        initialize_parameters(model, 7)
        out[("model", setting)] = _saved_bytes_and_grads(model, lambda: model(tokens)[0])
    return out


def test_activation_checkpointing_same_loss_less_memory(tiny_dataset):
    results = run_distributed(_checkpointing_worker, 1, tiny_dataset["vocab_size"])[0]
    for kind in ("pipeline", "model"):
        loss, saved, grads = results[(kind, "none")]
        for setting in ("full", "every_2"):
            loss_c, saved_c, grads_c = results[(kind, setting)]
            assert abs(loss_c - loss) <= CKPT_TOL, (kind, setting)
            assert grads_c.keys() == grads.keys()
            for name in grads:
                torch.testing.assert_close(torch.from_numpy(grads_c[name]), torch.from_numpy(grads[name]),
                                           rtol=0, atol=CKPT_TOL)
            assert saved_c < saved, (kind, setting, saved_c, saved)
        assert results[(kind, "full")][1] < results[(kind, "every_2")][1]
    # the pipeline stage and the PP = 1 model compute the same loss and gradients
    assert results[("pipeline", "none")][1] == results[("model", "none")][1]
    for setting in ("none", "full", "every_2"):
        assert abs(results[("pipeline", setting)][0] - results[("model", setting)][0]) <= CKPT_TOL
        for name, grad in results[("model", setting)][2].items():
            torch.testing.assert_close(torch.from_numpy(results[("pipeline", setting)][2][name]),
                                       torch.from_numpy(grad), rtol=0, atol=CKPT_TOL)


# ---------------------------------------------------------------------------------------------------------
# Training through loop.train


@pytest.fixture(scope="session")
def two_process_pipeline(tiny_dataset, tmp_path_factory, reference):
    # the process group of two that also runs tests/test_deepspeed_engine.py's layouts (run once a session)
    return two_process_results(tiny_dataset, str(tmp_path_factory.mktemp("layouts")))


@pytest.fixture(scope="session")
def reference(tiny_dataset, tmp_path_factory):
    return baseline(tiny_dataset, str(tmp_path_factory.mktemp("reference")))


@pytest.mark.parametrize("name, against", [("pp2", "base"), ("pp2_tied", "base_tied")])
def test_two_stages_follow_single_process(two_process_pipeline, reference, name, against):
    check_layout(two_process_pipeline, reference, name, against)


def test_activation_checkpointing_keeps_losses_pipeline(two_process_pipeline):
    plain, ckpt = two_process_pipeline["pp2"]["metrics"], two_process_pipeline["pp2_ckpt"]["metrics"]
    assert_same_curve(ckpt, plain, "pp2_ckpt", tol=CKPT_TOL)


FOUR = {
    "pp4": (4, {"pp": 4}),  # one piece per stage: embedding | trunk 0 | trunk 1 | heads
    "tp2_pp2": (4, {"tp": 2, "pp": 2}),
    # sequence parallelism: norm gradients summed over TP before DeepSpeed reduces them
    "tp2_sp_pp2": (4, {"tp": 2, "pp": 2, "sequence_parallel": True}),
    "tp2_sp_dp2_zero2": (2, {"tp": 2, "sequence_parallel": True, "zero_stage": 2}),
}


def test_four_processes_follow_single_process(tiny_dataset, tmp_path, reference):
    """PP=4, TP=2 x PP=2, and with sequence parallelism TP=2 x PP=2 and TP=2 x DP=2 with ZeRO-2."""
    jobs = [{"name": name, "eval": name == "tp2_pp2",
             "config": make_config(tiny_dataset, str(tmp_path / name), mbs, parallel=par)}
            for name, (mbs, par) in FOUR.items()]
    results = run_layouts(4, jobs, str(tmp_path))
    for name in FOUR:
        check_layout(results, reference, name)


@pytest.mark.slow8
def test_3d_parallel_follows_single_process(tiny_dataset, tmp_path, reference):
    """TP=2 x PP=2 x DP=2 with ZeRO-1: 8 processes on the tiniest shape."""
    jobs = [{"name": "tp2_pp2_dp2", "eval": True,
             "config": make_config(tiny_dataset, str(tmp_path / "tp2_pp2_dp2"), 2,
                                   parallel={"tp": 2, "pp": 2, "zero_stage": 1})}]
    results = run_layouts(8, jobs, str(tmp_path))
    check_layout(results, reference, "tp2_pp2_dp2")
    ranks = results["tp2_pp2_dp2"]["params_by_rank"]
    assert set(ranks) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for pp in (0, 1):
        for key, value in ranks[(pp, 0)].items():
            assert torch.equal(value, ranks[(pp, 1)][key]), (pp, key)
