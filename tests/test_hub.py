"""models/hub.py (``resolve_checkpoint``) against a hub cache laid out the way huggingface_hub lays it out:

  <cache>/models--owner--name/refs/<branch or tag>      the commit hash, no newline
  <cache>/models--owner--name/snapshots/<commit>/<file>  relative symlink to ../../blobs/<etag>
  <cache>/models--owner--name/blobs/<etag>               the bytes
  <cache>/models--owner--name/trees/<commit>.json        the repo's file listing (marks a snapshot complete)

The weights in the cache are a synthetic checkpoint (models.synthetic.write_synthetic_checkpoint). No
test reaches the network: offline mode is on, every socket connect raises, and the "online" paths run
the real ``snapshot_download`` with its hub calls (``HfApi.repo_info``) replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors import safe_open

import models.hub as hub
from models.hf_reader import CheckpointError, CheckpointReader
from models.hub import ALLOW_PATTERNS, parse_repo_spec, resolve_checkpoint
from models.synthetic import write_synthetic_checkpoint

REPO = "unsloth/llama-debug-bnb-4bit"
COMMIT_A = "a" * 40
COMMIT_B = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Offline, and any connection attempt fails the test loudly (RuntimeError is no network error that
    huggingface_hub would swallow and fall back from)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.delenv("RANK", raising=False)

    def refuse(*args, **kwargs):
        raise RuntimeError(f"a test tried to reach the network: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(hub, "_POLL_S", 0.05)


def _online(monkeypatch, repo_info):
    """The hub "reachable": offline mode off, ``HfApi.repo_info`` replaced by ``repo_info``."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)


def _http_error(cls, status, url="https://huggingface.co/api/models/" + REPO):
    response = httpx.Response(status, request=httpx.Request("GET", url))
    return cls(f"{status} Client Error for url {url}", response=response)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return write_synthetic_checkpoint(
        tmp_path_factory.mktemp("src") / "ckpt", shape="debug", quant_type="nf4", device="cpu", max_shard_bytes=1 << 20
    )


def lay_out_cache(cache: Path, repo: str, src: Path, commit: str, refs=("main",), tree=True, skip=()) -> Path:
    """``src``'s files as huggingface_hub caches repo ``repo`` at ``commit``; returns the snapshot folder.
    ``tree``: also the cached file listing; ``skip``: files listed there but not downloaded."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    listing = {}
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        etag = hashlib.sha256(data).hexdigest() if f.suffix == ".safetensors" else hashlib.sha1(data).hexdigest()
        listing[f.name] = {"size": len(data), "blob_id": hashlib.sha1(data).hexdigest()}
        if f.name in skip:
            continue
        (storage / "blobs" / etag).write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.join("..", "..", "blobs", etag))
    if tree:
        (storage / "trees").mkdir(exist_ok=True)
        (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def cache(tmp_path, synthetic) -> Path:
    root = tmp_path / "hub"
    lay_out_cache(root, REPO, synthetic, COMMIT_B)
    return root


def _same_checkpoint(path: Path, src: Path):
    reader = CheckpointReader(path)
    assert reader.prequantized and reader.quant_scheme() == ("nf4", 64)
    key = "model.layers.1.mlp.down_proj.weight"
    fname = reader.weight_map[key]
    assert (path / fname).is_symlink()
    with safe_open(str(src / fname), "pt") as f:
        assert torch.equal(reader.read(key), f.get_tensor(key))
    s = reader.shape
    rows = reader.rows_4bit("model.layers.1.mlp.down_proj", s.hidden_size, s.intermediate_size, 3, 9)
    assert rows.packed.shape == (6, s.intermediate_size // 2)


# -------------------------------------------------------------------------------------------------- resolving


def test_repo_id_resolves_to_cached_snapshot(cache, synthetic):
    path = resolve_checkpoint(REPO, is_main=True, cache_dir=str(cache))
    assert path == cache / "models--unsloth--llama-debug-bnb-4bit" / "snapshots" / COMMIT_B
    _same_checkpoint(path, synthetic)


def test_non_main_rank_resolves_the_same_snapshot_after_the_barrier(cache, synthetic):
    calls = []
    path = resolve_checkpoint(REPO, is_main=False, barrier=lambda: calls.append("barrier"), cache_dir=str(cache))
    assert calls == ["barrier"]
    assert path == resolve_checkpoint(REPO, is_main=True, cache_dir=str(cache))
    _same_checkpoint(path, synthetic)


def test_offline_env_set_after_import_keeps_the_hub_untouched(cache, monkeypatch):
    """HF_HUB_OFFLINE set in the environment after huggingface_hub read it at import still holds."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as if imported before the variable was set

    def repo_info(*args, **kwargs):
        raise AssertionError("the hub was asked although HF_HUB_OFFLINE=1")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    assert resolve_checkpoint(REPO, is_main=True, cache_dir=str(cache)).name == COMMIT_B


