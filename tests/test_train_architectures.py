"""The training loop trains each architecture (the model's ``model_type`` is a ``model:`` field) and exports a
checkpoint of that architecture."""

import json

import pytest
import torch

import diffllama
from diffllama.train.loop import Trainer
from train_utils import MICRO_MODEL, micro_config, small_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("model_type", ["diffllama_v2", "llama"])
def test_the_loop_trains_and_exports_each_architecture(model_type, corpus, tmp_path):
    cfg = micro_config(corpus, tmp_path / "cache", max_steps=4, save_every=4, eval_every=4,
                       model={**MICRO_MODEL, "model_type": model_type})
    result = Trainer(cfg, tmp_path / "run", quiet=True).fit()
    assert result.step == 4 and torch.isfinite(torch.tensor(result.metrics["loss"]))
    assert json.loads((result.model_dir / "config.json").read_text())["model_type"] == model_type
    model = diffllama.DiffLlamaForCausalLM.from_pretrained(result.model_dir)
    assert model.config.model_type == model_type
