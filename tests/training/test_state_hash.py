"""`state_sha256`: the identity of a set of weights (round folders, signatures, checkpoint chains)."""

from __future__ import annotations

import torch

from aldm_fed.training.common import state_sha256


def test_hash_covers_zero_dim_tensors_and_every_byte() -> None:
    # BatchNorm keeps a 0-dim int64 counter; hashing it used to fail on the dtype view.
    base = {"net": {"bn.num_batches_tracked": torch.tensor(3), "w": torch.ones(2, 2)}}
    h = state_sha256(base)
    assert h == state_sha256({"net": {k: v.clone() for k, v in base["net"].items()}})
    assert h != state_sha256({"net": {**base["net"], "bn.num_batches_tracked": torch.tensor(4)}})
    flipped = base["net"]["w"].clone()
    flipped.view(torch.uint8)[0] ^= 1
    assert h != state_sha256({"net": {**base["net"], "w": flipped}})
