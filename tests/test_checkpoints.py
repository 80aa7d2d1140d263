"""Checkpoints: safetensors + JSON round trips, checksums, pickle refusal, atomic replacement."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save as safetensors_bytes
from torch import nn

import aldm_fed.io
from aldm_fed.checkpoints import (
    FORMAT_VERSION,
    META_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    PickleCheckpointError,
    load_checkpoint,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    restore_rng_state,
    rng_state_to_tensors,
    save_checkpoint,
    sha256_file,
)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3)
        self.norm = nn.BatchNorm1d(2)  # buffers, incl. an int64 counter
        self.head = nn.Linear(2, 1)


def _tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


@pytest.fixture
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to unpickle during the test fails it."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle-based loading was called")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)


def _save(path: Path, model: nn.Module | None = None, **meta: object) -> Path:
    model = model or _tiny()
    groups = {
        "unet": model,
        "ema.unet": {k: v.clone() + 1 for k, v in model.state_dict().items()},
        "extra": {"bf16": torch.linspace(-3, 3, 7, dtype=torch.bfloat16), "i8": torch.arange(5, dtype=torch.int8)},
    }
    return save_checkpoint(path, groups, {"step": 7, **meta})


def test_round_trip_keeps_values_dtypes_and_metadata(tmp_path: Path, no_pickle: None) -> None:
    model = _tiny()
    cfg = OmegaConf.create({"train": {"lr": 1e-4, "max_steps": "${data.size}"}, "data": {"size": 32}})
    path = _save(tmp_path / "ckpt", model, config=cfg, scale_factor=0.87, data_hash="abc123")

    ckpt = load_checkpoint(path)
    assert set(ckpt.tensors) == {"unet", "ema.unet", "extra"}
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt.tensors["unet"][key], value) and ckpt.tensors["unet"][key].dtype == value.dtype
        assert torch.equal(ckpt.tensors["ema.unet"][key], value + 1)
    bf16 = ckpt.tensors["extra"]["bf16"]
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, torch.linspace(-3, 3, 7, dtype=torch.bfloat16))
    assert ckpt.tensors["extra"]["i8"].dtype == torch.int8
    _tiny(seed=1).load_state_dict(ckpt.tensors["unet"])  # keys load straight into a module

    meta = ckpt.meta
    assert meta["format_version"] == FORMAT_VERSION
    assert ckpt.step == 7 and ckpt.scale_factor == 0.87 and meta["data_hash"] == "abc123"
    assert ckpt.config == {"train": {"lr": 1e-4, "max_steps": 32}, "data": {"size": 32}}  # resolved, plain
    assert {"aldm_fed", "torch", "monai", "safetensors"} <= set(meta["versions"])
    assert meta["created"].endswith("+00:00")
    assert meta["weights"]["sha256"] == sha256_file(path / WEIGHTS_FILE)


def test_load_selected_groups_only(tmp_path: Path) -> None:
    path = _save(tmp_path / "ckpt")
    ckpt = load_checkpoint(path, groups=["unet"])
    assert list(ckpt.tensors) == ["unet"]
    assert "ema.unet" in ckpt.groups and not any(k.startswith("unet.") for k in ckpt.tensors["unet"])
    with pytest.raises(CheckpointError, match="no group"):
        load_checkpoint(path, groups=["vae"])


def test_tied_weights_are_saved(tmp_path: Path) -> None:
    shared = torch.ones(3)
    path = save_checkpoint(tmp_path / "c", {"m": {"a": shared, "b": shared}})
    assert torch.equal(load_checkpoint(path).tensors["m"]["b"], shared)


def test_bad_groups_and_meta_are_rejected(tmp_path: Path) -> None:
    t = {"w": torch.zeros(1)}
    with pytest.raises(ValueError, match="prefix"):
        save_checkpoint(tmp_path / "a", {"ema": t, "ema.unet": t})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "b", {"unet": t}, {"weights": 1})
    with pytest.raises(ValueError, match="not a tensor"):
        save_checkpoint(tmp_path / "c", {"unet": {"w": 1.0}})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "d", {"unet": t}, {"obj": object()})
    assert not (tmp_path / "d").exists()


def test_optimizer_state_round_trip_and_continuation(tmp_path: Path, no_pickle: None) -> None:
    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)

    def step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()

    model, opt = make()
    for i in range(3):
        step(model, opt, i)
    opt_tensors, structure = optimizer_state_to_tensors(opt)
    save_checkpoint(tmp_path / "c", {"model": model, "optim.model": opt_tensors}, {"optim": structure})

    ckpt = load_checkpoint(tmp_path / "c")
    model2 = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    model2.load_state_dict(ckpt.tensors["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    opt2.load_state_dict(optimizer_state_from_tensors(ckpt.tensors["optim.model"], ckpt.meta["optim"]))

    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]  # lr, betas (a tuple again), weight_decay, ...
    assert isinstance(b["param_groups"][0]["betas"], tuple)
    assert a["state"].keys() == b["state"].keys()
    for pid, state in a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["state"][pid][name]) and value.dtype == b["state"][pid][name].dtype
    assert float(b["state"][0]["step"]) == 3.0

    step(model, opt, 3)
    step(model2, opt2, 3)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_rng_state_round_trip(tmp_path: Path) -> None:
    tensors, structure = rng_state_to_tensors()
    assert tensors["torch"].dtype == torch.uint8
    save_checkpoint(tmp_path / "c", {"rng": tensors}, {"rng": structure})
    first = (torch.rand(3), np.random.random(3), random.random())
    ckpt = load_checkpoint(tmp_path / "c")
    restore_rng_state(ckpt.tensors["rng"], ckpt.meta["rng"])
    again = (torch.rand(3), np.random.random(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_tampered_byte_fails_checksum(tmp_path: Path) -> None:
    path = _save(tmp_path / "ckpt")
    weights = path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch") as err:
        load_checkpoint(path)
    assert str(weights) in str(err.value)


def test_truncated_and_missing_files(tmp_path: Path) -> None:
    path = _save(tmp_path / "ckpt")
    weights = path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_checkpoint(path)
    assert str(weights) in str(err.value)
    weights.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path)
    (path / META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_pickle_formats_are_refused(tmp_path: Path, no_pickle: None) -> None:
    state = _tiny().state_dict()
    pt = tmp_path / "model.pt"
    with open(pt, "wb") as fh:  # what torch.save writes (zip container); torch.save itself is patched out
        fh.write(b"PK\x03\x04" + b"\0" * 60)
    with pytest.raises(PickleCheckpointError, match="pickle") as err:
        load_checkpoint(pt)
    assert str(pt) in str(err.value)
    with pytest.raises(PickleCheckpointError):
        load_checkpoint(tmp_path / "absent.ckpt")  # refused by name, before looking at it

    raw = tmp_path / "weights"  # no telling suffix: refused by its first bytes
    raw.write_bytes(pickle.dumps({k: v.numpy() for k, v in state.items()}, protocol=2))
    with pytest.raises(PickleCheckpointError, match="pickle header"):
        load_checkpoint(raw)

    path = _save(tmp_path / "ckpt")  # a pickle dropped in under our weights name
    (path / WEIGHTS_FILE).write_bytes(b"PK\x03\x04" + b"\0" * 60)
    with pytest.raises(PickleCheckpointError):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="pickle"):
        save_checkpoint(tmp_path / "out.pth", {"m": state})


def test_safetensors_header_that_looks_like_pickle_still_loads(tmp_path: Path) -> None:
    # A 640-byte header starts 0x80 0x02, the pickle protocol-2 magic.
    meta = {"format": "aldm-fed-checkpoint/1"}  # the header save_checkpoint writes
    for n in range(1, 600):
        key = "g." + "k" * n
        if safetensors_bytes({key: torch.zeros(1)}, metadata=meta)[:2] == b"\x80\x02":
            break
    else:
        pytest.skip("no key length gives a 640-byte header")
    path = save_checkpoint(tmp_path / "c", {"g": {"k" * n: torch.zeros(1)}})
    assert (path / WEIGHTS_FILE).read_bytes()[:2] == b"\x80\x02"
    assert load_checkpoint(path).tensors["g"]["k" * n].shape == (1,)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(tmp_path / "ckpt", _tiny(seed=0))
    before = load_checkpoint(path).tensors["unet"]
    real_replace = os.replace

    def crash_on_publish(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(src).is_dir():  # the rename that would publish (or move aside) a checkpoint
            raise OSError("simulated crash before the rename")
        real_replace(src, dst)

    monkeypatch.setattr(aldm_fed.io.os, "replace", crash_on_publish)
    with pytest.raises(OSError, match="simulated crash"):
        _save(tmp_path / "ckpt", _tiny(seed=1))
    monkeypatch.undo()

    after = load_checkpoint(path).tensors["unet"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no half-written leftovers


def test_meta_json_is_plain_json(tmp_path: Path) -> None:
    path = _save(tmp_path / "ckpt", config={"p": Path("/x"), "n": np.float32(0.5)})
    doc = json.loads((path / META_FILE).read_text())
    assert doc["config"] == {"p": "/x", "n": 0.5} and doc["groups"] == ["unet", "ema.unet", "extra"]


def test_weights_file_hash_depends_on_the_tensors_only(tmp_path: Path) -> None:
    # A site re-saves the server's global weights and must get the server's sha256, whatever the
    # metadata, the key order or the process (safetensors writes its header map in hash order).
    state = {f"layer{i}.weight": torch.full((3, i + 1), float(i)) for i in range(6)}
    reordered = dict(reversed(list(state.items())))
    hashes = {
        load_checkpoint(save_checkpoint(tmp_path / f"c{i}", {"net": state if i % 2 else reordered},
                                        {"step": i, "note": "x" * i}), groups=[]).meta["weights"]["sha256"]
        for i in range(6)
    }
    assert len(hashes) == 1
    other = {**state, "layer0.weight": state["layer0.weight"] + 1}
    assert load_checkpoint(save_checkpoint(tmp_path / "d", {"net": other}), groups=[]).meta["weights"]["sha256"] not in hashes
