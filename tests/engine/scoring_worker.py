"""Worker for test_evaluate_engine_scores (torchrun): score packed sequences through the engine
in the given layout and save every sample's per-token loss and argmax (rank 0, .npz)."""
import argparse
import os

import numpy as np


def main() -> None:
    from engine.evaluate.engine_scores import score_samples
    from engine.model.config import get_model_config
    from engine.model.kernel_choices import KernelChoices
    from engine.parallel.layout import ParallelLayout
    from engine.parallel.setup import destroy_parallel, initialize_parallel
    from engine.tools.layout_check import synthetic_global_batch
    from engine.training.build import build_inference_model
    from engine.training.data import InMemorySequences, SampleSource
    from engine.training.run_plan import RunPlan

    parser = argparse.ArgumentParser()
    for flag in ("--tp", "--pp", "--vpp", "--cp"):
        parser.add_argument(flag, type=int, default=1)
    parser.add_argument("--cp-algorithm", default="all-gather")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    layout = ParallelLayout.for_world_size(
        int(os.environ["WORLD_SIZE"]), tensor_parallel=args.tp, pipeline_parallel=args.pp,
        virtual_stages=args.vpp, context_parallel=args.cp, cp_algorithm=args.cp_algorithm,
        sequence_parallel=args.tp > 1)
    model = get_model_config("tiny")
    plan = RunPlan.create(model, layout, seq_length=64,
                          global_batch=layout.data_parallel * layout.pipeline_parallel,
                          kernels=KernelChoices.parse("all=torch"), seed=5,
                          collective_timeout_s=120)
    initialize_parallel(layout, seed=plan.seed, timeout_s=120)
    chunks = build_inference_model(plan)
    tokens, doc_lengths, _ = synthetic_global_batch(model.vocab_size, args.samples, 64, seed=11)
    samples = SampleSource(InMemorySequences(tokens, doc_lengths), 64)
    scores = score_samples(chunks, plan, samples, range(args.samples), position_mode="document")
    direct = {}
    if layout.world_size == 1:  # the same numbers from the model's full logits
        import torch

        from engine.training.data import micro_batch_for_rank

        batch = micro_batch_for_rank(samples, range(args.samples), position_mode="document",
                                     mask_cross_document=False)
        with torch.no_grad():
            logits = chunks[0](batch.tokens, batch.position_ids, None,
                               packed_seq_params=batch.packed_seq_params()).float()
        direct["direct_loss"] = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch.labels.flatten(), reduction="none").view(
            args.samples, -1).numpy()
        direct["direct_argmax"] = logits.argmax(-1).numpy()
    if int(os.environ["RANK"]) == 0:
        np.savez(args.out, loss=np.stack([scores[i].loss for i in range(args.samples)]),
                 argmax=np.stack([scores[i].argmax for i in range(args.samples)]),
                 tokens=tokens, **direct)
    destroy_parallel()


if __name__ == "__main__":
    main()
