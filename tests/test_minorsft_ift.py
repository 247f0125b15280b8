"""MinorSFT and IFT on a real (tiny) model: gradients against SFT's, the temporal residual
connection's embeddings, tied and untied embeddings, and the deviation metric on any run."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from align import default_batch
from align.cli import cli
from align.data.examples import tokenize_records
from align.data.records import read_records
from align.reference import ModelReference
from align_ift.loss import ift_loss, mixed_embeddings
from align_minorsft.loss import minorsft_loss
from align_sft.loss import sft_loss


@pytest.fixture
def batch(tmp_path, write_jsonl, sft_rows, tokenizer):
    """Prompt/completion rows whose completions have different lengths."""
    path = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    examples, _ = tokenize_records(
        read_records(path), "prompt_completion", tokenizer, 64, "error", "train"
    )
    lengths = {sum(e["completion_mask"]) for e in examples}
    assert len(lengths) > 1
    return default_batch("prompt_completion", examples, tokenizer.pad_token_id)


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _mean(output):
    return output.loss / output.count


@pytest.mark.parametrize("length_normalized", [False, True])
def test_minorsft_gradient_at_initialisation_is_sft_per_sequence(
    model_dir, batch, length_normalized
):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = ModelReference.frozen_copy(model)
    minor = _grads(model, _mean(minorsft_loss(model, batch, reference, 0.1, length_normalized)))
    sft = _grads(model, _mean(sft_loss(model, batch, "sequence")))
    assert minor.keys() == sft.keys()
    for name, grad in sft.items():
        assert torch.allclose(minor[name], grad, atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("tied", [True, False])
def test_ift_without_residual_or_propagation_is_sft_per_sequence(
    model_dir, untied_model_dir, batch, tied
):
    model = AutoModelForCausalLM.from_pretrained(model_dir if tied else untied_model_dir)
    embeddings = model.get_input_embeddings()
    ift = ift_loss(model, embeddings, batch, lam=0.0, gamma=0.0)
    sft = sft_loss(model, batch, "sequence")
    assert _mean(ift).item() == pytest.approx(_mean(sft).item(), abs=1e-6)
    ift_grads, sft_grads = _grads(model, _mean(ift)), _grads(model, _mean(sft))
    table = "model.embed_tokens.weight"
    for name, grad in sft_grads.items():
        if name == table:  # IFT's lookups are detached: only the output side trains it
            continue
        assert torch.allclose(ift_grads[name], grad, atol=1e-6, rtol=1e-5), name
    if tied:  # the shared table still learns, through the logits only
        assert not torch.allclose(ift_grads[table], sft_grads[table], atol=1e-6)
        assert ift_grads[table].abs().sum() > 0
    else:
        assert table not in ift_grads


def _official_ift(model, batch, lam, gamma):
    """The official code's ``ift`` branch, written out again: labels of −100 keep their ids,
    the argmax is shifted by one, and the weights are discounted suffix sums, step by step."""
    ids, attention = batch["input_ids"], batch["attention_mask"]
    labels = torch.where(batch["completion_mask"].bool(), ids, torch.full_like(ids, -100))
    loss_mask = labels[:, 1:] != -100
    table = model.get_input_embeddings()
    with torch.no_grad():
        truth = table(ids)
        logits = model(inputs_embeds=truth, attention_mask=attention).logits
        further = torch.cat((ids[:, :1], logits.argmax(-1)[:, :-1]), dim=-1)
        further = table(torch.where(labels == -100, ids, further))
    mixed = (1 - lam) * truth + lam * further
    logits = model(inputs_embeds=mixed, attention_mask=attention).logits
    targets = labels[:, 1:].clamp(min=0)
    logps = logits[:, :-1].float().log_softmax(-1).gather(2, targets[..., None]).squeeze(2)
    logps = logps * loss_mask
    tokens = loss_mask.sum(-1, keepdim=True)
    item = (-logps / tokens).masked_fill(~loss_mask, 0)
    columns, running = [], torch.zeros_like(item[:, 0])
    for t in reversed(range(item.shape[1])):
        running = item[:, t] + gamma * running
        columns.append(running)
    weights = torch.stack(columns[::-1], 1).masked_fill(~loss_mask, 0)
    weights = weights * tokens / weights.sum(-1, keepdim=True)
    return ((-logps * weights).sum(-1) / loss_mask.sum(-1)).mean()


@pytest.mark.parametrize(("lam", "gamma"), [(0.2, 0.95), (0.5, 1.0)])
def test_ift_equals_the_official_computation(model_dir, batch, lam, gamma):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    official = _official_ift(model, batch, lam, gamma)
    ours = _mean(ift_loss(model, model.get_input_embeddings(), batch, lam, gamma))
    assert ours.item() == pytest.approx(official.item(), abs=1e-6)
    expected, got = _grads(model, official), _grads(model, ours)
    assert expected.keys() == got.keys()
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, atol=1e-6, rtol=1e-5), name
    plain = _mean(sft_loss(model, batch, "sequence"))
    assert abs(ours.item() - plain.item()) > 1e-4  # the mixing and the weights do something


@pytest.mark.parametrize("prediction", ["greedy", "expected"])
def test_the_temporal_residual_connection(model_dir, batch, prediction):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    table = model.get_input_embeddings().weight.detach()
    mixed, _ = mixed_embeddings(model, model.get_input_embeddings(), batch, 0.2, prediction)
    assert not mixed.requires_grad
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ids, trained = batch["input_ids"], batch["completion_mask"]
    for row in range(ids.shape[0]):
        for i in range(ids.shape[1]):
            truth = table[ids[row, i]]
            if i > 0 and trained[row, i]:
                if prediction == "greedy":
                    predicted = table[logits[row, i - 1].argmax()]
                else:
                    predicted = torch.softmax(logits[row, i - 1], -1) @ table
                expected = 0.8 * truth + 0.2 * predicted
                assert torch.allclose(mixed[row, i], expected, atol=1e-5), (row, i)
            else:
                assert torch.equal(mixed[row, i], truth), (row, i)


def _run(*args):
    result = CliRunner().invoke(cli, ["run", *map(str, args)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["minorsft", "ift"])
def test_runs_on_tied_and_untied_models(tmp_path, model_dir, untied_model_dir, objective, data):
    for name, path in (("tied", model_dir), ("untied", untied_model_dir)):
        out = tmp_path / name
        flags = ["--max-steps", "3", "--batch-size", "4", "--lr", "1e-2"]
        _run("--objective", objective, "--model", path, "--data", data, *flags, "--output-dir", out)
        rows = _rows(out)
        assert rows[-1]["nll"] < rows[0]["nll"]
        if objective == "minorsft":
            assert rows[0]["minor_weight"] == pytest.approx(1.0, abs=1e-6)
            assert rows[0]["deviation"] == pytest.approx(0.0, abs=1e-5)
            assert rows[-1]["deviation"] > 0.01  # the policy moved off the reference
        else:
            assert rows[0]["lambda"] == pytest.approx(0.2)
            start = AutoModelForCausalLM.from_pretrained(path).get_input_embeddings().weight
            end = AutoModelForCausalLM.from_pretrained(out / "final").get_input_embeddings().weight
            assert torch.equal(start, end) == (name == "untied")  # tied: trained via the logits


def test_minorsft_length_normalized_from_the_command_line(tmp_path, model_dir, data):
    """--set length_normalized=true reaches the loss: at Δ = 0 the loss is 2·ln2/β whatever the
    answers' lengths (the paper's is 2·ln2/(β·m)); the first step is the same for both, so at
    the second the policy has moved equally and the per-token weight 2σ(−βΔ/m) is the larger."""
    rows = {}
    for normalized in ("false", "true"):
        out = tmp_path / normalized
        flags = ["--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--set", "beta=0.5"]
        flags += ["--set", f"length_normalized={normalized}", "--output-dir", out]
        _run("--objective", "minorsft", "--model", model_dir, "--data", data, *flags)
        rows[normalized] = _rows(out)
    paper, normalized = rows["false"], rows["true"]
    assert normalized[0]["loss"] == pytest.approx(2 * math.log(2) / 0.5, abs=1e-5)
    assert paper[0]["loss"] < normalized[0]["loss"] / 2  # every answer has m > 2 tokens
    assert paper[0]["minor_weight"] == normalized[0]["minor_weight"] == pytest.approx(1.0)
    assert paper[1]["deviation"] == pytest.approx(normalized[1]["deviation"], abs=1e-5)
    assert paper[1]["deviation"] > 0.01
    assert normalized[1]["minor_weight"] > paper[1]["minor_weight"]


@pytest.mark.parametrize("objective", ["ift", "sft"])
def test_only_ift_freezes_an_untied_input_table(model_dir, untied_model_dir, objective):
    from align_ift import align_prepare_model

    config = SimpleNamespace(objective=objective)
    untied = AutoModelForCausalLM.from_pretrained(untied_model_dir)
    align_prepare_model(untied, config)
    assert untied.get_input_embeddings().weight.requires_grad == (objective != "ift")
    tied = AutoModelForCausalLM.from_pretrained(model_dir)
    align_prepare_model(tied, config)
    assert tied.get_input_embeddings().weight.requires_grad  # it is the output layer too


@pytest.fixture
def data(tmp_path, write_jsonl, sft_rows):
    return write_jsonl(tmp_path / "train.jsonl", sft_rows)


def test_eval_deviation_on_an_sft_run_is_against_the_starting_model(
    tmp_path, model_dir, data, tokenizer
):
    out = tmp_path / "out"
    flags = ["--eval-deviation", "--max-steps", "3", "--batch-size", "8", "--lr", "1e-2"]
    _run("--model", model_dir, "--data", data, "--eval-data", data, *flags, "--output-dir", out)
    final = [r for r in _rows(out) if "eval_deviation" in r][-1]
    examples, _ = tokenize_records(
        read_records(data), "prompt_completion", tokenizer, 1024, "keep_start", "eval"
    )
    policy = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    start = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    terms = []
    for example in examples:  # one unpadded sequence at a time
        ids = torch.tensor([example["input_ids"]])
        mask = torch.tensor(example["completion_mask"][1:], dtype=torch.float64)
        with torch.no_grad():
            logp = [
                torch.log_softmax(m(ids).logits[0, :-1].double(), -1)
                .gather(-1, ids[0, 1:, None])
                .squeeze(-1)
                for m in (policy, start)
            ]
        terms.append(((logp[0] - logp[1]) * mask).sum().item() / mask.sum().item())
    assert final["eval_deviation"] == pytest.approx(sum(terms) / len(terms), abs=1e-5)
    assert final["eval_deviation"] > 0.01


def test_eval_deviation_needs_eval_data_and_allows_a_reference_for_sft(tmp_path, model_dir, data):
    result = CliRunner().invoke(
        cli, ["run", "--model", str(model_dir), "--data", str(data), "--eval-deviation"]
    )
    assert (
        result.exit_code == 1 and "--eval-deviation is measured on the eval split" in result.output
    )
    out = tmp_path / "o"
    _run(
        "--model",
        model_dir,
        "--data",
        data,
        "--eval-data",
        data,
        "--eval-deviation",
        "--reference",
        "model",
        "--ref-model",
        model_dir,
        "--max-steps",
        1,
        "--output-dir",
        out,
    )
    assert [r for r in _rows(out) if "eval_deviation" in r][0]["eval_deviation"] != 0
