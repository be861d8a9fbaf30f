"""Checkpoints: resume equals an uninterrupted run bit for bit on CPU; each checkpoint is a transformers model."""

import json

import pytest
import torch

from diffllama.train.checkpoint import list_checkpoints
from diffllama.train.loop import Trainer
from train_utils import micro_config, small_corpus


def _fit(cfg, out, *, stop_at=None, resume=False):
    trainer = Trainer(cfg, out, resume=resume, quiet=True)
    if stop_at is not None:
        def stop(t, metrics):
            if t.step == stop_at:
                t._stop_signal = "SIGTERM"  # what the SIGTERM handler sets
        trainer.callbacks.append(stop)
    return trainer, trainer.fit()


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


def test_resume_equals_uninterrupted(corpus, tmp_path):
    cfg = micro_config(corpus, tmp_path / "cache", max_steps=6, save_every=3, eval_every=2)
    _, full = _fit(cfg, tmp_path / "full")
    _, cut = _fit(cfg, tmp_path / "cut", stop_at=4)
    assert cut.interrupted == "SIGTERM" and cut.step == 4 and cut.checkpoint.name == "step-000004"
    assert not (tmp_path / "cut" / "model").exists()  # no final model for an interrupted run
    resumed_trainer, resumed = _fit(cfg, tmp_path / "cut", resume=True)
    assert resumed_trainer.resume_from.name == "step-000004" and resumed.step == 6
    a, b = _records(tmp_path / "full"), _records(tmp_path / "cut")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):  # bit for bit: losses, gradient norms, validation
        assert {k: v for k, v in ra.items() if k not in ("tokens_per_s", "elapsed_s")} == \
               {k: v for k, v in rb.items() if k not in ("tokens_per_s", "elapsed_s")}
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "full" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_is_a_transformers_model(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = micro_config(corpus, tmp_path / "cache", max_steps=4, save_every=1, keep_last=2)
    trainer, result = _fit(cfg, tmp_path / "run")
    kept = list_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["step-000003", "step-000004"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_bits_per_byte"] > 0 and summary["unigram_entropy_bits_per_byte"] > 0
    for folder in (kept[-1], result.model_dir):
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        ids = tok("Fellow-Citizens of the Senate", return_tensors="pt").input_ids
        assert ids.shape[1] > 2 and tok.decode(ids[0]) == "Fellow-Citizens of the Senate"
        with torch.no_grad():
            ours = trainer.model.cpu().eval()(ids).logits
            torch.testing.assert_close(hf(ids).logits, ours, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="--resume"):
        Trainer(cfg, tmp_path / "run", quiet=True)


def test_failure_before_first_checkpoint_leaves_nothing(corpus, tmp_path):
    cfg = micro_config(corpus, tmp_path / "cache", max_steps=4, save_every=0)
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)

    def boom(t, metrics):
        raise RuntimeError("simulated crash")
    trainer.callbacks.append(boom)
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.fit()
    assert not (tmp_path / "run").exists()


def test_batch_that_does_not_fit_is_a_clear_error(corpus, tmp_path, monkeypatch):
    from diffllama.train.loop import BatchTooLargeError

    cfg = micro_config(corpus, tmp_path / "cache", max_steps=2)
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)

    def out_of_memory(step):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(trainer, "train_step", out_of_memory)
    with pytest.raises(BatchTooLargeError, match="does not fit.*--batch-size"):
        trainer.fit()
    assert not (tmp_path / "run").exists()
