"""The shipped ProLong stage configs parse, fit their layouts and carry the published numbers."""

import pytest

from engine.model.config import get_model_config
from engine.training.config import load_config
from tests.distributed import REPO

CONFIGS = REPO / "engine" / "configs"


@pytest.mark.parametrize("name, world_size, rope_base, seq_length, tokens", [
    ("prolong-stage1-64k", 64, 8e6, 65_536, 20e9),
    ("prolong-stage2-512k", 128, 1.28e8, 524_288, 20e9),
    ("prolong-sft", 64, 1.28e8, 65_536, 1e9),
])
def test_prolong_stage_configs(name, world_size, rope_base, seq_length, tokens):
    config = load_config([str(CONFIGS / f"{name}.yaml")])
    model = get_model_config(config.model.name, **config.model.overrides)
    assert model.rope_base == rope_base
    layout = config.parallel.with_world_size(world_size)
    layout.validate(model, world_size=world_size, seq_length=seq_length)
    trained = config.train_steps * config.data.global_batch * seq_length
    assert trained == pytest.approx(tokens, rel=0.05)
    assert config.optimizer.weight_decay == 0.1 and config.optimizer.clip_grad == 1.0
    assert layout.recompute == "full" and config.bf16


@pytest.mark.parametrize("name, warmup", [
    ("prolong-stage1-64k", 500), ("prolong-stage2-512k", 250),
    ("prolong-sft", 13),  # 5% of 250 = 12.5, rounded up as Hugging Face's Trainer does
])
def test_warmup_steps_round_up_as_hugging_face(name, warmup):
    config = load_config([str(CONFIGS / f"{name}.yaml")])
    assert config.optimizer.warmup_steps(config.train_steps) == warmup


def test_quickstart_configs_parse():
    for path in sorted((REPO / "examples" / "quickstart").glob("train-*.yaml")):
        config = load_config([str(path)])
        assert config.parallel.tensor_parallel * config.parallel.pipeline_parallel == 4
