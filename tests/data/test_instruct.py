"""Instruction data for SFT: chat templates (the default one, a Hugging Face
tokenizer_config.json's), the JSON-lines shapes of `local_instruct` and their errors,
and `shakespeare_instruct` (three checkable tasks, split by scene as `shakespeare`)."""

import collections
import json

import pytest

from llmjax import cli
from llmjax.data import chat, datasets
from llmjax.data.tfds_builders import local_instruct
from llmjax.errors import UserError
from llmjax.train import metrics as metrics_lib

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt "
          "%}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TURNS = [{"role": "system", "content": "Answer briefly."},
         {"role": "user", "content": "Who wrote Hamlet?"},
         {"role": "assistant", "content": "Shakespeare."},
         {"role": "user", "content": "And Othello?"},
         {"role": "assistant", "content": "Shakespeare too."}]


def _write_jsonl(path, lines):
  path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                          for line in lines), encoding="utf-8")


def test_default_template():
  prompt, response = chat.render(TURNS[1:3])
  assert prompt == "### User:\nWho wrote Hamlet?\n\n### Assistant:\n"
  assert response == "Shakespeare."
  prompt, response = chat.render(TURNS)  # earlier turns stay in the prompt
  assert prompt == ("Answer briefly.\n\n### User:\nWho wrote Hamlet?\n\n### Assistant:\n"
                    "Shakespeare.\n\n### User:\nAnd Othello?\n\n### Assistant:\n")
  assert response == "Shakespeare too."


def test_template_from_a_tokenizer_config_matches_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  tokenizers = pytest.importorskip("tokenizers")
  (tmp_path / "hf_tokenizer").mkdir()
  (tmp_path / "hf_tokenizer" / "tokenizer_config.json").write_text(
      json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
  source = chat.load_template(str(tmp_path))  # an imported workdir: hf_tokenizer/...
  assert source == CHATML
  prompt, response = chat.render(TURNS, chat.compile_template(source))
  word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, chat_template=CHATML)
  assert prompt == hf.apply_chat_template(TURNS[:-1], tokenize=False, add_generation_prompt=True)
  assert prompt + response == hf.apply_chat_template(TURNS, tokenize=False)
  assert response == "Shakespeare too.<|im_end|>\n"


def test_template_errors_and_eos_as_an_id(tmp_path):
  # `eos_token` renders empty: the objective appends EOS as an id, not as text.
  llama = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
           "{{ m['content'] }} [/INST]{% elif m['role'] == 'assistant' %} {{ m['content'] }}"
           "{{ eos_token }}{% else %}{{ raise_exception('no system turns') }}{% endif %}"
           "{% endfor %}")
  template = chat.compile_template(llama)
  assert chat.render(TURNS[1:3], template) == ("[INST] Who wrote Hamlet? [/INST]",
                                               " Shakespeare.")
  with pytest.raises(UserError, match="no system turns"):
    chat.render(TURNS, template)
  with pytest.raises(UserError, match="SecurityError"):  # the sandbox holds
    chat.render(TURNS, chat.compile_template("{{ messages.append(1) }}"))
  with pytest.raises(UserError, match="does not parse"):
    chat.compile_template("{% for %}")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
  with pytest.raises(UserError, match="no 'chat_template'"):
    chat.load_template(str(tmp_path / "tokenizer_config.json"))


def test_jsonl_shapes(tmp_path):
  _write_jsonl(tmp_path / "mine.jsonl", [
      {"prompt": "Who wrote Hamlet?", "response": "Shakespeare.", "task": "author"},
      {"instruction": "Name the play.", "input": "To be, or not to be", "output": "Hamlet"},
      {"instruction": "Say hi.", "output": "Hi."},
      "",
      {"messages": TURNS}])
  examples = [e for _, e in local_instruct.read_examples(str(tmp_path))]
  assert [e["source"] for e in examples] == ["mine.jsonl:1", "mine.jsonl:2", "mine.jsonl:3",
                                             "mine.jsonl:5"]
  assert (examples[0]["prompt"], examples[0]["response"]) == chat.render(TURNS[1:3])
  assert examples[0]["task"] == "author" and examples[1]["task"] == ""
  assert examples[1]["prompt"] == ("### User:\nName the play.\n\nTo be, or not to be\n\n"
                                   "### Assistant:\n")
  assert examples[2]["prompt"] == "### User:\nSay hi.\n\n### Assistant:\n"
  assert (examples[3]["prompt"], examples[3]["response"]) == chat.render(TURNS)
  assert all(e["text"] == e["prompt"] + e["response"] for e in examples)


