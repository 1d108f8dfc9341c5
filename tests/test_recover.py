"""Recovery (`linearize recover`) on tiny models: each stage lowers its loss on a fixed batch, an interrupted run
resumes to the same adapter, the recovered model decodes like its full forward, bad input is refused without
touching files, the training corpora read as documented, and the teacher is the same weights with adapters off."""
import json
import pathlib

import pytest
import torch

import linearize
from linearize.data import CorpusError, pack, read_corpus
from linearize.generation import StateCache, decode_logits
from linearize.models import tiny_model
from linearize.recovery import RecoverError, Run, batch_rows, recover

# one training row: every step sees the same batch, so each stage's loss must fall
ONE_ROW = ["The quick brown fox jumps over the lazy dog. " * 3]
FAST = dict(seq_len=64, batch_size=1, lr=5e-3, evals_per_stage=1, eval_tokens=64, final_lengths=(64,),
            checkpoint_every=3, held_out_tokens=256)


def _run(out, tokens=64 * 16, model=None, **kw):
    return recover(model or tiny_model("llama"), rules="liger", data=ONE_ROW, tokens=tokens, out=out,
                   progress=False, **{**FAST, **kw})


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    model = _run(out)
    torch._dynamo.reset()
    return out, model


def _adapter(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "recover_state" / "adapter.safetensors"))


def test_each_stage_lowers_its_loss_on_a_fixed_batch(straight):
    out, _ = straight
    result = json.loads((out / "recover.json").read_text())
    for stage in ("transfer", "lora"):
        losses = [h["loss"] for h in result["history"]["loss"] if h["stage"] == stage]
        assert len(losses) == 8
        assert losses[-1] < 0.98 * losses[0], (stage, losses)
    table = result["table"]
    assert table["after"]["layer_error"] and len(table["after"]["layer_error"]) == 2
    for f in ("recover.md", "recover.png", "config.json", "linearize_rules.yaml"):
        assert (out / f).is_file()
    assert "first 256 tokens" in (out / "recover.md").read_text()  # a capped evaluation says so


def test_interrupted_run_resumes_to_the_same_adapter(straight, tmp_path, monkeypatch):
    out_straight, _ = straight
    calls = {"n": 0}
    save = Run.save

    def save_then_stop(self, folder, stage, step, history):
        save(self, folder, stage, step, history)
        calls["n"] += 1
        if stage == 0 and step == 6:  # mid-transfer, after its second checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(Run, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path)
    state = json.loads((tmp_path / "recover_state" / "state.json").read_text())
    assert (state["stage"], state["step"]) == (0, 6)
    monkeypatch.setattr(Run, "save", save)
    torch._dynamo.reset()
    _run(tmp_path)
    a, b = _adapter(out_straight), _adapter(tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    resumed = json.loads((tmp_path / "recover.json").read_text())["history"]["loss"]
    once = json.loads((out_straight / "recover.json").read_text())["history"]["loss"]
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in once], rel=1e-5)


def test_recovered_model_decodes_like_its_full_forward(straight):
    _, model = straight
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    out = decode_logits(model, ids, StateCache(model, max_length=64), prompt_len=25)
    assert (out - ref).abs().max().item() <= 1e-4


