"""Long-context evaluation: the recall suite, its scoring, loss by position, and the report.

The parts:

- `tasks`: `RecallSuite(tokenizer, haystack, seed, vocab_size).example(task, length, depth,
  index) -> RecallExample`, the tasks in `TASKS` (RULER's and HELMET's formats), exact
  token lengths up to 512K, `depth_sweep(n)`, `check_tokenizer_vocabulary`.
- `measures`: the registry of measures (recall, loss by position, short-document loss; RULER's
  and HELMET's Recall protocols, scored by generation), each preparing its inputs, running on
  the engine's chunks or a transformers model and filling its part of the report, that the
  command and evaluation inside training both run; the task list of each protocol
  (`PROTOCOL_TASKS`, read from the measures); how to add a measure or a protocol.
- `ruler`, `helmet`: RULER's tasks (prompts, budgets, metrics) and HELMET's Recall tasks (its
  data files, truncation, metrics), which their protocol measures build and score.
- `haystack`: `NoiseHaystack` (RULER's noise), `DocumentHaystack.from_indexed` /
  `.from_text_files` (the user's documents), `load_haystack(source, tokenizer)`.
- `scoring`: `score_generation(text, gold)`, `score_teacher_forced(example, predicted_ids)`,
  `answer_token_losses`, `ExampleResult`, `recall_cells` -> `RecallCell`.
- `hf_model`: transformers on a Hugging Face folder: `load_hf_model`, `greedy_generate`,
  `evaluate_generation` (real greedy decoding with a KV cache), `teacher_forced_reference` /
  `evaluate_teacher_forced` (the reference the engine's teacher-forced scoring must match).
- `position_loss`: `PositionLossAccumulator` (log2 position buckets), `MeanLossAccumulator`
  (short documents).
- `report`: `EvaluationReport` / `CheckpointReport` -> `write_report(report, out_dir)`
  (report.json, report.md, PNG plots; a protocol's report.json and report.md from its
  `ProtocolResult`), `read_report`.

- `engine_scores`: `score_samples(chunks, plan, samples, indices)`, per-token loss and argmax
  through the engine's model in any parallel layout (one forward pass, no KV cache).

Bad input raises `EvaluationError` (a ValueError) naming the value and the fix. transformers (a
test extra) and matplotlib are imported by the functions that use them.
"""
from engine.evaluate.errors import EvaluationError
from engine.evaluate.haystack import DocumentHaystack, Haystack, NoiseHaystack, load_haystack
from engine.evaluate.position_loss import (MeanLossAccumulator, PositionBucket,
                                           PositionLossAccumulator, ShortDocumentLoss,
                                           position_bucket_edges)
from engine.evaluate.report import (CheckpointReport, EvaluationReport, read_report,
                                    render_markdown, report_to_dict, write_report)
from engine.evaluate.scoring import (ExampleResult, RecallCell, RecallScore, answer_token_losses,
                                     answer_value_ends, recall_cells, score_generation,
                                     score_teacher_forced)
from engine.evaluate.tasks import (TASKS, RecallExample, RecallSuite, check_tokenizer_vocabulary,
                                   depth_sweep)

__all__ = [
    "EvaluationError", "DocumentHaystack", "Haystack", "NoiseHaystack", "load_haystack",
    "MeanLossAccumulator", "PositionBucket", "PositionLossAccumulator", "ShortDocumentLoss",
    "position_bucket_edges", "CheckpointReport", "EvaluationReport", "read_report",
    "render_markdown", "report_to_dict", "write_report", "ExampleResult", "RecallCell",
    "RecallScore", "answer_token_losses", "answer_value_ends", "recall_cells",
    "score_generation", "score_teacher_forced", "TASKS", "RecallExample", "RecallSuite",
    "check_tokenizer_vocabulary", "depth_sweep",
]
