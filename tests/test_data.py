import pytest
from conftest import make_tokenizer, write_jsonl

from qlora_rt.errors import QloraError
from qlora_rt.train.text_data import IGNORE, Order, collate, count_targets, read_examples, tokenize

TOK = make_tokenizer()


def decoded_targets(ex) -> str:
    return TOK.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE])


def test_messages_loss_only_on_assistant_turns_including_turn_end():
    row = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"},
                        {"role": "assistant", "content": "world"}]}
    ex = tokenize(row, TOK, 512)
    assert decoded_targets(ex) == "hello<|im_end|>\nworld<|im_end|>\n"
    assert len(ex.input_ids) == len(ex.labels)


def test_prompt_completion_and_text():
    ex = tokenize({"prompt": "the capital of france? ", "completion": "paris."}, TOK, 512)
    assert decoded_targets(ex) == "paris.<|im_end|>"
    ex = tokenize({"text": "hello world"}, TOK, 512)
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == TOK.eos_token_id


def test_truncation_and_collate_padding():
    a = tokenize({"text": "one two three four five six seven"}, TOK, 4)
    b = tokenize({"text": "one"}, TOK, 4)
    assert len(a.input_ids) == 4
    batch = collate([a, b], TOK.pad_token_id)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["attention_mask"][1].tolist() == [1] * len(b.input_ids) + [0] * (4 - len(b.input_ids))
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    assert count_targets(batch) == 3 + len(b.input_ids) - 1


@pytest.mark.parametrize("line,message", [
    ("{not json", r"bad.jsonl:2: not valid JSON"),
    ('["a"]', r"bad.jsonl:2: expected a JSON object"),
    ('{"foo": 1}', r"bad.jsonl:2: expected a 'text', 'prompt'\+'completion' or 'messages' field"),
    ('{"prompt": "x"}', r"bad.jsonl:2: 'completion' must be a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"bad.jsonl:2: 'messages' has no assistant turn"),
    ('{"messages": [{"role": "user"}]}', r"bad.jsonl:2: messages\[0\] must be an object"),
    ('{"text": ""}', r"bad.jsonl:2: 'text' must be a non-empty string"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(QloraError, match=message):
        read_examples(p)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(QloraError, match="no examples"):
        read_examples(tmp_path / "e.jsonl")
    with pytest.raises(QloraError, match="does not exist"):
        read_examples(tmp_path / "missing.jsonl")


def test_order_is_a_resumable_stream():
    full = Order(5, seed=3).take(13)
    part = Order(5, seed=3)
    head = part.take(7)
    rest = Order(5, seed=3, **part.state()).take(6)
    assert head + rest == full
    assert sorted(full[:5]) == list(range(5)) and full[:5] != full[5:10]


def test_bad_files_name_the_flag_file_line_and_column(tmp_path):
    with pytest.raises(QloraError, match=r"^--eval-data: .*nope.jsonl does not exist$"):
        read_examples(tmp_path / "nope.jsonl", "--eval-data")
    with pytest.raises(QloraError, match=r"^--data: .* is a folder; expected a JSONL file"):
        read_examples(tmp_path)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(
        QloraError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at column 14\); save the file as UTF-8"
    ):
        read_examples(latin1)
    comma = tmp_path / "comma.jsonl"
    comma.write_text('{"text": "ok"}\n{"text": "a", "b": 1,}\n')
    with pytest.raises(
        QloraError,
        match=r"comma.jsonl:2: not valid JSON \(Expecting property name enclosed in double "
        r"quotes at column 22, near '\"a\", \"b\": 1,}'\)",
    ):
        read_examples(comma)


def test_a_byte_order_mark_is_read_as_utf8(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes('{"text": "héllo"}\n'.encode("utf-8-sig"))
    assert read_examples(bom) == [{"text": "héllo"}]


def test_ignored_fields_and_unknown_roles_are_counted_once(tmp_path, capsys):
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0, "id": 7},
            {"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"},
                          {"role": "assistant", "content": "z"}]}, {"prompt": "p", "completion": "c"}]
    read_examples(write_jsonl(tmp_path / "odd.jsonl", rows))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: ignored field 'label' on 2 lines, role 'bot' on 1 line" in err
    read_examples(write_jsonl(tmp_path / "clean.jsonl", rows[-1:]))
    assert capsys.readouterr().err == ""
