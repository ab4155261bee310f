import json

import pytest

from thresher.data import DataError, default_texts, load_texts, read_texts, token_windows


def test_default_splits_are_disjoint_real_english():
    calibration, evaluation = default_texts("calibration"), default_texts("evaluation")
    assert len(calibration) > 50 and len(evaluation) > 15
    assert not set(calibration) & set(evaluation)
    assert sum(len(t) for t in evaluation) > 300_000  # enough for 20k+ held-out tokens
    assert " the " in evaluation[0] and "[[" not in evaluation[0] and "'''" not in evaluation[0]


def test_txt_paragraphs(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph.\nstill first.\n\n\nSecond one.\n")
    assert read_texts(path) == ["First paragraph.\nstill first.", "Second one."]


def test_a_users_file_is_split_like_the_embedded_text(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("\n\n".join(f"paragraph {i}" for i in range(8)))
    calibration, evaluation = load_texts(path, "calibration"), load_texts(path, "evaluation")
    assert evaluation == ["paragraph 3", "paragraph 7"]
    assert sorted(calibration + evaluation) == sorted(read_texts(path))
    path.write_text("one\n\ntwo\n\nthree")
    with pytest.raises(DataError, match="3 text.*at least 4"):
        load_texts(path, "calibration")


def test_jsonl_text_and_chat_messages(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [{"text": "plain text"},
             {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    assert read_texts(path) == ["plain text", "hi\n\nhello"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"text": "ok"}\n{not json}\n', r"bad.jsonl:2: not valid JSON"),
        ("wrong.jsonl", '{"title": "no text"}\n', r"wrong.jsonl:1: expected an object with a 'text'"),
        ("empty.txt", "\n\n", "holds no text"),
        ("data.csv", "a,b\n", "must be .txt or .jsonl"),
    ],
)
def test_bad_files_name_what_is_wrong(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_texts(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_texts(tmp_path / "absent.txt")


class _CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_token_windows_are_full_and_bounded():
    windows = list(token_windows(["abcdef", "ghij"], _CharTokenizer(), window=4, max_tokens=8))
    assert windows == [[97, 98, 99, 100], [101, 102, 0, 103]]


def test_token_windows_start_at_the_offset_across_texts():
    # "abc" + EOS is 4 tokens, so an offset of 5 starts at the second letter of the second text
    windows = list(token_windows(["abc", "defgh"], _CharTokenizer(), window=2, max_tokens=4, offset=5))
    assert windows == [[101, 102], [103, 104]]
