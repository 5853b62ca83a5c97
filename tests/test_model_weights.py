"""Saving and loading weights: round trips, torch checkpoints, strict checks, corrupt files."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import pickle

import pytest
import torch

from wsi_pipeline.errors import CheckpointError
from wsi_pipeline.model import create_model, load_weights, save_weights


@functools.cache
def _pristine(seed: int):
    torch.manual_seed(seed)
    return create_model("convlm_test")


def _model(seed: int = 0):
    """A fresh copy of the seeded convlm_test (built once per seed)."""
    return copy.deepcopy(_pristine(seed))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A convlm_test saved with seed 0: (path, state dict, reference features)."""
    path = tmp_path_factory.mktemp("w") / "convlm_test.safetensors"
    model = _model(0)
    digest = save_weights(model, path)
    assert model.weights_sha256 == digest
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = model.encode_image(x)
    return path, {k: v.clone() for k, v in model.state_dict().items()}, x, feats


def test_safetensors_round_trip_with_sidecar(saved):
    path, state, x, feats = saved
    sidecar = json.loads((path.parent / (path.name + ".json")).read_text())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (
        sidecar["name"] == "convlm_test"
        and sidecar["sha256"] == digest
        and sidecar["format"] == "safetensors"
    )
    assert sidecar["cfg"]["vision_cfg"]["width"] == 64
    assert not list(path.parent.glob(".*.tmp")), "atomic write left a temp file"
    other = _model(1)
    assert not torch.equal(other.visual.pos_embed, state["visual.pos_embed"])
    assert load_weights(other, path) == digest == other.weights_sha256
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        assert torch.equal(other.encode_image(x), feats)
    via_factory = create_model("convlm_test", weights=path)
    assert via_factory.weights_sha256 == digest and not via_factory.training
    assert torch.equal(via_factory.image_projection, state["image_projection"])


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "ddp"])
def test_torch_checkpoints_and_nesting(saved, tmp_path, wrap):
    _, state, x, feats = saved
    obj = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state, "optimizer": {}},
        "ddp": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    model = _model(2)
    load_weights(model, path)
    assert model.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), feats)


def test_key_and_shape_mismatches_are_listed(saved, tmp_path):
    _, state, _, _ = saved
    broken = dict(state)
    for k in ("visual.norm.weight", "visual.norm.bias", "text.ln_final.bias"):
        del broken[k]
    broken["extra.head.weight"] = torch.zeros(2)
    broken["visual.pos_embed"] = torch.zeros(1, 5, 64)
    path = tmp_path / "broken.pt"
    torch.save(broken, path)
    with pytest.raises(CheckpointError) as ei:
        load_weights(_model(0), path)
    msg = str(ei.value)
    assert "\n" not in msg
    assert "3 missing keys" in msg and "visual.norm.weight" in msg
    assert "1 unexpected key" in msg and "extra.head.weight" in msg
    assert "1 shape mismatch" in msg and "visual.pos_embed (1, 5, 64) vs (1, 17, 64)" in msg


def test_weights_of_another_architecture_are_refused(saved):
    path, _, _, _ = saved
    demo = create_model("convlm_demo", device="meta")  # the checks run before any tensor is copied
    with pytest.raises(CheckpointError, match="saved for model convlm_test, not convlm_demo"):
        load_weights(demo, path)
    (path.parent / (path.name + ".json")).rename(path.parent / "aside.json")
    try:
        with pytest.raises(CheckpointError, match=r"shape mismatch.*…"):
            load_weights(demo, path)
    finally:
        (path.parent / "aside.json").rename(path.parent / (path.name + ".json"))


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_files_give_one_line(saved, tmp_path, fmt, keep):
    path, state, _, _ = saved
    src = tmp_path / "full.pt"
    if fmt == "torch":
        torch.save(state, src)
    else:
        src.write_bytes(path.read_bytes())
    data = src.read_bytes()
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as ei:
        load_weights(_model(0), cut)
    assert "\n" not in str(ei.value)


def test_sidecar_hash_mismatch_is_detected(saved, tmp_path):
    path, _, _, _ = saved
    copy = tmp_path / "w.safetensors"
    copy.write_bytes(path.read_bytes())
    side = json.loads((path.parent / (path.name + ".json")).read_text())
    side["sha256"] = "0" * 64
    (tmp_path / "w.safetensors.json").write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        load_weights(_model(0), copy)


class _NotATensor:
    pass


def test_unsafe_pickles_missing_and_empty_files(tmp_path):
    unsafe = tmp_path / "unsafe.pt"
    with open(unsafe, "wb") as f:
        pickle.dump({"x": _NotATensor()}, f, protocol=2)
    torch.save({"obj": _NotATensor()}, tmp_path / "unsafe2.pt")
    for p in (unsafe, tmp_path / "unsafe2.pt"):
        with pytest.raises(CheckpointError):
            load_weights(_model(0), p)
    with pytest.raises(CheckpointError, match="unsafe"):
        load_weights(_model(0), tmp_path / "unsafe2.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(_model(0), tmp_path / "nope.safetensors")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(CheckpointError):
        load_weights(_model(0), tmp_path / "empty.bin")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_weights(_model(0), tmp_path / "list.pt")