def test_local_directory_passes_through(synthetic, monkeypatch):
    def snapshot_download(*args, **kwargs):
        raise AssertionError("a local directory must not go to the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    for spec in (str(synthetic), synthetic):
        assert resolve_checkpoint(str(spec), is_main=True) == synthetic
        assert resolve_checkpoint(str(spec), is_main=False, barrier=lambda: None, timeout_s=0.01) == synthetic


def test_local_directory_named_like_a_repo_id_wins(tmp_path, synthetic, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").symlink_to(synthetic)
    assert resolve_checkpoint("owner/name", is_main=True) == Path("owner/name")


@pytest.mark.parametrize("spec", ["{tmp}/no_such_checkpoint", "./runs/ckpt", "runs/a/b", "ckpt", "~/no/such/ckpt"])
def test_missing_local_path_that_is_no_repo_id(tmp_path, spec):
    spec = spec.format(tmp=tmp_path)
    with pytest.raises(CheckpointError, match="does not exist") as e:
        resolve_checkpoint(spec, is_main=True)
    msg = str(e.value)
    assert str(Path(spec).expanduser()) in msg and "[model] checkpoint" in msg, msg
    with pytest.raises(CheckpointError) as e2:
        CheckpointReader(Path(spec).expanduser())
    assert str(e2.value) == msg  # the reader's own message


def test_revision_pin(tmp_path, synthetic):
    cache = tmp_path / "hub"
    lay_out_cache(cache, REPO, synthetic, COMMIT_A, refs=("v1",))
    lay_out_cache(cache, REPO, synthetic, COMMIT_B, refs=("main",))
    snapshots = cache / "models--unsloth--llama-debug-bnb-4bit" / "snapshots"
    assert resolve_checkpoint(REPO, is_main=True, cache_dir=str(cache)) == snapshots / COMMIT_B
    assert resolve_checkpoint(f"{REPO}@main", is_main=True, cache_dir=str(cache)) == snapshots / COMMIT_B
    assert resolve_checkpoint(f"{REPO}@v1", is_main=True, cache_dir=str(cache)) == snapshots / COMMIT_A
    assert resolve_checkpoint(f"{REPO}@{COMMIT_A}", is_main=False, cache_dir=str(cache)) == snapshots / COMMIT_A
    with pytest.raises(CheckpointError, match="not in the local cache") as e:
        resolve_checkpoint(f"{REPO}@v2", is_main=True, cache_dir=str(cache))
    assert f"{REPO}@v2" in str(e.value) and "--revision v2" in str(e.value)


def test_parse_repo_spec():
    assert parse_repo_spec("owner/name") == ("owner/name", None)
    assert parse_repo_spec("unsloth/Llama-3.2-1B-bnb-4bit@main") == ("unsloth/Llama-3.2-1B-bnb-4bit", "main")
    assert parse_repo_spec(f"a/b@{COMMIT_A}") == ("a/b", COMMIT_A)
    assert parse_repo_spec("a/b@refs/pr/1") == ("a/b", "refs/pr/1")
    for spec in ("/abs/path", "./rel/x", "../x/y", "~/x", "a/b/c", "name", "a--b/c", "a/b@", "a/b c", ""):
        assert parse_repo_spec(spec) is None, spec


# -------------------------------------------------------------------------------------------------- errors


def test_uncached_repo_offline(tmp_path):
    cache = tmp_path / "hub"
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("nobody/missing-model", is_main=True, cache_dir=str(cache))
    msg = str(e.value)
    assert "nobody/missing-model is not in the local cache" in msg, msg
    assert str(cache / "models--nobody--missing-model") in msg and "HF_HUB_OFFLINE=1" in msg, msg
    assert "hf download nobody/missing-model" in msg and "local directory" in msg, msg
    # a non-main rank offline knows that nothing will arrive: the same message at once, no waiting
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match="not in the local cache"):
        resolve_checkpoint("nobody/missing-model", is_main=False, cache_dir=str(cache), timeout_s=60)
    assert time.monotonic() - t0 < 10


def test_incomplete_cached_snapshot(tmp_path, synthetic):
    cache = tmp_path / "hub"
    shard = sorted(p.name for p in synthetic.glob("*.safetensors"))[-1]
    lay_out_cache(cache, REPO, synthetic, COMMIT_B, skip={shard})
    with pytest.raises(CheckpointError, match="incomplete") as e:
        resolve_checkpoint(REPO, is_main=True, cache_dir=str(cache))
    assert shard in str(e.value) and "hf download" in str(e.value)


def test_snapshot_without_safetensors(tmp_path, synthetic):
    src = tmp_path / "bin_repo"
    src.mkdir()
    (src / "config.json").write_bytes((synthetic / "config.json").read_bytes())
    (src / "pytorch_model.bin").write_bytes(b"\0" * 16)  # not in the allow patterns: never downloaded
    cache = tmp_path / "hub"
    lay_out_cache(cache, REPO, src, COMMIT_B, tree=False, skip={"pytorch_model.bin"})
    with pytest.raises(CheckpointError, match="safetensors") as e:
        resolve_checkpoint(REPO, is_main=True, cache_dir=str(cache))
    assert REPO in str(e.value)


def test_non_main_rank_timeout_names_the_repo(tmp_path, monkeypatch):
    """The main rank never delivers (its download failed): a non-main rank stops with a message that
    names the repo and what it waited for, without any process group."""
    _online(monkeypatch, repo_info=None)  # online: the main rank might still be downloading
    monkeypatch.setenv("RANK", "1")
    barrier_calls = []
    t0 = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(
            f"{REPO}@v1",
            is_main=False,
            barrier=lambda: barrier_calls.append(1),
            cache_dir=str(tmp_path / "hub"),
            timeout_s=0.3,
        )
    assert 0.3 <= time.monotonic() - t0 < 10
    msg = str(e.value)
    assert "rank 1 waited" in msg and f"{REPO}@v1" in msg and "rank 0" in msg and "network" in msg, msg
    assert barrier_calls == []  # nobody would come to it


def test_non_main_rank_waits_for_the_main_download(tmp_path, synthetic, monkeypatch):
    """The snapshot appears while a non-main rank polls (the main rank downloading): it is taken once
    complete, never half-written."""
    _online(monkeypatch, repo_info=None)
    cache = tmp_path / "hub"
    shard = sorted(p.name for p in synthetic.glob("*.safetensors"))[-1]
    storage = cache / "models--unsloth--llama-debug-bnb-4bit"

    def download():
        time.sleep(0.3)
        lay_out_cache(cache, REPO, synthetic, COMMIT_B, skip={shard})  # files arriving one by one
        time.sleep(0.3)
        blob = storage / "blobs" / hashlib.sha256((synthetic / shard).read_bytes()).hexdigest()
        blob.write_bytes((synthetic / shard).read_bytes())
        (storage / "snapshots" / COMMIT_B / shard).symlink_to(os.path.join("..", "..", "blobs", blob.name))

    thread = threading.Thread(target=download)
    thread.start()
    try:
        path = resolve_checkpoint(REPO, is_main=False, cache_dir=str(cache), timeout_s=30)
    finally:
        thread.join()
    assert (path / shard).is_file()
    _same_checkpoint(path, synthetic)


# -------------------------------------------------------------------------------------------------- "online"


def test_main_rank_downloads_once_with_the_recipe_files(tmp_path, synthetic, monkeypatch):
    _online(monkeypatch, repo_info=None)
    calls, order = [], []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        order.append("download")
        snapshot = tmp_path / "hub" / "models--unsloth--llama-debug-bnb-4bit" / "snapshots" / COMMIT_B
        if not snapshot.exists():
            lay_out_cache(tmp_path / "hub", REPO, synthetic, COMMIT_B)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    path = resolve_checkpoint(
        f"{REPO}@v1",
        is_main=True,
        barrier=lambda: order.append("barrier"),
        cache_dir=str(tmp_path / "hub"),
        token="hf_test",
    )
    assert order == ["download", "barrier"]  # the others are released only after the download
    ((repo_id, kw),) = calls
    assert repo_id == REPO and kw["revision"] == "v1" and kw["cache_dir"] == str(tmp_path / "hub")
    assert kw["token"] == "hf_test" and kw["local_files_only"] is False
    for pattern in (
        "config.json",
        "*.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "chat_template.jinja",
        "generation_config.json",
    ):
        assert pattern in kw["allow_patterns"], pattern
    assert kw["allow_patterns"] == ALLOW_PATTERNS
    _same_checkpoint(path, synthetic)


def test_network_failure_falls_back_to_the_cache(cache, tmp_path, monkeypatch):
    def repo_info(*args, **kwargs):
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")

    _online(monkeypatch, repo_info)
    assert resolve_checkpoint(REPO, is_main=True, cache_dir=str(cache)).name == COMMIT_B
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("nobody/missing-model", is_main=True, cache_dir=str(tmp_path / "empty"))
    msg = str(e.value)
    assert "not in the local cache" in msg and "cannot be reached" in msg and "ConnectError" in msg, msg
    assert "hf download nobody/missing-model" in msg, msg


@pytest.mark.parametrize("token", [None, "hf_test"])
def test_gated_repo(tmp_path, monkeypatch, token):
    def repo_info(*args, **kwargs):
        raise _http_error(GatedRepoError, 401 if token is None else 403)

    _online(monkeypatch, repo_info)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(CheckpointError, match="gated") as e:
        resolve_checkpoint(REPO, is_main=True, cache_dir=str(tmp_path / "hub"), token=token)
    msg = str(e.value)
    assert REPO in msg and f"https://huggingface.co/{REPO}" in msg, msg
    if token is None:
        assert "set HF_TOKEN or run `hf auth login`" in msg and "huggingface-cli login" in msg, msg
    else:
        assert "token in use" in msg, msg


def test_private_or_missing_repo(tmp_path, monkeypatch):
    def repo_info(*args, **kwargs):
        raise _http_error(RepositoryNotFoundError, 401)

    _online(monkeypatch, repo_info)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("someone/privat-or-typo", is_main=True, cache_dir=str(tmp_path / "hub"))
    msg = str(e.value)
    assert "someone/privat-or-typo does not exist, or it is private" in msg and "no token is set" in msg, msg
    assert "set HF_TOKEN or run `hf auth login`" in msg, msg


def test_unknown_revision(tmp_path, monkeypatch):
    def repo_info(*args, **kwargs):
        raise _http_error(RevisionNotFoundError, 404)

    _online(monkeypatch, repo_info)
    with pytest.raises(CheckpointError, match="has no revision 'v9'") as e:
        resolve_checkpoint(f"{REPO}@v9", is_main=True, cache_dir=str(tmp_path / "hub"))
    assert REPO in str(e.value)


def test_hub_error_uses_a_complete_cached_snapshot(cache, monkeypatch):
    """A gated/private answer (no token on this machine) still lets a complete cached snapshot serve."""

    def repo_info(*args, **kwargs):
        raise _http_error(GatedRepoError, 401)

    _online(monkeypatch, repo_info)
    assert resolve_checkpoint(REPO, is_main=True, cache_dir=str(cache)).name == COMMIT_B


@pytest.mark.parametrize("tree", [True, False], ids=["tree_cached", "no_tree"])
def test_pinned_commit_with_the_network_down_uses_the_cache(tmp_path, synthetic, monkeypatch, tree):
    """A commit-hash revision skips the repo lookup that snapshot_download falls back from: without a
    cached file listing it asks the hub for one, and that connection error must still end on the
    complete cached snapshot."""
    cache = tmp_path / "hub"
    lay_out_cache(cache, REPO, synthetic, COMMIT_B, tree=tree)
    listed = []

    def down(*args, **kwargs):
        listed.append(1)
        raise httpx.ConnectError("[Errno 101] Network is unreachable")

    _online(monkeypatch, down)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", down)
    assert resolve_checkpoint(f"{REPO}@{COMMIT_B}", is_main=True, cache_dir=str(cache)).name == COMMIT_B
    assert bool(listed) == (not tree)


# -------------------------------------------------------------------------------------------------- end to end


def test_trainer_trains_from_a_cached_repo_id(cache, synthetic, tmp_path, monkeypatch):
    """``model.checkpoint = owner/name`` through the training entry point: the snapshot in the hub cache
    is what the model is built from (offline), and it trains the same as from the local directory."""
    from recipe.config import load_config
    from recipe.train import Trainer

    # The rendezvous of a 1-process run connects to a local port: drop the socket guard of no_network
    # (offline mode, set again below, still keeps huggingface_hub off the network).
    monkeypatch.undo()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)

    def losses(checkpoint: str, dump: Path) -> tuple[list[float], Path]:
        cfg = load_config(
            [
                f"--model.checkpoint={checkpoint}",
                "--model.synthetic_shape=",
                "--training.device=cpu",
                "--training.mixed_precision_param=float32",
                "--training.steps=2",
                "--training.global_batch_size=2",
                "--training.micro_batch_size=2",
                "--data.seq_len=32",
                "--data.num_synthetic_samples=8",
                "--checkpoint.export_adapter=false",
                "--profiling.memory_report=false",
                f"--job.dump_folder={dump}",
            ]
        )
        import recipe.train

        keep = recipe.train.destroy
        recipe.train.destroy = lambda: None  # one process group for both runs of this test
        tr = Trainer(cfg)
        try:
            return [tr.train_step().loss for _ in range(2)], Path(tr.reader.path)
        finally:
            tr.close()
            recipe.train.destroy = keep

    try:
        from_hub, path = losses(REPO, tmp_path / "hub_run")
        from_dir, _ = losses(str(synthetic), tmp_path / "dir_run")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert path == cache / "models--unsloth--llama-debug-bnb-4bit" / "snapshots" / COMMIT_B
    assert from_hub == from_dir
