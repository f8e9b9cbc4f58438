"""torchrun worker for test_convert_llama3x: an imported Llama-3.1/3.2-style checkpoint in a
parallel layout (gloo, fp32, CPU).

    --mode logits: full-vocabulary logits of fixed random tokens, gathered over TP (vocabulary
                   shards) and CP (sequence chunks) on the last pipeline stage -> OUT/logits.pt
    --mode train:  one training step from the imported weights, then every rank's canonical
                   weights -> OUT/weights_rank{r}.pt (OUT/init_rank{r}.pt: the fresh model's,
                   before the import is loaded) and a checkpoint under OUT/ckpt
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

SEED, LR = 11, 1e-3


def tokens_for(vocab_size: int, seq_length: int, batch: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, vocab_size, (batch, seq_length + 1), generator=generator)


def _plan(args, model, seq_length: int, global_batch: int):
    from engine.model.kernel_choices import KernelChoices
    from engine.parallel.layout import ParallelLayout
    from engine.training.config import OptimizerSection
    from engine.training.run_plan import RunPlan

    layout = ParallelLayout.for_world_size(int(os.environ["WORLD_SIZE"]), tensor_parallel=args.tp,
                                           pipeline_parallel=args.pp, context_parallel=args.cp)
    return RunPlan.create(model, layout, seq_length=seq_length, global_batch=global_batch,
                          kernels=KernelChoices.parse("all=torch"), seed=SEED, train_steps=2,
                          collective_timeout_s=120,
                          optimizer=OptimizerSection(lr=LR, warmup_fraction=0.0))


def _logits(args, model, chunks) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from engine.parallel.context.chunks import gathered_to_sequence_order
    from engine.training.data import InMemorySequences, SampleSource, micro_batch_for_rank

    tokens = tokens_for(model.vocab_size, args.seq_length)[0, :-1].numpy()
    samples = SampleSource(InMemorySequences([tokens], [np.array([len(tokens)])]),
                           args.seq_length)
    cp_rank = parallel_state.get_context_parallel_rank()
    batch = micro_batch_for_rank(samples, [0], cp_rank, args.cp, mask_cross_document=False)

    def step(data_iterator, chunk):
        b = next(data_iterator)
        output = chunk(b.tokens, b.position_ids, None, packed_seq_params=b.packed_seq_params())
        return output, lambda logits, non_loss_data=True: logits

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([batch]), model=chunks,
            num_microbatches=1, seq_length=args.seq_length, micro_batch_size=1,
            forward_only=True, collect_non_loss_data=True)
    if parallel_state.is_pipeline_last_stage():
        logits = outputs[0].float().contiguous()  # [1, S / CP, padded vocab / TP]
        tp_group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(logits) for _ in range(args.tp)]
        dist.all_gather(parts, logits, group=tp_group)
        logits = torch.cat(parts, dim=-1)[0]
        if args.cp > 1:
            parts = [torch.empty_like(logits) for _ in range(args.cp)]
            dist.all_gather(parts, logits, group=parallel_state.get_context_parallel_group())
            logits = torch.cat(parts)[gathered_to_sequence_order(args.seq_length, args.cp)]
        if (parallel_state.get_tensor_model_parallel_rank() == 0 and cp_rank == 0
                and parallel_state.get_data_parallel_rank() == 0):
            torch.save({"tokens": torch.as_tensor(tokens),
                        "logits": logits[:, :model.vocab_size]}, Path(args.out) / "logits.pt")


def _save_weights(chunks, path: Path) -> None:
    """This rank's parameters under their canonical names."""
    from engine.model.sharding import canonical_named_parameters

    torch.save({name: param.detach().clone() for chunk in chunks
                for name, param in canonical_named_parameters(chunk)}, path)


def _train(args, model, plan, chunks, optimizer, scheduler) -> None:
    from engine.checkpoint import save_checkpoint
    from engine.training.data import MicroBatch
    from engine.training.step import train_step

    tokens = tokens_for(model.vocab_size, args.seq_length, plan.global_batch)
    positions = torch.arange(args.seq_length)[None]
    micro_batches = [MicroBatch(tokens=tokens[i:i + 1, :-1], labels=tokens[i:i + 1, 1:],
                                loss_mask=torch.ones(1, args.seq_length), position_ids=positions)
                     for i in range(plan.num_microbatches)]
    train_step(chunks, optimizer, scheduler, micro_batches, plan.num_microbatches,
               args.seq_length, 1)
    _save_weights(chunks, Path(args.out) / f"weights_rank{torch.distributed.get_rank()}.pt")
    save_checkpoint(Path(args.out) / "ckpt", 1, chunks, optimizer, scheduler, model,
                    plan.layout, {"consumed_samples": plan.global_batch})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=["logits", "train"], required=True)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1)
    args = parser.parse_args(argv)

    from engine.checkpoint import load_checkpoint, model_config_from_state, read_checkpoint_state
    from engine.checkpoint import resolve_checkpoint
    from engine.parallel.setup import destroy_parallel, initialize_parallel
    from engine.training.build import build_model, build_training_state

    source = resolve_checkpoint(args.checkpoint)
    model = model_config_from_state(read_checkpoint_state(source), source)
    plan = _plan(args, model, args.seq_length, 2 if args.mode == "train" else 1)
    initialize_parallel(plan.layout, seed=SEED, timeout_s=120)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    try:
        if args.mode == "logits":
            chunks = build_model(plan)
            load_checkpoint(source, chunks, optimizer=None, model_config=model)
            for chunk in chunks:
                chunk.eval()
            _logits(args, model, chunks)
        else:
            state = build_training_state(plan)
            _save_weights(state.chunks, Path(args.out) / f"init_rank{torch.distributed.get_rank()}.pt")
            load_checkpoint(source, state.chunks, optimizer=None, model_config=model)
            state.optimizer.reload_model_params()
            _train(args, model, plan, state.chunks, state.optimizer, state.scheduler)
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
