"""Checkpoints: round trips (both models), sharding, atomic writes, corrupt and foreign directories."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastxlstm
from fastxlstm.models.io import CheckpointError, from_pretrained, parse_size, save_pretrained
from fastxlstm.models.xlstm_large import XLSTMLarge, XLSTMLargeConfig

# the small 7B-architecture configs below are not transformers-compatible (head sizes): saving them warns
pytestmark = pytest.mark.filterwarnings("ignore::fastxlstm.models.xlstm_large_format.TransformersCompatibilityWarning")

V = 47


def large(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_heads=2, chunk_size=8,
               ffn_proj_factor=2.0, ffn_round_up_to_multiple_of=16)
    cfg.update(kw)
    m = XLSTMLarge(XLSTMLargeConfig(**cfg))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def paper(seed=0):
    from fastxlstm.models.xlstm_lm import XLSTMLM, XLSTMLMConfig
    torch.manual_seed(seed)
    m = XLSTMLM(XLSTMLMConfig(vocab_size=V, embedding_dim=32, num_blocks=3, slstm_at=(1,), chunk_size=8,
                              tie_weights=True))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.eval()


IDS = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(0))


def same_model(a, b):
    assert type(a) is type(b) and a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(a(IDS).logits, b(IDS).logits)


# --------------------------------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("factory", [large, paper], ids=["xlstm_large", "xlstm_lm"])
def test_round_trip(tmp_path, factory):
    m = factory()
    m.save_pretrained(tmp_path / "ck")
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "model.safetensors"]
    loaded = fastxlstm.from_pretrained(tmp_path / "ck")
    same_model(m, loaded)
    assert type(m).from_pretrained(tmp_path / "ck").config == m.config
    assert loaded.lm_head.weight.device.type == "cpu" and not loaded.training
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["model_type"] == m.config.model_type


def test_tied_weights_stay_tied(tmp_path):
    m = large(tie_word_embeddings=True)
    m.save_pretrained(tmp_path / "t")
    back = from_pretrained(tmp_path / "t")
    assert back.lm_head.weight is back.backbone.embeddings.weight
    same_model(m, back)
    p = paper()
    p.save_pretrained(tmp_path / "p")
    pb = from_pretrained(tmp_path / "p")
    assert pb.num_parameters() == p.num_parameters()


def test_wrong_class_from_pretrained(tmp_path):
    large().save_pretrained(tmp_path / "ck")
    from fastxlstm.models.xlstm_lm import XLSTMLM
    with pytest.raises(ValueError, match="XLSTMLarge checkpoint"):
        XLSTMLM.from_pretrained(tmp_path / "ck")


def test_sharded_round_trip(tmp_path):
    m = large()
    m.save_pretrained(tmp_path / "sh", max_shard_size="20KB")
    files = sorted(os.listdir(tmp_path / "sh"))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    index = json.loads((tmp_path / "sh" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(m.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in m.state_dict().values())
    for f in shards:
        assert os.path.getsize(tmp_path / "sh" / f) < 20_000 + 4096 or len(load_file(tmp_path / "sh" / f)) == 1
    same_model(m, from_pretrained(tmp_path / "sh"))


def test_dtype_and_device_arguments(tmp_path):
    m = large()
    m.save_pretrained(tmp_path / "ck")
    b = from_pretrained(tmp_path / "ck", dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in b.parameters())
    assert b(IDS).logits.dtype == torch.float32
    m.to(torch.bfloat16).save_pretrained(tmp_path / "bf")
    assert all(p.dtype == torch.bfloat16 for p in from_pretrained(tmp_path / "bf").parameters())
    with pytest.raises(ValueError, match="dtype"):
        from_pretrained(tmp_path / "ck", dtype=torch.int32)


def test_parse_size():
    assert parse_size("2GB") == 2 * 10 ** 9
    assert parse_size("1GiB") == 2 ** 30
    assert parse_size("500kb") == 500_000
    assert parse_size(123) == 123
    for bad in ("lots", 0, -5, "0MB", 1.5):
        with pytest.raises(ValueError):
            parse_size(bad)


# --------------------------------------------------------------------------------------------------------------
# atomicity
# --------------------------------------------------------------------------------------------------------------

def _crash_on_call(monkeypatch, n):
    """Make the n-th safetensors write fail half-way (after writing part of a file)."""
    calls = {"n": 0}

    def boom(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == n:
            with open(path, "wb") as fh:
                fh.write(b"\x00" * 10)
            raise OSError("disk full (simulated)")
        return save_file(tensors, path, metadata=metadata)
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", boom)


def test_crash_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    m = large()
    _crash_on_call(monkeypatch, 3)
    with pytest.raises(OSError, match="simulated"):
        m.save_pretrained(tmp_path / "new", max_shard_size="20KB")
    assert os.listdir(tmp_path) == []  # neither the target nor a temp dir is left


def test_crash_while_overwriting_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    old = large(seed=1)
    old.save_pretrained(tmp_path / "ck")
    (tmp_path / "ck" / "tokenizer.json").write_text("{}")
    before = {f: (tmp_path / "ck" / f).read_bytes() for f in os.listdir(tmp_path / "ck")}
    _crash_on_call(monkeypatch, 2)
    with pytest.raises(OSError, match="simulated"):
        large(seed=2).save_pretrained(tmp_path / "ck", max_shard_size="20KB")
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    after = {f: (tmp_path / "ck" / f).read_bytes() for f in os.listdir(tmp_path / "ck")}
    assert after == before
    same_model(old, from_pretrained(tmp_path / "ck"))


def test_overwrite_replaces_weights_and_keeps_foreign_files(tmp_path):
    large(seed=1).save_pretrained(tmp_path / "ck", max_shard_size="20KB")
    (tmp_path / "ck" / "tokenizer.json").write_text('{"x": 1}')
    new = large(seed=2)
    new.save_pretrained(tmp_path / "ck")  # single file now: old shards must go
    files = sorted(os.listdir(tmp_path / "ck"))
    assert files == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (tmp_path / "ck" / "tokenizer.json").read_text() == '{"x": 1}'
    same_model(new, from_pretrained(tmp_path / "ck"))
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_save_into_a_file_path_fails(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        large().save_pretrained(tmp_path / "f")


# --------------------------------------------------------------------------------------------------------------
# corrupt or foreign checkpoints: clear errors naming the file
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture()
def single(tmp_path):
    large().save_pretrained(tmp_path / "ck")
    return tmp_path / "ck"


@pytest.fixture()
def sharded(tmp_path):
    large().save_pretrained(tmp_path / "sh", max_shard_size="20KB")
    return tmp_path / "sh"


def test_bad_json(single):
    (single / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json.*JSON"):
        from_pretrained(single)


def test_missing_config_and_dir(single, tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        from_pretrained(tmp_path / "nothing")
    os.remove(single / "config.json")
    with pytest.raises(CheckpointError, match="config.json: missing"):
        from_pretrained(single)


def test_unknown_model_type_and_bad_config(single):
    cfg = json.loads((single / "config.json").read_text())
    (single / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        from_pretrained(single)
    (single / "config.json").write_text(json.dumps({**cfg, "num_heads": 3}))
    with pytest.raises(CheckpointError, match="config.json: invalid"):
        from_pretrained(single)
    (single / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        from_pretrained(single)


def test_truncated_safetensors(single):
    path = single / "model.safetensors"
    data = path.read_bytes()
    for cut in (4, 100, len(data) - 7):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="model.safetensors"):
            from_pretrained(single)


def test_garbage_safetensors(single):
    (single / "model.safetensors").write_bytes(b"\x80\x04\x95 this is a pickle, not safetensors" * 3)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_pretrained(single)


def test_missing_shard(sharded):
    shard = sorted(f for f in os.listdir(sharded) if f.startswith("model-"))[1]
    os.remove(sharded / shard)
    with pytest.raises(CheckpointError, match=shard):
        from_pretrained(sharded)


def test_index_disagrees_with_shard(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = sorted(set(index["weight_map"].values()))[-1]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="disagree"):
        from_pretrained(sharded)


def test_index_cannot_escape_the_directory(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../elsewhere.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="same directory"):
        from_pretrained(sharded)
    (sharded / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="weight_map"):
        from_pretrained(sharded)


def _rewrite(single, fn):
    sd = load_file(single / "model.safetensors")
    fn(sd)
    save_file(sd, single / "model.safetensors")


def test_missing_key(single):
    _rewrite(single, lambda sd: sd.pop("backbone.blocks.1.ffn.proj_up.weight"))
    with pytest.raises(CheckpointError, match=r"model.safetensors.*missing 1.*proj_up"):
        from_pretrained(single)


def test_extra_key(single):
    _rewrite(single, lambda sd: sd.__setitem__("backbone.blocks.9.extra", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected 1.*blocks.9.extra"):
        from_pretrained(single)


def test_wrong_shape(single):
    _rewrite(single, lambda sd: sd.__setitem__("backbone.out_norm.weight", torch.ones(31)))
    with pytest.raises(CheckpointError, match=r"out_norm.weight has shape \(31,\)"):
        from_pretrained(single)


def test_tied_copy_must_match_for_paper_model(tmp_path):
    p = paper()
    p.save_pretrained(tmp_path / "p")
    keys = list(load_file(tmp_path / "p" / "model.safetensors"))
    sd = load_file(tmp_path / "p" / "model.safetensors")
    head = [k for k in keys if "head" in k]
    if not head:
        pytest.skip("the paper model writes no separate head key")  # pragma: no cover
    sd[head[0]] = sd[head[0]] + 1
    save_file(sd, tmp_path / "p" / "model.safetensors")
    with pytest.raises(CheckpointError, match="must equal"):
        from_pretrained(tmp_path / "p")


def test_pickle_only_directory_is_refused(tmp_path):
    d = tmp_path / "pk"
    d.mkdir()
    large().save_pretrained(tmp_path / "ok")
    (d / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(CheckpointError, match="never unpickles"):
        from_pretrained(d)
    os.remove(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        from_pretrained(d)
