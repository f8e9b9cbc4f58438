"""The run plan: built once from the config, before any process group, or refused with the
setting, the value and the fix."""
import pytest
import torch.distributed as dist

from engine.parallel.layout import LayoutError
from engine.training.config import ConfigError, load_config
from engine.training.run_plan import plan_from_config


def _plan(train_config, data, world_size=1, *overrides):
    config = load_config([train_config], [f"data.path={data}", "checkpoint.dir=/tmp/unused",
                                          *overrides])
    return plan_from_config(config, world_size)


def test_plan_resolves_everything_once(train_config, packed_tiny_dataset):
    plan = _plan(train_config, packed_tiny_dataset, 4, "parallel.tensor_parallel=2",
                 "parallel.context_parallel=2", "parallel.cp_algorithm=ulysses",
                 "parallel.recompute=full")
    assert plan.layout.describe() == "TP2 x PP1 x CP2 x DP1 +ulysses +recompute=full"
    assert plan.kernels.resolved and plan.kernels.attention == "torch"  # CPU: auto -> torch
    assert (plan.seq_length, plan.num_microbatches, plan.bf16) == (64, 4, False)
    assert plan.data.packing_length == 64 and plan.warmup_steps == 0
    assert not dist.is_initialized()


def test_context_parallel_trains_below_the_packing_length(train_config, packed_tiny_dataset):
    """CP no longer needs seq_length equal to the packing length: 32-token samples of the
    64-token packed sequences split over CP2 (4 chunks of 8)."""
    plan = _plan(train_config, packed_tiny_dataset, 2, "data.seq_length=32",
                 "parallel.context_parallel=2")
    assert plan.seq_length == 32 and plan.data.packing_length == 64
    with pytest.raises(LayoutError, match="seq_length 16 is not divisible by 2 x "
                                          "context_parallel_size = 32"):
        _plan(train_config, packed_tiny_dataset, 16, "data.seq_length=16",
              "parallel.context_parallel=16")


@pytest.mark.parametrize("overrides, world, error, message", [
    (["model.overrides={num_layers: 2, vocab_size: 300}"], 1, ConfigError,
     "holds token id 511, beyond the vocabulary of 300 of model tiny: the data was tokenized "
     "for another model"),
    (["train_steps=-3"], 1, ConfigError, "train_steps = -3 must be >= 1"),
    (["data.global_batch=0"], 1, ConfigError, "data.global_batch = 0 must be >= 1"),
    (["optimizer.lr=0"], 1, ConfigError, "optimizer.lr = 0 must be > 0"),
    (["optimizer.warmup_fraction=1.5"], 1, ConfigError, "must be in [0, 1)"),
    (["data.micro_batch=two"], 1, ConfigError, "data.micro_batch = 'two' must be int"),
    (["data.position_mode=reset"], 1, ConfigError, "data.position_mode 'reset' must be one of"),
    (["parallel.recompute=some"], 1, LayoutError, "recompute 'some' is not one of"),
    (["parallel.context_parallel=2", "kernels={attention: transformer-engine}"], 2, ConfigError,
     "transformer-engine"),
    (["model.overrides={num_layers: 2, max_position_embeddings: 32}"], 1, ConfigError,
     "seq_length 64 is beyond the model's max_position_embeddings 32"),
])
def test_bad_settings_are_refused_naming_value_and_fix(overrides, world, error, message,
                                                      train_config, packed_tiny_dataset):
    with pytest.raises(error) as info:
        _plan(train_config, packed_tiny_dataset, world, *overrides)
    assert message in str(info.value)
    assert not dist.is_initialized()


def test_the_config_loads_its_parallel_section_into_the_layout(train_config, tmp_path):
    """One layout type: the parallel section is the ParallelLayout the plan places on the world
    size; each field checked once, as it is made; the resolved config written beside a run's
    logs reads back."""
    import yaml

    from engine.parallel.layout import ParallelLayout

    config = load_config([train_config], ["parallel.tensor_parallel=2", "parallel.recompute=full"])
    assert config.parallel == ParallelLayout(tensor_parallel=2, recompute="full")
    assert config.parallel.with_world_size(8).data_parallel == 4
    resolved = tmp_path / "config.yaml"
    resolved.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    assert load_config([str(resolved)]) == config
    with pytest.raises(ConfigError, match="parallel.data_parallel is not a setting"):
        load_config([train_config], ["parallel.data_parallel=2"])
    with pytest.raises(ConfigError, match=r"train.yaml: parallel.tensor_parallel = 0 must be "
                                          r">= 1"):
        load_config([train_config], ["parallel.tensor_parallel=0"])
    with pytest.raises(LayoutError, match=r"parallel.cp_algorithm 'ring' is not one of"):
        load_config([train_config], ["parallel.cp_algorithm=ring"])


def test_the_packed_data_records_its_largest_token_id(packed_tiny_dataset):
    """What the vocabulary check reads: the largest id mix wrote, exact."""
    import numpy as np

    from data_tools.packed_dataset import PackedDataset

    dataset = PackedDataset(packed_tiny_dataset)
    largest = max(int(np.max(dataset[i].tokens)) for i in range(len(dataset)))
    assert dataset.max_token_id == largest == 511


def test_context_parallel_below_the_packing_length_trains_like_one_process(
        train_config, packed_tiny_dataset, tmp_path):
    """32-token samples (two per 64-token packed sequence) under CP2 match one process."""
    import json

    from tests.distributed import torchrun

    runs = {}
    for name, nproc, extra in (("one", 1, []), ("cp2", 2, ["parallel.context_parallel=2"])):
        run = tmp_path / name
        torchrun("engine.train", nproc, ["--config", train_config,
                                         f"data.path={packed_tiny_dataset}",
                                         f"checkpoint.dir={run}", "data.seq_length=32",
                                         "train_steps=2", "optimizer.lr=1e-4", *extra])
        runs[name] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for one, cp2 in zip(runs["one"], runs["cp2"]):
        assert cp2["valid_tokens"] == one["valid_tokens"] and one["valid_tokens"] > 0
        assert cp2["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert cp2["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
