"""Long-context training of Llama-3 on megatron-core. Layers, each importing only those above it:

    megatron_compat   every patch of megatron-core (CPU support, a checkpoint-load fix)
    model/            what the model is: shapes, kernel choices, megatron layer specs, GPTModel
    parallel/         how it is spread: ParallelLayout, process groups, context parallelism
    checkpoint        distributed checkpoints, published atomically, reshardable
    training/         config -> run plan -> build -> data -> step
    convert/ planner/ evaluate/ tools/   Hugging Face conversion, memory planning, evaluation,
                      self-checks (tests/engine/test_import_layers.py keeps this order)
    train             the entry point: torchrun -m engine.train --config FILE
"""
import warnings

# megatron-core warns at import, once per module, that transformer-engine and apex are absent
# (five lines before any output); engine.megatron_compat says it in one line instead.
warnings.filterwarnings("ignore", message=r"(Transformer Engine and Apex are|Apex is) not installed",
                        category=UserWarning)
