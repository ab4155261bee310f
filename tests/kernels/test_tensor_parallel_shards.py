"""What one tensor-parallel rank of N computes for each projection group, against the unsharded projection: a
column-parallel group (q/k/v, gate/up) thresholds the whole input and makes its slice of the outputs; a row-parallel
group (o, down) thresholds its slice of the input with its slice of the thresholds (`ProjectionGroup.rank_thresholds`)
and its partial outputs sum, in the all-reduce, to the unsharded result. Through `threshold_linear`, the op the
engine runs: the Triton kernel on a GPU (or under TRITON_INTERPRET=1), the reference elsewhere."""

import pytest
import torch

from thresher.families import LLAMA_LAYOUT
from thresher.kernels.dispatch import threshold_linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the Triton kernels take bf16; off CUDA float32 keeps the only difference the partial sums' order
DTYPE, TOLERANCE = (torch.bfloat16, 1e-2) if DEVICE == "cuda" else (torch.float32, 1e-5)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("group", LLAMA_LAYOUT, ids=lambda g: g.name)
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("in_features", [256, 4096])
def test_a_ranks_share_is_its_slice_of_the_unsharded_projection(group, world, rows, in_features):
    torch.manual_seed(0)
    out_features = 192
    x = torch.randn(rows, in_features, device=DEVICE, dtype=DTYPE)
    weight = torch.randn(out_features, in_features, device=DEVICE, dtype=DTYPE) / 16
    thresholds = torch.stack([torch.zeros(in_features), torch.rand(in_features)]).to(DEVICE)  # level 0 and a sparse one
    levels = torch.tensor([1, 0, 1, 1][:rows], device=DEVICE)
    whole = threshold_linear(x, weight.t().contiguous().t(), thresholds, levels)
    parts = []
    for rank in range(world):
        table = group.rank_thresholds(thresholds, rank, world)
        if group.sharded:
            columns = slice(rank * in_features // world, (rank + 1) * in_features // world)
            shard = weight[:, columns]
            parts.append(threshold_linear(x[:, columns].contiguous(), shard.t().contiguous().t(), table, levels))
        else:
            shard = weight.chunk(world, dim=0)[rank]
            parts.append(threshold_linear(x, shard.t().contiguous().t(), table, levels))
    merged = sum(parts) if group.sharded else torch.cat(parts, dim=1)
    torch.testing.assert_close(merged, whole, rtol=TOLERANCE, atol=TOLERANCE)
    assert not torch.equal(threshold_linear(x, weight, thresholds, torch.zeros_like(levels)), whole)  # a level bites
