"""File-level checkpoint I/O: transformers' safetensors layout, atomic saves, clear errors, hub cache resolution."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from diffllama import hf_format as checkpoint
from diffllama.hf_format import load_state_dict, parse_size, save_state_dict
from diffllama.hub import resolve_checkpoint_dir


def make_state_dict(seed=0):
    """Tensors of several dtypes, 3,200 bytes in all."""
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(16, 16, generator=g),  # float32, 1024 bytes
        "b.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),  # 512
        "c.weight": torch.randn(8, 32, generator=g).to(torch.float16),  # 512
        "d.ids": torch.randint(0, 1000, (64,), generator=g),  # int64, 512
        "e.bias": torch.randn(160, generator=g),  # float32, 640
    }


def assert_same(loaded, expected):
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert loaded[name].device.type == "cpu"
        assert torch.equal(loaded[name], tensor.cpu()), name


def snapshot(directory: Path):
    """Every file under ``directory`` (hidden ones included) -> its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------------
# parse_size


@pytest.mark.parametrize(
    "size, expected",
    [
        (123, 123),
        ("100", 100),
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("10KB", 10 * 10**3),
        ("10kb", 10 * 10**3 // 8),  # a lowercase final b means bits, as in transformers
        ("2GiB", 2 * 2**30),
        ("2gib", 2 * 2**30),
        ("1.5GB", 1_500_000_000),
        (" 7 MiB ", 7 * 2**20),
    ],
)
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5XB", "abc", "", "GB", "-1GB", 0, -5, "0MB", True, 1.5, None])
def test_parse_size_rejects(size):
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(size)


def test_save_rejects_bad_max_shard_size(tmp_path):
    with pytest.raises(ValueError, match="max_shard_size"):
        save_state_dict(make_state_dict(), tmp_path / "ckpt", max_shard_size="lots")
    assert not (tmp_path / "ckpt").exists()


# ----------------------------------------------------------------------------------------------------------------
# round trips


def test_round_trip_single_file(tmp_path):
    sd = make_state_dict()
    written = save_state_dict(sd, tmp_path, extra_files={"config.json": '{"a": 1}'})
    assert written == [tmp_path / "model.safetensors", tmp_path / "config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert (tmp_path / "config.json").read_text() == '{"a": 1}'
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert_same(load_state_dict(tmp_path), sd)


def test_round_trip_sharded(tmp_path):
    sd = make_state_dict()
    written = save_state_dict(sd, tmp_path, max_shard_size=1100)
    names = [p.name for p in written]
    shards = [n for n in names if n != "model.safetensors.index.json"]
    assert len(shards) >= 3
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert names[-1] == "model.safetensors.index.json"
    assert not (tmp_path / "model.safetensors").exists()

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": sum(t.nbytes for t in sd.values())}
    assert set(index["weight_map"]) == set(sd)
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        with safe_open(tmp_path / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            keys = set(f.keys())
            assert keys == {n for n, s in index["weight_map"].items() if s == shard}
            assert sum(f.get_tensor(k).nbytes for k in keys) <= 1100
    assert_same(load_state_dict(tmp_path), sd)


def test_oversize_tensor_gets_its_own_shard(tmp_path):
    sd = {"small1": torch.zeros(10), "big": torch.zeros(1000), "small2": torch.zeros(10)}
    save_state_dict(sd, tmp_path, max_shard_size="1KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) == 3
    assert_same(load_state_dict(tmp_path), sd)


def test_shared_and_non_contiguous_tensors(tmp_path):
    base = torch.randn(4, 6)
    sd = {"emb": base, "head": base, "part": base[:2], "transposed": base.t()}
    save_state_dict(sd, tmp_path)
    loaded = load_state_dict(tmp_path)
    assert_same(loaded, sd)
    assert loaded["emb"].data_ptr() != loaded["head"].data_ptr()


def test_resave_switches_layout_and_removes_stale_files(tmp_path):
    sd = make_state_dict()
    save_state_dict(sd, tmp_path, max_shard_size=1100)
    sd2 = make_state_dict(seed=1)
    save_state_dict(sd2, tmp_path, extra_files={"config.json": "{}"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert_same(load_state_dict(tmp_path), sd2)
    save_state_dict(sd, tmp_path, max_shard_size=1100)
    assert not (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "config.json").exists()
    assert_same(load_state_dict(tmp_path), sd)
    # Fewer shards than before: the extra old shards go.
    save_state_dict(sd2, tmp_path, max_shard_size=1700)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    on_disk = {p.name for p in tmp_path.glob("model-*.safetensors")}
    assert on_disk == set(index["weight_map"].values())
    assert_same(load_state_dict(tmp_path), sd2)


@pytest.fixture
def umask():
    """Set the process umask for one test (``umask(0o022)``), restoring the old one afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["umask-022", "umask-027"])
def test_saved_files_get_the_umask_permissions(tmp_path, umask, mask, mode):
    """Files moved in from temp files (mkstemp, safetensors) get 0o666 & ~umask, as open() gives: they were 0o600."""
    from diffllama import DiffLlamaConfig, DiffLlamaForCausalLM

    umask(mask)
    config = DiffLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4)
    DiffLlamaForCausalLM(config).save_pretrained(tmp_path / "single")
    DiffLlamaForCausalLM(config).save_pretrained(tmp_path / "sharded", max_shard_size=20000)
    config.save_pretrained(tmp_path / "config-only")
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "model.safetensors.index.json",
                                       "model-00001-of-00004.safetensors"}
    assert {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files} == {
        str(p.relative_to(tmp_path)): oct(mode) for p in files}


def test_extra_file_names_are_checked(tmp_path):
    for bad in ["sub/config.json", "model.safetensors", "model.safetensors.index.json", ".."]:
        with pytest.raises(ValueError, match="extra_files"):
            save_state_dict(make_state_dict(), tmp_path, extra_files={bad: "x"})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# atomicity


class FailOnSecondSave:
    def __init__(self, real):
        self.real, self.calls = real, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 2:
            raise OSError("disk full (simulated)")
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("old_shard_size", [1100, "5GB"], ids=["old-sharded", "old-single"])
def test_failed_save_leaves_directory_untouched(tmp_path, monkeypatch, old_shard_size):
    old = make_state_dict()
    save_state_dict(old, tmp_path, max_shard_size=old_shard_size, extra_files={"config.json": '{"old": true}'})
    before = snapshot(tmp_path)

    failing = FailOnSecondSave(checkpoint.save_file)
    monkeypatch.setattr(checkpoint, "save_file", failing)
    with pytest.raises(OSError, match="simulated"):
        save_state_dict(
            make_state_dict(seed=1), tmp_path, max_shard_size=600, extra_files={"config.json": '{"new": true}'}
        )
    assert failing.calls == 2
    assert snapshot(tmp_path) == before
    assert not list(tmp_path.glob(".staging-*"))
    assert_same(load_state_dict(tmp_path), old)


def test_failed_save_into_new_directory_removes_it(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "save_file", FailOnSecondSave(checkpoint.save_file))
    with pytest.raises(OSError):
        save_state_dict(make_state_dict(), tmp_path / "new", max_shard_size=600)
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    monkeypatch.setattr(checkpoint, "save_file", FailOnSecondSave(checkpoint.save_file.real))
    with pytest.raises(OSError):  # parent folders the call created go too; those that existed stay
        save_state_dict(make_state_dict(), tmp_path / "old" / "a" / "b", max_shard_size=600)
    assert list(tmp_path.iterdir()) == [tmp_path / "old"] and not any((tmp_path / "old").iterdir())
    monkeypatch.setattr(checkpoint, "save_file", FailOnSecondSave(checkpoint.save_file.real))
    with pytest.raises(OSError):  # a path through "..": what the call made is what it removes
        save_state_dict(make_state_dict(), tmp_path / "new1" / ".." / "new2" / "sub", max_shard_size=600)
    assert list(tmp_path.iterdir()) == [tmp_path / "old"]


def test_failed_staging_folder_removes_created_parents(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(checkpoint.tempfile, "mkdtemp", no_space)
    with pytest.raises(OSError, match="No space left"):
        save_state_dict(make_state_dict(), tmp_path / "p" / "q" / "r")
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------------------
# load errors


def test_truncated_file(tmp_path):
    save_state_dict(make_state_dict(), tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated"):
        load_state_dict(tmp_path)


def test_truncated_shard(tmp_path):
    save_state_dict(make_state_dict(), tmp_path, max_shard_size=1100)
    path = tmp_path / "model-00002-of-00004.safetensors"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"model-00002-of-00004\.safetensors is truncated"):
        load_state_dict(tmp_path)


def test_truncated_inside_header(tmp_path):
    save_state_dict(make_state_dict(), tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated"):
        load_state_dict(tmp_path)


@pytest.mark.parametrize(
    "payload",
    [
        bytes(range(256)) * 4,  # a huge announced header length
        (40).to_bytes(8, "little") + b"\xff" * 100,  # a header that is not JSON
        b"abc",  # shorter than the length prefix
    ],
    ids=["huge-header", "not-json", "tiny"],
)
def test_garbage_file(tmp_path, payload):
    (tmp_path / "model.safetensors").write_bytes(payload)
    with pytest.raises(ValueError, match=r"model\.safetensors .*(truncated|corrupt|not a safetensors)"):
        load_state_dict(tmp_path)


def test_header_safetensors_rejects(tmp_path):
    """A header that fits the file but that safetensors refuses (unknown dtype): its error becomes ours."""
    header = json.dumps({"w": {"dtype": "NOPE", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a valid safetensors file"):
        load_state_dict(tmp_path)


def test_missing_shard(tmp_path):
    save_state_dict(make_state_dict(), tmp_path, max_shard_size=1100)
    (tmp_path / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(ValueError, match=r"shard 'model-00003-of-00004\.safetensors' .* is missing"):
        load_state_dict(tmp_path)


def test_tensor_missing_from_its_shard(tmp_path):
    save_state_dict(make_state_dict(), tmp_path, max_shard_size=1100)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00004.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model-00001-of-00004\.safetensors lacks .*ghost\.weight"):
        load_state_dict(tmp_path)


def test_bad_index_json(tmp_path):
    save_state_dict(make_state_dict(), tmp_path, max_shard_size=1100)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {')
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json is not valid JSON"):
        load_state_dict(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json has no 'weight_map'"):
        load_state_dict(tmp_path)


def test_missing_directory_or_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_dict(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no weights .*expected model\.safetensors"):
        load_state_dict(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match="only safetensors is supported"):
        load_state_dict(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# compatibility with transformers


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def tiny_hf_model(transformers, tie=False):
    torch.manual_seed(0)
    cfg = transformers.DiffLlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie,
    )
    return transformers.DiffLlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_transformers_loads_our_files(tmp_path, transformers, tie):
    model = tiny_hf_model(transformers, tie)
    sd = model.state_dict()
    written = save_state_dict(
        sd, tmp_path, max_shard_size="20KB", extra_files={"config.json": model.config.to_json_string()}
    )
    assert len(written) >= 4  # >= 2 shards, the index, config.json
    loaded = transformers.DiffLlamaForCausalLM.from_pretrained(tmp_path)
    loaded_sd = loaded.state_dict()
    assert set(loaded_sd) == set(sd)
    for name, tensor in sd.items():
        assert torch.equal(loaded_sd[name], tensor), name


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_we_load_transformers_files(tmp_path, transformers, tie):
    model = tiny_hf_model(transformers, tie)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    sd = model.state_dict()
    loaded = load_state_dict(tmp_path)
    expected = set(sd) - ({"lm_head.weight"} if tie else set())  # transformers leaves tied weights out
    assert set(loaded) == expected
    for name in expected:
        assert torch.equal(loaded[name], sd[name]), name


# ----------------------------------------------------------------------------------------------------------------
# resolve_checkpoint_dir (offline only: the hub cache is a temp folder, network use is refused)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A fresh offline HF cache; every snapshot_download call made must be cache-only."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the environment at import: point its constants at the temp cache too.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    real = huggingface_hub.snapshot_download
    calls = []

    def cache_only(*args, **kwargs):
        calls.append(kwargs)
        assert kwargs.get("local_files_only") is True, "resolve_checkpoint_dir went to the network"
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cache_only)
    return cache, calls


def fake_cached_repo(cache: Path, repo_id: str, refs: dict[str, str]) -> dict[str, Path]:
    """The layout huggingface_hub's cache uses: models--org--name/refs/<branch> (a commit hash, no newline) and
    models--org--name/snapshots/<commit>/<files> (real caches link these into blobs/; plain files read the same)."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshots = {}
    for ref, commit in refs.items():
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
        snap = repo_dir / "snapshots" / commit
        save_state_dict(
            {"w": torch.full((3,), float(len(snapshots)))}, snap, extra_files={"config.json": '{"x": 1}'}
        )
        snapshots[ref] = snap
    return snapshots


def test_resolve_local_directory(tmp_path):
    assert resolve_checkpoint_dir(tmp_path) == tmp_path
    assert resolve_checkpoint_dir(str(tmp_path)) == tmp_path


def test_resolve_cached_repo_offline(hub_cache):
    cache, calls = hub_cache
    snaps = fake_cached_repo(cache, "some-org/tiny-diffllama", {"main": COMMIT, "v1": OTHER_COMMIT})
    resolved = resolve_checkpoint_dir("some-org/tiny-diffllama")
    assert resolved == snaps["main"]
    assert torch.equal(load_state_dict(resolved)["w"], torch.zeros(3))
    assert resolve_checkpoint_dir("some-org/tiny-diffllama", revision="v1") == snaps["v1"]
    assert resolve_checkpoint_dir("some-org/tiny-diffllama", revision=OTHER_COMMIT) == snaps["v1"]
    assert calls and all(c.get("local_files_only") for c in calls)


def test_resolve_cached_repo_without_namespace(hub_cache):
    cache, _ = hub_cache
    snaps = fake_cached_repo(cache, "tiny-model", {"main": COMMIT})
    assert resolve_checkpoint_dir("tiny-model") == snaps["main"]


def test_resolve_uncached_repo_offline(hub_cache):
    with pytest.raises(FileNotFoundError, match=r"'org/not-cached' is neither a local directory .*HF_HUB_OFFLINE"):
        resolve_checkpoint_dir("org/not-cached")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_checkpoint_dir("org/not-cached", revision="v2")


def test_unreachable_repo_error_is_one_line(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):  # the hub's own messages span several lines
        raise OSError("Got: ConnectError\nAn error happened while trying to locate the files on the Hub.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(FileNotFoundError) as caught:
        resolve_checkpoint_dir("org/unreachable")
    message = str(caught.value)
    assert "could not be downloaded" in message and "\n" not in message
    assert message.endswith("OSError: Got: ConnectError An error happened while trying to locate the files on the Hub.)")


def test_from_pretrained_passes_revision_and_local_files_only_to_the_hub(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def not_cached(**kwargs):
        calls.append(kwargs)
        raise OSError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    from diffllama import DiffLlamaForCausalLM

    with pytest.raises(FileNotFoundError, match="local_files_only is set, so only the local cache was searched"):
        DiffLlamaForCausalLM.from_pretrained("org/model", revision="v1", local_files_only=True)
    assert [(c["revision"], c.get("local_files_only")) for c in calls] == [("v1", True)]  # no download tried
    calls.clear()
    with pytest.raises(TypeError, match="local_files_only must be a bool, got 'yes'"):
        DiffLlamaForCausalLM.from_pretrained("org/model", local_files_only="yes")
    with pytest.raises(TypeError, match="revision must be None or a str"):
        DiffLlamaForCausalLM.from_pretrained("org/model", revision=3)
    assert calls == []  # refused before the hub is asked


def test_resolve_missing_paths(tmp_path, monkeypatch, hub_cache):
    _, calls = hub_cache
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    for missing in ["./nope", str(tmp_path / "nope"), "~/surely-not-here-xyz", "a/b/c", "checkpoints/run1",
                    tmp_path / "nope", ""]:
        with pytest.raises(FileNotFoundError):
            resolve_checkpoint_dir(missing)
    with pytest.raises(FileNotFoundError, match=r"checkpoint directory './nope' does not exist"):
        resolve_checkpoint_dir("./nope")
    assert calls == []  # none of these went to the hub
    (tmp_path / "file.safetensors").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is a file"):
        resolve_checkpoint_dir(tmp_path / "file.safetensors")


def test_saving_onto_a_file_and_loading_integer_weights_are_refused(tmp_path):
    import diffllama
    from conftest import tiny_config

    from safetensors.torch import load_file, save_file

    model = diffllama.DiffLlamaForCausalLM(tiny_config())
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    for target in (blocker, blocker / "below"):
        with pytest.raises(NotADirectoryError, match=f"{str(blocker)!r} is a file, not a folder"):
            model.save_pretrained(target)
    assert blocker.read_text() == "keep me"
    model.save_pretrained(tmp_path / "ckpt")
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"].to(torch.int64)  # was cast to float silently
    save_file(weights, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"weights must be floating point, got model.norm.weight \(torch.int64\)"):
        diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path / "ckpt")
