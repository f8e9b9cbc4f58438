"""The recall suite on a Hugging Face model (e.g. an `engine.convert export` folder) through
transformers: real greedy generation, and the reference for teacher-forced scoring.

    model = load_hf_model("hf/prolong-64k")                  # dtype from config.json, cuda if any
    results = evaluate_generation(model, tokenizer, examples)  # greedy with a KV cache, substrings
    results = evaluate_teacher_forced(model, examples)        # one forward per example

- `load_hf_model(folder, device=None, dtype=None)`: AutoModelForCausalLM in eval mode, in the
  dtype config.json names (`torch_dtype`, or transformers 5's `dtype`), on CUDA when available.
- `greedy_generate(model, prompts, max_new_tokens)`: the prompts' token ids are fed as they are
  (never re-tokenized); prompts of one length (every example of a suite cell) batch without
  padding. Returns the new tokens of each prompt, cut at the first EOS.
- `teacher_forced_reference(model, example) -> TeacherForcedOutput`: one forward pass over
  prompt + answer[:-1]; the argmax and the next-token loss at each answer position. The engine's
  teacher-forced scoring in any parallel layout must agree with it.
- `evaluate_generation(...)` / `evaluate_teacher_forced(...)`: a progress bar over examples,
  one `ExampleResult` per example (engine.evaluate.scoring). Generation runs for the answer's
  length plus `margin` tokens, so an answer buried in extra words is still found.

transformers (a test extra) is imported when these functions run, not with the module.
"""
from __future__ import annotations

import inspect
import json
import os
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from engine.evaluate.errors import EvaluationError
from engine.evaluate.scoring import (ExampleResult, RecallScore, answer_token_losses,
                                     score_generation, score_teacher_forced)
from engine.evaluate.tasks import check_tokenizer_vocabulary

GENERATION_MARGIN = 16


def _torch_dtype(name: str):

    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise EvaluationError(f"dtype {name!r} is not a torch dtype; use float32, bfloat16 or float16")
    return dtype


def load_hf_model(folder: str, device: Optional[str] = None, dtype: Optional[str] = None):
    """AutoModelForCausalLM from a local folder, eval mode. `dtype` (e.g. "float32") overrides
    the one config.json names; `device` defaults to "cuda" when available, else "cpu"."""
    import transformers

    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise EvaluationError(f"{folder!r} holds no config.json: not a Hugging Face model folder; "
                              f"export a checkpoint with `python -m engine.convert export`")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    torch_dtype = _torch_dtype(dtype or config.get("torch_dtype") or config.get("dtype") or "float32")
    # transformers 5 renamed from_pretrained's torch_dtype to dtype.
    major = int(transformers.__version__.split(".")[0])
    dtype_argument = {"dtype" if major >= 5 else "torch_dtype": torch_dtype}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **dtype_argument)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()


def _model_device(model):
    return next(model.parameters()).device


def _warn_if_beyond_context(model, length: int) -> None:
    trained = getattr(model.config, "max_position_embeddings", None)
    if trained is not None and length > trained:
        warnings.warn(f"length {length} is beyond the model's max_position_embeddings {trained}; "
                      f"evaluating anyway", stacklevel=3)


@dataclass
class TeacherForcedOutput:
    """`predicted_ids[i]` (int64 [A]): argmax for answer token i given prompt + answer[:i];
    `token_losses[i]` (float64 [A], nats): -log p(answer token i | the same)."""
    predicted_ids: np.ndarray
    token_losses: np.ndarray

    def score(self, example) -> RecallScore:
        return score_teacher_forced(example, self.predicted_ids)


