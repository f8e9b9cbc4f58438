"""Layouts that cannot work fail before any process group exists, naming values and fix."""
import pytest
import torch.distributed as dist

from engine.model.config import get_model_config
from engine.parallel.layout import LayoutError, ParallelLayout
from tests.distributed import torchrun

TINY = get_model_config("tiny")  # 4 layers, 4 heads, 2 KV heads


@pytest.mark.parametrize("layout, world, message", [
    (ParallelLayout(tensor_parallel=3), 3, "num_attention_heads 4 is not divisible by tensor_parallel 3"),
    (ParallelLayout(tensor_parallel=4), 4, "num_query_groups (KV heads) 2 is not divisible by tensor_parallel 4"),
    (ParallelLayout(pipeline_parallel=3), 3, "num_layers 4 is not divisible by pipeline_parallel x virtual_stages = 3 x 1"),
    (ParallelLayout(pipeline_parallel=2, virtual_stages=4), 2, "= 2 x 4 = 8"),
    (ParallelLayout(tensor_parallel=2, data_parallel=2), 8, "world size 8 does not match TP x PP x CP x DP = 2 x 1 x 1 x 2 = 4"),
    (ParallelLayout(virtual_stages=2), 1, "virtual_stages 2 needs pipeline_parallel > 1"),
    (ParallelLayout(sequence_parallel=True), 1, "sequence_parallel needs tensor_parallel > 1"),
])
def test_invalid_layouts_are_refused(layout, world, message):
    with pytest.raises(LayoutError) as info:
        layout.validate(TINY, world_size=world)
    assert message in str(info.value)
    assert not dist.is_initialized()


def test_interleaving_needs_microbatches_divisible_by_pipeline():
    with pytest.raises(LayoutError, match=r"num_microbatches \(3\) divisible by pipeline_parallel 2"):
        ParallelLayout(pipeline_parallel=2, virtual_stages=2).validate(TINY, world_size=2,
                                                                 num_microbatches=3)


def test_world_size_must_divide_into_layout():
    with pytest.raises(LayoutError, match="world size 6 is not divisible by TP x PP x CP = 4"):
        ParallelLayout.for_world_size(6, tensor_parallel=2, pipeline_parallel=2)
    assert ParallelLayout.for_world_size(8, tensor_parallel=2, pipeline_parallel=2).data_parallel == 2


def test_launch_with_bad_layout_fails_fast_with_the_message():
    """Through torchrun, as a user launches: every rank exits with the message, none hangs."""
    result = torchrun("engine.tools.layout_check", 3, ["--tp", "3", "--out", "/nonexistent"],
                      timeout=120, check=False)
    assert result.returncode != 0
    assert "num_attention_heads 4 is not divisible by tensor_parallel 3" in result.stdout
