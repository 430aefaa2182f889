"""Token selection (SaiT/EViT), gather/scatter of kept tokens and the package token."""
import pytest
import torch

import sparse_ops
from sparse_ops import TokenIndex, reference
from conftest import assert_close_to_reference


def same_index(a: TokenIndex, b: TokenIndex):
    assert torch.equal(a.index, b.index)
    assert torch.equal(a.cu_seqlens, b.cu_seqlens)
    assert (a.max_seqlen, a.batch_size, a.seq_len) == (b.max_seqlen, b.batch_size, b.seq_len)


def check_structure(idx: TokenIndex, keep_prefix: int):
    """Per image: sorted (original order), within the image, prefix tokens kept."""
    N = idx.seq_len
    for b in range(idx.batch_size):
        rows = idx.index[idx.cu_seqlens[b] : idx.cu_seqlens[b + 1]]
        assert (rows // N == b).all()
        assert (rows[1:] > rows[:-1]).all()
        assert torch.equal(rows[:keep_prefix] % N, torch.arange(keep_prefix, device=rows.device))
    assert idx.cu_seqlens[-1] == idx.num_tokens
    assert idx.max_seqlen == (int(idx.lengths.max()) if idx.batch_size else 0)


@pytest.mark.parametrize("B,N", [(1, 197), (4, 50), (3, 2), (2, 1)])
@pytest.mark.parametrize("keep_rate", [0.25, 0.7, 1.0])
@pytest.mark.parametrize("keep_prefix", [0, 1, 2])
def test_select_tokens_by_rate(device, B, N, keep_rate, keep_prefix):
    if keep_prefix > N:
        pytest.skip("more prefix tokens than tokens")
    scores = torch.rand(B, N, device=device)
    idx = sparse_ops.select_tokens(scores, keep_rate=keep_rate, keep_prefix=keep_prefix)
    same_index(idx, reference.select_tokens(scores, keep_rate=keep_rate, keep_prefix=keep_prefix))
    check_structure(idx, keep_prefix)
    if keep_rate == 1.0:
        assert torch.equal(idx.index, torch.arange(B * N, device=device))


def test_select_tokens_rate_count():
    scores = torch.rand(2, 11)
    assert sparse_ops.select_tokens(scores, keep_rate=0.7).max_seqlen == 1 + 7  # 0.7 * 10 keeps 7
    assert sparse_ops.select_tokens(scores, keep_rate=0.01, min_keep=3).max_seqlen == 1 + 3


def test_reference_counts_as_the_op():
    """The reference keeps as many tokens as the op for every keep rate k/100 and 1..199
    candidates (a plain ceil(keep_rate * candidates) kept one more in 22 of these pairs,
    e.g. 0.28 of 25: 8 by the op, 9 by the reference)."""
    for candidates in range(1, 200):
        scores = torch.rand(1, candidates + 1)
        for k in range(1, 101):
            got = sparse_ops.select_tokens(scores, keep_rate=k / 100, min_keep=0).max_seqlen
            want = reference.select_tokens(scores, keep_rate=k / 100, min_keep=0).max_seqlen
            assert got == want, (k / 100, candidates)


def test_reference_counts_by_mass_as_the_op():
    """By mass, over masses k/50 and 1..40 candidates (images of ties, of one peak, random)."""
    for candidates in range(1, 41):
        scores = torch.rand(3, candidates + 1)
        scores[1, 1:] = 0.25  # ties
        scores[2, 1:] = 0.0
        scores[2, -1] = 1.0  # all the mass in one token
        for k in range(1, 51):
            for batch in (scores, scores[:1]):  # one image takes a path of its own
                got = sparse_ops.select_tokens(batch, mass=k / 50, min_keep=0)
                same_index(got, reference.select_tokens(batch, mass=k / 50, min_keep=0))


@pytest.mark.parametrize("mass", [0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("min_keep", [0, 1, 4])
@pytest.mark.parametrize("images", [5, 1])  # one image takes a path of its own
def test_select_tokens_by_mass(device, mass, min_keep, images):
    # Peaked scores so that images need very different counts.
    scores = torch.rand(5, 40, device=device) ** torch.tensor([1.0, 4.0, 8.0, 16.0, 0.5], device=device).view(5, 1)
    scores = scores[-images:]
    idx = sparse_ops.select_tokens(scores, mass=mass, min_keep=min_keep)
    same_index(idx, reference.select_tokens(scores, mass=mass, min_keep=min_keep))
    check_structure(idx, 1)
    lengths = idx.lengths - 1
    assert (lengths >= min_keep).all()
    if mass == 1.0:
        assert (lengths == 39).all()
    # The kept candidates hold at least `mass` of each image's candidate score mass.
    keep = idx.keep_mask()[:, 1:]
    share = (scores[:, 1:] * keep).sum(1) / scores[:, 1:].sum(1)
    assert (share >= mass - 1e-6).all()


@pytest.mark.parametrize("keep_prefix", [0, 2, 9])
def test_select_tokens_by_mass_ties_and_prefixes(device, keep_prefix):
    """Tied scores rank in token order; the prefix is kept whatever its scores (all of the
    tokens when keep_prefix is N)."""
    scores = torch.tensor([[0.5, 0.1, 0.2, 0.2, 0.0, 0.2, 0.1, 0.2, 0.3]], device=device)
    for batch in (scores, scores.expand(3, -1)):
        for mass in (0.3, 0.6, 1.0):
            idx = sparse_ops.select_tokens(batch, mass=mass, keep_prefix=keep_prefix)
            same_index(idx, reference.select_tokens(batch, mass=mass, keep_prefix=keep_prefix))
            check_structure(idx, keep_prefix)


def test_token_index_from_mask_and_back(device):
    keep = torch.rand(4, 9, device=device) < 0.5
    keep[2] = False  # an image with no kept token
    idx = TokenIndex.from_mask(keep)
    assert torch.equal(idx.keep_mask(), keep)
    assert idx.lengths.tolist() == keep.sum(1).tolist()
    assert idx.max_seqlen == int(keep.sum(1).max())


@pytest.mark.parametrize("B,N,C", [(2, 17, 8), (1, 5, 3), (3, 50, 64)])
def test_gather_scatter_tokens(device, dtype, B, N, C):
    x = torch.randn(B, N, C, device=device).to(dtype)
    idx = sparse_ops.select_tokens(torch.rand(B, N, device=device), mass=0.6)
    packed = sparse_ops.gather_tokens(x, idx)
    assert torch.equal(packed, reference.gather_tokens(x, idx))
    y = torch.randn_like(packed)
    out = sparse_ops.scatter_tokens(y, idx, x)
    assert torch.equal(out, reference.scatter_tokens(y, idx, x))
    assert torch.equal(out[~idx.keep_mask()], x[~idx.keep_mask()])


def test_gather_scatter_tokens_non_contiguous_and_empty(device):
    x = torch.randn(3, 12, 30, device=device)[:, :, 5:21]
    idx = TokenIndex.from_mask(torch.rand(3, 12, device=device) < 0.4)
    assert torch.equal(sparse_ops.gather_tokens(x, idx), reference.gather_tokens(x, idx))
    y = torch.randn(16, idx.num_tokens, device=device).t()
    assert torch.equal(sparse_ops.scatter_tokens(y, idx, x), reference.scatter_tokens(y, idx, x))
    none = TokenIndex.from_mask(torch.zeros(3, 12, dtype=torch.bool, device=device))
    assert sparse_ops.gather_tokens(x, none).shape == (0, 16)
    assert torch.equal(sparse_ops.scatter_tokens(x.new_zeros(0, 16), none, x), x)


@pytest.mark.parametrize("keep_rate", [0.3, 1.0])
def test_package_tokens(device, dtype, keep_rate):
    B, N, C = 3, 30, 16
    x = torch.randn(B, N, C, device=device).to(dtype)
    scores = torch.rand(B, N, device=device)
    idx = sparse_ops.select_tokens(scores, keep_rate=keep_rate)
    out = sparse_ops.package_tokens(x, scores, idx)
    assert out.shape == (B, C) and out.dtype == dtype
    expected = reference.package_tokens(x.double(), scores.double(), idx)
    assert_close_to_reference(out, reference.package_tokens(x, scores, idx), expected, atol=1e-5)
    if keep_rate == 1.0:
        assert (out == 0).all()


@pytest.mark.parametrize("path", ["public", "reference"])
def test_token_ops_gradcheck(device, path):
    ops = sparse_ops if path == "public" else reference
    x = torch.randn(2, 7, 3, device=device, dtype=torch.float64, requires_grad=True)
    scores = torch.rand(2, 7, device=device, dtype=torch.float64, requires_grad=True)
    idx = sparse_ops.select_tokens(scores.detach(), mass=0.5)
    y = torch.randn(idx.num_tokens, 3, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.gather_tokens(t, idx), (x,))
    assert torch.autograd.gradcheck(lambda a, b: ops.scatter_tokens(a, idx, b), (y, x))
    assert torch.autograd.gradcheck(lambda a, s: ops.package_tokens(a, s, idx), (x, scores))
