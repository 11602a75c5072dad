import torch

from prunekit.core.statistics import InputHessian, InputNorms


def test_norms_and_hessian_match_direct_computation():
    torch.manual_seed(0)
    batches = [torch.randn(3, 5, 7) for _ in range(4)]
    norms, hessian = InputNorms(7), InputHessian(7)
    for batch in batches:
        norms.add(batch)
        hessian.add(batch)
    x = torch.cat([b.reshape(-1, 7) for b in batches])
    assert norms.rows == hessian.rows == 60
    torch.testing.assert_close(norms.norms(), x.norm(dim=0))
    torch.testing.assert_close(hessian.norms(), x.norm(dim=0))
    torch.testing.assert_close(hessian.hessian(), 2 * x.T @ x / 60)


def test_hessian_is_a_fresh_tensor():
    hessian = InputHessian(3)
    hessian.add(torch.randn(4, 3))
    h = hessian.hessian()
    h.zero_()
    assert hessian.gram.abs().sum() > 0


def test_triangular_and_symmetric_storage_agree_and_merge():
    torch.manual_seed(1)
    a, b = torch.randn(40, 9), torch.randn(30, 9)
    fast, plain = InputHessian(9), InputHessian(9)
    plain.upper_only = False
    fast.add(a)
    plain.add(a)
    torch.testing.assert_close(fast.hessian(), plain.hessian())
    other = InputHessian(9)
    other.add(b)
    fast.merge_(other)
    plain.merge_(other)
    expected = 2 * torch.cat([a, b]).T @ torch.cat([a, b]) / 70
    torch.testing.assert_close(fast.hessian(), expected)
    torch.testing.assert_close(plain.hessian(), expected)
