"""The run folder: one run at a time (its lock), and the files a run writes whole or not at all."""

import pytest

from diffllama.train.checkpoint import RunDirInUse, check_run_dir
from diffllama.train.loop import Trainer
from train_utils import micro_config, small_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


def test_second_run_on_a_folder_in_use_is_refused_before_any_write(corpus, tmp_path):
    run = tmp_path / "run"
    first = Trainer(micro_config(corpus, tmp_path / "cache", max_steps=2, save_every=2), run, quiet=True)
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # locked from construction: data preparation is long
    check_run_dir(run)  # the lock file alone does not make the folder someone else's
    other_cache = tmp_path / "other-cache"
    with pytest.raises(RunDirInUse) as caught:
        Trainer(micro_config(corpus, other_cache, max_steps=2), run, quiet=True)
    assert str(caught.value) == (f"--out {str(run)!r} is in use by another run (it holds {run / '.lock'}): wait for "
                                 f"that run to end, or choose another --out")
    assert sorted(p.name for p in run.iterdir()) == [".lock"] and not other_cache.exists()  # no data work either
    result = first.fit()  # the first run is unharmed, and releases the folder when it ends
    assert result.step == 2 and (run / "summary.json").is_file()
    again = Trainer(micro_config(corpus, tmp_path / "cache", max_steps=2, save_every=2), run, resume=True,
                    quiet=True)
    assert again.step == 2


def test_a_lock_path_that_is_not_a_file_is_one_clear_error(corpus, tmp_path):
    run = tmp_path / "run"
    (run / ".lock").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"--out {str(run)!r}: {run / '.lock'} is not a regular file; remove it"):
        Trainer(micro_config(corpus, tmp_path / "cache", max_steps=2), run, quiet=True)


def test_model_vocab_below_the_tokenizer_is_refused_before_bpe_training_leaving_no_folder(corpus, tmp_path):
    with pytest.raises(ValueError) as caught:
        Trainer(micro_config(corpus, tmp_path / "cache", model={"vocab_size": 300}), tmp_path / "run", quiet=True)
    assert str(caught.value) == ("model vocab_size 300 is smaller than tokenizer_vocab_size (the BPE to train): 320 "
                                 "tokens; set model.vocab_size to at least 320 or leave it unset (the tokenizer's "
                                 "size rounded up to 64), or lower tokenizer_vocab_size (--tokenizer-vocab-size)")
    assert not (tmp_path / "cache").exists()  # no tokenizer trained, no data tokenized
    assert not (tmp_path / "run").exists()  # the folder its lock created is removed again
