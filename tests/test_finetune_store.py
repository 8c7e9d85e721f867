"""FinetuneStore: per-account finetunes in SQLite + adapter files on disk, validated with the real
load_adapter on a tiny Gemma 3 config; account isolation, Workers AI's rules (names, limits, no
replacing assets), and crash safety (temp files, missing records, interrupted deletes, restarts)."""

from __future__ import annotations

import io
import json
import logging
import re
import sqlite3
import threading
import uuid

import pytest
import torch
from conftest import tiny_hf_config
from safetensors.torch import save_file

from gemlora.finetunes.store import ASSET_NAMES, Asset, Finetune, FinetuneError, FinetuneStore
from gemlora.lora.adapter import load_adapter
from gemlora.model.config import GemmaConfig

CONFIG, WEIGHTS = ASSET_NAMES
MODEL = "@cf/google/gemma-3-270m-it"
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture(scope="module")
def model_cfg() -> GemmaConfig:
    return GemmaConfig.from_hf(tiny_hf_config("gemma3").to_dict())


@pytest.fixture(scope="module")
def validate(model_cfg):
    return lambda folder: load_adapter(folder, model_cfg).summary()


@pytest.fixture(scope="module")
def files(model_cfg, tmp_path_factory) -> dict[str, bytes]:
    """A valid tiny PEFT adapter (q_proj of every layer, r=2), plus a wrong-shaped weights file."""
    out = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    r, h, q = 2, model_cfg.hidden_size, model_cfg.q_size

    def weights(in_features: int) -> bytes:
        tensors = {}
        for i in range(model_cfg.num_layers):
            key = f"base_model.model.model.layers.{i}.self_attn.q_proj"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_features)
            tensors[f"{key}.lora_B.weight"] = torch.randn(q, r)
        path = out / f"w{in_features}.safetensors"
        save_file(tensors, str(path))
        return path.read_bytes()

    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2, "target_modules": ["q_proj"], "bias": "none",
              "base_model_name_or_path": "google/gemma-3-270m-it"}
    return {CONFIG: json.dumps(config).encode(), WEIGHTS: weights(h), "bad_weights": weights(h // 2)}


@pytest.fixture
def make_store(tmp_path, validate):
    def make(**kw) -> FinetuneStore:
        return FinetuneStore(tmp_path / "data", validate=validate, **kw)
    return make


@pytest.fixture
def store(make_store) -> FinetuneStore:
    return make_store()


def upload_all(store: FinetuneStore, account: str, ref: str, files: dict, order=ASSET_NAMES) -> Finetune:
    for name in order:
        finetune, _ = store.put_asset(account, ref, name, files[name])
    return finetune


def error(code: int, status: int, match: str = ""):
    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(FinetuneError, match=match)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            assert (self.info.value.code, self.info.value.status) == (code, status), self.info.value
            return handled
    return Check()


def not_found():
    return error(3037, 404, "not found")


def leftovers(store: FinetuneStore) -> list[str]:
    return sorted(p.name for p in store.root.rglob("*") if p.name.startswith((".upload-", ".trash-")))


# ---- create, list, get --------------------------------------------------------------------------

def test_create_list_get_by_id_and_name(store):
    a = store.create("acct1", model=MODEL, name="my-lora_1.0", description="first")
    b = store.create("acct1", model=MODEL, name="second", public=True)
    assert uuid.UUID(a.id).version == 4 and a.id != b.id
    assert a.to_api() == {"id": a.id, "name": "my-lora_1.0", "model": MODEL, "description": "first",
                          "public": False, "created_at": a.created_at, "modified_at": a.modified_at}
    assert ISO.fullmatch(a.created_at) and ISO.fullmatch(a.modified_at)
    assert a.assets == frozenset() and not a.ready and a.summary is None and a.path.is_dir()
    assert [f.id for f in store.list("acct1")] == [a.id, b.id]      # oldest first
    assert store.get("acct1", a.id) == a == store.get("acct1", "my-lora_1.0")
    assert store.get("acct1", "second").public
    assert store.list("nobody") == []
    with not_found():
        store.get("acct1", "nope")


def test_names_unique_per_account_case_sensitive(store):
    store.create("acct1", model=MODEL, name="lora")
    with error(5006, 400, "already exists"):
        store.create("acct1", model=MODEL, name="lora")
    store.create("acct1", model=MODEL, name="LoRA")                   # case-sensitive
    other = store.create("acct2", model=MODEL, name="lora")            # same name, other account
    assert store.get("acct2", "lora").id == other.id != store.get("acct1", "lora").id


@pytest.mark.parametrize("name", ["", "x" * 65, "has space", "slash/name", "ünï", "cf-mine", "CF-public-x",
                                  "3dd75f75-8d4c-4b4a-9f57-2f0c4a1d9e11", None, 7])
def test_bad_names_refused(store, name):
    with error(5006, 400, "name"):
        store.create("acct1", model=MODEL, name=name)
    assert store.list("acct1") == []


def test_good_edge_names(store):
    for name in ("x" * 64, "a", "A.b-c_9", "cfx", "public"):
        store.create("acct1", model=MODEL, name=name)


def test_limit_per_account(make_store):
    store = make_store(max_per_account=2)
    store.create("acct1", model=MODEL, name="a")
    store.create("acct1", model=MODEL, name="b")
    with error(5006, 400, "limit of 2 finetunes"):
        store.create("acct1", model=MODEL, name="c")
    store.create("acct2", model=MODEL, name="c")                      # per account
    store.delete("acct1", "a")
    store.create("acct1", model=MODEL, name="c")


def test_limit_holds_under_concurrent_creates(make_store):
    store = make_store(max_per_account=5)
    results: list[object] = []

    def create(i: int) -> None:
        try:
            results.append(store.create("acct1", model=MODEL, name=f"n{i}"))
        except FinetuneError as exc:
            results.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(isinstance(r, Finetune) for r in results) == 5 == len(store.list("acct1"))


# ---- account isolation and public finetunes -------------------------------------------------------

def test_account_isolation(store, files):
    mine = store.create("acct1", model=MODEL, name="private")
    for ref in (mine.id, "private"):
        with not_found():
            store.get("acct2", ref)
        with not_found():
            store.put_asset("acct2", ref, CONFIG, files[CONFIG])
        with not_found():
            store.delete("acct2", ref)
    assert store.list("acct2") == [] and store.list_public() == []
    assert store.get("acct1", mine.id).assets == frozenset()          # untouched


def test_public_finetunes_readable_by_all_writable_by_owner_only(store, files):
    shared = store.create("acct1", model=MODEL, name="shared", public=True)
    store.create("acct1", model=MODEL, name="hidden")
    assert [f.id for f in store.list_public()] == [shared.id]
    assert store.get("acct2", shared.id).id == shared.id              # by id from any account
    with not_found():
        store.get("acct2", "shared")     # names are unique per account only: another's is found by id
    with not_found():
        store.put_asset("acct2", shared.id, CONFIG, files[CONFIG])
    with not_found():
        store.delete("acct2", shared.id)
    assert store.list("acct2") == []
    upload_all(store, "acct1", "shared", files)
    assert store.get("acct2", shared.id).ready


# ---- uploads --------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", [ASSET_NAMES, ASSET_NAMES[::-1]])
def test_upload_in_either_order(store, files, order):
    ft = store.create("acct1", model=MODEL, name="lora")
    first, asset = store.put_asset("acct1", "lora", order[0], io.BytesIO(files[order[0]]))
    assert first.assets == {order[0]} and not first.ready and first.summary is None
    assert isinstance(asset, Asset) and asset.finetune_id == ft.id and asset.file_name == order[0]
    assert set(asset.to_api()) == {"id", "bucket_name", "created_at", "file_name", "finetune_id", "modified_at"}
    assert ISO.fullmatch(asset.created_at)
    done, _ = store.put_asset("acct1", ft.id, order[1], files[order[1]])
    assert done.ready and done.assets == set(ASSET_NAMES)
    assert done.summary.startswith("patches 6 q_proj modules in 6 layers; rank 2")
    assert (done.path / CONFIG).read_bytes() == files[CONFIG]
    assert (done.path / WEIGHTS).read_bytes() == files[WEIGHTS]
    assert [a.file_name for a in store.get_assets("acct1", ft.id)] == list(ASSET_NAMES)
    assert leftovers(store) == []


def test_bad_file_name(store, files):
    store.create("acct1", model=MODEL, name="lora")
    for bad in ("adapter_model.bin", "config.json", "../adapter_config.json", ""):
        with error(5006, 400, "adapter_config.json or adapter_model.safetensors"):
            store.put_asset("acct1", "lora", bad, files[CONFIG])
    assert store.get("acct1", "lora").assets == frozenset()


def test_reupload_refused(store, files):
    store.create("acct1", model=MODEL, name="lora")
    store.put_asset("acct1", "lora", CONFIG, files[CONFIG])
    with error(5006, 400, "cannot be replaced; create a new finetune"):
        store.put_asset("acct1", "lora", CONFIG, files[CONFIG])
    upload_all(store, "acct1", "lora", files, order=[WEIGHTS])
    for name in ASSET_NAMES:
        with error(5006, 400, "cannot be replaced"):
            store.put_asset("acct1", "lora", name, files[name])
    assert store.get("acct1", "lora").ready


def test_too_large_refused_and_no_temp_file_left(make_store, files):
    store = make_store(max_file_bytes=len(files[WEIGHTS]))
    store.create("acct1", model=MODEL, name="lora")
    with error(3006, 413, "too large"):
        store.put_asset("acct1", "lora", WEIGHTS, io.BytesIO(files[WEIGHTS] + b"\0"))
    assert store.get("acct1", "lora").assets == frozenset() and leftovers(store) == []
    assert list(store.get("acct1", "lora").path.iterdir()) == []
    ft = upload_all(store, "acct1", "lora", files)                    # exactly at the limit is fine
    assert ft.ready


def test_corrupt_adapter_refused_on_second_file_first_kept(store, files, tmp_path):
    store.create("acct1", model=MODEL, name="lora")
    store.put_asset("acct1", "lora", CONFIG, files[CONFIG])
    with error(5006, 400, "adapter refused: .*lora_A") as info:
        store.put_asset("acct1", "lora", WEIGHTS, files["bad_weights"])
    assert str(tmp_path) not in info.value.message                   # no server paths in messages
    ft = store.get("acct1", "lora")
    assert ft.assets == {CONFIG} and not ft.ready and not (ft.path / WEIGHTS).exists()
    assert [a.file_name for a in store.get_assets("acct1", "lora")] == [CONFIG]
    ft, _ = store.put_asset("acct1", "lora", WEIGHTS, files[WEIGHTS])   # a corrected upload is accepted
    assert ft.ready


@pytest.mark.parametrize("file_name, data, match", [
    (CONFIG, b"{not json", "not valid JSON"),
    (CONFIG, b"[1, 2]", "JSON object"),
    (CONFIG, b"", "empty"),
    (WEIGHTS, b"\x00" * 100, "not a safetensors file"),
    (WEIGHTS, b"PK\x03\x04 zip of a torch.save", "pickle"),
])
def test_broken_files_refused_before_they_are_kept(store, file_name, data, match):
    store.create("acct1", model=MODEL, name="lora")
    with error(5006, 400, match):
        store.put_asset("acct1", "lora", file_name, data)
    assert store.get("acct1", "lora").assets == frozenset() and leftovers(store) == []


def test_failed_stream_leaves_nothing(store, files):
    class Broken(io.RawIOBase):
        def __init__(self):
            self.sent = False

        def read(self, n=-1):
            if self.sent:
                raise OSError("connection reset")
            self.sent = True
            return files[WEIGHTS][:100]

    store.create("acct1", model=MODEL, name="lora")
    with pytest.raises(OSError, match="connection reset"):
        store.put_asset("acct1", "lora", WEIGHTS, Broken())
    assert store.get("acct1", "lora").assets == frozenset() and leftovers(store) == []
    assert upload_all(store, "acct1", "lora", files).ready


def test_concurrent_uploads_of_one_file_one_wins(store, files):
    store.create("acct1", model=MODEL, name="lora")
    gate = threading.Event()

    class Slow(io.BytesIO):
        def read(self, n=-1):
            gate.wait(5)
            return super().read(n)

    results: list[object] = []

    def put() -> None:
        try:
            results.append(store.put_asset("acct1", "lora", CONFIG, Slow(files[CONFIG])))
        except FinetuneError as exc:
            results.append(exc)

    threads = [threading.Thread(target=put) for _ in range(4)]
    for t in threads:
        t.start()
    while sum(isinstance(r, FinetuneError) for r in results) < 3:
        threading.Event().wait(0.01)
    gate.set()
    for t in threads:
        t.join()
    assert sum(isinstance(r, tuple) for r in results) == 1
    assert all(r.code == 5006 for r in results if isinstance(r, FinetuneError))


# ---- restart and crash recovery -------------------------------------------------------------------

def test_survives_restart(make_store, files):
    store = make_store()
    a = store.create("acct1", model=MODEL, name="a", description="d", public=True)
    upload_all(store, "acct1", "a", files)
    b = store.create("acct1", model=MODEL, name="b")
    store.put_asset("acct1", "b", WEIGHTS, files[WEIGHTS])
    before = store.list("acct1")
    assets_before = store.get_assets("acct1", "a")
    again = make_store()
    assert again.list("acct1") == before
    assert again.get("acct1", "a").ready and again.get("acct1", "a").summary == before[0].summary
    assert again.get("acct1", b.id).assets == {WEIGHTS}
    assert again.get_assets("acct1", "a") == assets_before
    assert [f.id for f in again.list_public()] == [a.id]
    with error(5006, 400, "cannot be replaced"):
        again.put_asset("acct1", "b", WEIGHTS, files[WEIGHTS])
    assert again.put_asset("acct1", "b", CONFIG, files[CONFIG])[0].ready


def test_leftover_temp_file_cleaned_and_never_an_asset(make_store, files):
    store = make_store()
    ft = store.create("acct1", model=MODEL, name="lora")
    store.put_asset("acct1", "lora", CONFIG, files[CONFIG])
    half = ft.path / f".upload-{WEIGHTS}.{uuid.uuid4().hex}.tmp"   # killed mid-write
    half.write_bytes(files[WEIGHTS][:1000])
    assert store.get("acct1", "lora").assets == {CONFIG}
    store.recover()
    assert not half.exists()
    again = make_store()
    assert again.get("acct1", "lora").assets == {CONFIG} and leftovers(again) == []
    assert again.put_asset("acct1", "lora", WEIGHTS, files[WEIGHTS])[0].ready


def test_asset_without_db_record_seen_after_restart(make_store, files):
    store = make_store()
    ft = store.create("acct1", model=MODEL, name="lora")
    store.put_asset("acct1", "lora", CONFIG, files[CONFIG])
    # as if killed right after os.replace of the second file: no record, no validation
    (ft.path / WEIGHTS).write_bytes(files[WEIGHTS])
    with sqlite3.connect(store.db_path) as db:
        db.execute("DELETE FROM assets")
    again = make_store()
    got = again.get("acct1", "lora")
    assert got.assets == set(ASSET_NAMES) and got.ready and got.summary.startswith("patches 6 q_proj")
    assert [a.file_name for a in again.get_assets("acct1", "lora")] == list(ASSET_NAMES)
    with error(5006, 400, "cannot be replaced"):
        again.put_asset("acct1", "lora", WEIGHTS, files[WEIGHTS])


def test_unvalidated_bad_adapter_found_on_restart_drops_newest_file(make_store, files):
    store = make_store()
    ft = store.create("acct1", model=MODEL, name="lora")
    store.put_asset("acct1", "lora", CONFIG, files[CONFIG])
    (ft.path / WEIGHTS).write_bytes(files["bad_weights"])            # crashed before validation
    again = make_store()
    assert again.get("acct1", "lora").assets == {CONFIG}
    assert again.put_asset("acct1", "lora", WEIGHTS, files[WEIGHTS])[0].ready


@pytest.mark.timeout(60)
def test_a_stored_hostile_config_cannot_keep_the_store_from_starting(make_store, files):
    """The files an older gemlora (or a crash in the window between publishing and validating) left: a config
    whose regex never returns under Python's re. The restart validates it in bounded time, drops the file
    written last as any refusal does, and the finetune says why until a corrected file is uploaded."""
    import os
    import time
    store = make_store()
    ft = store.create("acct1", model=MODEL, name="evil")
    ok = store.create("acct1", model=MODEL, name="fine")
    upload_all(store, "acct1", "fine", files)
    evil = {**json.loads(files[CONFIG]), "target_modules": "(.*.*)*x"}
    (ft.path / CONFIG).write_text(json.dumps(evil))
    (ft.path / WEIGHTS).write_bytes(files[WEIGHTS])
    os.utime(ft.path / CONFIG, ns=(time.time_ns() + 10**9,) * 2)       # the config was written last
    start = time.process_time()
    again = make_store()
    assert time.process_time() - start < 5
    got = again.get("acct1", "evil")
    assert not got.ready and got.assets == {WEIGHTS}
    assert "refused" in got.error and "(.*.*)*x" in got.error and "matches no module" in got.error
    assert str(again.root) not in got.error                           # the server's paths stay private
    assert again.get("acct1", ok.id).ready
    fixed = again.put_asset("acct1", "evil", CONFIG, files[CONFIG])[0]
    assert fixed.ready and fixed.error is None
    assert make_store().get("acct1", "evil").error is None


def test_a_data_dir_from_before_the_error_column_still_opens(make_store, files):
    store = make_store()
    upload_all(store, "acct1", store.create("acct1", model=MODEL, name="lora").id, files)
    with sqlite3.connect(store.db_path) as db:
        db.execute("ALTER TABLE finetunes DROP COLUMN error")
    again = make_store()
    assert again.get("acct1", "lora").ready and again.get("acct1", "lora").error is None


def test_interrupted_delete_finished_on_restart(make_store, files):
    store = make_store()
    ft = store.create("acct1", model=MODEL, name="lora")
    upload_all(store, "acct1", "lora", files)
    ft.path.rename(store.root / f".trash-{ft.id}.{uuid.uuid4().hex}")  # killed after the commit point
    again = make_store()
    with not_found():
        again.get("acct1", ft.id)
    assert again.list("acct1") == [] and leftovers(again) == []
    assert again.create("acct1", model=MODEL, name="lora").id != ft.id


def test_row_without_folder_mended(make_store):
    store = make_store()
    ft = store.create("acct1", model=MODEL, name="lora")
    ft.path.rmdir()                                                    # killed between commit and mkdir
    again = make_store()
    assert again.get("acct1", "lora").path.is_dir()


# ---- delete ---------------------------------------------------------------------------------------

def test_delete_refused_while_in_use_then_allowed(store, files):
    ft = store.create("acct1", model=MODEL, name="lora")
    upload_all(store, "acct1", "lora", files)
    seen = []
    with error(5006, 400, "in use by 3 requests; retry when they finish"):
        store.delete("acct1", "lora", in_use=lambda fid: seen.append(fid) or 3)
    assert seen == [ft.id]
    with error(5006, 400, "in use"):
        store.delete("acct1", ft.id, in_use=lambda fid: True)
    assert store.get("acct1", "lora").ready
    removed = store.delete("acct1", "lora", in_use=lambda fid: False)
    assert removed.id == ft.id and removed.name == "lora"
    assert not ft.path.exists() and leftovers(store) == [] and store.list("acct1") == []
    with not_found():
        store.get("acct1", ft.id)
    with not_found():
        store.delete("acct1", ft.id)
    with sqlite3.connect(store.db_path) as db:
        assert db.execute("SELECT COUNT(*) FROM assets").fetchone() == (0,)


# ---- public_dir -----------------------------------------------------------------------------------

def test_public_dir_adapters(make_store, files, tmp_path, caplog):
    public = tmp_path / "public"
    for name, weights in (("cf-public-good", WEIGHTS), ("cf-public-other", WEIGHTS), ("broken", "bad_weights")):
        (public / name).mkdir(parents=True)
        (public / name / CONFIG).write_bytes(files[CONFIG])
        (public / name / WEIGHTS).write_bytes(files[weights])
    (public / "incomplete").mkdir()
    (public / "incomplete" / CONFIG).write_bytes(files[CONFIG])
    with caplog.at_level(logging.WARNING, logger="gemlora.finetunes.store"):
        store = make_store(public_dir=public)
    assert "broken" in caplog.text
    own = store.create("acct1", model=MODEL, name="mine", public=True)
    listed = store.list_public()
    assert [f.name for f in listed] == ["cf-public-good", "cf-public-other", "mine"]
    good = listed[0]
    assert good.id == str(uuid.uuid5(uuid.UUID("6f1c3b0e-5a3d-5c8e-9f57-2f0c4a1d9e11"), "cf-public-good"))
    assert good.account_id == "public" and good.public and good.ready and good.path == public / "cf-public-good"
    assert good.model == "google/gemma-3-270m-it" and good.summary.startswith("patches 6 q_proj")
    for account in ("acct1", "acct2"):
        assert store.get(account, "cf-public-good") == good == store.get(account, good.id)
        with not_found():
            store.put_asset(account, good.id, CONFIG, files[CONFIG])
        with not_found():
            store.delete(account, "cf-public-good")
    assert store.list("acct1") == [own]
    again = make_store(public_dir=public)
    assert [(f.id, f.name) for f in again.list_public()] == [(f.id, f.name) for f in listed]
    assert (public / "cf-public-good" / WEIGHTS).exists()
