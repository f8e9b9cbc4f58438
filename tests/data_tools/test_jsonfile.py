"""read_json_object, which every reader of a JSON object file shares: each way a file can fail
is the caller's error, naming the file, the problem and the caller's fix."""
import pytest

from data_tools.jsonfile import read_json_object


class CallersError(Exception):
    pass


@pytest.mark.parametrize("content, problem", [
    ("{oops", "is not valid JSON (Expecting property name"),
    ("[1, 2]", "holds a JSON list, not a JSON object"),
    ("7", "holds a JSON int, not a JSON object"),
    (b"\xff\xfe{}", "is not valid JSON ('utf-8' codec can't decode"),
], ids=["garbage", "list", "number", "not_utf8"])
def test_a_file_that_is_not_one_object_is_the_callers_error(tmp_path, content, problem):
    path = tmp_path / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CallersError) as caught:
        read_json_object(path, "export it again", CallersError)
    assert str(caught.value).startswith(f"{path} {problem}"), caught.value
    assert str(caught.value).endswith("; export it again")


def test_an_unreadable_path_names_the_reason_and_the_fix(tmp_path):
    with pytest.raises(CallersError, match=rf"^{tmp_path} cannot be read \(Is a directory\); "
                                           rf"check that it is a readable file, or fix it$"):
        read_json_object(tmp_path, "fix it", CallersError)
    with pytest.raises(CallersError, match="No such file or directory"):
        read_json_object(tmp_path / "missing.json", "fix it", CallersError)


def test_an_object_is_returned_as_read(tmp_path):
    (tmp_path / "state.json").write_text('{"step": 4, "model_config": {"num_layers": 2}}')
    assert read_json_object(tmp_path / "state.json", "unused") == {
        "step": 4, "model_config": {"num_layers": 2}}