def test_a_checkpoint_of_other_rules_is_refused_and_left_alone(straight):
    out, _ = straight
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RecoverError, match="rules: saved 'liger', now 'gla'"):
        recover(tiny_model("llama"), rules="gla", data=ONE_ROW, tokens=64 * 16, out=out, progress=False, **FAST)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_a_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RecoverError, match="not empty"):
        _run(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_rules_that_rewrite_nothing_have_nothing_to_transfer(tmp_path):
    with pytest.raises(RecoverError, match="nothing to train"):
        recover(tiny_model("llama"), rules="keep", data=ONE_ROW, tokens=640, out=tmp_path, progress=False, **FAST)


def test_bad_stage_and_missing_lora_target_are_refused(tmp_path):
    with pytest.raises(RecoverError, match="stages"):
        _run(tmp_path, stages=("distill",))
    with pytest.raises(RecoverError, match="not Linear modules"):
        _run(tmp_path, lora_targets=("query",))


def test_transfer_share_splits_the_token_budget_between_the_stages():
    from linearize.recovery import RecoverConfig, _stage_offset

    even = RecoverConfig(tokens=64 * 16, seq_len=64)
    assert [even.stage_steps(i) for i in range(2)] == [8, 8]
    cfg = RecoverConfig(tokens=64 * 16, seq_len=64, transfer_share=0.25)
    assert [cfg.stage_steps(i) for i in range(2)] == [4, 12]
    assert _stage_offset(cfg, 1) == 4 * 64  # the curve's x axis continues where transfer stopped
    lora_first = RecoverConfig(tokens=64 * 16, seq_len=64, stages=("lora", "transfer"), transfer_share=0.25)
    assert [lora_first.stage_steps(i) for i in range(2)] == [12, 4]
    for bad in (dict(transfer_share=1.0), dict(transfer_share=0.0), dict(transfer_share=0.3, stages=("lora",))):
        with pytest.raises(RecoverError, match="transfer_share"):
            RecoverConfig(tokens=1024, **bad)


def test_teacher_is_the_original_model_on_the_same_weights():
    """No second copy: adapters off + the eager forward = the unconverted model's logits, bit for bit."""
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    params = sum(p.numel() for p in model.parameters())
    from linearize.recovery import RecoverConfig

    run = Run(model, RecoverConfig(rules="liger", **FAST), None, 0, 1)
    for p in run.model.parameters():  # make the adapters matter
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    out, attn = run.teacher(ids)
    torch.testing.assert_close(out.logits, want, rtol=0, atol=0)
    assert len(attn) == 2
    lora = sum(p.numel() for n, p in run.model.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in run.model.parameters()) == params + lora  # no duplicate of the base weights
    with torch.no_grad():
        student = run.student(ids)[0].logits
    assert (student - want).abs().max() > 1e-3  # the student is rewritten and adapted


# ------------------------------------------------------------------------------------------------ data
def test_corpus_from_folder_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "second"}\n\n{"text": "third"}\n')
    (tmp_path / "ignored.bin").write_bytes(b"\0")
    texts, what = read_corpus(tmp_path)
    assert texts == ["first document", "second", "third"] and "2 files" in what
    rows = pack(texts, None, seq_len=8, vocab_size=128)
    assert rows.shape == (len("first document\n\nsecond\n\nthird\n\n") // 8, 8)
    assert rows.max() < 128


def test_corpus_from_a_datasets_object():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["one", "", "two"], "id": [1, 2, 3]})
    assert read_corpus(ds)[0] == ["one", "two"]
    with pytest.raises(CorpusError, match="'text' column"):
        read_corpus(ds.rename_column("text", "body"))


