"""lora-ext train: the demo and JSONL datasets run, write PEFT adapters and the loss report, and
refuse bad datasets clearly."""

import json
import os

import pytest
import torch

import lora_ext
from lora_ext.finetune.main import main as train_main
from tiny_models import build_model


def test_demo_runs_and_writes_adapters_and_report(tmp_path, capsys):
    code = train_main(["--steps", "3", "--rank", "4", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code in (0, 1)  # three steps do not solve the tasks; the report says so
    assert "accuracy of each adapter" in out and '"__base__" rows unchanged by training: True' in out
    history = json.loads((tmp_path / "loss.json").read_text())
    assert sorted(history) == ["alpha", "beta", "gamma"] and all(len(v) == 3 for v in history.values())
    assert (tmp_path / "loss.png").stat().st_size > 0 and "first loss" in (tmp_path / "loss.txt").read_text()
    from lora_ext.bench.synthetic import build_default_model

    mm = lora_ext.patch_model(build_default_model(torch.float32, "cpu"), max_adapters=3, max_rank=4)
    for name in history:
        mm.load_adapter(name, tmp_path / name)


def tiny_model_dir(tmp_path):
    """A tiny Llama and a word-level tokenizer saved as a local Hugging Face model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "hello", "world", "sql", "select", "from", "table", "chat", "hi", "there"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>")
    directory = tmp_path / "model"
    build_model("llama").save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_datasets_train_one_adapter_each(tmp_path):
    model = tiny_model_dir(tmp_path)
    sql = write_jsonl(tmp_path / "sql.jsonl", [{"prompt": "sql", "completion": "select from table"}] * 3)
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"text": "hi there hello world"}, {"text": "hello there"}])
    out = tmp_path / "out"
    assert train_main(["--model", str(model), "--data", f"sql={sql}", f"chat={chat}", "--steps", "2", "--rank", "4",
                       "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["chat", "loss.json", "loss.png", "loss.txt", "sql"]
    config = json.loads((out / "sql" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4


@pytest.mark.parametrize("line,pattern", [("{oops", r"line 1 is not JSON"),
                                          ('{"prompt": "sql"}', r"line 1 must be an object with a string 'text'")])
def test_bad_dataset_lines_refused(tmp_path, line, pattern):
    model = tiny_model_dir(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(line + "\n")
    with pytest.raises(lora_ext.AdapterError, match=rf"dataset 'x': .*bad.jsonl {pattern}"):
        train_main(["--model", str(model), "--data", f"x={bad}", "--steps", "1", "--out", str(tmp_path / "o")])


def test_bad_arguments_refused(capsys):
    with pytest.raises(SystemExit):
        train_main(["--data", "x=y.jsonl"])
    assert "--data needs --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main(["--rank", "0"])
