"""``align chat`` and ``align generate``: a run's final model or newest checkpoint, a model or
LoRA adapter directory; the conversation's history through the chat template (and /clear);
streaming, Ctrl-C stopping one reply; greedy completions equal to ``model.generate``'s; prompt
files read as align run reads them; clear errors before torch is imported; a pseudo-terminal."""

from __future__ import annotations

import json
import logging
import os
import pty
import select
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import torch
from click.testing import CliRunner
from test_cli_errors import run_in_one_process  # command lines in a fresh process, offline
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.cli import cli
from align.tools import chat as tools

PROMPT = "What is 7 + 12?"


def _cli(*args, input=None, expect=0):
    result = CliRunner().invoke(cli, [str(a) for a in args], input=input)
    assert result.exit_code == expect, result.output + repr(result.exception)
    assert "Traceback" not in result.output
    return result


def _train(out, *args):
    _cli("run", "--max-steps", 3, "--save-every", 1, "--output-dir", out, *args)
    return out


def _greedy(model, tokenizer, messages, max_new_tokens):
    """``model.generate`` run greedily on the chat template's rendering, independently."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(ids, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


class Recorder:
    """Records the prompt ids of each streamed reply and its completion."""

    def __init__(self, monkeypatch):
        self.prompts, self.completions = [], []
        stream = tools.Completer.stream

        def recorded(completer, prompt, on_text, on_start=None):
            self.prompts.append(list(prompt))
            completion = stream(completer, prompt, on_text, on_start)
            self.completions.append(completion)
            return completion

        monkeypatch.setattr(tools.Completer, "stream", recorded)


def _template_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def test_chat_through_stdin_streams_and_keeps_the_history(tmp_path, monkeypatch):
    out = _train(tmp_path / "run")
    record = Recorder(monkeypatch)
    result = _cli(
        "chat", out, "--temperature", 0, "--max-new-tokens", 6,
        input="hello\nhi there\n/clear\nhi there\n/exit\n",
    )  # fmt: skip
    assert f"Model: {out / 'final'} (the run's final model)" in result.output
    assert result.output.count("Assistant: ") == 3 and "History cleared." in result.output
    first, second, third = record.completions
    for completion in record.completions:
        assert f"Assistant: {completion.text}" in result.output
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    history = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": first.text},
    ]
    assert record.prompts[0] == _template_ids(tokenizer, history[:1])
    assert record.prompts[1] == _template_ids(
        tokenizer, [*history, {"role": "user", "content": "hi there"}]
    )
    assert record.prompts[2] == _template_ids(tokenizer, [{"role": "user", "content": "hi there"}])
    assert third.text == _greedy(
        AutoModelForCausalLM.from_pretrained(out / "final"),
        tokenizer,
        [{"role": "user", "content": "hi there"}],
        6,
    )
    assert second.ids and third.ids


def test_system_message_and_commands(tmp_path, model_dir, monkeypatch):
    record = Recorder(monkeypatch)
    result = _cli(
        "chat", model_dir, "--system", "Add numbers.", "--temperature", 0,
        "--max-new-tokens", 3, input="hi\n/system\nhi\n/nope\n/help\nclear\nexit\nhi\n",
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    system = {"role": "system", "content": "Add numbers."}
    user = {"role": "user", "content": "hi"}
    assert record.prompts[0] == _template_ids(tokenizer, [system, user])
    reply = {"role": "assistant", "content": record.completions[0].text}
    assert record.prompts[1] == _template_ids(tokenizer, [user, reply, user])
    assert "No system message." in result.output
    assert "Unknown command /nope. Commands: /clear" in result.output
    assert "History cleared." in result.output  # `clear` and `exit` as LLaMA-Factory has them
    assert result.output.count("Assistant: ") == 2 and result.output.rstrip().endswith("exit")
    assert _cli("chat", model_dir, input="hi\n").output.rstrip().endswith("You:")  # Ctrl-D


def test_a_template_that_refuses_a_message_is_named_and_the_chat_goes_on(tmp_path, model_dir):
    strict = tmp_path / "no-system"
    shutil.copytree(model_dir, strict)
    template = strict / "chat_template.jinja"
    refusal = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('No system role') }}"
    template.write_text(refusal + "{% endif %}" + template.read_text())
    result = _cli(
        "chat", strict, "--system", "Be brief.", "--max-new-tokens", 2,
        input="hi\n/system\nhi\n",
    )  # fmt: skip
    refused = "You: hi\nError: cannot render the conversation: the chat template failed: No system"
    assert refused in result.output
    assert result.output.count("Assistant: ") == 1 and result.output.count("Error") == 1


def test_ctrl_c_stops_the_reply_not_the_chat(model_dir):
    loaded = tools.load(tools.resolve_source(str(model_dir)))
    completer = tools.Completer(loaded, tools.sampling(temperature=0, max_completion_length=60))
    conversation = tools.Conversation(completer)
    pieces = []

    def interrupt(text):
        pieces.append(text)
        raise KeyboardInterrupt

    stopped = conversation.reply(PROMPT, interrupt)
    assert stopped.stopped and len(stopped.ids) < 60 and conversation.messages == []
    assert not [t for t in threading.enumerate() if t.name == "align-chat-generate"]
    full = conversation.reply(PROMPT, lambda _text: None)
    assert not full.stopped and full.text.startswith(stopped.text)
    assert [m["role"] for m in conversation.messages] == ["user", "assistant"]

    lines = iter(["hello", "hello again", "/exit"])
    written = []

    def write(text):
        written.append(text)
        if written[-2:-1] == ["Assistant: "] and written.count("Assistant: ") == 1:
            raise KeyboardInterrupt  # the first reply's first piece

    tools.chat_loop(tools.Conversation(completer), lambda _p: next(lines), write)
    text = "".join(written)
    assert "[stopped (Ctrl-C): this exchange is left out of the history]" in text
    assert text.count("Assistant: ") == 2


def test_greedy_generate_equals_model_generate(tmp_path, model_dir):
    target = tmp_path / "completions.jsonl"
    args = ["generate", model_dir, "--prompt", PROMPT, "--prompt", "What is 3 + 4?"]
    greedy = [*args, "--temperature", 0, "--max-completion-length", 12]
    _cli(*greedy, "--output", target)
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for row, text in zip(rows, [PROMPT, "What is 3 + 4?"], strict=True):
        assert row["prompt"] == [{"role": "user", "content": text}]
        expected = _greedy(model, tokenizer, row["prompt"], 12)
        assert row["completion"] == [{"role": "assistant", "content": expected}]
    printed = _cli(*greedy, "--batch-size", 1).output
    assert f"> {PROMPT}\n{rows[0]['completion'][0]['content']}\n" in printed
    refused = _cli(*greedy, "--output", target, expect=1)
    assert f"--output {target} exists; pass --overwrite" in refused.output
    assert [json.loads(line) for line in target.read_text().splitlines()] == rows
    sampled = [_cli(*args, "--seed", seed, "--max-new-tokens", 12).output for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
    bad = _cli(*args, "--temperature", -1, "--top-p", 2, expect=1).output
    assert "--temperature: Input should be greater than or equal to 0 (got -1.0)" in bad
    assert "--top-p: Input should be less than or equal to 1 (got 2.0)" in bad


def test_prompt_files_are_read_as_align_run_reads_them(tmp_path, model_dir, write_jsonl):
    good = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": "What is 1 + 2? "}, {"prompt": [{"role": "user", "content": PROMPT}]}],
    )
    target = tmp_path / "out.jsonl"
    _cli("generate", model_dir, "--data", good, "--max-new-tokens", 4, "-o", target)
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert rows[0]["prompt"] == "What is 1 + 2? " and isinstance(rows[0]["completion"], str)
    assert rows[1]["completion"][0]["role"] == "assistant"
    cases = [
        ({"question": "hi"}, "line 2, field 'prompt': missing field (fields present: question)"),
        ({"prompt": 5}, "line 2, field 'prompt': expected a string or a list of messages"),
        ({"prompt": [{"role": "robot", "content": "x"}]}, "line 2, field 'prompt[0].role'"),
    ]
    for bad_row, message in cases:
        bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, bad_row])
        result = _cli("generate", model_dir, "--data", bad, "-o", tmp_path / "x.jsonl", expect=1)
        assert f"{bad}, {message}" in result.output, result.output
        assert not (tmp_path / "x.jsonl").exists()
    missing = _cli("generate", model_dir, "--data", tmp_path / "none.jsonl", expect=1)
    assert "none.jsonl: no such file or directory" in missing.output
    neither = _cli("generate", model_dir, expect=2)
    assert "give --prompt TEXT (repeatable) or --data FILE" in neither.output


def test_an_adapter_is_applied(tmp_path, model_dir):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(3)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # an adapter that changes the model
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    args = ["--prompt", PROMPT, "--temperature", 0, "--max-new-tokens", 10]
    _cli("generate", adapter, *args, "-o", tmp_path / "adapter.jsonl")
    _cli("generate", model_dir, *args, "-o", tmp_path / "base.jsonl")
    got, base = (
        json.loads((tmp_path / name).read_text())["completion"][0]["content"]
        for name in ("adapter.jsonl", "base.jsonl")
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    applied = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    messages = [{"role": "user", "content": PROMPT}]
    assert got == _greedy(applied, tokenizer, messages, 10) != base
    result = _cli("chat", adapter, input="/exit\n")
    assert f"Model: {adapter}: a LoRA adapter on {model_dir}" in result.output


def test_a_run_without_final_chats_with_its_newest_checkpoint(tmp_path):
    out = _train(tmp_path / "run")
    shutil.rmtree(out / "final")
    result = _cli("generate", out, "--prompt", PROMPT, "--max-new-tokens", 3)
    newest = out / "checkpoints" / "step-2"
    assert f"Model: {newest}: the run in {out} has no final/ yet" in result.output
    assert "its newest complete checkpoint, step 2" in result.output
    older = out / "checkpoints" / "step-1"
    result = _cli("chat", older, input="/exit\n")
    assert f"Model: {older} (checkpoint step-1 of the run in {out})" in result.output
    shutil.rmtree(out / "checkpoints")
    result = _cli("chat", out, expect=1)
    assert f"the run in {out} (status completed) has no final/ and no complete checkpoint" in (
        result.output
    )


def test_a_tokenizer_without_chat_template_continues_plain_text(tmp_path, model_dir, monkeypatch):
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(plain)
    assert not tokenizer.chat_template
    record = Recorder(monkeypatch)
    result = _cli("chat", plain, "--max-new-tokens", 3, input="What is\nWhat is\n")
    assert "each line is continued as plain text" in result.output
    assert record.prompts == [tokenizer("What is").input_ids] * 2  # no history
    refused = _cli("chat", plain, "--system", "hi", expect=2)
    assert "--system needs a tokenizer with a chat template" in refused.output
    noted = _cli("generate", plain, "--prompt", "What is", "--max-new-tokens", 2)
    assert "no chat template; --prompt texts are continued as plain text" in noted.output


def test_bad_arguments_are_named_before_torch_is_imported(tmp_path):
    (tmp_path / "empty").mkdir()
    taken = tmp_path / "taken.jsonl"
    taken.write_text("{}\n")
    cases = [
        (["chat", "./no-such-run"], "model path ./no-such-run does not exist"),
        (["chat", "runs/nothing"], "offline mode is on (HF_HUB_OFFLINE)"),
        (["chat", str(tmp_path / "empty")], "is neither an align run (run.json), a model"),
        (["chat", "x", "--top-k", "-1"], "--top-k: Input should be greater than or equal to 0"),
        (["generate", "x", "--prompt", "a", "-o", str(taken)], f"--output {taken} exists; pass"),
    ]
    report = run_in_one_process([args for args, _ in cases], tmp_path)
    for (args, message), (code, stderr) in zip(cases, report["results"], strict=True):
        assert code == 1 and message in stderr and "Traceback" not in stderr, (args, stderr)
    assert report["heavy"] == []


class Terminal:
    """A command run on a pseudo-terminal of its own (its controlling terminal: Ctrl-C sends
    SIGINT, as a user's terminal does), read up to what the test waits for."""

    def __init__(self, args, env):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes the command
            os.execve(sys.executable, [sys.executable, *args], env)
        self.seen, self.read_to, self.code = "", 0, None

    def _read(self, wait):
        """Add what the command wrote within ``wait`` seconds; False once the terminal closed."""
        if select.select([self.fd], [], [], wait)[0]:
            try:
                self.seen += os.read(self.fd, 4096).decode(errors="replace")
            except OSError:  # the command exited
                return False
        return True

    def expect(self, marker, timeout=120):
        """Wait for ``marker`` in what was written since the last marker found."""
        deadline = time.monotonic() + timeout
        while marker not in self.seen[self.read_to :]:
            assert time.monotonic() < deadline, f"no {marker!r} in {self.seen[-2000:]!r}"
            assert self._read(1), f"exited before {marker!r}: {self.seen[-2000:]!r}"
        self.read_to = self.seen.index(marker, self.read_to) + len(marker)

    def send(self, data):
        os.write(self.fd, data)

    def exit_code(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.2)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
                return self.code
        raise AssertionError(f"still running: {self.seen[-2000:]!r}")

    def close(self):
        """Kill the command if it still runs, and close the terminal."""
        if self.code is None:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


def test_chat_in_a_pseudo_terminal(tmp_path, model_dir):
    long = tmp_path / "long-context"  # room for a reply long enough to be stopped midway
    shutil.copytree(model_dir, long)
    config = json.loads((long / "config.json").read_text())
    (long / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 100_000}))
    args = ["-m", "align.cli", "chat", str(long), "--temperature", "0", "--max-new-tokens", "90000"]
    terminal = Terminal(args, {**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        terminal.expect("You: ")
        terminal.send(b"hello\r")
        terminal.expect("hello")  # echoed by the terminal
        terminal.expect("Assistant: ")
        time.sleep(1)
        terminal.send(b"\x03")  # Ctrl-C while the reply streams: it stops, the chat goes on
        terminal.expect("[stopped (Ctrl-C): this exchange is left out of the history]")
        terminal.expect("You: ")
        # Ctrl-C at the prompt: the line is dropped, the chat goes on. Sent once input() waits:
        # a SIGINT between the prompt's write and readline's select() is noticed only at the
        # next key (CPython's readline), which a person cannot hit but a test can.
        time.sleep(1)
        terminal.send(b"\x03")
        terminal.expect("(/exit or Ctrl-D quits)")
        terminal.expect("You: ")
        terminal.send(b"\x04")  # Ctrl-D: quit
        assert terminal.exit_code() == 0, terminal.seen
    finally:
        terminal.close()
    assert "Traceback" not in terminal.seen


def test_the_length_flag_and_its_alias(tmp_path, model_dir):
    for flag in ("--max-new-tokens", "--max-completion-length"):
        target = tmp_path / f"{flag}.jsonl"
        result = _cli("generate", model_dir, "--prompt", PROMPT, flag, 2, "--raw", "-o", target)
        note = "1 of 1 completions ended without EOS: cut at --max-completion-length (2 tokens)"
        assert note in result.output
        assert json.loads(target.read_text())["prompt"] == PROMPT  # --raw: plain text


def test_the_model_context_bounds_prompts_and_replies(tmp_path, model_dir, write_jsonl, caplog):
    long = " ".join(["1 + 2"] * 60)  # well over the demo model's 128 positions
    result = _cli("generate", model_dir, "--prompt", PROMPT, "--prompt", long, expect=1)
    assert "--prompt 2 (" in result.output and "fills the model's context of 128 tokens" in (
        result.output
    )
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": PROMPT}, {"prompt": long}])
    result = _cli("generate", model_dir, "--data", data, expect=1)
    assert f"{data}, line 2 (" in result.output
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    near = " ".join(["1 + 2"] * 20)
    room = 128 - len(tokenizer(near).input_ids)
    target = tmp_path / "out.jsonl"
    args = ["--prompt", near, "--prompt", PROMPT, "--raw", "--temperature", 0, "-o", target]
    logging.Logger.warning_once.cache_clear()  # transformers' warnings, said once a process
    result = _cli("generate", model_dir, *args, "--max-new-tokens", 100)
    assert "ended without EOS: cut: the model's context of 128 tokens is full" in result.output
    assert not [r for r in caplog.records if "friendly reminder" in r.getMessage()]
    alone = tmp_path / "alone.jsonl"
    _cli("generate", model_dir, *args[2:-1], alone, "--max-new-tokens", 100)
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert rows[1]["completion"] == json.loads(alone.read_text())["completion"]  # batched alike
    assert len(tokenizer(rows[0]["completion"], add_special_tokens=False).input_ids) <= room + 2
    result = _cli("chat", model_dir, "--max-new-tokens", 2, input=f"{long}\nhi\n")
    assert "fills the model's context of 128 tokens (/clear starts a new conversation)" in (
        result.output
    )
    assert result.output.count("Assistant: ") == 1  # the chat goes on


HUB_RUNNER = textwrap.dedent(
    """
    import json, sys
    from align.cli import cli

    codes = []
    for args in json.loads(sys.argv[1]):
        try:
            cli(args)
        except SystemExit as exc:
            codes.append(exc.code)
    print(json.dumps(codes))
    """
)


def _cache_repo(cache, repo_id, files_from):
    """A hub cache entry for ``repo_id`` holding the files of a directory, as a download
    leaves it (hub unreachable: HF_HUB_OFFLINE)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(files_from, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


def test_hub_ids_from_the_cache(tmp_path, model_dir):
    from peft import LoraConfig, get_peft_model

    cache = tmp_path / "hub"
    _cache_repo(cache, "align-test/tiny", model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "adapter"
    )
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(
        json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "align-test/tiny"})
    )
    _cache_repo(cache, "align-test/tiny-lora", tmp_path / "adapter")
    common = ["--prompt", PROMPT, "--max-new-tokens", "2", "--raw"]
    commands = [
        ["generate", "align-test/tiny", *common, "-o", str(tmp_path / "model.jsonl")],
        ["generate", "align-test/tiny-lora", *common, "-o", str(tmp_path / "adapter.jsonl")],
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", HUB_RUNNER, json.dumps(commands)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0 and json.loads(done.stdout) == [0, 0], done.stderr
    assert "Model: align-test/tiny\n" in done.stderr
    lora = "Model: align-test/tiny-lora (from the hub cache): a LoRA adapter on align-test/tiny"
    assert lora in done.stderr
    assert (tmp_path / "model.jsonl").exists() and (tmp_path / "adapter.jsonl").exists()