def test_bad_corpora_name_the_file_and_fix(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: not JSON"):
        read_corpus(bad)
    with pytest.raises(CorpusError, match="no such file"):
        read_corpus(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .txt"):
        read_corpus(tmp_path / "empty")
    with pytest.raises(CorpusError, match="at least 4 needed"):
        pack(["short"], None, seq_len=64, vocab_size=128, min_sequences=4)


def test_default_corpus_is_disjoint_from_the_evaluation_texts():
    from linearize.data import english_text, long_document, paragraphs

    held_out = paragraphs(english_text() + "\n\n" + long_document())
    texts, what = read_corpus(None)
    assert "pydoc_data" in what and len(texts) > 50
    stdlib, what_stdlib = read_corpus("stdlib")
    assert "docstrings" in what_stdlib and stdlib[: len(texts)] == texts
    assert sum(map(len, stdlib)) > 5 * sum(map(len, texts))  # the point of it: several times the default's text
    for corpus in (texts, stdlib):
        joined = "\n".join(corpus)
        assert held_out and not any(p in joined for p in held_out)


def test_batches_are_a_pure_function_of_seed_and_step():
    rows = torch.arange(10).view(5, 2)
    a = [batch_rows(rows, 0, s, 2) for s in range(5)]  # two epochs
    assert torch.equal(torch.cat(a[:2] + [a[2][:1]]).sort(0).values, rows)  # epoch 0 covers every row once
    assert all(torch.equal(x, batch_rows(rows, 0, s, 2)) for s, x in enumerate(a))


def test_hugging_face_trainer_runs_the_converted_model(tmp_path):
    """`linearize.convert` compiles in place, so Trainer (torch_compile=False: accelerate does not know the backend
    name) trains the rewritten graph: the loss is finite and the LoRA weights move."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    seen = []
    linearize.convert(model, rules="liger", record=seen.append)  # each compiled graph's pass context
    rows = pack(ONE_ROW * 4, None, seq_len=32, vocab_size=128)
    data = [{"input_ids": r, "labels": r} for r in rows]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                             use_cpu=True, report_to=[], torch_compile=False, save_strategy="no", logging_steps=1)
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any((p - before[n]).abs().max() > 0 for n, p in model.named_parameters() if n in before)
    assert seen and all([s.rewrite for s in ctx.sites] == ["liger", "liger"] for ctx in seen)


def test_learned_mix_is_trained_checkpointed_and_ships_with_the_adapter(tmp_path):
    from linearize.generation.convert import learned_parameters
    from linearize.models import load
    from linearize.recovery import load_learned_file

    rules = tmp_path / "learn.yaml"
    rules.write_text("rules:\n  - rewrite: liger\n    with: {window: 8, mix: [0.7, 0.3], learn: [mix]}\n")
    out = tmp_path / "run"
    model = recover(tiny_model("llama"), rules=str(rules), data=ONE_ROW, tokens=64 * 8, out=out, progress=False,
                    model_spec="tiny-llama", **FAST)
    trained = {k: v.detach().clone() for k, v in learned_parameters(model).items()}
    assert len(trained) == 2
    start = torch.tensor([[0.7] * 4, [0.3] * 4])
    assert all((v - start).abs().max() > 1e-3 for v in trained.values()), trained  # the optimizer moved them
    for folder in ("recover_state", "adapter"):
        assert (out / folder / "learned.safetensors").is_file()
    peft_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == "tiny-llama"  # the portable spec, not this machine's path
    ids = torch.randint(3, 128, (1, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    torch._dynamo.reset()
    resumed = recover(tiny_model("llama"), rules=str(rules), data=ONE_ROW, tokens=64 * 8, out=out, progress=False,
                      model_spec="tiny-llama", **FAST)  # finished run: state restored, nothing trained
    for k, v in learned_parameters(resumed).items():
        torch.testing.assert_close(v.detach(), trained[k])
    for loaded in (linearize.from_pretrained(out), load(str(out / "adapter"))[0]):  # checkpoint; adapter folder
        for k, v in learned_parameters(loaded).items():
            torch.testing.assert_close(v.detach(), trained[k])
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)
    (out / "adapter" / "learned.safetensors").unlink()
    with pytest.raises(RecoverError, match="learn recipe parameters but learned.safetensors is missing"):
        load_learned_file(tiny_model("llama"), str(rules), out / "adapter")


def test_cli_trains_writes_the_adapter_record_and_refuses_other_settings(tmp_path, capsys):
    """`linearize recover` end to end on the tiny model and the default corpus: exit 0, the adapter folder names its
    base model and rules, the capped evaluation is said beside the table; the same folder with another --lr exits 2
    naming the difference, and nothing in it changes."""
    from linearize.cli import main

    out = tmp_path / "run"
    args = ["recover", "--model", "tiny-llama", "--rules", "liger", "--stages", "lora", "--tokens", "256",
            "--seq-len", "64", "--held-out-tokens", "128", "--out", str(out)]
    assert main(args) == 0
    record = json.loads((out / "adapter" / "recovered.json").read_text())
    assert (record["model"], record["rules"], record["held_out_tokens"]) == ("tiny-llama", "liger", 128)
    assert "first 128 tokens" in (out / "recover.md").read_text()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(args + ["--lr", "5e-3"]) == 2
    assert "lr: saved 0.001, now 0.005" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