def teacher_forced_reference(model, example) -> TeacherForcedOutput:
    """One forward pass of a transformers causal LM over prompt + answer[:-1]; only the answer
    positions' logits are computed where transformers offers `logits_to_keep`."""

    answer = np.asarray(example.answer_ids, dtype=np.int64)
    tokens = np.concatenate([np.asarray(example.prompt_ids, dtype=np.int64), answer[:-1]])
    input_ids = torch.from_numpy(tokens)[None].to(_model_device(model))
    keep = {}
    parameters = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):  # transformers >= 4.50, 4.45-4.49
        if name in parameters:
            keep = {name: len(answer)}
            break
    with torch.no_grad():
        logits = model(input_ids=input_ids, **keep).logits[0, -len(answer):]
    logits = logits.double().cpu().numpy()
    return TeacherForcedOutput(logits.argmax(axis=-1), answer_token_losses(answer, logits=logits))


def greedy_generate(model, prompts: Sequence[np.ndarray], max_new_tokens: int) -> list[np.ndarray]:
    """Greedy decoding with transformers' KV cache from token-id prompts of one length.
    Returns each prompt's new tokens (int64), ending before the first EOS."""

    lengths = {len(p) for p in prompts}
    if len(lengths) != 1:
        raise EvaluationError(f"prompts of lengths {sorted(lengths)} in one batch; batch prompts "
                              f"of one length (one suite length) only")
    input_ids = torch.from_numpy(np.stack([np.asarray(p, dtype=np.int64) for p in prompts]))
    input_ids = input_ids.to(_model_device(model))
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    pad = model.generation_config.pad_token_id
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=None,
            top_p=None, top_k=None, use_cache=True,
            pad_token_id=pad if pad is not None else (min(eos_ids) if eos_ids else 0))
    new_tokens = output[:, input_ids.shape[1]:].cpu().numpy()
    results = []
    for row in new_tokens:
        stops = [i for i, t in enumerate(row.tolist()) if t in eos_ids]
        results.append(row[:stops[0]] if stops else row)
    return results


def _batches(examples: Iterable, batch_size: int):
    """Consecutive examples of one length, at most `batch_size` together."""
    batch = []
    for example in examples:
        if batch and (len(batch) == batch_size or batch[0].length != example.length):
            yield batch
            batch = []
        batch.append(example)
    if batch:
        yield batch


def evaluate_generation(model, tokenizer, examples: Sequence, margin: int = GENERATION_MARGIN,
                        batch_size: int = 1, progress: bool = True) -> list[ExampleResult]:
    """Greedy generation on each example, scored by substring match (RULER's metric); the
    generated text is kept in `ExampleResult.output`."""

    check_tokenizer_vocabulary(tokenizer, model.config.vocab_size, "the model")
    results = []
    bar = tqdm(total=len(examples), desc="generation", unit="example", disable=not progress)
    for batch in _batches(examples, batch_size):
        _warn_if_beyond_context(model, batch[0].length)
        budget = max(len(e.answer_ids) for e in batch) + margin
        for example, new in zip(batch, greedy_generate(model, [e.prompt_ids for e in batch], budget)):
            text = tokenizer.decode(new)
            results.append(ExampleResult.of(example, score_generation(text, example.gold), output=text))
        bar.update(len(batch))
    bar.close()
    return results


def evaluate_teacher_forced(model, examples: Sequence, progress: bool = True) -> list[ExampleResult]:
    """Teacher-forced greedy scoring with `teacher_forced_reference`, with each example's mean
    answer-token loss (nats)."""

    results = []
    for example in tqdm(examples, desc="teacher-forced", unit="example", disable=not progress):
        _warn_if_beyond_context(model, example.length)
        output = teacher_forced_reference(model, example)
        results.append(ExampleResult.of(example, output.score(example),
                                        answer_loss=float(output.token_losses.mean()),
                                        predicted_ids=output.predicted_ids))
    return results


def token_losses(model, tokens: np.ndarray) -> np.ndarray:
    """float64 [T - 1] (nats): -log p(token t + 1 | tokens 0..t) of one document, one forward
    pass (transformers holds the [T, vocab] logits: this is what the engine's chunked scoring
    avoids at long lengths)."""
    input_ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None].to(_model_device(model))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, input_ids[0, 1:], reduction="none").double().cpu().numpy()
