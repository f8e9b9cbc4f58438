"""The lce-data command line, run the way the README's quickstart runs it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_tools.cli import main
from data_tools.indexed import IndexedReader
from data_tools.packed_dataset import PackedDataset
from data_tools_helpers import write_mds_part, write_recipe

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
SAMPLE = os.path.join(REPO, "data_tools", "sample")
MDS_PART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "mds",
                        "fineweb-edu", "proc01-64")


def test_module_entry_point_help_lists_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "data_tools", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("preprocess", "import-mds", "merge", "stats", "inspect", "mix", "pack", "sft"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["preprocess", "import-mds", "merge", "stats", "inspect",
                                     "mix", "sft"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "usage: lce-data " + command in capsys.readouterr().out


def test_quickstart_pipeline(tmp_path, capsys, llama3_model):
    out = str(tmp_path)
    assert main(["preprocess", "--input", os.path.join(SAMPLE, "code.jsonl.zst"), "--output-prefix",
                 f"{out}/code", "--tokenizer", llama3_model, "--group-by", "repo", "--quiet",
                 "--workers", "2"]) == 0
    assert main(["preprocess", "--input", os.path.join(SAMPLE, "docs.jsonl.gz"), "--output-prefix",
                 f"{out}/docs", "--tokenizer", llama3_model, "--quiet"]) == 0
    summary = json.load(open(f"{out}/code.summary.json"))
    assert summary["documents"] == 18 and summary["skipped_lines"] == 0
    assert summary["tokens"] == IndexedReader(f"{out}/code").num_tokens

    recipe = write_recipe(tmp_path / "r.yaml", 4096, [
        {"name": "code", "path": "code", "weight": 0.6, "long": True},
        {"name": "docs", "path": "docs", "weight": 0.4}])
    assert main(["mix", recipe, "--output", f"{out}/packed", "--data-root", out]) == 0
    assert "sequences x 4,096 tokens" in capsys.readouterr().out
    ds = PackedDataset(f"{out}/packed")
    assert len(ds) > 10 and all(ds[i].doc_lengths.sum() == 4096 for i in range(len(ds)))
    assert main(["pack", recipe, "--output", f"{out}/packed", "--data-root", out]) == 0
    assert "reusing the packed index" in capsys.readouterr().out

    assert main(["stats", f"{out}/docs", "--png", f"{out}/h.png"]) == 0
    table = capsys.readouterr().out
    assert "79 documents" in table and "% tokens" in table
    with open(f"{out}/h.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    assert main(["inspect", f"{out}/docs", "0"]) == 0
    doc = json.loads(capsys.readouterr().out)
    first = json.loads(__import__("gzip").open(os.path.join(SAMPLE, "docs.jsonl.gz")).readline())
    assert doc["text"].startswith(first["text"][:100])
    assert main(["inspect", f"{out}/packed", "1"]) == 0
    sequence = json.loads(capsys.readouterr().out)
    assert sum(sequence["doc_lengths"]) == 4096 and len(sequence["pieces"]) == len(
        sequence["doc_lengths"])

    assert main(["merge", "--output-prefix", f"{out}/all", f"{out}/code", f"{out}/docs"]) == 0
    merged = IndexedReader(f"{out}/all")
    code, docs = IndexedReader(f"{out}/code"), IndexedReader(f"{out}/docs")
    assert len(merged) == len(code) + len(docs)
    assert np.array_equal(merged.tokens, np.concatenate([code.tokens, docs.tokens]))

    assert main(["sft", "--input", os.path.join(SAMPLE, "chat.jsonl"), "--output", f"{out}/sft",
                 "--tokenizer", llama3_model, "--seq-length", "4096"]) == 0
    assert PackedDataset(f"{out}/sft")[0].loss_mask is not None


def test_preprocess_with_a_hugging_face_folder_points_to_the_faster_rank_file(tmp_path, capsys,
                                                                            llama3_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n')
    assert main(["preprocess", "--input", str(data), "--output-prefix", str(tmp_path / "o"),
                 "--tokenizer", llama3_dir, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"--tokenizer {os.path.join(llama3_dir, 'tokenizer.model')} gives the same ids" in out


def test_mix_with_zero_weights_fails_naming_the_recipe(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "zero.yaml", 4096, [{"path": "a", "weight": 0}])
    assert main(["mix", recipe, "--output", str(tmp_path / "o")]) == 2
    assert "zero.yaml: the source weights sum to 0.0" in capsys.readouterr().err


# Bad input to every command: exit code 2, a message naming the value and the fix, and nothing
# written: the workspace (inputs and the outputs of an earlier good run at the same paths) is
# byte for byte what it was before.
CHAT = {"messages": [{"role": "user", "content": "What is 2 + 2?"},
                     {"role": "assistant", "content": "2 + 2 = 4."}]}
RECIPE = "seq_length: {length}\nsources:\n  - {{path: data, weight: 1}}\n"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, llama3_model):
    """Inputs under in/, and out/ holding a dataset, an SFT folder and a mixture built from them."""
    root = tmp_path_factory.mktemp("workspace")
    inputs = root / "in"
    inputs.mkdir()
    (inputs / "empty.jsonl").write_bytes(b"")
    (inputs / "blank.jsonl").write_bytes(b"\n  \n\n")
    (inputs / "bad.jsonl").write_bytes(b'{"text": "cut\n[1, 2]\n')
    (inputs / "two.jsonl").write_text('{"text": "hello world", "repo": "a"}\n'
                                      '{"text": "second line", "repo": "a"}\n')
    (inputs / "chat.jsonl").write_text(json.dumps(CHAT) + "\n")
    for name, length in (("float", "512.5"), ("text", "abc"), ("zero", "0"), ("good", "4")):
        (inputs / f"r_{name}.yaml").write_text(RECIPE.format(length=length))
    out = root / "out"
    assert main(["preprocess", "--input", str(inputs / "two.jsonl"), "--output-prefix",
                 str(out / "data"), "--tokenizer", llama3_model, "--quiet"]) == 0
    assert main(["sft", "--input", str(inputs / "chat.jsonl"), "--output", str(out / "sft"),
                 "--tokenizer", llama3_model, "--seq-length", "64"]) == 0
    assert main(["mix", str(inputs / "r_good.yaml"), "--output", str(out / "packed"),
                 "--data-root", str(out)]) == 0
    assert main(["preprocess", "--input", str(inputs / "empty.jsonl"), "--output-prefix",
                 str(out / "empty"), "--tokenizer", llama3_model, "--quiet", "--allow-empty"]) == 0
    _damaged_inputs(inputs, out)
    return root


def _damaged_inputs(inputs, out):
    """Bad inputs beside the good ones: damaged indexes, a garbage tokenizer.json, MDS sources
    with nothing to import, an existing dataset whose summary is a folder."""
    index = (out / "data.idx").read_bytes()
    for name, idx in (("dtype99", index[:17] + bytes([99]) + index[18:]), ("short", index[:12]),
                      ("cut", index[:-8])):
        (inputs / f"{name}.idx").write_bytes(idx)
        (inputs / f"{name}.bin").write_bytes((out / "data.bin").read_bytes())
    (inputs / "badtok").mkdir()
    (inputs / "badtok" / "tokenizer.json").write_text("this is not a tokenizer {")
    (inputs / "mds-no-shards").mkdir()
    (inputs / "mds-no-shards" / "index.json").write_text('{"shards": [], "version": 2}')
    write_mds_part(inputs / "mds-empty-ranges", [{"input_ids": [1, 2, 3, 4], "indices": [[2, 2]]}],
                   {"input_ids": "ndarray:uint32:4", "indices": "ndarray:uint32:1,2"})
    for suffix in (".bin", ".idx"):
        (inputs / f"old{suffix}").write_bytes((out / f"data{suffix}").read_bytes())
    (inputs / "old.summary.json").mkdir()
    (inputs / "taken.bin").mkdir()


def _tree(root):
    """{relative path: bytes} of every file under root (folders as None)."""
    tree = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            tree[os.path.relpath(path, root)] = (None if os.path.isdir(path)
                                                 else open(path, "rb").read())
    return tree


def _preprocess(input_name, *extra):
    return ["preprocess", "--input", "{w}/in/" + input_name, "--output-prefix", "{w}/out/data",
            "--tokenizer", "{tok}", "--quiet", *extra]


def _sft(input_name, length, *extra):
    return ["sft", "--input", "{w}/in/" + input_name, "--output", "{w}/out/sft", "--tokenizer",
            "{tok}", "--seq-length", str(length), *extra]


def _mix(recipe, *extra):
    return ["mix", "{w}/in/" + recipe, "--output", "{w}/out/packed", "--data-root", "{w}/out",
            *extra]


def _cores():
    from data_tools.preprocess import usable_cpu_cores

    return usable_cpu_cores()


BAD_RUNS = [
    ("empty input", _preprocess("empty.jsonl"),
     r"no document to write from \S*empty.jsonl: they hold no record \(empty files or blank "
     r"lines only\); check --input, or pass --allow-empty to write an empty dataset"),
    ("blank lines only", _preprocess("blank.jsonl"), r"blank.jsonl: they hold no record"),
    ("every record bad and skipped", _preprocess("bad.jsonl", "--skip-bad"),
     r"all records \(2\) were bad and skipped \(first: \S*bad.jsonl:1: malformed JSON"),
    ("every document filtered", _preprocess("two.jsonl", "--min-tokens", "1000"),
     r"all documents \(2\) are shorter than --min-tokens 1000; lower --min-tokens, or pass "
     r"--allow-empty"),
    ("every group filtered", _preprocess("two.jsonl", "--min-tokens", "1000", "--group-by", "repo"),
     r"all documents \(1\) are shorter than --min-tokens 1000"),
    ("no workers", _preprocess("two.jsonl", "--workers", "0"),
     r"--workers 0: give at least 1 \(the number of tokenizer processes\)"),
    ("negative workers", _preprocess("two.jsonl", "--workers", "-3"), r"--workers -3: give at least 1"),
    ("too many workers", _preprocess("two.jsonl", "--workers", str(100 * _cores())),
     rf"--workers {100 * _cores()} is far above the {_cores()} CPU cores this process may use; "
     rf"tokenizing is CPU-bound, so give at most {2 * _cores()} \(2 per core\)"),
    ("negative min tokens", _preprocess("two.jsonl", "--min-tokens", "-1"),
     r"--min-tokens -1: a document length cannot be negative; give 0 \(keep every document\)"),
    ("sft empty input", _sft("empty.jsonl", 64),
     r"no sequence to write from \S*empty.jsonl: they hold no record .* or pass --allow-empty"),
    ("sft every conversation too long", _sft("chat.jsonl", 8),
     r"all conversations \(1\) are longer than --seq-length 8 tokens \(the shortest has 2\d\); "
     r"raise --seq-length"),
    ("sft zero seq length", _sft("chat.jsonl", 0),
     r"--seq-length 0: give a positive number of tokens per sequence, e.g. --seq-length 65536"),
    ("sft negative seq length", _sft("chat.jsonl", -5), r"--seq-length -5: give a positive"),
    ("mix fractional seq_length", _mix("r_float.yaml"),
     r"r_float.yaml: seq_length must be a whole number, not 512.5; use 512 or 513"),
    ("mix text seq_length", _mix("r_text.yaml"),
     r"r_text.yaml: seq_length must be a whole number, not 'abc'"),
    ("mix zero seq_length", _mix("r_zero.yaml"), r"r_zero.yaml: seq_length is 0; it must be at least 1"),
    ("mix zero --seq-length", _mix("r_good.yaml", "--seq-length", "0"),
     r"r_good.yaml: --seq-length is 0; it must be at least 1"),
    ("merge into one of its inputs", ["merge", "--output-prefix", "{w}/out/data", "{w}/out/data",
                                      "{w}/out/data"],
     r"--output-prefix \S*out/data is the input \S*out/data: merging a dataset into itself"),
    ("preprocess under a file", ["preprocess", "--input", "{w}/in/two.jsonl", "--output-prefix",
                                 "{w}/in/two.jsonl/sub/data", "--tokenizer", "{tok}", "--quiet"],
     r"--output-prefix \S*two.jsonl/sub/data: \S*in/two.jsonl is a file, not a folder, so "
     r"nothing can be written under it"),
    ("merge under a file", ["merge", "--output-prefix", "{w}/in/two.jsonl/all", "{w}/out/data"],
     r"\S*in/two.jsonl is a file, not a folder"),
    ("sft under a file", ["sft", "--input", "{w}/in/chat.jsonl", "--output", "{w}/in/two.jsonl/s",
                          "--tokenizer", "{tok}", "--seq-length", "64"],
     r"--output \S*two.jsonl/s: \S*in/two.jsonl is a file, not a folder"),
    ("mix under a file", ["mix", "{w}/in/r_good.yaml", "--output", "{w}/in/two.jsonl/p",
                          "--data-root", "{w}/out"], r"\S*in/two.jsonl is a file, not a folder"),
    ("mix output is a file", ["mix", "{w}/in/r_good.yaml", "--output", "{w}/in/two.jsonl",
                              "--data-root", "{w}/out"],
     r"\S*in/two.jsonl is a file, where the dataset folder would be written"),
    ("import-mds under a file", ["import-mds", MDS_PART, "--output-prefix", "{w}/in/two.jsonl/d",
                                 "--quiet"],
     r"--output-prefix \S*two.jsonl/d: \S*in/two.jsonl is a file, not a folder"),
    ("import-mds .bin is a folder", ["import-mds", MDS_PART, "--output-prefix", "{w}/in/taken",
                                     "--quiet"],
     r"--output-prefix \S*in/taken: \S*in/taken.bin is a folder, where a file would be written"),
    ("import-mds summary is a folder", ["import-mds", MDS_PART, "--output-prefix", "{w}/in/old",
                                        "--quiet"],
     r"\S*in/old.summary.json is a folder, where a file would be written"),
    ("import-mds no shards", ["import-mds", "{w}/in/mds-no-shards", "--output-prefix",
                              "{w}/out/m", "--quiet"],
     r"no document to write from \S*mds-no-shards: its index.json files list no shards, or "
     r"pass --allow-empty"),
    ("import-mds only empty ranges", ["import-mds", "{w}/in/mds-empty-ranges", "--output-prefix",
                                      "{w}/out/m", "--quiet"],
     r"mds-empty-ranges: every \[start, end\) range of its 1 samples is empty \(1 empty ranges\)"
     r".* or pass --allow-empty"),
    ("inspect past the end", ["inspect", "{w}/out/data", "99999"],
     r"document 99999: the dataset \S*out/data holds 2 documents, numbered 0 to 1; give a "
     r"document number in that range"),
    ("inspect negative", ["inspect", "{w}/out/data", "-44"],
     r"document -44: the dataset \S*out/data holds 2 documents"),
    ("inspect an empty dataset", ["inspect", "{w}/out/empty", "0"],
     r"document 0: the dataset \S*out/empty holds no documents, there is nothing to inspect"),
    ("inspect a packed sequence past the end", ["inspect", "{w}/out/packed", "99999"],
     r"sequence 99999: the packed dataset \S*out/packed holds \d+ sequences, numbered 0 to"),
    ("index dtype code 99", ["inspect", "{w}/in/dtype99", "0"],
     r"\S*in/dtype99.idx: token dtype code 99 is not one of the index format's \(1, 2, .*\): "
     r"the index is damaged; rebuild the dataset"),
    ("index of 12 bytes", ["stats", "{w}/in/short"],
     r"\S*in/short.idx: 12 bytes, shorter than the 34-byte header of a Megatron index: the file "
     r"is cut short; rebuild"),
    ("index cut short", ["merge", "--output-prefix", "{w}/out/m", "{w}/in/cut"],
     r"\S*in/cut.idx: \d+ bytes, but its header's 2 documents need \d+: the index is damaged"),
    ("garbage tokenizer.json", ["preprocess", "--input", "{w}/in/two.jsonl", "--output-prefix",
                                "{w}/out/x", "--tokenizer", "{w}/in/badtok", "--quiet"],
     r"\S*badtok/tokenizer.json cannot be read as a Hugging Face tokenizer.json \(.*\): the file "
     r"is damaged or not a tokenizer"),
    ("garbage tokenizer.json for inspect", ["inspect", "{w}/out/data", "0", "--tokenizer",
                                            "{w}/in/badtok"],
     r"badtok/tokenizer.json cannot be read as a Hugging Face tokenizer.json"),
]


@pytest.mark.parametrize("argv,message", [c[1:] for c in BAD_RUNS], ids=[c[0] for c in BAD_RUNS])
def test_bad_input_exits_2_naming_the_value_and_writes_nothing(tmp_path, capsys, workspace,
                                                               llama3_model, argv, message):
    import re
    import shutil

    w = tmp_path / "w"
    shutil.copytree(workspace, w)
    before = _tree(w)
    code = main([a.format(w=w, tok=llama3_model) for a in argv])
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert re.search(message, captured.err), captured.err
    assert "Traceback" not in captured.err
    assert _tree(w) == before  # nothing new, nothing half-written, the earlier outputs intact


def test_allow_empty_writes_an_empty_dataset(tmp_path, capsys, llama3_model):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert main(["preprocess", "--input", str(empty), "--output-prefix", str(tmp_path / "e"),
                 "--tokenizer", llama3_model, "--quiet", "--allow-empty"]) == 0
    assert len(IndexedReader(str(tmp_path / "e"))) == 0
    summary = json.load(open(tmp_path / "e.summary.json"))
    assert summary["documents"] == 0 and summary["max_token_id"] is None
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps(CHAT) + "\n")
    assert main(["sft", "--input", str(chat), "--output", str(tmp_path / "s"), "--tokenizer",
                 llama3_model, "--seq-length", "8", "--allow-empty"]) == 0
    assert len(PackedDataset(str(tmp_path / "s"))) == 0
    assert "dropped: 1 too long" in capsys.readouterr().out


def _read_only_folder_runner(tmp_path):
    """A command prefix that runs a shell command with tmp_path/ro mounted read-only, or None.

    Tests run as root, whom permission bits (chmod 0o555) do not stop; a read-only tmpfs in a
    private mount namespace (unshare) refuses root as well and vanishes with the process.
    """
    import shutil

    (tmp_path / "ro").mkdir()
    if os.geteuid() != 0:
        os.chmod(tmp_path / "ro", 0o555)
        return lambda script: ["sh", "-c", script]
    if shutil.which("unshare") is None:
        return None
    mount = f"mount -t tmpfs none {tmp_path}/ro && mount -o remount,ro {tmp_path}/ro && "
    for flags in (["--mount"], ["--user", "--map-root-user", "--mount"]):
        probe = subprocess.run(["unshare", *flags, "sh", "-c", mount + f"! touch {tmp_path}/ro/x"],
                               capture_output=True, timeout=60)
        if probe.returncode == 0:
            return lambda script, flags=flags: ["unshare", *flags, "sh", "-c", mount + script]
    return None


def test_a_read_only_output_folder_is_named_and_nothing_is_written(tmp_path, workspace,
                                                                   llama3_model):
    runner = _read_only_folder_runner(tmp_path)
    if runner is None:
        pytest.skip("this environment cannot make a read-only folder (no unshare/mount)")
    w, ro = workspace, tmp_path / "ro"
    commands = {
        "preprocess": f"preprocess --input {w}/in/two.jsonl --output-prefix {ro}/sub/data "
                      f"--tokenizer {llama3_model} --quiet",
        "merge": f"merge --output-prefix {ro}/all {w}/out/data {w}/out/data",
        "sft": f"sft --input {w}/in/chat.jsonl --output {ro}/sft --tokenizer {llama3_model} "
               f"--seq-length 64",
        "mix": f"mix {w}/in/r_good.yaml --output {ro}/packed --data-root {w}/out",
    }
    env = f"cd {REPO} && PYTHONPATH={os.path.abspath(REPO)} "
    script = "; ".join(f"{env}{sys.executable} -m data_tools {c} 2>{tmp_path}/{n}.err; "
                       f"echo $? > {tmp_path}/{n}.rc; ls -A {ro} > {tmp_path}/{n}.ls"
                       for n, c in commands.items())
    subprocess.run(runner(script), check=True, timeout=600)
    for name in commands:
        err = (tmp_path / f"{name}.err").read_text()
        assert (tmp_path / f"{name}.rc").read_text().strip() == "2", err
        assert f"cannot create files in {ro}: it is on a read-only file system" in err or (
            os.geteuid() != 0 and f"cannot create files in {ro}: Permission denied" in err), err
        assert "Traceback" not in err
        assert (tmp_path / f"{name}.ls").read_text() == ""
