import json
import threading

import pytest

from rlhf_loop.core.policy_store import PolicyStore, VerificationError


def _save(payload: bytes):
    def save(d):
        (d / "model.safetensors").write_bytes(payload)
        (d / "config.json").write_text(json.dumps({"x": 1}))
    return save


def test_write_verify_and_latest(tmp_path):
    store = PolicyStore(tmp_path)
    assert store.latest() is None and store.versions() == []
    m = store.write(0, _save(b"w0"), parent_version=None)
    assert set(m.files) == {"model.safetensors", "config.json"}
    store.write(1, _save(b"w1"), parent_version=0, metrics={"kl": 0.01})
    assert store.latest() == 1 and store.versions() == [0, 1]
    assert store.verify(1).metrics == {"kl": 0.01}
    assert not list(store.tmp_dir.iterdir())  # staging cleaned by the rename
    with pytest.raises(FileExistsError):
        store.write(1, _save(b"again"), parent_version=0)


def test_tampered_or_incomplete_versions_do_not_verify(tmp_path):
    store = PolicyStore(tmp_path)
    store.write(0, _save(b"w0"), parent_version=None)
    (store.path(0) / "model.safetensors").write_bytes(b"evil")
    with pytest.raises(VerificationError, match="sha256 mismatch"):
        store.verify(0)
    store.write(1, _save(b"w1"), parent_version=0)
    (store.path(1) / "extra.json").write_text("{}")
    with pytest.raises(VerificationError, match="not as in manifest"):
        store.verify(1)
    store.write(2, _save(b"w2"), parent_version=1)
    (store.path(2) / "manifest.json").unlink()
    with pytest.raises(VerificationError, match="unreadable manifest"):
        store.verify(2)


def test_a_failed_save_leaves_nothing_behind(tmp_path):
    store = PolicyStore(tmp_path)

    def boom(d):
        (d / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        store.write(0, boom, parent_version=None)
    assert store.versions() == [] and store.latest() is None and not list(store.tmp_dir.iterdir())


def test_pickles_are_refused(tmp_path):
    store = PolicyStore(tmp_path)
    with pytest.raises(ValueError, match="pickled"):
        store.write(0, lambda d: (d / "pytorch_model.bin").write_bytes(b"x"), parent_version=None)


def test_concurrent_writers_of_one_version_yield_one_complete_version(tmp_path):
    store = PolicyStore(tmp_path)
    results = []

    def writer(i):
        try:
            store.write(0, _save(f"w{i}".encode()), parent_version=None)
            results.append("ok")
        except FileExistsError:
            results.append("exists")
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 1 and results.count("exists") == 3
    store.verify(0)


def test_clean_tmp_removes_only_stale_staging(tmp_path):
    import os
    import time

    store = PolicyStore(tmp_path)
    store.tmp_dir.mkdir(parents=True)
    stale, live = store.tmp_dir / "v000001.dead", store.tmp_dir / "v000002.writing"
    stale.mkdir()
    live.mkdir()
    old = time.time() - 7200
    os.utime(stale, (old, old))
    store.clean_tmp(older_than_s=3600)
    assert not stale.exists() and live.exists()


def test_an_adapter_version_verifies_its_base_too(tmp_path):
    store = PolicyStore(tmp_path)
    store.write(0, _save(b"base"), parent_version=None)

    def adapter(d):
        (d / "adapter_model.safetensors").write_bytes(b"lora")
        (d / "adapter_config.json").write_text("{}")

    m = store.write(1, adapter, parent_version=0, base_version=0)
    assert m.base_version == 0 and len(m.base_sha256) == 64
    assert store.verify(1).base_version == 0
    assert store.info()[1]["base_version"] == 0
    with pytest.raises(ValueError, match="adapter itself"):
        store.write(2, adapter, parent_version=1, base_version=1)
    (store.path(0) / "model.safetensors").write_bytes(b"swapped base")  # the adapter's base changed under it
    with pytest.raises(VerificationError, match="its base version 0: sha256 mismatch"):
        store.verify(1)


def test_an_adapter_refuses_a_rewritten_base(tmp_path):
    store = PolicyStore(tmp_path)
    store.write(0, _save(b"base"), parent_version=None)
    store.write(1, lambda d: (d / "adapter_model.safetensors").write_bytes(b"lora"), parent_version=0, base_version=0)
    # a different but self-consistent base under the same number (e.g. a store rebuilt from another model)
    import shutil
    shutil.rmtree(store.path(0))
    store.write(0, _save(b"another base"), parent_version=None)
    with pytest.raises(VerificationError, match="not the one it was trained on"):
        store.verify(1)


def test_a_store_made_from_another_model_is_refused_naming_both_and_a_new_lineage_sets_it_aside(tmp_path):
    from rlhf_loop.core.policy_store import LineageMismatch

    store = PolicyStore(tmp_path)
    store.write(0, _save(b"tiny"), parent_version=None, source="tiny-chat")
    store.write(1, _save(b"tuned"), parent_version=0)
    store.check_source("tiny-chat", new_lineage=False)  # the same model: nothing to say
    with pytest.raises(LineageMismatch) as e:
        store.check_source("/models/smollm2", new_lineage=False)
    message = str(e.value)
    assert "tiny-chat" in message and "/models/smollm2" in message and "\n" not in message
    assert "RLHF_STATE_DIR" in message and "RLHF_NEW_LINEAGE" in message  # the ways out
    assert store.latest() == 1 and store.versions() == [0, 1]  # refused: nothing moved

    store.check_source("/models/smollm2", new_lineage=True)
    assert store.latest() is None and store.versions() == []  # the store starts again, empty
    aside = PolicyStore(tmp_path / "lineages" / "0")
    assert aside.versions() == [0, 1] and aside.latest() == 1 and aside.source() == "tiny-chat"


def test_a_store_older_than_the_record_is_accepted(tmp_path):
    store = PolicyStore(tmp_path)
    store.write(0, _save(b"w0"), parent_version=None)  # no source: written before stores recorded it
    store.check_source("anything", new_lineage=False)
    assert store.latest() == 0
