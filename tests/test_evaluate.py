"""Evaluation (issue 12): deterministic passkey / recall generators, a scorer checked on fake models that answer right
and wrong, sliding-window perplexity equal to a direct computation, lm-eval on a local task, and the CLI end to end
on a saved tiny checkpoint (no download anywhere)."""
import json
import math
import pathlib
import re

import pytest
import torch

import linearize
from linearize.evaluate import (EvalSpec, mqar_probes, parse_length, passkey_probe, perplexity_at, run_lm_eval,
                                run_probes, score_answer)
from linearize.models import tiny_model

TASKS = pathlib.Path(__file__).parent / "lm_eval_tasks"


def _decode_prompt(tok, ids):
    return tok.decode(ids[0], skip_special_tokens=True)


def test_parse_length():
    assert [parse_length(x) for x in ("512", "2k", "16K")] == [512, 2048, 16384]
    with pytest.raises(ValueError, match="write a token count"):
        parse_length("2 thousand")


def test_generators_are_deterministic_and_place_the_needle(char_tokenizer):
    a = passkey_probe(char_tokenizer, 600, 0.25, seed=3)
    b = passkey_probe(char_tokenizer, 600, 0.25, seed=3)
    c = passkey_probe(char_tokenizer, 600, 0.25, seed=4)
    assert torch.equal(a.ids, b.ids) and a.answer == b.answer and a.answer != c.answer
    assert abs(a.ids.shape[1] - 600) < 100
    text = _decode_prompt(char_tokenizer, a.ids)
    where = text.index(f"The pass key is {a.answer}") / len(text)
    assert 0.15 < where < 0.35
    deep = _decode_prompt(char_tokenizer, passkey_probe(char_tokenizer, 600, 0.9, seed=3).ids)
    assert deep.index("The pass key is") / len(deep) > 0.75
    m1, m2 = mqar_probes(char_tokenizer, 8, 4, seed=1), mqar_probes(char_tokenizer, 8, 4, seed=1)
    assert [p.answer for p in m1] == [p.answer for p in m2] and len(m1) == 4
    for p in m1:  # the answer is the code the listing gives the asked word
        text = _decode_prompt(char_tokenizer, p.ids)
        assert f"{p.meta['word']}: {p.answer}\n" in text and text.endswith(f"\n{p.meta['word']}:")


def _oracle(tok):
    """A fake model that reads the answer off the prompt."""
    def answer(ids):
        text = _decode_prompt(tok, ids)
        m = re.search(r"The pass key is (\d+)", text)
        if m:
            return f" {m.group(1)}. The"
        word = text.rsplit("\n", 1)[1].rstrip(":")
        return " " + re.search(rf"^{word}: (\d+)$", text, re.M).group(1) + "\n"
    return answer


def test_scorer_on_fake_models_that_answer_right_and_wrong(char_tokenizer):
    probes = [passkey_probe(char_tokenizer, 300, d, seed=s) for d in (0.1, 0.9) for s in range(3)]
    probes += mqar_probes(char_tokenizer, 16, 5, seed=0)
    assert run_probes(probes, _oracle(char_tokenizer))["accuracy"] == 1.0
    assert run_probes(probes, lambda ids: " 12345")["accuracy"] == 0.0
    half = run_probes(probes[:2], lambda ids: " " + probes[0].answer)
    assert half["accuracy"] == 0.5 and [i["correct"] for i in half["items"]] == [True, False]
    assert score_answer(" 4812.", "4812") and not score_answer(" 48120", "4812")
    assert not score_answer(" the code is", "4812") and not score_answer(" 1 4812", "4812")


def test_sliding_window_perplexity_equals_a_direct_computation():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(0))
    got = perplexity_at(model, ids, 40)  # windows [0, 40) then [20, 60): 59 tokens scored
    with torch.no_grad():
        first = torch.log_softmax(model(ids[:, :40]).logits[0, :-1], -1).gather(-1, ids[0, 1:40, None])
        second = torch.log_softmax(model(ids[:, 20:60]).logits[0, 19:-1], -1).gather(-1, ids[0, 40:60, None])
    nll = -torch.cat([first, second]).double()
    assert got["tokens_scored"] == 59 and got["stride"] == 20
    assert math.isclose(got["ppl"], math.exp(nll.mean().item()), rel_tol=1e-6)
    whole = perplexity_at(model, ids[:, :30], 30)  # one window: the plain full-sequence perplexity
    with torch.no_grad():
        direct = torch.nn.functional.cross_entropy(model(ids[:, :30]).logits[0, :-1], ids[0, 1:30])
    assert math.isclose(whole["ppl"], math.exp(direct.item()), rel_tol=1e-5)


def test_lm_eval_runs_a_local_task_on_the_converted_model_offline(char_tokenizer):
    pytest.importorskip("lm_eval")
    model = linearize.convert(tiny_model("llama"), rules="liger", inner="eager")
    out = run_lm_eval(model, char_tokenizer, TASKS)
    assert set(out) == {"linearize_tiny_choice", "linearize_tiny_missing", "linearize_tiny_hub"}
    assert 0.0 <= out["linearize_tiny_choice"]["acc"] <= 1.0
    assert out["linearize_tiny_missing"] == {"error": "data not available offline: not_here.jsonl"}
    assert out["linearize_tiny_hub"]["error"].startswith(
        "data not available offline: dataset 'linearize-tests/no-such-dataset' is not in the local datasets cache")


def test_eval_cli_on_a_saved_checkpoint_writes_table_json_and_plots(tmp_path, char_tokenizer, capsys):
    from linearize.cli import main

    model = linearize.convert(tiny_model("llama"), rules="swa", inner="eager")
    linearize.save_pretrained(model, tmp_path / "tiny-swa", tokenizer=char_tokenizer)
    rc = main(["eval", "--model", str(tmp_path / "tiny-swa"), "--lengths", "96,160", "--depths", "0.5",
               "--mqar-pairs", "4", "--out", str(tmp_path / "ev")])
    assert rc == 0
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    row = result["rows"]["tiny-swa"]
    assert set(row["ppl"]) == {"96", "160"} and all(v["ppl"] > 1 for v in row["ppl"].values())
    assert set(row["passkey"]) == {"96@0.5", "160@0.5"} and set(row["mqar"]) == {"4"}
    assert "| tiny-swa |" in (tmp_path / "ev" / "eval.md").read_text()
    if pytest.importorskip("matplotlib"):
        assert (tmp_path / "ev" / "perplexity.png").is_file() and (tmp_path / "ev" / "passkey.png").is_file()
    assert "tiny-swa" in capsys.readouterr().out


def test_bad_task_names_are_refused(capsys):
    from linearize.cli import main

    assert main(["eval", "--model", "tiny-llama", "--tasks", "ppl,needles"]) == 2
    assert "unknown needles" in capsys.readouterr().err
    with pytest.raises(ValueError, match="evaluation needs text"):
        linearize.evaluate.evaluate(["tiny-llama"], spec=EvalSpec(lengths=(32,)))
