"""The lm-evaluation-harness hand-off of docs/evaluation.md ("The full benchmarks"), run as
written: RULER's niah_single_1 on a tiny export with the network cut, `max_length` the export's
context, plain (a base export) and in the chat template (an SFT export). The run must complete,
see every prompt whole, and report the task at the requested length.

lm-eval is not a dependency: in an environment without it the test skips, naming what to install.
CI runs it with lm-eval installed (.ci/lm_eval_handoff.sh, LCE_REQUIRE_LM_EVAL=1: no skip)."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.engine.evaluate_helpers import LLAMA3_VOCAB, llama3_tokenizer_dir, tiny_llama

pytestmark = pytest.mark.slow

CONTEXT = 1024   # the tiny export's context (max_position_embeddings), as 03_import_model sets it
LENGTH = 1024    # the RULER length asked for: the export's context, the most it may be
LIMIT = 2        # samples run (lm-eval builds RULER's 500 and scores the first LIMIT)
BUDGET = 128     # niah_single_1's max_gen_toks

# Llama-3-Instruct's header format, as the instruct tokenizer_config.json an SFT export copies
# carries it (the offline test tokenizer has none).
LLAMA3_CHAT_JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

INSTALL = ('pip install "lm-eval[hf,ruler]" into a virtual environment made with '
           '--system-site-packages and run this file with its python')


def _unavailable(reason: str):
    # .ci/lm_eval_handoff.sh runs this file in an environment with lm-eval: there, a missing
    # part fails the run instead of skipping it.
    if os.environ.get("LCE_REQUIRE_LM_EVAL") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def _require_lm_eval():
    if importlib.util.find_spec("lm_eval") is None:
        _unavailable(f"lm-eval is not installed in this interpreter (the main suite's "
                     f"environment does not have it; .ci/lm_eval_handoff.sh runs this file "
                     f"with it): {INSTALL}")
    missing = [name for name in ("accelerate", "wonderwords", "nltk")
               if importlib.util.find_spec(name) is None]
    if missing:
        _unavailable(f"lm-eval is installed without its hf/ruler extras (no "
                     f"{', '.join(missing)}): {INSTALL}")


# Inside the namespace only the loopback interface may exist: nothing can reach a network.
_NO_NETWORK = "import socket, sys; sys.exit(sorted(n for _, n in socket.if_nameindex()) != ['lo'])"


@pytest.fixture(scope="module")
def offline():
    """The command prefix that runs a process in a network namespace without interfaces."""
    _require_lm_eval()
    if shutil.which("unshare") is None:
        _unavailable("unshare (util-linux) is not installed: the network cannot be cut")
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):  # root; else a user namespace
        probe = subprocess.run(prefix + [sys.executable, "-c", _NO_NETWORK],
                               capture_output=True, timeout=60)
        if probe.returncode == 0:
            return prefix
    _unavailable("cannot make a network namespace (unshare -n needs root, unshare -rn user "
                "namespaces): the run could not be shown offline")


def _export(root, chat: bool):
    """A tiny random Llama through the engine: import at context CONTEXT, export with the
    Llama-3 tokenizer files (and, for an SFT export, a chat template among them)."""
    from engine.convert.export import export_checkpoint
    from engine.convert.importer import import_checkpoint

    quiet = {"log": lambda *_: None}
    tiny_llama(LLAMA3_VOCAB, seed=0, dtype="float32").save_pretrained(str(root / "hf_in"))
    import_checkpoint(root / "hf_in", root / "ckpt",
                      overrides={"max_position_embeddings": CONTEXT}, **quiet)
    tokenizer = root / "tokenizer"
    shutil.copytree(llama3_tokenizer_dir(), tokenizer)
    if chat:
        (tokenizer / "chat_template.jinja").write_text(LLAMA3_CHAT_JINJA)
    export_checkpoint(root / "ckpt", root / "export", tokenizer=tokenizer, dtype="float32",
                      **quiet)
    return root / "export"


def lm_eval_command(export, out, chat: bool) -> list[str]:
    """docs/evaluation.md's command: max_length is the export's max_position_embeddings."""
    with open(os.path.join(export, "config.json"), encoding="utf-8") as f:
        context = json.load(f)["max_position_embeddings"]
    command = [sys.executable, "-m", "lm_eval", "--model", "hf",
               "--model_args", f"pretrained={export},max_length={context},dtype=float32",
               "--tasks", "niah_single_1",
               "--metadata", json.dumps({"max_seq_lengths": [LENGTH]}),
               "--device", "cpu", "--batch_size", "1", "--limit", str(LIMIT),
               "--log_samples", "--output_path", str(out)]
    return command + (["--apply_chat_template"] if chat else [])


def _offline_env(root) -> dict:
    """The offline variables, with an empty Hugging Face cache and NLTK data folder: nothing
    downloaded beforehand is needed for niah_single_1 beyond the export itself."""
    for name in ("hf_home", "nltk_data"):
        (root / name).mkdir()
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                HF_HOME=str(root / "hf_home"), NLTK_DATA=str(root / "nltk_data"),
                OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _one(pattern: str) -> str:
    found = glob.glob(pattern)
    assert len(found) == 1, f"expected one file {pattern}, found {found}"
    return found[0]


@pytest.mark.parametrize("chat", [False, True], ids=["base-export", "sft-export-chat-template"])
def test_ruler_niah_single_1_runs_offline_on_an_export(offline, tmp_path, chat):
    from transformers import AutoTokenizer

    export = _export(tmp_path, chat)
    out = tmp_path / "lm_eval_out"
    run = subprocess.run(offline + lm_eval_command(export, out, chat), env=_offline_env(tmp_path),
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    log = run.stdout + run.stderr
    assert run.returncode == 0, f"lm_eval exited {run.returncode}:\n{log[-6000:]}"
    # lm-eval only warns when it cuts a prompt to max_length - max_gen_toks from the left.
    cut = [line for line in log.splitlines() if "Left truncation applied" in line]
    assert not cut, "lm-eval cut prompts from the left (max_length below the length asked " \
                    "for):\n" + "\n".join(cut)

    results = json.load(open(_one(str(out / "*" / "results_*.json")), encoding="utf-8"))
    assert results["config"]["model_args"]["max_length"] == CONTEXT == results["max_length"]
    assert results["n-samples"]["niah_single_1"]["effective"] == LIMIT
    assert (results["chat_template"] is not None) == chat
    score = results["results"]["niah_single_1"][f"{LENGTH},none"]

    samples = [json.loads(line) for line in
               open(_one(str(out / "*" / "samples_niah_single_1_*.jsonl")), encoding="utf-8")]
    assert len(samples) == LIMIT
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    rescored = []
    for sample in samples:
        doc, prompt = sample["doc"], sample["arguments"]["gen_args_0"]["arg_0"]
        assert doc["max_length"] == LENGTH and doc["length"] <= LENGTH
        # What the model was given fits the context with the generation budget (BOS included).
        assert len(tokenizer(prompt).input_ids) + BUDGET <= CONTEXT
        assert prompt.endswith(doc["gen_prefix"]) and doc["outputs"][0] in prompt
        assert prompt.startswith("<|begin_of_text|><|start_header_id|>user") == chat
        # RULER's string_match_all on the stripped output, recomputed from the samples file.
        response = sample["resps"][0][0].strip().lower()
        own = sum(value.lower() in response for value in doc["outputs"]) / len(doc["outputs"])
        assert sample[str(LENGTH)] == own
        rescored.append(own)
    assert score == pytest.approx(sum(rescored) / LIMIT)
    assert 0.0 <= score <= 1.0