@pytest.mark.parametrize("line, match", [
    ('{"prompt": "no response"', "not valid JSON"),
    ('{"question": "q", "answer": "a"}', "match no known shape"),
    ('["prompt", "response"]', "not a JSON object"),
    ('{"prompt": "q", "response": 3}', "'response' is int"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "ends with a 'user' turn"),
    ('{"messages": [{"role": "bot", "content": "q"}]}', "each message needs a role"),
])
def test_malformed_line_names_file_line_and_shapes(tmp_path, line, match):
  path = tmp_path / "data.jsonl"
  _write_jsonl(path, [{"prompt": "fine", "response": "yes"}, "", line])
  with pytest.raises(UserError, match=match) as e:
    local_instruct.read_examples(str(tmp_path))
  assert f"{path}:3" in str(e.value)
  shapes = ("prompt", "instruction", "messages") if "messages" not in line else ("assistant",)
  assert all(word in str(e.value) for word in shapes)


def test_local_instruct_dataset_uses_the_folder_template(tmp_path, data_dir):
  folder = tmp_path / "data"
  folder.mkdir()
  _write_jsonl(folder / "train.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"}
                                        for i in range(5)])
  _write_jsonl(folder / "validation.jsonl", [{"instruction": "q", "output": "a"}])
  (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
  train = datasets.get_source("local_instruct", "train", data_dir, input_dir=str(folder))
  assert len(train) == 5 and train[0]["prompt"] == (
      "<|im_start|>user\nq0<|im_end|>\n<|im_start|>assistant\n")
  assert train[0]["response"] == "a0<|im_end|>\n"
  assert len(datasets.get_source("local_instruct", "validation", data_dir,
                                 input_dir=str(folder))) == 1
  with pytest.raises(UserError, match="DataConfig.input_dir"):
    datasets.get_source("local_instruct", "train", data_dir)


@pytest.fixture(scope="module")
def instruct(data_dir):
  return {split: datasets.get_source("shakespeare_instruct", split, data_dir)
          for split in ("train", "validation", "test")}


def test_shakespeare_instruct_tasks_and_split_by_scene(instruct, data_dir):
  tasks = collections.Counter(instruct["train"][i]["task"] for i in range(len(instruct["train"])))
  assert set(tasks) == {"speaker", "play", "next_line"} and min(tasks.values()) > 1000
  scene_split = {}
  for split in ("train", "validation", "test"):
    scenes = datasets.get_source("shakespeare", split, data_dir)
    for i in range(len(scenes)):
      s = scenes[i]
      scene_split[(s["play"], s["act"], s["scene"])] = (split, s)
  for split, source in instruct.items():
    for i in range(len(source)):
      e = source[i]
      assert scene_split[(e["play"], e["act"], e["scene"])][0] == split
      assert set(e) >= {"prompt", "response", "task"} and e["prompt"].endswith(
          "### Assistant:\n")


def test_shakespeare_instruct_answers_are_checkable(instruct, data_dir):
  scenes = {}
  for split in ("validation", "test"):
    source = datasets.get_source("shakespeare", split, data_dir)
    for i in range(len(source)):
      scenes[(source[i]["play"], source[i]["act"], source[i]["scene"])] = source[i]
  seen = collections.Counter()
  for split in ("validation", "test"):
    for i in range(len(instruct[split])):
      e = instruct[split][i]
      scene = scenes[(e["play"], e["act"], e["scene"])]
      assert f"{e['line']}\n" in e["prompt"]
      speeches = scene["speeches"]  # a sequence of dicts reads as a dict of lists
      lines = [(speaker, [x.strip() for x in text.split("\n") if x.strip()])
               for speaker, text in zip(speeches["speaker"], speeches["text"])]
      where = [(speaker, ls, ls.index(e["line"])) for speaker, ls in lines if e["line"] in ls]
      assert len(where) == 1  # the line occurs once: the answer is the only right one
      speaker, ls, at = where[0]
      want = {"speaker": speaker, "play": scene["play"],
              "next_line": ls[at + 1] if at + 1 < len(ls) else None}[e["task"]]
      assert e["response"] == want
      seen[e["task"]] += 1
  assert min(seen.values()) > 50


def test_sft_on_local_jsonl_from_the_command_line(tmp_path, data_dir):
  """`llmjax train` reaches local_instruct through --gin_param."""
  folder = tmp_path / "data"
  folder.mkdir()
  rows = [{"instruction": "Who speaks?", "input": f"line {i}", "output": f"KING {i % 3}"}
          for i in range(40)]
  _write_jsonl(folder / "train.jsonl", rows)
  _write_jsonl(folder / "validation.jsonl", rows[:8])
  workdir = str(tmp_path / "run")
  params = ["DataConfig.dataset='local_instruct'", f"DataConfig.input_dir='{folder}'",
            f"DataConfig.data_dir={data_dir!r}", "TrainConfig.init_from=None",
            "train.model=@get_preset()", "get_preset.name='tiny'", "TrainConfig.num_steps=3",
            "TokenizerSpec.model_type='char'", "TokenizerSpec.vocab_size=None"]
  argv = ["train", "--gin_file=runs/sft_debug.gin", f"--workdir={workdir}"]
  assert cli.main(argv + [f"--gin_param={p}" for p in params]) == 0
  train = [r for r in metrics_lib.read_metrics(workdir) if "loss" in r]
  assert train and train[-1]["step"] == 3 and 0 < train[-1]["tokens"]
